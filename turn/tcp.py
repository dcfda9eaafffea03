"""TCP and TLS client connections (RFC 8656 §3.1, §12.5), and the listening side.

A stream carries STUN messages and ChannelData back to back; ChannelData is
padded to a multiple of four bytes on streams in both directions.  Each
connection is its own client 5-tuple and its allocation's ClientLink
(allocation.py): it is keyed by a name of its own ("tcp#12"), relayed data
goes out through it, and closing it ends its allocation.

A listener (node.py) runs a demux.accept.SniffingListener on a socket from
`open_stream_listener`; `StreamAcceptor` turns each sniffed connection it hands
on into a StreamConnection: plain STUN, or TLS (the handshake done here), or
neither and closed.  Its client address is the one a trusted PROXY header named.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from collections.abc import Callable

from demux.accept import Sniffed
from demux.sniff import StreamKind

from .core import TurnCore
from .stun import plain_address

STUN_HEADER = 20
MAX_BUFFERED = 4 * 65536
# While paused the unparsed requests of the last read wait in the buffer: one
# read (256 KiB, or what TLS decrypted at once) past a partial frame.
PAUSED_MAX_BUFFERED = 4 * MAX_BUFFERED
# A connection that has not allocated by then is aborted: holding sockets open
# without credentials must not be a way to exhaust the relay's descriptors.
UNALLOCATED_IDLE_S = 60.0
# Output flow control.  Past PAUSE_AT_BYTES queued for a client the transport
# pauses us and we stop reading that client (its own TCP window then pushes
# back); relayed data past OUTPUT_BUDGET_BYTES is dropped, as a congested UDP
# path would drop it.  A client that keeps us paused for STALLED_WRITE_S is
# reading nothing useful and is aborted, which frees its queue at once (close()
# would wait for a flush that never comes).
PAUSE_AT_BYTES = 64 * 1024
OUTPUT_BUDGET_BYTES = 256 * 1024
STALLED_WRITE_S = 30.0

# Pending TCP connections the kernel queues for a listener (asyncio's create_server default).
LISTEN_BACKLOG = 100
# A TLS client that has not finished its handshake by then is dropped.
TLS_HANDSHAKE_S = 10.0

# Numbers connections for their keys: never reused in a process, so a late close of an
# old connection cannot end a new one's allocation.
_connection_numbers = itertools.count(1)


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS client connection: its parser, its relay paths, and its
    allocation's ClientLink."""

    def __init__(
        self,
        core: TurnCore,
        transport_name: str,
        connections: set[StreamConnection],
        clock: Callable[[], float] = time.time,
        client: tuple[str, int] | None = None,
    ) -> None:
        """`client`: the client's address when it is not the transport's peer (a PROXY
        header named it, or the edge accepted the connection); None: the peer."""
        self.core = core
        self.transport_name = transport_name
        self.key = f"{transport_name}#{next(_connection_numbers)}"
        self.connections = connections
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.address = ("", 0)
        self.opened_at = clock()
        self.write_paused_since: float | None = None
        self.closed_at: float | None = None
        self._client = client
        self._buf = bytearray()

    # --------------------------------------------------------- asyncio

    # A stream server's protocol is given an asyncio.Transport; the stub declares the base.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        # The address nonces, XOR-MAPPED-ADDRESS, rate limits and logs use: a proxy's
        # own address would make every client behind it one source.
        self.address = plain_address(self._client or transport.get_extra_info("peername"))
        # Explicit, so TCP and TLS pause alike (asyncio's TLS default is 512 KiB).
        transport.set_write_buffer_limits(high=PAUSE_AT_BYTES)
        self.connections.add(self)

    def pause_writing(self) -> None:
        self.write_paused_since = self.clock()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused_since = None
        if self.transport is not None:
            self.transport.resume_reading()
            if self._buf:
                # Requests left unparsed when we paused: nothing new may arrive to
                # trigger them.  Deferred so this never runs inside data_received.
                asyncio.get_running_loop().call_soon(self._parse_leftover)

    def _parse_leftover(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and self.write_paused_since is None:
            self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.core.client_gone(self.key)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        # A bug on a stream leaves its framing unknown: the connection is aborted, and
        # the failure counted and logged at a bounded rate (asyncio would log each one).
        try:
            self._parse(data)
        except Exception:
            self.core.internal_error(self.clock(), "stream")
            self.abort()

    def _parse(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        now = self.clock()
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            if self.write_paused_since is not None:
                break  # the client is not reading: the rest waits for resume_writing
            first = buf[pos]
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            if first < 0x40:
                total = STUN_HEADER + length
                if n - pos < total:
                    break
                reply = self.core.handle_stun(bytes(buf[pos : pos + total]), self, now)
                if reply is not None and self.transport is not None:
                    self.transport.write(reply)
            elif first <= 0x7F:  # ChannelData, see allocation.CHANNEL_MAX
                total = 4 + length + (-length & 3)
                if n - pos < total:
                    break
                self._relay_channel_data(buf, pos, length, now)
            else:
                # Neither STUN nor ChannelData: the stream has lost framing and
                # nothing after this point can be trusted.
                self.core.counters["malformed"] += 1
                self.close()
                return
            pos += total
        if pos:
            del buf[:pos]
        if len(buf) > (MAX_BUFFERED if self.write_paused_since is None else PAUSED_MAX_BUFFERED):
            self.core.counters["malformed"] += 1
            self.close()

    # --------------------------------------------------------- relay paths

    def _relay_channel_data(self, buf: bytearray, pos: int, length: int, now: float) -> None:
        alloc = self.core.table.by_client.get(self.key)
        if alloc is None:
            return
        route = alloc.channel_routes.get((buf[pos] << 8) | buf[pos + 1])
        if route is None or route[1] <= now:  # see "the relay rule", allocation.py
            return
        peer = route[0]
        meter = alloc.to_peer_meter
        if meter is not None and not meter.take(length, now):
            self.core.counters["bandwidth_dropped_to_peer"] += 1
            return
        # The view must be released before the buffer is resized.
        with memoryview(buf) as view:
            try:
                alloc.relay.sock.sendto(view[pos + 4 : pos + 4 + length], peer)
            except OSError:
                return
        traffic = self.core.traffic
        traffic.to_peer_packets += 1
        traffic.to_peer_bytes += length
        alloc.to_peer_packets += 1
        alloc.to_peer_bytes += length

    # --------------------------------------------------------- ClientLink

    def send_channel_data(self, view: memoryview, size: int) -> bool:
        """Write ChannelData already framed in `view[:size]`, padded to 4 bytes.  Past the
        output budget it is dropped and counted here (stream_output_dropped); True either
        way, as the transport never refuses a write."""
        pad = -size & 3
        transport = self._room_for(size + pad)
        if transport is not None:
            transport.write(bytes(view[:size]) + b"\x00" * pad if pad else bytes(view[:size]))
        return True

    def send_data_indication(self, message: bytes) -> bool:
        """Write a Data indication (relayed data, so dropped past the budget like ChannelData)."""
        transport = self._room_for(len(message))
        if transport is not None:
            transport.write(message)
        return True

    def _room_for(self, size: int) -> asyncio.Transport | None:
        """The transport, if `size` more relayed bytes fit in the output budget; else None,
        and the drop is counted.  A closing transport takes nothing (uvloop raises on a
        write after abort())."""
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() + size > OUTPUT_BUDGET_BYTES
        ):
            self.core.counters["stream_output_dropped"] += 1
            return None
        return transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            if self.closed_at is None:
                self.closed_at = self.clock()

    def stalled(self, now: float) -> bool:
        """Paused by a client that does not read, or closed and still not flushed (a client
        that stops reading then holds it open), for STALLED_WRITE_S."""
        since = self.closed_at if self.closed_at is not None else self.write_paused_since
        return since is not None and now - since >= STALLED_WRITE_S

    def abort(self) -> None:
        """Drop the connection and whatever is queued for it now, without a flush.
        The transport is let go at once, so a sweep cannot abort (and count) it twice
        before connection_lost runs."""
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abort()


def close_idle_unallocated(connections: set[StreamConnection], core: TurnCore, now: float) -> int:
    """Abort connections that never allocated within UNALLOCATED_IDLE_S; returns how many.
    Aborted, not closed: a client that does not read would keep a closing one open."""
    idle = [
        c
        for c in connections
        if c.transport is not None
        and now - c.opened_at > UNALLOCATED_IDLE_S
        and core.table.get(c.key) is None
    ]
    for conn in idle:
        conn.abort()
    return len(idle)


def abort_stalled(connections: set[StreamConnection], now: float) -> int:
    """Abort connections whose output has been stalled for STALLED_WRITE_S (see
    StreamConnection.stalled); returns how many."""
    stalled = [c for c in connections if c.transport is not None and c.stalled(now)]
    for conn in stalled:
        conn.abort()
    return len(stalled)


def open_stream_listener(
    host: str, port: int, reuse_port: bool, backlog: int = LISTEN_BACKLOG
) -> socket.socket:
    """A listening, non-blocking TCP socket as asyncio's create_server made one
    (SO_REUSEADDR; SO_REUSEPORT when relay processes share the port), except that "::"
    takes IPv4 clients too, as the UDP listener does (udp.open_udp_listener)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class StreamAcceptor:
    """A relay listener's SniffingListener.on_stream: a STUN stream (when `plain`) or a
    TLS one (when there is a `tls_context`) becomes a StreamConnection; any other kind
    is closed and counted as `count("unexpected_<kind>")`, a failed or timed-out TLS
    handshake as `count("tls_handshake_failed")`."""

    def __init__(
        self,
        core: TurnCore,
        connections: set[StreamConnection],
        count: Callable[[str], None],
        *,
        plain: bool,
        tls_context: ssl.SSLContext | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.connections = connections
        self.count = count
        self.plain = plain
        self.tls_context = tls_context
        self.clock = clock

    async def __call__(self, sniffed: Sniffed) -> None:
        tls = sniffed.kind is StreamKind.TLS and self.tls_context is not None
        if not (tls or (sniffed.kind is StreamKind.STUN and self.plain)):
            self.count(f"unexpected_{sniffed.kind.value}")
            sniffed.sock.close()
            return
        if sniffed.proxied:
            self.core.counters["stream_proxied"] += 1
        name = "tls" if tls else "tcp"

        def connection() -> StreamConnection:
            return StreamConnection(self.core, name, self.connections, self.clock, client=sniffed.client)

        loop = asyncio.get_running_loop()
        if not tls:
            await loop.connect_accepted_socket(connection, sniffed.sock)
            return
        try:
            await loop.connect_accepted_socket(
                connection, sniffed.sock, ssl=self.tls_context, ssl_handshake_timeout=TLS_HANDSHAKE_S
            )
        except OSError:
            # A scanner, a client that distrusts the certificate, a stalled handshake: the
            # loop closed the transport; counted, not logged (every client could cause it).
            # Closing the socket again is safe on both loops (asyncio set its descriptor to
            # -1; uvloop holds an I/O reference, so this close only marks it).
            self.count("tls_handshake_failed")
            sniffed.sock.close()
