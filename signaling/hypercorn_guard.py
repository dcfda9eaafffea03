"""The signaling listener's connections as Hypercorn serves them: admitted or refused at
accept, cut off when a write stalls or a close hangs, and never left blocked on a
finished app's queue.  Hypercorn has no hooks for any of this, so:

- `guard_listener(config, guard)` makes Hypercorn build GuardedTCPServer for every
  connection (the name its accept callback looks up), and ties `config` to the guard.
  Connections of other listeners in the process (the admin's) get no guard and run as
  plain Hypercorn ones.
- GuardedTCPServer counts the connection in the guard's table (refusing it with a bare
  HTTP/1.1 503 past the total, 429 past the per-address cap), registers its transport so
  the app can abort it by peer, aborts it when one write waits more than send_timeout_s
  for the client to read (asyncio's drain has no timeout, so a client that stops
  reading held its socket and everything queued for it forever), and aborts a close
  that does not finish in that time (a graceful close waits for unsent data to drain).
- ReceiveDrain (ASGI middleware) keeps taking what Hypercorn hands the app after the app
  has returned, until the disconnect; see its docstring.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.utils import parse_socket_addr
from wsproto.frame_protocol import CloseReason

from ratelog import RateLimitedLog

from .client_text import loggable
from .forwarded import transport_peer
from .guard import ClientGuard, Refused
from .sockjs.request_body import DRAIN_MAX_BYTES

log = logging.getLogger("signaling.connections")

_guards: weakref.WeakKeyDictionary[Config, ClientGuard] = weakref.WeakKeyDictionary()
_server_errors = RateLimitedLog(log, burst=3, interval_s=10.0)

REFUSAL_LINGER_S = 0.5  # a refused client gets this long to read its 429
DRAIN_AFTER_ABORT_S = 2.0
DRAIN_POLL_S = 0.1  # after a WebSocket's disconnect: is the connection gone yet?
DISCONNECTS = ("http.disconnect", "websocket.disconnect")
REASON_PHRASES = {429: "Too Many Requests", 503: "Service Unavailable"}


def guard_listener(config: Config, guard: ClientGuard) -> None:
    """Serve the listener configured by `config` through `guard`."""
    _guards[config] = guard
    # Hypercorn has no hook for its connection class: the module's name is replaced.
    hypercorn_run.TCPServer = GuardedTCPServer  # type: ignore[misc]


def refusal_response(refusal: Refused) -> bytes:
    body = (refusal.message + "\n").encode()
    return (
        f"HTTP/1.1 {refusal.status} {REASON_PHRASES.get(refusal.status, 'Refused')}\r\n"
        f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
        f"retry-after: 5\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedTCPServer(TCPServer):
    def __init__(self, app, loop, config, context, state, reader, writer) -> None:
        super().__init__(app, loop, config, context, state, reader, writer)
        self.guard = _guards.get(config)
        self.cut_off = False

    async def run(self) -> None:
        try:
            await self._run_guarded()
        except asyncio.CancelledError:
            # A forced stop: Hypercorn cancels the connections still open when its graceful
            # timeout is over.  The connection ends here and the task ends normally, because
            # Python 3.11's StreamReaderProtocol logs an "Exception in callback" traceback for
            # every connection task that ends cancelled (task.exception() raises; 3.12 checks).
            self.writer.transport.abort()

    async def _run_guarded(self) -> None:
        if self.guard is None:
            await super().run()
            return
        transport = self.writer.transport
        try:
            sock = self.writer.get_extra_info("socket")
            peer = parse_socket_addr(sock.family, sock.getpeername())
        except OSError:
            transport.abort()  # gone before we looked
            return
        key, refusal = self.guard.open_connection(peer, transport)
        if refusal is not None and refusal.status == 503:
            # Over the total: not a descriptor more, not a moment longer.
            transport.write(refusal_response(refusal))
            transport.abort()
            return
        try:
            if refusal is not None:
                await self._refuse(refusal)
            else:
                await super().run()
        except Exception as exc:
            # Hypercorn's own code failed on what this client sent (its WebSocket buffer
            # takes a binary frame into a text message's buffer after a 1009, a TypeError):
            # this connection ends, nobody else notices, and the log gets a bounded few
            # lines, each naming the error and where it was raised.
            self.guard.count("aborted_server_error")
            _server_errors.warning(
                self.loop.time(),
                "connection from %r ended by an error in Hypercorn: %s",
                peer,
                describe_failure(exc),
            )
            transport.abort()
        finally:
            if refusal is None:
                self.guard.close_connection(peer, key)

    async def _refuse(self, refusal: Refused) -> None:
        """Answer a refused connection, and read what it sent so the close is a FIN, not an
        RST that would destroy the answer; then drop it."""
        transport = self.writer.transport
        transport.write(refusal_response(refusal))
        try:
            self.writer.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            pass  # TLS has no half-close
        try:
            await asyncio.wait_for(self._discard_until_eof(), REFUSAL_LINGER_S)
        except (TimeoutError, OSError):
            pass
        transport.abort()

    async def _discard_until_eof(self) -> None:
        while await self.reader.read(65536):
            pass

    async def protocol_send(self, event) -> None:
        if self.guard is None or not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        if self.cut_off:
            return  # aborted: nothing more goes out
        watchdog = self.loop.call_later(self.guard.policy.send_timeout_s, self._stalled, self.guard)
        try:
            await super().protocol_send(event)
        finally:
            watchdog.cancel()

    def _stalled(self, guard: ClientGuard) -> None:
        """A write has waited send_timeout_s for the client to read: drop the connection and
        what is queued for it.  The pending drain returns, and the read side reports the
        connection closed to the app."""
        if self.cut_off:
            return
        self.cut_off = True
        guard.count("aborted_send_timeout")
        self.writer.transport.abort()

    async def _close(self) -> None:
        if self.guard is None:
            await super()._close()
            return
        closing = asyncio.ensure_future(super()._close())
        done, _ = await asyncio.wait((closing,), timeout=self.guard.policy.send_timeout_s)
        if not done:
            # A graceful close waits until the client has read everything: it never will.
            if not self.cut_off:
                self.cut_off = True
                self.guard.count("aborted_close_timeout")
            self.writer.transport.abort()
            await closing


def describe_failure(exc: BaseException) -> str:
    """One line for an exception (the first one inside an ExceptionGroup): its type, message
    and the file and line it was raised at."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" at {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
    return loggable(f"{type(exc).__name__}: {exc}{where}")


class RequestBodyProgress:
    """How much of a request's body the app has been handed, and whether it has ended."""

    def __init__(self) -> None:
        self.ended = False
        self.received = 0
        self._changed = asyncio.Event()

    def saw(self, message: dict) -> None:
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.ended = not message.get("more_body", False)
        elif message["type"] in DISCONNECTS:
            self.ended = True
        self._changed.set()

    async def wait_end(self, timeout_s: float, max_bytes: int) -> bool:
        """True once the body has ended (or the client left) within `timeout_s` and before
        `max_bytes` more arrived."""
        loop = asyncio.get_running_loop()
        deadline, limit = loop.time() + timeout_s, self.received + max_bytes
        while not self.ended:
            left = deadline - loop.time()
            if left <= 0 or self.received > limit:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False
        return True


class ReceiveDrain:
    """ASGI middleware: once the app has returned, keep taking what Hypercorn hands it
    until it is done with the request (or abort the connection if it never is).

    Hypercorn puts each WebSocket message (and HTTP body chunk) a client sends on a
    per-request queue of max_app_queue_size (10) entries and awaits the put, in the
    task that reads the connection.  When the app has returned nobody takes from that
    queue: a client that keeps sending after the server ended its session fills it, and
    Hypercorn's read loop then waits forever -- it never reads the client's FIN, never
    closes the socket (CLOSE-WAIT), and the disconnect it would hand the app blocks on
    the same full queue.  Taking (and dropping) everything lets Hypercorn finish.

    An HTTP request is done at its disconnect (Hypercorn checks the stream is open
    before each put).  A WebSocket is not: Hypercorn goes on putting the rest of a batch
    of messages it had already read after the stream closed, so its queue is drained
    until the connection is gone.
    """

    def __init__(self, app, guard: ClientGuard) -> None:
        self.app = app
        self.guard = guard
        self.drains: set[asyncio.Task] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        disconnected = False
        gone = False  # Hypercorn dropped the connection without telling the app
        receiving: asyncio.Task | None = None
        disconnect = (
            {"type": "http.disconnect"}
            if scope["type"] == "http"
            else {"type": "websocket.disconnect", "code": int(CloseReason.ABNORMAL_CLOSURE)}
        )
        body = RequestBodyProgress()

        async def watched_receive():
            nonlocal disconnected, receiving
            if gone:
                return disconnect
            receiving = asyncio.current_task()
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not gone or receiving is None:
                    raise
                receiving.uncancel()  # the cancel was ours: tell the app it is over
                message = disconnect
            finally:
                receiving = None
            if message["type"] in DISCONNECTS:
                disconnected = True
            body.saw(message)
            return message

        async def send_while_connected(message) -> None:
            if not gone:
                await send(message)

        if scope["type"] == "http" and scope.get("http_version") in ("1.0", "1.1"):
            send = self._answer_before_the_body_ends(send, body, transport_peer(scope))
        app = asyncio.ensure_future(self.app(scope, watched_receive, send_while_connected))
        try:
            await asyncio.shield(app)
        except asyncio.CancelledError:
            # Hypercorn cancels the app when its connection task dies (an exception inside
            # Hypercorn, see GuardedTCPServer.run) or at a forced shutdown.  Quart would leave
            # its handler running, waiting for a message that can never come -- a session
            # registered for good.  The app is told the client is gone instead, and given
            # the linger to end; then it is cancelled in any case.
            gone = True
            if receiving is not None:
                receiving.cancel()
            await asyncio.wait((app,), timeout=self.guard.policy.linger_s)
            if not app.done():
                app.cancel()
            raise
        finally:
            websocket = scope["type"] == "websocket"
            if not gone and (websocket or not disconnected):
                # Hypercorn hands over the disconnect only after this returns: a task.
                task = asyncio.get_running_loop().create_task(
                    self._drain(receive, transport_peer(scope), websocket, disconnected)
                )
                self.drains.add(task)
                task.add_done_callback(self.drains.discard)

    def _answer_before_the_body_ends(self, send, body: RequestBodyProgress, client):
        """`send`, except that the end of a response given before the request's body has
        arrived (a 413, or any early answer) waits for that body: Hypercorn closes an
        HTTP/1.1 connection the moment a response ends with the request unfinished, and the
        client, still sending, meets a reset instead of reading its answer.  The answer goes
        out whole (its length is declared), the app's own receiver (Quart's reads on until
        it is cancelled) takes the rest of the body, and the response ends then; a body that
        does not end within the linger and send timeout, or DRAIN_MAX_BYTES, is cut off."""

        async def send_after_the_body(message) -> None:
            if message["type"] != "http.response.body" or message.get("more_body", False) or body.ended:
                await send(message)
                return
            await send({**message, "more_body": True})
            policy = self.guard.policy
            if await body.wait_end(policy.linger_s + policy.send_timeout_s, DRAIN_MAX_BYTES):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                self.guard.abort(client, "drain")

        return send_after_the_body

    async def _drain(self, receive, client, websocket: bool, disconnected: bool) -> None:
        loop = asyncio.get_running_loop()
        policy = self.guard.policy
        deadline = loop.time() + policy.linger_s + policy.send_timeout_s
        aborted = False
        while True:
            if disconnected and not (websocket and self.guard.connection_open(client)):
                return
            left = deadline - loop.time()
            if left <= 0:
                if aborted:
                    log.warning("connection from %r: not closed after the abort", client)
                    return
                aborted = True
                self.guard.abort(client, "drain")
                deadline = loop.time() + DRAIN_AFTER_ABORT_S
                continue
            try:
                message = await asyncio.wait_for(receive(), min(left, DRAIN_POLL_S) if disconnected else left)
            except TimeoutError:
                continue
            if message["type"] in DISCONNECTS:
                disconnected = True
