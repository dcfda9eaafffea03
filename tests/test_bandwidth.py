"""Bandwidth caps (turn/bandwidth.py) on a float clock: token buckets, meters that
charge several buckets together, per-user buckets shared and forgotten, and the
core's Send-indication path dropping and counting what a cap refuses."""

from __future__ import annotations

import pytest

from turn import stun
from turn.bandwidth import (
    BURST_S,
    MIN_BURST_BYTES,
    BandwidthCaps,
    Meter,
    TokenBucket,
    burst_bytes,
)

from .turn_fakes import T0, CoreClient, make_core, peer_attr

MBIT = 1_000_000


@pytest.mark.parametrize(
    "bps, burst",
    [
        (8 * MBIT, 8 * MBIT / 8 * BURST_S),  # 200 KB: 0.2 s of the cap
        (64_000, MIN_BURST_BYTES),  # 1.6 KB of cap: the two-packet floor
        (1, MIN_BURST_BYTES),
    ],
)
def test_burst_is_a_fifth_of_a_second_and_at_least_two_packets(bps, burst):
    assert burst_bytes(bps) == burst
    assert TokenBucket(bps, T0).tokens == burst


# (time offset s, bytes, passes?) against a 64 kbit/s bucket: 8000 bytes/s, burst 3000.
# Offsets are binary fractions, so T0 + offset is exact on the float clock.
@pytest.mark.parametrize(
    "steps",
    [
        # A full bucket passes its burst, then refuses until refilled.
        [(0, 1500, True), (0, 1500, True), (0, 1, False), (0.125, 1000, True), (0.125, 1, False)],
        # Refill is proportional to elapsed time and stops at the burst.
        [(0, 3000, True), (0.0625, 500, True), (0.0625, 1, False), (100, 3000, True), (100, 1, False)],
        # A refused packet costs nothing: a smaller one still fits.
        [(0, 2500, True), (0, 1000, False), (0, 500, True)],
        # A packet larger than the burst passes only from a full bucket, leaving debt.
        [(0, 5000, True), (0, 1, False), (0.375, 5000, False), (0.625, 1, True), (1, 5000, True)],
        # A clock that steps back does not stall the bucket: refill resumes from there.
        [(0, 3000, True), (-60, 1, False), (-59.875, 1000, True)],
    ],
)
def test_token_bucket(steps):
    bucket = TokenBucket(64_000, T0)
    for offset, nbytes, passes in steps:
        assert bucket.take(nbytes, T0 + offset) is passes, (offset, nbytes)


# From 120 kbit/s up the burst is 0.2 s of the cap (below, the two-packet floor).
@pytest.mark.parametrize("bps", [200_000, 1 * MBIT, 10 * MBIT])
@pytest.mark.parametrize("size", [160, 1200, 9000])
def test_a_flood_passes_the_cap_plus_the_burst(bps, size):
    bucket = TokenBucket(bps, T0)
    offered = 10 * bps / 8  # ten times the cap, in bytes per second
    seconds = 3.0
    interval = size / offered
    passed = 0
    for i in range(int(seconds / interval)):
        if bucket.take(size, T0 + i * interval):
            passed += size
    allowed = bps / 8 * seconds + bucket.burst
    assert allowed - 2 * size <= passed <= allowed + size
    assert passed <= 1.1 * bps / 8 * seconds + size  # within 10% over 3 s


def test_a_meter_passes_only_if_every_bucket_has_room_and_charges_none_otherwise():
    own, shared = TokenBucket(64_000, T0), TokenBucket(64_000, T0)
    meter, other = Meter((own, shared)), Meter((TokenBucket(64_000, T0), shared))
    assert other.take(2000, T0)  # another allocation took most of `shared`
    assert meter.take(1000, T0)
    assert (own.tokens, shared.tokens) == (2000, 0)
    assert not meter.take(1000, T0)  # `shared` refuses: `own` is not charged
    assert own.tokens == 2000
    assert meter.take(1000, T0 + 0.125)  # 1000 bytes refilled in each
    assert (own.tokens, shared.tokens) == (2000, 0)


class Alloc:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.to_peer_meter = self.to_client_meter = None


def test_no_cap_leaves_the_meters_none():
    caps = BandwidthCaps(0, 0, 0)
    alloc = Alloc("alice")
    caps.attach(alloc, T0)
    assert alloc.to_peer_meter is None and alloc.to_client_meter is None
    caps.detach(alloc)
    assert caps.users == {}


