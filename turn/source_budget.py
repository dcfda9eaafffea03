"""How many error replies the relay sends to one source: a bound on what it reflects.

A UDP request's source address can be forged.  An unauthenticated 20-byte
Allocate earns a ~104-byte 401, so without a bound the relay is a 5x
amplifier aimed wherever an attacker writes the source address.
`SourceBudget` gives each source a token bucket: `burst` replies at once,
refilled at `rate` per second; past it the caller stays silent.

A source is an IPv4 address or an IPv6 /64: one host is routinely given a
whole /64, so buckets per IPv6 address would be free to multiply.  An
IPv4-mapped IPv6 address (::ffff:a.b.c.d, as a dual-stack socket shows an
IPv4 client) is that IPv4 address.

Each bucket is one float: the time at which it will be full again (GCRA's
"theoretical arrival time").  A reply moves it 1/rate later, and is allowed
while that time stays within burst/rate of now.  A source whose time is past
is the same as one never seen, so a table entry is just a cache of the debt.

The table is bounded by `max_sources` entries, kept in two generations of
half that each.  New sources go into the young one; when it is full, the old
generation is dropped whole and the young one becomes the old.  A source met
again while in the old generation moves back to the young one (throttled or
not), so what is dropped was not seen for a whole generation.  That is O(1)
per call with no per-entry bookkeeping.  A forgotten source starts over with a
full bucket, like a new one: to make the table forget one throttled source an
attacker must first show it max_sources/2 other sources.

Sans-I/O: the caller passes `now` (seconds, any monotonic origin).
"""

from __future__ import annotations

from socket import AF_INET6, inet_ntoa, inet_pton

MAX_SOURCES = 65536


class SourceBudget:
    def __init__(self, rate: float, burst: int, max_sources: int = MAX_SOURCES) -> None:
        """`rate` replies per second per source, at most `burst` at once; rate 0 = no limit."""
        if rate < 0 or burst < 1 or max_sources < 2:
            raise ValueError("rate >= 0, burst >= 1 and max_sources >= 2 are required")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._interval = 1.0 / rate if rate else 0.0
        # The relative slack absorbs float rounding, so `burst` replies at one instant all fit.
        self._horizon = burst * self._interval * (1 + 1e-9)
        self._generation = max_sources // 2
        # source key -> when its bucket is full again
        self._young: dict[str | bytes, float] = {}
        self._old: dict[str | bytes, float] = {}

    def __len__(self) -> int:
        """Entries held (a source moved back to the young generation may count twice)."""
        return len(self._young) + len(self._old)

    def allow(self, host: str, now: float) -> bool:
        """Spend one reply for the source whose address text is `host`; False when its
        bucket is empty (nothing is spent then)."""
        if not self.rate:
            return True
        key = host if ":" not in host else ipv6_source_key(host)
        young = self._young
        full_at = young.get(key)
        if full_at is None:
            full_at = self._old.get(key, now)
            if len(young) >= self._generation:
                self._old = young
                self._young = young = {}
        # Full since then: a quiet spell earns no more than `burst`.  (Not max(): a call
        # costs ~80 ns, and this runs on every error reply.)
        if full_at < now:  # noqa: PLR1730
            full_at = now
        spent = full_at + self._interval
        if spent - now > self._horizon:
            young[key] = full_at  # kept young: a throttled source stays remembered
            return False
        young[key] = spent
        return True


def source_key(host: str) -> str | bytes:
    """The bucket an address text falls in: an IPv4 address's own text; for IPv6, the
    first 8 bytes of the packed address (its /64), or the IPv4 address's text when it
    is IPv4-mapped.  Text that is no address at all is its own bucket."""
    return host if ":" not in host else ipv6_source_key(host)


def ipv6_source_key(host: str) -> str | bytes:
    # inet_pton (C, ~0.2 us) reads every spelling of an address alike, so the /64 is a
    # slice of its bytes; no ipaddress objects on the reply path.
    try:
        packed = inet_pton(AF_INET6, host)
    except OSError:
        zoneless = host.partition("%")[0]  # fe80::1%eth0: the zone is not the address
        try:
            packed = inet_pton(AF_INET6, zoneless)
        except OSError:
            return host
    if packed.startswith(_MAPPED_PREFIX):
        return inet_ntoa(packed[12:])
    return packed[:8]


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96
