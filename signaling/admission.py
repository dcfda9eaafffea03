"""Per-address caps on STOMP sessions: how many one address holds at once, and how fast it
may open new ones (a token bucket).  Sans-I/O: every call takes `now`.

The address is the client's: the socket peer's, or, for a request from a trusted proxy
(the `trusted_proxies` of the configuration), the one its X-Forwarded-For or Forwarded
header names (forwarded.py); from anybody else those headers are never believed.  Addresses
in `exempt` (by default loopback; the appliance adds its trusted proxies) are not capped per
address at all; the total cap on connections (connections.py) still holds for them.  An
IPv6 address counts under its /64 (one host usually owns a whole /64), an IPv4-mapped one
as its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

REFUSED_SESSIONS = "sessions_per_ip"
REFUSED_RATE = "session_rate"
MAX_BUCKETS = 65536  # addresses whose recent sessions are remembered; the rest forgotten


def peer_ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The socket peer's IP address, an IPv4-mapped one as IPv4; None if the peer is not an
    IP address (a Unix socket)."""
    if not host:
        return None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


def exact_address_key(host: str | None) -> str | None:
    """The peer's whole address (no /64, no exemption): what a SockJS session is bound to."""
    addr = peer_ip(host)
    return None if addr is None else str(addr)


class AddressPolicy:
    """Which key a peer address counts under, or None if it is exempt from per-address caps."""

    def __init__(self, exempt: Iterable[str] = ()) -> None:
        self.exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt)

    def key(self, host: str | None) -> str | None:
        addr = peer_ip(host)
        if addr is None:
            return None  # not an IP peer (a Unix socket): nothing to key on
        if any(addr in net for net in self.exempt if net.version == addr.version):
            return None
        if addr.version == 6:
            return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
        return str(addr)


@dataclass(frozen=True)
class SessionLimits:
    max_per_address: int = 0  # sessions one address holds at once; 0 = no cap
    new_per_s: float = 0.0  # new sessions per second per address; 0 = no cap
    burst: int = 1  # new sessions an address may open at once


class SessionAdmission:
    """Counts live sessions per address and refills each address's bucket of new ones.

    Both tables stay bounded: an address leaves `live` with its last session, and a bucket
    that has refilled is worth nothing (a missing one is full), so those are dropped when
    the table grows past max_buckets, then the oldest if that is not enough.
    """

    def __init__(self, limits: SessionLimits, max_buckets: int = MAX_BUCKETS) -> None:
        self.limits = limits
        self.max_buckets = max_buckets
        self.live: dict[str, int] = {}
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def admit(self, key: str | None, now: float) -> str | None:
        """Take a session for `key` and return None, or return why it is refused."""
        if key is None:
            return None
        cap = self.limits.max_per_address
        if cap and self.live.get(key, 0) >= cap:
            return REFUSED_SESSIONS
        if self.limits.new_per_s and not self._take(key, now):
            return REFUSED_RATE
        self.live[key] = self.live.get(key, 0) + 1
        return None

    def release(self, key: str | None) -> None:
        if key is None or key not in self.live:
            return
        left = self.live[key] - 1
        if left > 0:
            self.live[key] = left
        else:
            del self.live[key]

    def _take(self, key: str, now: float) -> bool:
        burst, rate = self.limits.burst, self.limits.new_per_s
        tokens, at = self.buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - at) * rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets.pop(key, None)  # re-inserted last: the dict stays oldest-first
        self.buckets[key] = (tokens - 1.0, now)
        if len(self.buckets) > self.max_buckets:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        burst, rate = self.limits.burst, self.limits.new_per_s
        for key in [k for k, (t, at) in self.buckets.items() if t + (now - at) * rate >= burst]:
            del self.buckets[key]
        while len(self.buckets) > self.max_buckets:
            del self.buckets[next(iter(self.buckets))]
