"""Allocations, their permissions and channels, and the table that owns them.

Lifetimes follow RFC 8656: permissions 300 s, channel bindings 600 s, and a
channel number or peer whose binding expired stays unusable for another
300 s (§12) so late packets cannot reach a new peer.  Times are floats on the
caller's clock; nothing here reads a clock.

Two contracts with the I/O layer (turn/udp.py, turn/tcp.py) live here:

- The relay rule, "may this packet pass, and how": decided by `Allocation`
  alone (see "the relay rule" in it) and read by every packet path as a route
  with an expiry, or as `Allocation.permits`; tests/test_relay_rule.py runs one
  table of cases against every path.
- `ClientLink`: who an allocation's client is and how the relay sends to it.
  The allocation is found by the link's plain, hashable `key`; relayed data
  goes out through the link.

`to_peer_meter` and `to_client_meter` (turn/bandwidth.py) are None when no
bandwidth cap applies, else `meter.take(payload bytes, now)` says whether a
packet going that way may pass (and charges it); the hot path checks them
after the relay rule and drops what they refuse.

`to_peer_packets`, `to_peer_bytes`, `to_client_packets` and `to_client_bytes` count
what every relay path sent for the allocation (payload bytes, as core.Traffic counts
them for the node); what the relay rule, a meter or the socket refused is not in them.
`bits_per_second` turns them into a current rate for the operator's listing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Protocol

from .bandwidth import Meter
from .stun import Address

PERMISSION_LIFETIME_S = 300.0
CHANNEL_LIFETIME_S = 600.0
CHANNEL_COOLDOWN_S = 300.0
DEFAULT_LIFETIME_S = 600
CHANNEL_MIN = 0x4000
# RFC 8656 narrowed channels to 0x4000-0x4FFF, but RFC 5766 clients still in
# use (coturn's own turnutils_uclient among them) bind up to 0x7FFF, and coturn
# accepts them.  Accepting the old range costs nothing: no other protocol is
# multiplexed on the relay's client port.
CHANNEL_MAX = 0x7FFF
# The shortest window a current rate is measured over (Allocation.bits_per_second): a
# listing right after another would otherwise divide a few packets by a few milliseconds.
# Below a second because relay workers list every second (STATS_EVERY_S) and a timer may
# fire a little early: each of their listings then measures the second before it.
RATE_WINDOW_S = 0.9


class DatagramSocket(Protocol):
    """What the hot paths use of a relay port's socket (a `socket.socket`)."""

    def sendto(self, data: bytes | memoryview, address: Address, /) -> int: ...


class RelayPort(Protocol):
    """A relay transport address the I/O layer opened for one allocation."""

    address: Address  # the bound (ip, port)
    allocation: Allocation | None

    # The hot paths (turn/udp.py, turn/tcp.py) send peer-bound ChannelData on the port's
    # socket directly: no Python call per packet in between.  Read-only here, so a port may
    # hold any socket type that has sendto.
    @property
    def sock(self) -> DatagramSocket: ...

    def sendto(self, data: bytes, addr: Address) -> None: ...

    def close(self) -> None: ...


class ClientLink(Protocol):
    """One client as the I/O layer sees it: who it is, and how the relay sends it data.

    turn/udp.py's UdpClientLink (datagrams from the listener's socket to the client's
    address) and turn/tcp.py's StreamConnection (one TCP or TLS connection) are the two.
    """

    # The allocation table's key for the client's 5-tuple: plain and hashable (UDP: the
    # source address as recvfrom gave it; a stream: its connection's name).  Read-only
    # here, so each link may declare its own key type.
    @property
    def key(self) -> Hashable: ...

    address: Address  # the client's (ip, port), IPv4-mapped IPv6 shown as IPv4
    transport_name: str  # "udp", "tcp" or "tls"

    def send_channel_data(self, view: memoryview, size: int) -> bool:
        """Send the ChannelData framed in `view[:size]` (a stream pads it to 4 bytes).
        False when the socket refused it, for the caller to count as dropped; what a
        stream drops past its output budget it counts itself, and returns True."""

    def send_data_indication(self, message: bytes) -> bool:
        """Send a Data indication; False and True as for send_channel_data."""


