"""One relay worker: the core, its listeners and its timer, on one event loop.

Every worker process runs one `RelayNode`.  Listeners are bound with
SO_REUSEPORT so N workers share the ports and the kernel keeps each client
5-tuple on one worker, which therefore owns that client's allocation.

The stream listeners sniff each connection's first bytes (demux.accept): turn.tcp
serves plain STUN and, with `tcp_tls`, TLS on the same port; turn.tls serves TLS.
Both accept a PROXY header from `trusted_proxies`.  `adopt_stream` takes a stream
another listener (the edge) accepted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from demux.accept import SniffingListener
from demux.proxy import TrustedProxies

from .auth import NonceBook, RestVerifier, Revocation, parse_rest_username
from .core import RelaySettings, TurnCore
from .ledger import Ledger
from .policy import PeerPolicy
from .tcp import (
    StreamAcceptor,
    StreamConnection,
    abort_stalled,
    close_idle_unallocated,
    open_stream_listener,
)
from .udp import UdpListener, UdpRelayOpener, open_udp_listener

log = logging.getLogger("turn")

TIMER_MAX_WAIT_S = 1.0
# Rows one process lists (allocation_rows): what a pipe carries every second stays small.
MAX_LISTED_ALLOCATIONS = 2000
IDLE_CHECK_S = 10.0
# How often the node closes its allocations' rate windows (sample_rates).
RATE_SAMPLE_S = 1.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


class ListenerBindError(OSError):
    """A client-facing listener could not bind; `transport` ("udp", "tcp" or "tls") and
    `endpoint` say which, so the caller can name it the way its operator configured it."""

    def __init__(self, transport: str, endpoint: Endpoint, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.transport = transport
        self.endpoint = endpoint


@dataclass(frozen=True)
class NodeSettings:
    """What one worker needs; built from the appliance configuration."""

    relay: RelaySettings
    udp: Endpoint | None
    tcp: Endpoint | None
    tls: Endpoint | None
    relay_ips: dict[int, str]  # family (stun.FAMILY_*) -> bind address
    relay_ports: tuple[int, int]
    nonce_lifetime_s: float
    reuse_port: bool
    # turn.tcp takes TLS clients too (with the node's TLS context).
    tcp_tls: bool = False
    # Peers whose PROXY header names the client on turn.tcp and turn.tls.
    trusted_proxies: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))


def _host_port(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayNode:
    def __init__(
        self,
        settings: NodeSettings,
        secrets: tuple[bytes, ...],
        nonce_key: bytes,
        policy: PeerPolicy,
        tls_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.clock = clock
        self.tls_context = tls_context
        self.verifier = RestVerifier(settings.relay.realm, secrets)
        self.nonces = NonceBook(nonce_key, settings.nonce_lifetime_s)
        self.policy = policy
        self.core: TurnCore | None = None
        self.udp: UdpListener | None = None
        self.listeners: list[SniffingListener] = []
        self.connections: set[StreamConnection] = set()
        self._timer_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        udp_sock = None
        if s.udp:
            try:
                udp_sock = open_udp_listener(s.udp.host, s.udp.port, s.reuse_port)
            except OSError as exc:
                raise ListenerBindError("udp", s.udp, exc) from exc
        opener = UdpRelayOpener(loop, self._started_core, s.relay_ips, s.relay_ports, self.clock)
        self.core = TurnCore(s.relay, self.verifier, self.nonces, self.policy, opener, self.ledger)
        try:
            if udp_sock is not None:
                self.udp = UdpListener(loop, self.core, udp_sock, self.clock)
                self.udp.start()
            if s.tcp:
                self._listen(s.tcp, "tcp", plain=True, tls=s.tcp_tls)
            if s.tls:
                self._listen(s.tls, "tls", plain=False, tls=True)
        except BaseException:
            await self.stop()
            raise
        self._timer_task = loop.create_task(self._run_timer())

    def _started_core(self) -> TurnCore:
        core = self.core
        assert core is not None, "used only once start() has built the core"
        return core

    def _listen(self, ep: Endpoint, name: str, *, plain: bool, tls: bool) -> None:
        """Bind `ep` and sniff each connection: plain STUN if `plain`, TLS if `tls` and
        the node has a TLS context; anything else is closed and counted."""
        if name == "tls" and self.tls_context is None:
            raise ValueError("a turn.tls listener needs a TLS context")
        try:
            sock = open_stream_listener(ep.host, ep.port, self.settings.reuse_port)
        except OSError as exc:
            raise ListenerBindError(name, ep, exc) from exc
        acceptor = StreamAcceptor(
            self._started_core(),
            self.connections,
            self._count_refused,
            plain=plain,
            tls_context=self.tls_context if tls else None,
            clock=self.clock,
        )
        listener = SniffingListener(sock, acceptor, self.settings.trusted_proxies, self._count_refused)
        self.listeners.append(listener)
        listener.start()

    def _count_refused(self, reason: str) -> None:
        """A stream connection closed before it became a StreamConnection: the
        SniffingListener's reasons and StreamAcceptor's (ops.metrics lists them)."""
        self._started_core().counters[f"stream_refused_{reason}"] += 1

    def adopt_stream(
        self,
        transport: asyncio.Transport,
        initial: bytes,
        client: tuple[str, int],
        transport_name: str = "tls",
    ) -> StreamConnection:
        """Make a stream another listener accepted (the edge's TLS, handshake done) one of
        this node's connections, with the quotas, metrics, sweeps and drain of its own.

        `initial`: bytes already read from it (decrypted), parsed first; `client`: the
        client's address (the peer, or what a trusted PROXY header named).  The transport
        must be reading.  Raises RuntimeError (and aborts the transport) before start().
        """
        core = self.core
        if core is None:
            transport.abort()
            raise RuntimeError("adopt_stream before the relay node started")
        conn = StreamConnection(core, transport_name, self.connections, self.clock, client=client)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if initial:
            conn.data_received(initial)
        return conn

    async def _run_timer(self) -> None:
        core = self._started_core()
        next_idle_check = self.clock() + IDLE_CHECK_S
        next_rate_sample = self.clock() + RATE_SAMPLE_S
        while True:
            now = self.clock()
            when = core.get_timer()
            wait = TIMER_MAX_WAIT_S if when is None else min(max(when - now, 0.0), TIMER_MAX_WAIT_S)
            await asyncio.sleep(wait)
            now = self.clock()
            core.handle_timer(now)
            if now >= next_idle_check:
                # One sweep for both, not a timer per connection: a stall is aborted
                # within STALLED_WRITE_S + IDLE_CHECK_S.
                core.counters["stalled_connections_aborted"] += abort_stalled(self.connections, now)
                core.counters["idle_connections_closed"] += close_idle_unallocated(
                    self.connections, core, now
                )
                next_idle_check = now + IDLE_CHECK_S
            if now >= next_rate_sample:
                self.sample_rates(now)
                next_rate_sample = now + RATE_SAMPLE_S

    def sample_rates(self, now: float, limit: int = MAX_LISTED_ALLOCATIONS) -> None:
        """Close each listed allocation's rate window (Allocation.bits_per_second), so that
        the rate a listing shows is about the last second's whoever lists and however
        rarely: a relay worker lists every second anyway, the supervisor's own node only
        when an operator asks.  The allocations a listing would show, no more."""
        core = self.core
        if core is not None:
            for alloc in itertools.islice(core.table.by_client.values(), limit):
                alloc.bits_per_second(now)

    def begin_drain(self) -> None:
        """Stop taking new allocations and TCP/TLS connections (those not yet past their
        sniff or handshake are closed); live ones keep relaying."""
        if self.core is not None:
            self.core.draining = True
        for listener in self.listeners:
            listener.close()

    async def drained(self, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Wait until no allocation is left or `timeout_s` passed; True if none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.core is not None and len(self.core.table) and loop.time() < deadline:
            await asyncio.sleep(min(poll_s, max(0.0, deadline - loop.time())))
        return self.core is None or not len(self.core.table)

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: live counts, traffic and event counters."""
        core = self.core
        if core is None:
            return {}
        now = self.clock()
        allocations = list(core.table.by_client.values())
        t = core.traffic
        dropped = (self.udp.dropped if self.udp else 0) + core.relays.dropped
        return {
            "processes": 1,
            "allocations": len(allocations),
            "permissions": sum(a.live_permissions(now) for a in allocations),
            "channels": sum(a.live_channels(now) for a in allocations),
            "connections": len(self.connections),
            "to_peer_packets": t.to_peer_packets,
            "to_peer_bytes": t.to_peer_bytes,
            "to_client_packets": t.to_client_packets,
            "to_client_bytes": t.to_client_bytes,
            "dropped_packets": dropped,
            "counters": dict(core.counters),
            "draining": core.draining,
        }

    def allocation_rows(self, limit: int = MAX_LISTED_ALLOCATIONS) -> tuple[list[dict[str, Any]], bool]:
        """The live allocations for an operator (at most `limit` rows), and whether more exist.

        `user` is client text: whoever shows it escapes it (the admin API's JSON encoder,
        the CLI's table cells).  Traffic is the relayed payload since the Allocate, each
        way; the bit rates are current (Allocation.bits_per_second: over the second or so
        since the previous listing)."""
        core = self.core
        if core is None:
            return [], False
        now = self.clock()
        rows = []
        for alloc in itertools.islice(core.table.by_client.values(), limit):
            parsed = parse_rest_username(alloc.username)
            to_peer_bps, to_client_bps = alloc.bits_per_second(now)
            rows.append(
                {
                    "user": alloc.user_id,
                    "usernameExpiry": parsed[0] if parsed else None,
                    "client": _host_port(alloc.client.address),
                    "transport": alloc.client.transport_name,
                    "relayed": _host_port(alloc.relayed_address),
                    "created": alloc.created,
                    "expires": alloc.expires,
                    "permissions": alloc.live_permissions(now),
                    "channels": alloc.live_channels(now),
                    "packetsToPeer": alloc.to_peer_packets,
                    "bytesToPeer": alloc.to_peer_bytes,
                    "packetsToClient": alloc.to_client_packets,
                    "bytesToClient": alloc.to_client_bytes,
                    "bitsPerSecondToPeer": to_peer_bps,
                    "bitsPerSecondToClient": to_client_bps,
                }
            )
        return rows, len(core.table) > limit

    def apply(self, relay: RelaySettings, policy: PeerPolicy) -> None:
        """New relay settings and a new peer policy, whole (a configuration reload): the
        core takes them from its next request on (TurnCore.apply), live allocations keep
        relaying as they are.  Listeners, relay addresses and ports are not among them:
        those change only with a restart."""
        self.settings = replace(self.settings, relay=relay)
        self.policy = policy
        if self.core is not None:
            self.core.apply(relay, policy)

    def set_secrets(self, secrets: tuple[bytes, ...]) -> None:
        self.verifier.set_secrets(secrets)

    def set_revocations(self, revocations: tuple[Revocation, ...]) -> None:
        """The revocations in force: refused from the next request on, and the allocations
        they name ended now."""
        self.verifier.set_revocations(revocations)
        if self.core is not None:
            self.core.end_revoked(self.clock())

    async def stop(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            self._timer_task = None
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            conn.close()
        if self.core is not None:
            self.core.close_all("shutdown")
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        for listener in self.listeners:
            try:
                await asyncio.wait_for(listener.wait_closed(), 2)
            except (TimeoutError, Exception):
                pass
        self.listeners.clear()
