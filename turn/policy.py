"""Which peer addresses the relay may send to (RFC 8656 §21, coturn's denied-peer-ip advice).

A TURN relay is an open proxy onto whatever network it sits in, so by default
it refuses every address that is not plainly on the public Internet: loopback,
private, link-local (including the 169.254.169.254 cloud metadata service),
CGNAT, multicast, reserved and documentation ranges, and all IPv6 space outside
2000::/3 global unicast.  IPv6 forms that embed an IPv4 address (IPv4-mapped,
SIIT, NAT64, 6to4, Teredo) are unwrapped by `normalise`, in one place, and
every decision (deny, allow, own listeners, own relay addresses) is made on
the IPv4 address they reach, so they cannot smuggle a denied destination past
the list.

Called on CreatePermission, ChannelBind and Send indications, never per
ChannelData packet; verdicts are cached per address.  A configuration reload replaces
the policy whole (TurnCore.apply), so no cached verdict outlives the lists it came from.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .stun import FAMILY_IPV4, FAMILY_IPV6

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Everything not global in IANA's special-purpose registries (RFC 6890), and more for IPv6.
RECOMMENDED_DENY: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network" (RFC 791)
        "10.0.0.0/8",  # private (RFC 1918)
        "100.64.0.0/10",  # CGNAT shared space (RFC 6598)
        "127.0.0.0/8",  # loopback (RFC 1122)
        "169.254.0.0/16",  # link-local (RFC 3927), cloud metadata services
        "172.16.0.0/12",  # private (RFC 1918)
        "192.0.0.0/24",  # IETF protocol assignments (RFC 6890)
        "192.0.2.0/24",  # documentation TEST-NET-1 (RFC 5737)
        "192.88.99.0/24",  # deprecated 6to4 relay anycast (RFC 7526)
        "192.168.0.0/16",  # private (RFC 1918)
        "198.18.0.0/15",  # benchmarking (RFC 2544)
        "198.51.100.0/24",  # documentation TEST-NET-2 (RFC 5737)
        "203.0.113.0/24",  # documentation TEST-NET-3 (RFC 5737)
        "224.0.0.0/4",  # multicast (RFC 5771)
        "240.0.0.0/4",  # reserved (RFC 1112), and 255.255.255.255 broadcast (RFC 919)
        # IPv6: only 2000::/3 is global unicast (RFC 4291 §2.4, IANA's IPv6 address space);
        # everything else is reserved or special, so it is all refused.
        "::/3",  # ::/8 (::, ::1, the deprecated IPv4-compatible ::a.b.c.d of RFC 4291
        # §2.5.5.1; the IPv4-mapped, SIIT and NAT64 forms in it are unwrapped
        # first), 64:ff9b:1::/48 local-use NAT64 (RFC 8215: the IPv4 address may
        # sit anywhere in it, and it leads into the local network anyway),
        # 100::/64 discard-only (RFC 6666), 100:0:0:1::/64 dummy (RFC 9780)
        "2001::/23",  # IETF protocol assignments (RFC 2928): 2001:2::/48 benchmarking
        # (RFC 5180), 2001:10::/28 ORCHID (RFC 4843), 2001:20::/28 ORCHIDv2
        # (RFC 7343), ...; Teredo (2001::/32) is unwrapped before this check
        "2001:db8::/32",  # documentation (RFC 3849)
        "3fff::/20",  # documentation (RFC 9637)
        "4000::/2",  # reserved, and 5f00::/16 SRv6 segment identifiers (RFC 9602)
        "8000::/1",  # reserved, fc00::/7 unique local (RFC 4193), fe80::/10 link-local
        # (RFC 4291), fec0::/10 site-local (deprecated, RFC 3879), ff00::/8
        # multicast (RFC 4291 §2.7)
    )
)

# Where IPv6 addresses carry the IPv4 address they reach (the IPv4-mapped ::ffff:0:0/96,
# RFC 4291 §2.5.5.2, is Python's `ipv4_mapped`).
SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765 §2.1)
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 §2.1
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # RFC 3056 §2
TEREDO = ipaddress.ip_network("2001::/32")  # RFC 4380 §4
IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
EMBEDDED_IPV4_NETWORKS = (IPV4_MAPPED, SIIT, NAT64_WELL_KNOWN, SIX_TO_FOUR, TEREDO)


def normalise(ip: IPAddress) -> IPAddress:
    """The address a packet to `ip` really reaches, unwrapping embedded IPv4."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in SIIT or ip in NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    sixtofour = ip.sixtofour  # None outside SIX_TO_FOUR
    if sixtofour is not None:
        return sixtofour
    teredo = ip.teredo  # None outside TEREDO
    if teredo is not None:
        return teredo[1]  # the client's IPv4, its obfuscation (XOR all ones) removed
    return ip