@pytest.mark.parametrize(
    "max_bps, user_max_bps, total_max_bps, buckets",
    [
        (80_000, 0, 0, 1),
        (0, 80_000, 0, 1),
        (0, 0, 80_000, 1),
        (80_000, 160_000, 800_000, 3),
    ],
)
def test_each_cap_adds_a_bucket_per_direction(max_bps, user_max_bps, total_max_bps, buckets):
    alloc = Alloc("alice")
    BandwidthCaps(max_bps, user_max_bps, total_max_bps).attach(alloc, T0)
    assert len(alloc.to_peer_meter.buckets) == len(alloc.to_client_meter.buckets) == buckets
    assert not set(map(id, alloc.to_peer_meter.buckets)) & set(map(id, alloc.to_client_meter.buckets))


def test_a_users_allocations_share_its_buckets_until_the_last_one_ends():
    caps = BandwidthCaps(0, 80_000, 0)
    a1, a2, b = Alloc("alice"), Alloc("alice"), Alloc("bob")
    for alloc in (a1, a2, b):
        caps.attach(alloc, T0)
    assert a1.to_peer_meter.buckets == a2.to_peer_meter.buckets != b.to_peer_meter.buckets
    assert a1.to_peer_meter.take(3000, T0)
    assert not a2.to_peer_meter.take(1, T0)  # alice's share is spent, by either allocation
    assert a2.to_client_meter.take(3000, T0)  # the other direction is its own
    assert b.to_peer_meter.take(3000, T0)
    caps.detach(a1)
    caps.detach(a1)  # a second detach changes nothing
    assert set(caps.users) == {"alice", "bob"}
    assert not a2.to_peer_meter.take(1, T0)
    caps.detach(a2)
    caps.detach(b)
    assert caps.users == {}
    again = Alloc("alice")
    caps.attach(again, T0)
    assert again.to_peer_meter.take(3000, T0)  # a fresh bucket for alice's next allocation


def test_the_node_bucket_is_shared_by_every_allocation():
    caps = BandwidthCaps(0, 0, 80_000)
    a, b = Alloc("alice"), Alloc("bob")
    caps.attach(a, T0)
    caps.attach(b, T0)
    assert a.to_client_meter.take(3000, T0)
    assert not b.to_client_meter.take(1, T0)
    assert b.to_peer_meter.take(3000, T0)


# ------------------------------------------------------------------ the core


def test_core_meters_allocations_and_forgets_users_when_their_allocations_end():
    core, _ = make_core(max_bps=80_000, user_max_bps=160_000, allow=("198.51.100.0/24",))
    first, second = CoreClient(core, "alice"), CoreClient(core, "alice", ("198.51.100.20", 40001))
    assert first.allocate().cls == stun.SUCCESS and second.allocate().cls == stun.SUCCESS
    allocs = list(core.table.by_client.values())
    assert all(a.to_peer_meter is not None and a.to_client_meter is not None for a in allocs)
    assert set(core.bandwidth.users) == {"alice"}
    assert first.send(stun.REFRESH, [(stun.LIFETIME, b"\x00\x00\x00\x00")]).cls == stun.SUCCESS
    assert set(core.bandwidth.users) == {"alice"}
    core.handle_timer(T0 + 10_000)  # the second one expires
    assert core.bandwidth.users == {}


def test_core_without_caps_gives_allocations_no_meters():
    core, _ = make_core()
    client = CoreClient(core)
    assert client.allocate().cls == stun.SUCCESS
    alloc = next(iter(core.table.by_client.values()))
    assert alloc.to_peer_meter is None and alloc.to_client_meter is None


def send_indication(client: CoreClient, peer, data: bytes) -> bytes:
    tid = b"s" * 12
    b = stun.Builder(stun.SEND, stun.INDICATION, tid)
    b.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid))
    b.add(stun.DATA_ATTR, data)
    return b.encode()


def test_send_indications_past_the_cap_are_dropped_and_counted():
    core, opener = make_core(max_bps=64_000, allow=("198.51.100.0/24",))
    client = CoreClient(core)
    assert client.allocate().cls == stun.SUCCESS
    peer = ("198.51.100.7", 9000)
    assert client.send(stun.CREATE_PERMISSION, [peer_attr(peer)]).cls == stun.SUCCESS
    relay = opener.opened[0]
    for _ in range(10):  # 10 x 1000 bytes at once; the burst is 3000
        client.raw(send_indication(client, peer, b"x" * 1000))
    assert len(relay.sent) == 3
    assert core.counters["bandwidth_dropped_to_peer"] == 7
    client.now += 0.125  # 1000 bytes refilled
    client.raw(send_indication(client, peer, b"x" * 1000))
    assert len(relay.sent) == 4