class RelayOpener(Protocol):
    dropped: int  # packets the relay ports dropped, for metrics

    def open(
        self, family: int, even_port: bool, reserve_next: bool
    ) -> tuple[RelayPort, RelayPort | None] | None:
        """Bind a relay port (even if asked; with the next port held too if
        `reserve_next`), or None when no port is free."""


class Allocation:
    __slots__ = (
        "client",
        "client_key",
        "username",
        "user_id",
        "family",
        "relay",
        "relayed_address",
        "expires",
        "created",
        "permissions",
        "channels",
        "channel_of_peer",
        "channel_routes",
        "peer_routes",
        "txid",
        "response",
        "fingerprint",
        "closed",
        "to_peer_meter",
        "to_client_meter",
        "to_peer_packets",
        "to_peer_bytes",
        "to_client_packets",
        "to_client_bytes",
        "_rate_sample",
        "_rate_bps",
    )

    def __init__(
        self,
        client: ClientLink,
        username: str,
        user_id: str,
        family: int,
        relay: RelayPort,
        relayed_address: Address,
        expires: float,
        fingerprint: bool,
        *,
        created: float = 0.0,
    ) -> None:
        self.client = client
        self.client_key = client.key
        self.username = username
        self.user_id = user_id
        self.family = family
        self.relay = relay
        self.relayed_address = relayed_address
        self.expires = expires
        # When the Allocate succeeded (the caller's clock): its age, and its duration at the end.
        self.created = created
        # peer IP -> expiry; channel number -> (peer address, expiry); peer address -> number.
        self.permissions: dict[str, float] = {}
        self.channels: dict[int, tuple[Address, float]] = {}
        self.channel_of_peer: dict[Address, int] = {}
        # The relay rule's answers for channels (see below): what the hot paths read.
        self.channel_routes: dict[int, tuple[Address, float]] = {}
        self.peer_routes: dict[Address, tuple[int, float]] = {}
        self.txid = b""
        self.response = b""
        self.fingerprint = fingerprint
        self.closed = False
        # Set by BandwidthCaps.attach when a cap applies (client->peer, peer->client).
        self.to_peer_meter: Meter | None = None
        self.to_client_meter: Meter | None = None
        # Relayed since the Allocate, added to by the packet paths (see the module docstring).
        self.to_peer_packets = self.to_peer_bytes = 0
        self.to_client_packets = self.to_client_bytes = 0
        # bits_per_second's state: (when, to_peer_bytes, to_client_bytes) at the start of
        # the window it measures, and what the last full window measured (None: none yet).
        self._rate_sample = (created, 0, 0)
        self._rate_bps: tuple[int, int] | None = None

    # ------------------------------------------------------------ traffic

    def bits_per_second(self, now: float) -> tuple[int, int]:
        """The current rate of relayed payload (to the peer, to the client), in bit/s.

        Measured over the window since the previous call that started one, at least
        RATE_WINDOW_S long: a call that finds a full window measures it and starts the
        next; one sooner shows what the last full window measured, or, while the
        allocation is younger than the first window, its rate since it was made.  So
        listings every second show each second's rate, and one in between no noise."""
        since, to_peer, to_client = self._rate_sample
        elapsed = now - since
        if 0.0 <= elapsed < RATE_WINDOW_S and self._rate_bps is not None:
            return self._rate_bps
        if elapsed > 0.0:
            rate = (
                round((self.to_peer_bytes - to_peer) * 8 / elapsed),
                round((self.to_client_bytes - to_client) * 8 / elapsed),
            )
        else:  # just made, or a wall clock that stepped back: no time to divide by
            rate = self._rate_bps or (0, 0)
        if not 0.0 <= elapsed < RATE_WINDOW_S:
            self._rate_sample = (now, self.to_peer_bytes, self.to_client_bytes)
            self._rate_bps = rate
        return rate

    # ------------------------------------------------------------ the relay rule
    #
    # When relayed data may pass (RFC 8656 §9, §12), decided here and nowhere else.
    #
    # A permission (a peer IP, any port) is live while now < its expiry, and so is a
    # channel binding (a number <-> one peer ip:port): at the expiry instant it is gone.
    # Data either way needs a live permission for the peer's IP (`permits`); ChannelData
    # needs a live channel as well, so a channel carries data until the earlier of its
    # own and its permission's expiry.  `_route` writes that instant into two routes,
    # which the packet paths read with one lookup and one comparison, "until > now":
    #
    #   channel_routes[number] = (peer, until)   ChannelData the client sends on
    #       `number` goes to `peer`; else it is dropped (udp.UdpListener, tcp.py).
    #   peer_routes[peer] = (number, until)      data from `peer` goes to the client as
    #       ChannelData on `number`; else as a Data indication if `permits`, else
    #       nowhere (udp.UdpRelayPort).
    #
    # They are kept by the only methods that change permissions or channels (permit,
    # bind_channel, sweep).  An expired binding's cool-down keeps ChannelBind from
    # reusing its number or peer (core._channel_bind); for data it is simply gone.
    # A route, not a call, because the hot path pays for a Python call per packet.

    def permits(self, ip: str, now: float) -> bool:
        """Whether data to or from `ip` may pass without a channel (a Send indication, a
        Data indication)."""
        return self.permissions.get(ip, 0.0) > now

    def _route(self, ip: str) -> None:
        """Recompute the routes of the channels to peers at `ip`, whose permission changed."""
        permitted_until = self.permissions.get(ip, 0.0)
        for number, (peer, bound_until) in self.channels.items():
            if peer[0] == ip:
                until = min(bound_until, permitted_until)
                self.channel_routes[number] = (peer, until)
                self.peer_routes[peer] = (number, until)

    # ------------------------------------------------------------ state changes

    def live_permissions(self, now: float) -> int:
        return sum(1 for exp in self.permissions.values() if exp > now)

    def live_channels(self, now: float) -> int:
        return sum(1 for _, exp in self.channels.values() if exp > now)

    def permit(self, ip: str, now: float) -> None:
        self.permissions[ip] = now + PERMISSION_LIFETIME_S
        self._route(ip)

    def bind_channel(self, number: int, peer: Address, now: float) -> None:
        self.channels[number] = (peer, now + CHANNEL_LIFETIME_S)
        self.channel_of_peer[peer] = number
        self.permit(peer[0], now)

    def sweep(self, now: float) -> None:
        """Forget expired permissions and channels past their cool-down."""
        for ip in [ip for ip, exp in self.permissions.items() if exp <= now]:
            del self.permissions[ip]
        for number in [n for n, (_, exp) in self.channels.items() if exp + CHANNEL_COOLDOWN_S <= now]:
            peer = self.channels.pop(number)[0]
            del self.channel_routes[number]
            if self.channel_of_peer.get(peer) == number:
                del self.channel_of_peer[peer]
                del self.peer_routes[peer]


