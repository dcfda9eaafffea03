"""TURN over TCP and over TLS on the one turn.tcp port (turn.tcp_tls), against one running
appliance whose turn.tls listener is off: coturn's turnutils_uclient (-t and -t -S) relays
with zero loss, and aioice (aiortc's TURN client) allocates and relays over TLS and TCP."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aioice.turn import create_turn_endpoint

from .conftest import start_appliance, stop_appliance
from .test_aioice import Collector, EchoPeer, wait_for_count
from .test_uclient import CLIENTS, MESSAGES, run_uclient, totals

# Outside Linux's ephemeral range (32768-60999), from which uclient's own sockets take
# their ports: a relay port never meets one of them.
RELAY_PORTS = "61000-61999"


@pytest.fixture(scope="module")
def one_port_relay(tmp_path_factory):
    running = start_appliance(
        tmp_path_factory.mktemp("one-port"),
        extra_turn={"tls": None, "tcp_tls": True, "relay_ports": RELAY_PORTS},
    )
    yield running
    code = stop_appliance(running)
    assert code == 0, f"appliance exited with {code} on SIGTERM:\n{running.log()}"


@pytest.mark.parametrize("flags", [["-t"], ["-t", "-S"]], ids=["tcp", "tls"])
def test_uclient_relays_without_loss_over_tcp_and_tls_on_the_tcp_port(one_port_relay, turn_peer, flags):
    output = run_uclient(one_port_relay, turn_peer, flags, "127.0.0.1", port=one_port_relay.port)
    sent, received, lost = totals(output)
    assert sent == MESSAGES * CLIENTS, output[-2000:]
    assert received == sent and lost == 0, output[-2000:]


@pytest.mark.parametrize("transport", ["tls", "tcp"])
async def test_aioice_allocates_and_relays_on_the_tcp_port(one_port_relay, transport):
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(EchoPeer, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    username, password = one_port_relay.credentials(f"aioice-one-port-{transport}")
    ctx = ssl.create_default_context(cafile=str(one_port_relay.cert)) if transport == "tls" else None
    turn, collector = await asyncio.wait_for(
        create_turn_endpoint(
            Collector,
            (one_port_relay.host, one_port_relay.port),
            username,
            password,
            transport="tcp",
            ssl=ctx,
        ),
        10,
    )
    try:
        relayed = turn.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1" and 61000 <= relayed[1] <= 61999
        for i in range(20):
            turn.sendto(b"msg%03d" % i, peer_addr)
            await asyncio.sleep(0.002)
        await wait_for_count(collector, 20)
        assert sorted(d for d, _ in collector.received) == [b"echo:msg%03d" % i for i in range(20)]
        assert peer.count == 20
    finally:
        turn.close()
        peer_transport.close()
        await asyncio.sleep(0.1)
