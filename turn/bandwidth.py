"""Bandwidth caps: token buckets that the relay's hot paths charge per packet.

A cap is in bits per second of relayed payload (the data the client or peer
sent, without ChannelData or STUN framing), each direction separately.  A
packet past a cap is dropped, as a congested link would drop it; nothing is
queued.  Three caps can hold at once (RelaySettings.max_bps, user_max_bps,
total_max_bps): an allocation's `Meter` for one direction combines its own
bucket with its user's and this process's, and a packet passes only if every
one of them has room.  Times are floats on the caller's clock; nothing here
reads a clock.

The burst (what a full bucket holds) is BURST_S of the cap, and at least
MIN_BURST_BYTES.  0.2 s keeps what passes within ~7% of the cap over 3 s
(cap x 3 s + cap x 0.2 s) and within 10% over 2 s, yet lets a video keyframe
of a few packets through whole at media rates.  The floor of two full-size
Ethernet packets keeps a low cap from refusing every ordinary packet.  A
packet larger than the whole burst still passes when the bucket is full and
leaves it in debt, so no packet size is refused forever while the average
still holds.
"""

from __future__ import annotations

from typing import Protocol

BURST_S = 0.2
MIN_BURST_BYTES = 2 * 1500


def burst_bytes(bps: int) -> float:
    return max(bps / 8 * BURST_S, MIN_BURST_BYTES)


class TokenBucket:
    """`bps` bits per second of payload, with a burst of burst_bytes(bps)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, bps: int, now: float) -> None:
        if bps <= 0:
            raise ValueError("a bucket needs a positive rate")
        self.rate = bps / 8  # bytes per second
        self.burst = burst_bytes(bps)
        self.tokens = self.burst  # starts full: a new allocation may burst at once
        self.stamp = now

    def refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        # Also when the clock went back (a wall clock stepped): re-anchored at once,
        # so the bucket is not left without refill until the clock catches up.
        self.stamp = now

    def has_room(self, nbytes: int) -> bool:
        # A full bucket admits any size (see the module docstring): "full" is
        # tokens >= burst, so one oversized packet cannot pass twice in a row.
        tokens = self.tokens
        return tokens >= nbytes or tokens >= self.burst

    def take(self, nbytes: int, now: float) -> bool:
        """Whether `nbytes` may pass now; if so they are charged."""
        self.refill(now)
        if self.has_room(nbytes):
            self.tokens -= nbytes
            return True
        return False


class Meter:
    """One direction of one allocation: its buckets (own, user's, node's) charged together.
    Every bucket is asked before any is charged, so a packet one bucket refuses costs
    the others nothing (a user at their cap does not eat into the node's share)."""

    __slots__ = ("buckets",)

    def __init__(self, buckets: tuple[TokenBucket, ...]) -> None:
        self.buckets = buckets

    def take(self, nbytes: int, now: float) -> bool:
        # Per packet, so TokenBucket.has_room is inlined, and refill skipped when the clock
        # has not moved: the hot paths read it once per batch of packets.
        buckets = self.buckets
        for bucket in buckets:
            if now != bucket.stamp:
                bucket.refill(now)
            tokens = bucket.tokens
            if tokens < nbytes and tokens < bucket.burst:
                return False
        for bucket in buckets:
            bucket.tokens -= nbytes
        return True


class Metered(Protocol):
    """What BandwidthCaps needs of an allocation (turn.allocation.Allocation)."""

    user_id: str
    to_peer_meter: Meter | None
    to_client_meter: Meter | None


class _UserBuckets:
    __slots__ = ("allocations", "to_client", "to_peer")

    def __init__(self, bps: int, now: float) -> None:
        self.to_peer = TokenBucket(bps, now)
        self.to_client = TokenBucket(bps, now)
        self.allocations = 0


class BandwidthCaps:
    """Gives allocations their meters and owns the buckets they share: one pair per user
    id with a live allocation in this process (forgotten with the user's last one, so
    there are never more than allocations), and one pair for the process.  With every
    cap 0 an allocation's meters stay None and the hot paths skip them."""

    def __init__(self, max_bps: int, user_max_bps: int, total_max_bps: int) -> None:
        self.max_bps = max_bps
        self.user_max_bps = user_max_bps
        self.total_max_bps = total_max_bps
        self.enabled = bool(max_bps or user_max_bps or total_max_bps)
        self.users: dict[str, _UserBuckets] = {}
        self._node: tuple[TokenBucket, TokenBucket] | None = None

    def attach(self, alloc: Metered, now: float) -> None:
        """Set the allocation's meters (pair with one detach when it ends)."""
        if not self.enabled:
            return
        to_peer: list[TokenBucket] = []
        to_client: list[TokenBucket] = []
        if self.max_bps:
            to_peer.append(TokenBucket(self.max_bps, now))
            to_client.append(TokenBucket(self.max_bps, now))
        if self.user_max_bps:
            user = self.users.get(alloc.user_id)
            if user is None:
                user = self.users[alloc.user_id] = _UserBuckets(self.user_max_bps, now)
            user.allocations += 1
            to_peer.append(user.to_peer)
            to_client.append(user.to_client)
        if self.total_max_bps:
            if self._node is None:
                self._node = (TokenBucket(self.total_max_bps, now), TokenBucket(self.total_max_bps, now))
            to_peer.append(self._node[0])
            to_client.append(self._node[1])
        alloc.to_peer_meter = Meter(tuple(to_peer))
        alloc.to_client_meter = Meter(tuple(to_client))

    def detach(self, alloc: Metered) -> None:
        """The allocation ended: its user's buckets go with the user's last allocation.
        Its meters are cleared, so a second detach changes nothing."""
        if alloc.to_peer_meter is None:
            return
        alloc.to_peer_meter = alloc.to_client_meter = None
        if self.user_max_bps:
            user = self.users.get(alloc.user_id)
            if user is not None:
                user.allocations -= 1
                if user.allocations <= 0:
                    del self.users[alloc.user_id]