class AllocationTable:
    """Allocations by their client's key (ClientLink.key), with expiry (quotas are the
    ledger's: turn/ledger.py)."""

    def __init__(self) -> None:
        self.by_client: dict[Hashable, Allocation] = {}
        self._heap: list[tuple[float, int, Allocation]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.by_client)

    def get(self, client_key: Hashable) -> Allocation | None:
        return self.by_client.get(client_key)

    def add(self, alloc: Allocation) -> None:
        self.by_client[alloc.client_key] = alloc
        self.schedule(alloc)

    def schedule(self, alloc: Allocation) -> None:
        # Lazy deletion: stale heap entries are skipped when popped, so a
        # refresh costs one push instead of a heap search.  Stale entries
        # would keep deleted allocations alive until their old expiry, so the
        # heap is rebuilt once they outnumber the live ones.
        heapq.heappush(self._heap, (alloc.expires, next(self._seq), alloc))
        if len(self._heap) > 2 * len(self.by_client) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(a.expires, next(self._seq), a) for a in self.by_client.values()]
        heapq.heapify(self._heap)

    def remove(self, alloc: Allocation) -> None:
        if alloc.closed:
            return
        alloc.closed = True
        if self.by_client.get(alloc.client_key) is alloc:
            del self.by_client[alloc.client_key]
        if len(self._heap) > 2 * len(self.by_client) + 64:
            self._compact()

    def next_expiry(self) -> float | None:
        while self._heap:
            expires, _, alloc = self._heap[0]
            if alloc.closed or expires != alloc.expires:
                heapq.heappop(self._heap)
                continue
            return expires
        return None

    def pop_expired(self, now: float) -> list[Allocation]:
        expired = []
        while (when := self.next_expiry()) is not None and when <= now:
            alloc = heapq.heappop(self._heap)[2]
            self.remove(alloc)
            expired.append(alloc)
        return expired