class RangeSet:
    """Sorted, merged integer ranges per IP version: membership by bisection."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in networks:
            spans[net.version].append((int(net.network_address), int(net.broadcast_address)))
        for version, items in spans.items():
            for start, end in sorted(items):
                ends = self._ends[version]
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)
                else:
                    self._starts[version].append(start)
                    ends.append(end)

    def __contains__(self, ip: IPAddress) -> bool:
        value = int(ip)
        i = bisect_right(self._starts[ip.version], value) - 1
        return i >= 0 and value <= self._ends[ip.version][i]


def parse_networks(specs: Iterable[str], allow_recommended: bool) -> list[IPNetwork]:
    networks: list[IPNetwork] = []
    for spec in specs:
        if allow_recommended and spec == "recommended":
            networks.extend(RECOMMENDED_DENY)
            continue
        try:
            networks.append(ipaddress.ip_network(spec, strict=False))
        except ValueError:
            raise ValueError(f"{spec!r} is not an IP address or CIDR range") from None
    return networks


class RelayPortsInUse(Protocol):
    def holds_port(self, family: int, port: int) -> bool:
        """Does a live allocation of this node hold `port` on its relay address?"""


@dataclass
class PeerPolicy:
    deny: RangeSet
    allow: RangeSet
    own_endpoints: frozenset[tuple[IPAddress, int]]
    own_ports_any_address: frozenset[int]
    relay_addresses: frozenset[IPAddress]
    relay_ports: tuple[int, int]
    # None: any port of the range counts as a live allocation's (tests of the policy alone).
    ports_in_use: RelayPortsInUse | None = None
    _ip_cache: dict[str, tuple[IPAddress, bool, bool] | None] = field(default_factory=dict)

    def _judge(self, ip: str) -> tuple[IPAddress, bool, bool] | None:
        """(normalised ip, permitted, permitted only as one of our relays)."""
        cached = self._ip_cache.get(ip)
        if cached is not None or ip in self._ip_cache:
            return cached
        try:
            addr = normalise(ipaddress.ip_address(ip.split("%", 1)[0]))
        except ValueError:
            verdict = None
        else:
            if addr in self.allow or addr not in self.deny:
                verdict = (addr, True, False)
            elif addr in self.relay_addresses:
                verdict = (addr, True, True)
            else:
                verdict = (addr, False, False)
        if len(self._ip_cache) > 65536:
            self._ip_cache.clear()  # bounded: peers are many, verdicts are cheap
        self._ip_cache[ip] = verdict
        return verdict

    def permits_ip(self, ip: str) -> bool:
        """May a permission be installed for `ip` (CreatePermission)?"""
        verdict = self._judge(ip)
        return verdict is not None and verdict[1]

    def permits(self, ip: str, port: int) -> bool:
        """May data be relayed to `ip`:`port` (ChannelBind, Send)?"""
        verdict = self._judge(ip)
        if verdict is None or not verdict[1]:
            return False
        addr, _, only_as_relay = verdict
        if (addr, port) in self.own_endpoints:
            return False
        if port in self.own_ports_any_address and addr in self.relay_addresses:
            return False
        if only_as_relay:
            # Another allocation on this relay (two clients behind one loopback or
            # private relay address): only a port a live allocation holds qualifies,
            # never another local socket that happens to use a port of the range.
            if not self.relay_ports[0] <= port <= self.relay_ports[1]:
                return False
            return self._held(addr, port)
        return True

    def _held(self, addr: IPAddress, port: int) -> bool:
        if self.ports_in_use is None:
            return True
        return self.ports_in_use.holds_port(FAMILY_IPV6 if addr.version == 6 else FAMILY_IPV4, port)


def build_policy(
    deny_specs: Iterable[str],
    allow_specs: Iterable[str],
    own_endpoints: Iterable[tuple[str, int]],
    relay_addresses: Iterable[str],
    relay_ports: tuple[int, int],
    ports_in_use: RelayPortsInUse | None = None,
) -> PeerPolicy:
    """A policy from configuration strings; ValueError names a bad entry.

    `own_endpoints` are the appliance's listeners: never relay targets, even
    when allowed.  A listener on 0.0.0.0 or :: is refused on every relay
    address of this host.
    """
    exact: set[tuple[IPAddress, int]] = set()
    any_address: set[int] = set()
    for host, port in own_endpoints:
        addr = normalise(ipaddress.ip_address(host))
        if addr.is_unspecified:
            any_address.add(port)
        else:
            exact.add((addr, port))
    relays = frozenset(
        a for a in (normalise(ipaddress.ip_address(ip)) for ip in relay_addresses) if not a.is_unspecified
    )
    return PeerPolicy(
        deny=RangeSet(parse_networks(deny_specs, allow_recommended=True)),
        allow=RangeSet(parse_networks(allow_specs, allow_recommended=False)),
        own_endpoints=frozenset(exact),
        own_ports_any_address=frozenset(any_address),
        relay_addresses=relays,
        relay_ports=relay_ports,
        ports_in_use=ports_in_use,
    )
