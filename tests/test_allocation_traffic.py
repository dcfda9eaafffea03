"""Issue 17, traffic per allocation: every path that relays application data (ChannelData
and Send/Data indications, over UDP and TCP) counts packets and payload bytes on the
allocation it relays for, nothing the relay rule refuses is counted, and the current
rate (Allocation.bits_per_second) is measured on the core's float clock over windows of
at least RATE_WINDOW_S.  The node runs on loopback with a settable clock
(test_relay_io's), so rates are exact without sleeping.  `appliance allocations` shows them
in human units."""

from __future__ import annotations

import os
import struct

import pytest

from appliance.cli import _kbit_per_s, _traffic
from turn import stun
from turn.allocation import RATE_WINDOW_S, Allocation
from turn.core import RelaySettings

from .test_relay_io import (
    REALM,
    T0,
    assert_nothing,
    open_client,
    peer_recv,
    peer_socket,
    start_node,
)
from .turn_fakes import FakeClientLink, FakeOpener

TRAFFIC_KEYS = ("packetsToPeer", "bytesToPeer", "packetsToClient", "bytesToClient")
RATE_KEYS = ("bitsPerSecondToPeer", "bitsPerSecondToClient")

# ------------------------------------------------------------------ the rate, sans I/O


def fresh_allocation(created: float = T0) -> Allocation:
    relay, _ = FakeOpener().open(stun.FAMILY_IPV4, False, False)
    client = FakeClientLink(("192.0.2.1", 4000), ("192.0.2.1", 4000))
    username = f"{int(created) + 3600}:alice"
    return Allocation(
        client,
        username,
        "alice",
        stun.FAMILY_IPV4,
        relay,
        relay.address,
        created + 600,
        True,
        created=created,
    )


def relay(alloc: Allocation, to_peer: int = 0, to_client: int = 0) -> None:
    """As a packet path does: one packet each way that has bytes."""
    if to_peer:
        alloc.to_peer_packets += 1
        alloc.to_peer_bytes += to_peer
    if to_client:
        alloc.to_client_packets += 1
        alloc.to_client_bytes += to_client


def test_the_rate_is_per_window_of_at_least_a_second_and_held_in_between():
    assert RATE_WINDOW_S <= 1.0  # relay workers list every second: each listing starts a window
    alloc = fresh_allocation()
    assert alloc.bits_per_second(T0) == (0, 0)  # no time yet to divide by
    relay(alloc, to_peer=1000)
    # Younger than a window: its rate since it was made.
    assert alloc.bits_per_second(T0 + 0.5) == (16000, 0)
    relay(alloc, to_client=500)
    assert alloc.bits_per_second(T0 + 0.8) == (10000, 5000)
    # The first full window, from the Allocate: 1000 and 500 bytes in one second.
    assert alloc.bits_per_second(T0 + 1.0) == (8000, 4000)
    relay(alloc, to_peer=4000, to_client=2000)
    # A listing right after another shows what the last window measured, not 4000 bytes
    # over 0.1 s.
    assert alloc.bits_per_second(T0 + 1.1) == (8000, 4000)
    assert alloc.bits_per_second(T0 + 1.5) == (8000, 4000)
    # The next window runs from the previous full one: 4000 and 2000 bytes in one second.
    assert alloc.bits_per_second(T0 + 2.0) == (32000, 16000)
    # Idle for two seconds: the window is as long as the time since the last one.
    assert alloc.bits_per_second(T0 + 4.0) == (0, 0)
    relay(alloc, to_peer=3000)
    assert alloc.bits_per_second(T0 + 7.0) == (8000, 0)
    # Totals are since the Allocate, whatever the windows.
    assert (alloc.to_peer_packets, alloc.to_peer_bytes, alloc.to_client_packets, alloc.to_client_bytes) == (
        3,
        8000,
        2,
        2500,
    )


def test_a_clock_that_steps_back_starts_a_new_window_and_never_divides_by_it():
    alloc = fresh_allocation()
    relay(alloc, to_peer=1000)
    assert alloc.bits_per_second(T0 + 1.0) == (8000, 0)
    # The wall clock stepped back a minute: the last rate stands, and a window starts there.
    assert alloc.bits_per_second(T0 - 60.0) == (8000, 0)
    relay(alloc, to_client=2000)
    assert alloc.bits_per_second(T0 - 59.0) == (0, 16000)


# ------------------------------------------------------------------ every relay path, counted


def traffic_of(alloc: Allocation) -> tuple[int, int, int, int]:
    return (alloc.to_peer_packets, alloc.to_peer_bytes, alloc.to_client_packets, alloc.to_client_bytes)


def send_indication(peer_addr, payload: bytes) -> bytes:
    tid = os.urandom(12)
    send = stun.Builder(stun.SEND, stun.INDICATION, tid)
    send.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer_addr, tid))
    send.add(stun.DATA_ATTR, payload)
    return send.encode()


def row_of(node, relayed) -> dict:
    (row,) = [r for r in node.allocation_rows()[0] if r["relayed"] == f"{relayed[0]}:{relayed[1]}"]
    return row


