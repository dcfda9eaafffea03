"""STOMP over a native WebSocket (`{prefix}/ws?userId=...`), on Quart, and the WebSocket
lifecycle SockJS's websocket transport shares (`WebSocketCarrier`, with its own Framing).

One task reads messages into the StompEndpoint (which also serves the
heart-beat timer and the CONNECT deadline between messages); one writes its
output, one text message per STOMP frame (stomp-websocket 2.3 decodes binary
messages as Latin-1).

How a connection ends (issue 14): once the STOMP session is over (an ERROR,
a refused CONNECT, a DISCONNECT, the CONNECT deadline, shutdown) the writer
sends what is left, the WebSocket close frame goes out, and the connection
reads and discards whatever the client still sends until it answers the
close or `linger_s` passes; only then does the handler return.  Returning at
once would close the socket with the client's data unread (an RST that can
destroy the ERROR in flight), and returning while the client floods would
leave Hypercorn blocked on its per-connection queue (see hypercorn_guard).
A client that stops reading is cut off: its outbox passing its budget aborts
the connection at once when the writer is stuck in a send (an ERROR frame
goes first when the writer is free), and a send that stalls for
`send_timeout_s` is aborted under the writer by Hypercorn's side.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .client_text import loggable
from .endpoint import StompEndpoint
from .errors import SignalingError
from .forwarded import transport_peer
from .guard import ClientGuard, Refused, SessionTicket
from .origins import OriginPolicy
from .service import SignalingService
from .session import Arrival
from .stomp import Limits

log = logging.getLogger("signaling.ws")

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")  # preference order
REFUSED_ORIGIN = "refused_origin"  # counter of refused web pages

EndpointFactory = Callable[[Callable[[], None], Callable[[], None]], StompEndpoint]


def endpoint_factory(
    service: SignalingService,
    limits: Limits,
    max_outbox: int,
    guard: ClientGuard,
    user: str | None,
    now: float,
    arrival: Arrival,
) -> EndpointFactory:
    """How every transport builds its client's StompEndpoint: the URL's userId, the guard's
    CONNECT deadline and outbox budget, and how it arrived (for operators)."""
    policy = guard.policy
    return lambda wake, overflow: StompEndpoint(
        service,
        limits,
        max_outbox,
        user,
        now,
        wake,
        connect_timeout_s=policy.connect_timeout_s,
        max_outbox_bytes=policy.max_outbox_bytes,
        overflow=overflow,
        arrival=arrival,
    )


def address_text(client) -> str:
    """An ASGI scope's `client` (host, port) -- the client a trusted proxy named, if any --
    as "host:port" ("[v6]:port"); "" when the server does not know it."""
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def arrival_of(scope, transport: str) -> Arrival:
    """How a client that opened `transport` now arrived (the scope's client, the wall clock)."""
    return Arrival(transport, address_text(scope.get("client")), time.time())


def choose_subprotocol(offered: list[str]) -> str | None:
    return next((p for p in SUBPROTOCOLS if p in offered), None)


@dataclass(frozen=True)
class Framing:
    """How STOMP frames travel in a transport's WebSocket messages."""

    encode: Callable[[list[bytes]], Iterable[str]]  # STOMP frames -> messages
    # A message -> the STOMP stream data it carries, in one piece (a SockJS envelope's
    # elements joined: fed one by one, 200,000 one-byte elements held the loop for seconds);
    # None: hang up.
    decode: Callable[[str | bytes], str | bytes | None]
    # Whether the handshake negotiates a STOMP subprotocol (v12.stomp...): stomp.js asks for
    # one on a native WebSocket; sockjs-client asks for none.
    subprotocols: bool = True
    opening: str | None = None  # the first message (SockJS "o")
    closing: str | None = None  # the last one (SockJS c[...])
    idle: tuple[float, str] | None = None  # (seconds, message) when quiet (SockJS h)
    transport: str = "websocket"  # what operators see (GET /admin/sessions)


def max_message_bytes(max_frame_bytes: int) -> int:
    """The largest WebSocket message a client may send (Hypercorn closes a larger one with
    1009 before it is buffered whole): one STOMP frame, JSON-quoted for SockJS, where a
    character takes at most six bytes (\\u0000).  stomp.js sends a frame per message, and
    splits larger ones.  Hypercorn's default, 16 MiB, let one message hold the loop."""
    return 6 * max_frame_bytes + 64


NATIVE = Framing(encode=lambda frames: (f.decode("utf-8") for f in frames), decode=lambda data: data)


def admit_origin(origins: OriginPolicy, guard: ClientGuard, headers) -> None:
    """A handshake from a web page `origins` does not allow: an HTTP 403 (SignalingError), raised
    before the handshake is accepted and counted.  A WebSocket is not held to the same-origin
    policy by browsers, so without this any page a user visits could open one here."""
    origin = headers.get("Origin")
    if origins.allows(origin, headers.get("Host")):
        return
    guard.count(REFUSED_ORIGIN)
    log.debug("WebSocket handshake from origin %s refused", loggable(origin))
    raise SignalingError(403, "origin not allowed: the operator lists allowed pages in http.allowed_origins")


def admit_session(guard: ClientGuard, client, now: float) -> SessionTicket:
    """The per-address caps' ticket for a new session; an HTTP 429 (SignalingError) if refused --
    raised before the handshake is accepted, so the client sees the status."""
    try:
        return guard.open_session(client, now)
    except Refused as refusal:
        raise SignalingError(refusal.status, refusal.message) from None


async def serve_websocket(
    websocket,
    service: SignalingService,
    limits: Limits,
    max_outbox: int,
    guard: ClientGuard | None = None,
    origins: OriginPolicy | None = None,
    framing: Framing = NATIVE,
) -> None:
    """Run one client's WebSocket until it closes (called inside a Quart websocket route):
    the native STOMP endpoint, or with `framing` SockJS's websocket transport."""
    guard = guard if guard is not None else ClientGuard()
    loop = asyncio.get_running_loop()
    admit_origin(origins if origins is not None else OriginPolicy(), guard, websocket.headers)
    ticket = admit_session(guard, websocket.scope.get("client"), loop.time())
    try:
        offered = list(websocket.requested_subprotocols)
        await websocket.accept(subprotocol=choose_subprotocol(offered) if framing.subprotocols else None)
        user = websocket.args.get("userId")
        arrival = arrival_of(websocket.scope, framing.transport)
        factory = endpoint_factory(service, limits, max_outbox, guard, user, loop.time(), arrival)
        await WebSocketCarrier(websocket, guard, framing, factory).run()
    finally:
        ticket.release()


class WebSocketCarrier:
    """One accepted WebSocket carrying one StompEndpoint, from the opening message to the
    closed connection."""

    def __init__(
        self, websocket, guard: ClientGuard, framing: Framing, make_endpoint: EndpointFactory
    ) -> None:
        self.websocket = websocket
        self.guard = guard
        self.framing = framing
        # The connection to cut off on overflow: the TCP peer, whichever client a trusted
        # proxy named.
        self.client = transport_peer(websocket.scope)
        self.wake = asyncio.Event()
        self.sending = False  # the writer is inside a send
        self.writer: asyncio.Task | None = None
        self.endpoint = make_endpoint(self.wake.set, self._overflow)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.framing.opening is not None:
            await self.websocket.send(self.framing.opening)
        self.writer = writer = loop.create_task(self._write())
        reader = loop.create_task(self._read())
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # a failure is logged below
                if self.endpoint.closed:
                    self.wake.set()  # the ERROR/RECEIPT goes out first
                else:
                    writer.cancel()  # the transport hung up (SockJS: broken JSON)
            await asyncio.wait((writer,), timeout=self.guard.policy.send_timeout_s)
            reader.cancel()
            if not writer.done():
                return  # stuck in a send past the timeout, and not abortable from here
            if not writer.cancelled():
                writer.result()
            self.endpoint.finish()  # the session is over; only the socket lingers
            await self._close_and_linger()
        except asyncio.CancelledError:
            raise
        except Exception:  # one client must never take the server down with it
            log.exception("websocket session failed")
        finally:
            for task in (reader, writer):
                if not task.done():
                    task.cancel()
            # The writer's frame (with what it was sending) lives on in its task's
            # CancelledError; the task must not be kept alive by a cycle through us.
            self.writer = None
            self.endpoint.finish()

    async def _write(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            frames = self.endpoint.take_output()
            if frames:
                self.sending = True
                for message in self.framing.encode(frames):
                    await self.websocket.send(message)
                self.sending = False
            del frames
            # Output queued while we were sending (the frames before an ERROR) goes out first.
            if self.endpoint.closed and not self.wake.is_set():
                if self.framing.closing is not None:
                    await self.websocket.send(self.framing.closing)
                return

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self.framing.idle
        while not self.endpoint.closed:
            timer = self.endpoint.next_timer()
            timeout = None if timer is None else max(0.0, timer - loop.time())
            if idle is not None:
                timeout = idle[0] if timeout is None else min(idle[0], timeout)
            try:
                data = await asyncio.wait_for(self.websocket.receive(), timeout)
            except TimeoutError:
                self.endpoint.tick(loop.time())
                if idle is not None and not self.wake.is_set() and not self.sending:
                    await self.websocket.send(idle[1])
                continue
            stream_data = self.framing.decode(data)
            if stream_data is None:
                return
            if stream_data:
                await self.endpoint.feed(stream_data, loop.time())

    def _overflow(self) -> None:
        """The outbox passed its budget.  A writer inside a send will not get the ERROR
        through: cut the connection off now, which frees what it holds."""
        if not self.sending:
            return  # the writer sends the ERROR and ends
        if not self.guard.abort(self.client, "overflow") and self.writer is not None:
            self.writer.cancel()  # not a connection we can abort: stop writing

    async def _close_and_linger(self) -> None:
        """Close the WebSocket, then read and discard until the client answers the close
        (Quart then cancels this handler) or linger_s passes."""
        loop = asyncio.get_running_loop()
        try:
            await self.websocket.close(1000)
        except RuntimeError:
            return  # already closed
        deadline = loop.time() + self.guard.policy.linger_s
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self.websocket.receive(), left)
            except TimeoutError:
                return
