"""aioice's TURN client (the one aiortc uses) against our relay, over UDP, TCP and TLS:
allocate, permission + channel bind, data both ways, refresh, delete; and the
refusals a client must see (401 wrong password, 401 expired username, 403 denied peer)."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
from aioice import stun as aioice_stun
from aioice.turn import create_turn_endpoint

MESSAGES = 40


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple]] = []
        self.event = asyncio.Event()

    def datagram_received(self, data, addr) -> None:
        self.received.append((data, addr))
        self.event.set()


class EchoPeer(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.count = 0

    def datagram_received(self, data, addr) -> None:
        self.count += 1
        self.transport.sendto(b"echo:" + data, addr)


async def open_endpoint(relay, transport: str, username: str, password: str):
    ssl_ctx = None
    port = relay.port
    if transport == "tls":
        ssl_ctx = ssl.create_default_context(cafile=str(relay.cert))
        port = relay.tls_port
    return await create_turn_endpoint(
        Collector,
        (relay.host, port),
        username,
        password,
        transport="tcp" if transport in ("tcp", "tls") else "udp",
        ssl=ssl_ctx,
    )


def inner(turn_transport):
    return turn_transport._TurnTransport__inner_protocol


async def wait_for_count(collector: Collector, count: int, timeout: float = 5.0) -> None:
    async def loop():
        while len(collector.received) < count:
            collector.event.clear()
            await collector.event.wait()

    await asyncio.wait_for(loop(), timeout)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_aioice_relays_data_both_ways(relay, transport):
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(EchoPeer, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    username, password = relay.credentials(f"aioice-{transport}")
    turn, collector = await open_endpoint(relay, transport, username, password)
    try:
        relayed = turn.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1"
        for i in range(MESSAGES):
            turn.sendto(b"msg%03d" % i, peer_addr)
            await asyncio.sleep(0.002)
        await wait_for_count(collector, MESSAGES)
        assert sorted(d for d, _ in collector.received) == [b"echo:msg%03d" % i for i in range(MESSAGES)]
        assert {a for _, a in collector.received} == {peer_addr}
        assert peer.count == MESSAGES
        # The client bound a channel for the peer: data flowed as ChannelData.
        assert peer_addr in inner(turn).peer_to_channel
    finally:
        turn.close()
        peer_transport.close()
        await asyncio.sleep(0.1)


async def test_aioice_refresh_and_delete(relay):
    username, password = relay.credentials("aioice-refresh")
    turn, _ = await open_endpoint(relay, "udp", username, password)
    protocol = inner(turn)
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.REFRESH, message_class=aioice_stun.Class.REQUEST
    )
    request.attributes["LIFETIME"] = 1200
    response, _ = await protocol.request_with_retry(request)
    assert response.attributes["LIFETIME"] == 1200
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.REFRESH, message_class=aioice_stun.Class.REQUEST
    )
    request.attributes["LIFETIME"] = 99999  # clamped to turn.max_lifetime_s
    response, _ = await protocol.request_with_retry(request)
    assert response.attributes["LIFETIME"] == 3600
    relayed = turn.get_extra_info("sockname")
    await protocol.delete()  # Refresh with LIFETIME 0
    for _ in range(50):
        if f"allocation {relayed} for user 'aioice-refresh' ended: refreshed to 0" in relay.log():
            break
        await asyncio.sleep(0.02)
    assert f"allocation {relayed} for user 'aioice-refresh' ended: refreshed to 0" in relay.log()


async def expect_allocate_error(relay, username: str, password: str) -> int:
    with pytest.raises(aioice_stun.TransactionFailed) as failed:
        turn, _ = await open_endpoint(relay, "udp", username, password)
        turn.close()
    return failed.value.response.attributes["ERROR-CODE"][0]


async def test_wrong_password_is_401(relay):
    username, _ = relay.credentials("mallory")
    assert await expect_allocate_error(relay, username, "d3JvbmcgcGFzc3dvcmQ=") == 401


async def test_expired_username_is_401(relay):
    username, password = relay.credentials("late", ttl_s=-60)
    assert int(username.split(":")[0]) < time.time()
    assert await expect_allocate_error(relay, username, password) == 401


@pytest.mark.parametrize(
    "peer", [("192.0.2.1", 9), ("10.0.0.1", 9), ("169.254.169.254", 80), ("::ffff:10.0.0.1", 9)]
)
async def test_denied_peer_is_403(relay, peer):
    username, password = relay.credentials("prober")
    turn, _ = await open_endpoint(relay, "udp", username, password)
    try:
        protocol = inner(turn)
        request = aioice_stun.Message(
            message_method=aioice_stun.Method.CREATE_PERMISSION, message_class=aioice_stun.Class.REQUEST
        )
        request.attributes["XOR-PEER-ADDRESS"] = peer
        with pytest.raises(aioice_stun.TransactionFailed) as failed:
            await protocol.request_with_retry(request)
        code = failed.value.response.attributes["ERROR-CODE"][0]
        # An IPv4-mapped IPv6 peer on an IPv4 allocation is a family mismatch
        # (443); every other one is forbidden by the peer policy (403).
        assert code == (443 if ":" in peer[0] else 403)
    finally:
        turn.close()
        await asyncio.sleep(0.05)
