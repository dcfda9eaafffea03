"""Which peer addresses the relay may send to (RFC 8656 §21, coturn's denied-peer-ip advice).

A TURN relay is an open proxy onto whatever network it sits in, so by default
it refuses every address that is not plainly on the public Internet:
loopback, private, link-local (including the 169.254.169.254 cloud metadata
service), CGNAT, multicast, reserved and documentation ranges.  IPv6 forms
that embed an IPv4 address (v4-mapped, v4-compatible, NAT64, 6to4, Teredo)
are judged as the IPv4 address they reach, so they cannot smuggle a denied
destination past the list.

Called on CreatePermission, ChannelBind and Send indications, never per
ChannelData packet; verdicts are cached per address.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RECOMMENDED_DENY: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",          # "this network"
    "10.0.0.0/8",         # RFC 1918
    "100.64.0.0/10",      # CGNAT shared space
    "127.0.0.0/8",        # loopback
    "169.254.0.0/16",     # link-local, cloud metadata services
    "172.16.0.0/12",      # RFC 1918
    "192.0.0.0/24",       # IETF protocol assignments
    "192.0.2.0/24",       # TEST-NET-1
    "192.88.99.0/24",     # deprecated 6to4 relay anycast
    "192.168.0.0/16",     # RFC 1918
    "198.18.0.0/15",      # benchmarking
    "198.51.100.0/24",    # TEST-NET-2
    "203.0.113.0/24",     # TEST-NET-3
    "224.0.0.0/4",        # multicast
    "240.0.0.0/4",        # reserved, and 255.255.255.255 broadcast
    "::/128",             # unspecified
    "::1/128",            # loopback
    "100::/64",           # discard-only
    "64:ff9b:1::/48",     # local-use NAT64
    "2001::/23",          # IETF protocol assignments (Teredo is unwrapped before this check)
    "2001:db8::/32",      # documentation
    "fc00::/7",           # unique local
    "fe80::/10",          # link-local
    "ff00::/8",           # multicast
))

NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
TEREDO = ipaddress.ip_network("2001::/32")
V4_COMPATIBLE = ipaddress.ip_network("::/96")


def normalise(ip: IPAddress) -> IPAddress:
    """The address a packet to `ip` really reaches, unwrapping embedded IPv4."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in SIX_TO_FOUR:
        return ip.sixtofour
    if ip in TEREDO:
        return ip.teredo[1]          # the client's (obfuscation removed) IPv4
    if ip in V4_COMPATIBLE and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
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


@dataclass
class PeerPolicy:
    deny: RangeSet
    allow: RangeSet
    own_endpoints: frozenset[tuple[IPAddress, int]]
    own_ports_any_address: frozenset[int]
    relay_addresses: frozenset[IPAddress]
    relay_ports: tuple[int, int]
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
            self._ip_cache.clear()      # bounded: peers are many, verdicts are cheap
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
            # Another allocation on this relay (two clients behind one
            # loopback or private relay address): only relay ports qualify.
            return self.relay_ports[0] <= port <= self.relay_ports[1]
        return True


def build_policy(deny_specs: Iterable[str], allow_specs: Iterable[str],
                 own_endpoints: Iterable[tuple[str, int]], relay_addresses: Iterable[str],
                 relay_ports: tuple[int, int]) -> PeerPolicy:
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
    relays = frozenset(a for a in (normalise(ipaddress.ip_address(ip)) for ip in relay_addresses)
                       if not a.is_unspecified)
    return PeerPolicy(
        deny=RangeSet(parse_networks(deny_specs, allow_recommended=True)),
        allow=RangeSet(parse_networks(allow_specs, allow_recommended=False)),
        own_endpoints=frozenset(exact),
        own_ports_any_address=frozenset(any_address),
        relay_addresses=relays,
        relay_ports=relay_ports,
    )