@pytest.mark.parametrize("framing", ["channel", "indication"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_each_path_counts_packets_and_payload_bytes_on_its_allocation(transport, framing):
    """ChannelData both ways (the UDP listener or the TCP parser, the relay port), or a
    Send indication (the core) and Data indications (the relay port)."""
    node = await start_node(RelaySettings(realm=REALM))
    client = await open_client(node, transport)
    idle = await open_client(node, "udp")  # on the same listener, relays nothing
    peer = peer_socket()
    try:
        relayed = await client.allocate()
        idle_relayed = await idle.allocate()
        peer_addr = peer.getsockname()
        if framing == "channel":
            assert (await client.channel_bind(0x4001, peer_addr)).cls == stun.SUCCESS
            pad = transport == "tcp"  # streams pad ChannelData to 4 bytes: not payload

            def to_peer(payload: bytes) -> bytes:
                padding = b"\x00" * (-len(payload) & 3) if pad else b""
                return struct.pack("!HH", 0x4001, len(payload)) + payload + padding
        else:
            assert (await client.create_permission(peer_addr)).cls == stun.SUCCESS

            def to_peer(payload: bytes) -> bytes:
                return send_indication(peer_addr, payload)

        for payload in (b"abcde", b"1234567"):
            await client.send(to_peer(payload))
            assert (await peer_recv(peer))[0] == payload
        for _ in range(3):
            peer.sendto(b"x" * 11, relayed)
            await client.recv()
        (alloc,) = [a for a in node.core.table.by_client.values() if a.relayed_address == relayed]
        assert traffic_of(alloc) == (2, 12, 3, 33)
        traffic = node.core.traffic  # the node-wide counters count the same payload
        assert (traffic.to_peer_bytes, traffic.to_client_bytes) == (12, 33)

        row = row_of(node, relayed)
        assert tuple(row[k] for k in TRAFFIC_KEYS) == (2, 12, 3, 33)
        assert tuple(row_of(node, idle_relayed)[k] for k in TRAFFIC_KEYS + RATE_KEYS) == (0,) * 6
        node.clock_ref.now += 1.0  # a second after the Allocate: the rate since then, in bit/s
        assert tuple(row_of(node, relayed)[k] for k in RATE_KEYS) == (96, 264)
    finally:
        client.sock.close()
        idle.sock.close()
        peer.close()
        await node.stop()


async def test_the_node_closes_rate_windows_every_second_so_a_rare_listing_shows_the_last_one():
    """The supervisor's own node is listed only when an operator asks: without the node's
    sampling, a listing after a quiet minute would show the minute's average."""
    node = await start_node(RelaySettings(realm=REALM))
    client = await open_client(node, "udp")
    peer = peer_socket()
    try:
        relayed = await client.allocate()
        assert (await client.channel_bind(0x4001, peer.getsockname())).cls == stun.SUCCESS
        await client.send(struct.pack("!HH", 0x4001, 100) + b"x" * 100)
        await peer_recv(peer)
        node.clock_ref.now += 1.0
        node.sample_rates(node.clock_ref.now)  # what the node's timer does every second
        node.clock_ref.now += 1.0
        node.sample_rates(node.clock_ref.now)  # a quiet second
        node.clock_ref.now += 0.5
        assert tuple(row_of(node, relayed)[k] for k in RATE_KEYS) == (0, 0)
    finally:
        client.sock.close()
        peer.close()
        await node.stop()


async def test_what_the_relay_rule_refuses_is_not_counted():
    node = await start_node(RelaySettings(realm=REALM))
    client = await open_client(node, "udp")
    peer = peer_socket()
    stranger = peer_socket("127.0.0.2")  # permissions are per IP: another one than the peer's
    try:
        relayed = await client.allocate()
        peer_addr = peer.getsockname()
        assert (await client.channel_bind(0x4001, peer_addr)).cls == stun.SUCCESS
        await client.send(struct.pack("!HH", 0x4002, 4) + b"nope")  # no such channel
        await client.send(send_indication(stranger.getsockname(), b"nope"))  # no permission
        await assert_nothing(stranger)
        stranger.sendto(b"unpermitted", relayed)
        # Each after the refused ones on the same socket: they were handled by then.
        await client.send(struct.pack("!HH", 0x4001, 2) + b"ok")
        assert (await peer_recv(peer))[0] == b"ok"
        peer.sendto(b"back", relayed)
        assert (await client.recv())[4:] == b"back"
        (alloc,) = node.core.table.by_client.values()
        assert traffic_of(alloc) == (1, 2, 1, 4)
        assert node.core.counters["send_dropped"] == 1
    finally:
        client.sock.close()
        peer.close()
        stranger.close()
        await node.stop()


# ------------------------------------------------------------------ the CLI's cells


def test_the_allocations_table_shows_traffic_in_human_units():
    assert _traffic(0, 0) == "0 pkt 0 B"
    assert _traffic(312, 2808) == "312 pkt 2.8 kB"
    assert _traffic(1_234_567, 987_654_321) == "1.2M pkt 987.7 MB"
    assert _traffic(999_960, 1_500_000_000) == "1.0M pkt 1.5 GB"
    assert _traffic(None, None) == "0 pkt 0 B"  # a row without them (an older relay process)
    assert (_kbit_per_s(7272), _kbit_per_s(2_100_000), _kbit_per_s(None)) == ("7.3", "2100.0", "0.0")
