"""The edge listener: one TLS port for TURN over TLS and the signaling's HTTPS/WSS.

Each connection goes through four steps, every one bounded in time and memory:

1. demux.accept.SniffingListener accepts it, strips a PROXY header from a trusted proxy,
   and peeks at its first bytes: anything but a TLS handshake (plain HTTP, STUN, junk)
   is closed and counted ("not_tls").
2. The TLS handshake, with the edge's certificate and ALPN list, within `deadline_s`.
3. The route (route.py): by the negotiated ALPN protocol, or else by up to FIRST_BYTES
   decrypted bytes the client sends within `deadline_s` (Chromium's TURN over TLS names
   no ALPN protocol). A client that sends nothing in time is closed and counted.
4. The hand-off: TURN connections become connections of the process's relay node
   (RelayNode.adopt_stream: its quotas, metrics, sweeps and drain); HTTP ones become
   Hypercorn connections of the signaling app (hypercorn_handoff.py).

Steps 2 and 3 run inside SniffingListener's pending slot, so at most its `max_pending`
connections are ever between accept and hand-off.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter

from demux.accept import COUNTED, Sniffed, SniffingListener
from demux.proxy import TrustedProxies
from demux.sniff import StreamKind
from ratelog import RateLimitedLog
from turn.node import RelayNode
from turn.tcp import open_stream_listener

from ...config.schema import HostPort
from ..listeners import ListenerError
from .hypercorn_handoff import HypercornConnections
from .route import FIRST_BYTES, Route, route_by_alpn, route_by_first_bytes

log = logging.getLogger("appliance.edge")
_errors = RateLimitedLog(log, burst=3, interval_s=10.0)

LISTEN_BACKLOG = 1024
DEADLINE_S = 10.0

# Why a connection was closed before it was routed: SniffingListener's reasons
# (demux.accept.COUNTED: no bytes in time, too many pending, EOF, a PROXY header refused, a
# bug, accept failing), then the edge's own.
EDGE_REASONS = (
    "not_tls",  # plain text (HTTP, STUN, anything) on the TLS port
    "tls_handshake_failed",  # a failed, refused or timed-out handshake
    "first_bytes_timeout",  # TLS done, no ALPN, and no routable bytes in time
    "closed_before_route",  # the client closed before its connection was routed
    "draining",  # the edge was stopping
)
CLOSE_REASONS = COUNTED + EDGE_REASONS


def bind_edge_socket(key: str, address: HostPort, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening, non-blocking socket on `address`, as the relay's stream listeners get one
    ("::" takes IPv4 clients too); ListenerError names `key` if it cannot bind (as every
    listener of the appliance: process/listeners.py)."""
    try:
        return open_stream_listener(address.host, address.port, reuse_port=False, backlog=backlog)
    except OSError as exc:
        raise ListenerError(key, address, exc) from exc


class FirstBytes(asyncio.Protocol):
    """The protocol of a connection between its handshake and its route: keeps what the
    client sends (reading pauses past FIRST_BYTES) and says when something changed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False  # EOF or connection lost: nothing more will come
        self.changed = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= FIRST_BYTES and self.transport is not None:
            self.transport.pause_reading()  # enough to route; the rest waits unread
        self.changed.set()

    def eof_received(self) -> bool | None:
        self.closed = True
        self.changed.set()
        return None  # close: a client that ends before it is routed is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()


class EdgeListener:
    """The edge: see the module docstring. `relay` is the process's relay node (started),
    `http` the Hypercorn hand-off of the signaling app."""

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLContext,
        relay: RelayNode,
        http: HypercornConnections,
        trusted: TrustedProxies,
        *,
        deadline_s: float = DEADLINE_S,
        max_pending: int = 1024,
    ) -> None:
        self.tls = tls
        self.relay = relay
        self.http = http
        self.deadline_s = deadline_s
        self.routes: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.draining = False
        self.listener = SniffingListener(
            sock, self._on_stream, trusted, self._count_closed, deadline_s=deadline_s, max_pending=max_pending
        )

    def start(self) -> None:
        """Begin accepting on the running loop."""
        self.listener.start()

    def stats(self) -> dict:
        """Connections by route and closed before a route, every label present (metrics)."""
        return {
            "routes": {route.value: self.routes[route.value] for route in Route},
            "closed": {reason: self.closed[reason] for reason in CLOSE_REASONS},
            "http_open": len(self.http.connections),
        }

    def _count_closed(self, reason: str) -> None:
        self.closed[reason] += 1

    async def begin_drain(self) -> None:
        """Stop accepting (connections not yet routed are closed); HTTP connections close
        when idle or after their current request; TURN ones drain with the relay node."""
        self.draining = True
        self.listener.close()
        await self.http.begin_drain()

    async def stop(self) -> None:
        """Stop accepting, give HTTP connections Hypercorn's graceful timeout (as the http
        listener's), then abort them. A connection still in its handshake or waiting for
        its first bytes ends by its deadline (it is not routed while the edge drains)."""
        if not self.draining:
            await self.begin_drain()
        await self.listener.wait_closed()
        await self.http.stop(self.http.config.graceful_timeout)

    # ------------------------------------------------------------ one connection

    async def _on_stream(self, sniffed: Sniffed) -> None:
        if sniffed.kind is not StreamKind.TLS:
            self._count_closed("not_tls")
            sniffed.sock.close()
            return
        loop = asyncio.get_running_loop()
        # Kept here, not taken from connect_accepted_socket's answer: uvloop returns its
        # SSLProtocol there, not ours.
        first = FirstBytes()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: first, sniffed.sock, ssl=self.tls, ssl_handshake_timeout=self.deadline_s
            )
        except OSError:
            # A scanner, a client that distrusts the certificate, a stalled handshake: the
            # loop closed the transport; counted, not logged (any client can cause it).
            # Closing the socket again is safe (see turn.tcp.StreamAcceptor).
            self._count_closed("tls_handshake_failed")
            sniffed.sock.close()
            return
        try:
            await self._route(transport, first, sniffed.client)
        except Exception:
            # A bug here must cost one connection, not the listener: counted with
            # SniffingListener's own and logged at a bounded rate.
            self._count_closed("stream_error")
            _errors.exception(loop.time(), "edge connection from %r failed", sniffed.client)
            transport.abort()

    async def _route(self, transport: asyncio.Transport, first: FirstBytes, client: tuple[str, int]) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        route = route_by_alpn(ssl_object.selected_alpn_protocol() if ssl_object is not None else None)
        if route is None:
            route = await self._first_bytes_route(first)
            if route is None:
                self._count_closed("closed_before_route" if first.closed else "first_bytes_timeout")
                transport.abort()
                return
        if first.closed or transport.is_closing():
            self._count_closed("closed_before_route")
            transport.abort()
            return
        if self.draining:
            self._count_closed("draining")
            transport.abort()
            return
        self.routes[route.value] += 1
        initial = bytes(first.data)
        transport.resume_reading()  # FirstBytes may have paused it; both hand-offs read
        if route.is_turn:
            self.relay.adopt_stream(transport, initial, client)
        else:
            self.http.serve(transport, initial, client)

    async def _first_bytes_route(self, first: FirstBytes) -> Route | None:
        """The route the client's first bytes decide, or None if it closed or sent too few
        within the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        while True:
            route = route_by_first_bytes(bytes(first.data))
            if route is not None or first.closed:
                return route
            left = deadline - loop.time()
            if left <= 0:
                return None
            first.changed.clear()
            try:
                await asyncio.wait_for(first.changed.wait(), left)
            except TimeoutError:
                return None
