"""SockJS on Quart: /info, and the websocket, xhr_streaming, xhr + xhr_send and
eventsource transports at `{base}/{server}/{session}/{transport}`.

Each SockJS session carries one StompEndpoint.  Outbound STOMP frames become
SockJS messages (a STOMP heart-beat is the message "\\n" inside a["\\n"]: SockJS
`h` frames never reach stomp.js); inbound SockJS messages are fed to the
endpoint.  A task per session serves the STOMP timer (and with it the
CONNECT deadline) and ends the session when no receiver has come back within
the disconnect delay.

Output stays in the STOMP session's outbox until a receiver takes it, so a
SockJS client that stops polling (or stops reading its stream) meets the same
frame and byte budget as a WebSocket one; passing it ends the session and
aborts the receiving connection if one is stuck writing.  New sessions count
against the per-address caps (429 when refused).  The websocket transport is
ws.WebSocketCarrier with SockJS framing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from quart import Quart, Response, make_response, request, websocket

from ..endpoint import StompEndpoint
from ..guard import ClientGuard, SessionTicket
from ..service import SignalingService
from ..stomp import Limits
from ..ws import Framing, WebSocketCarrier, admit_session
from .protocol import (ANOTHER_CONNECTION, GO_AWAY, HEARTBEAT_FRAME, HEARTBEAT_S, OPEN_FRAME,
                       STREAMING_LIMIT_BYTES, PayloadError, SockJSSession, State, close_frame,
                       decode_payload, message_frame)

log = logging.getLogger("signaling.sockjs")

JS = "application/javascript; charset=UTF-8"
SESSION_TICK_S = 1.0
MAX_SESSIONS = 20000


def _sockjs_decode(data: str | bytes) -> list[str] | None:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    if not text:
        return []
    try:
        return decode_payload(text)
    except PayloadError:
        return None              # the protocol says: broken JSON closes the connection


SOCKJS_WEBSOCKET = Framing(encode=lambda frames: [message_frame([f.decode("utf-8") for f in frames])],
                           decode=_sockjs_decode,
                           opening=OPEN_FRAME, closing=close_frame(*GO_AWAY),
                           idle=(HEARTBEAT_S, HEARTBEAT_FRAME))


class Carrier:
    """A SockJS session together with the STOMP client it carries."""

    def __init__(self, session: SockJSSession, endpoint_factory, guard: ClientGuard | None = None,
                 ticket: SessionTicket | None = None) -> None:
        self.sockjs = session
        self.guard = guard
        self.ticket = ticket
        self.ready = asyncio.Event()          # a frame is waiting for a receiver
        self.receiver = None                  # the attached receiving request's client address
        self.endpoint: StompEndpoint = endpoint_factory(self.ready.set)
        self.endpoint.overflow = self._overflow
        self.task: asyncio.Task | None = None

    def _overflow(self) -> None:
        """Nobody took the output in time: the session is over, and a receiver that is
        stuck writing is cut off now rather than at the send timeout."""
        if self.guard is not None and self.receiver is not None:
            self.guard.abort(self.receiver, "overflow")

    def _pull(self) -> None:
        """Move the endpoint's output into the SockJS queue, for a receiver about to write."""
        for chunk in self.endpoint.take_output():
            self.sockjs.send(chunk.decode("utf-8"))
        if self.endpoint.closed:
            self.sockjs.close()

    async def wait_frame(self, timeout: float) -> str:
        """The next frame for a receiver; a heart-beat if nothing came within `timeout`."""
        frame = self.next_frame()
        while frame is None:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return HEARTBEAT_FRAME
            frame = self.next_frame()
        return frame

    def next_frame(self) -> str | None:
        """What a receiver should write now: queued messages first, then a close frame."""
        self._pull()
        frame = self.sockjs.drain()
        if frame is None and self.sockjs.state is State.CLOSED:
            return close_frame(*self.sockjs.close_reason)
        return frame


class SockJSServer:
    def __init__(self, service: SignalingService, limits: Limits, max_outbox: int,
                 guard: ClientGuard | None = None) -> None:
        self.service = service
        self.limits = limits
        self.max_outbox = max_outbox
        self.guard = guard if guard is not None else ClientGuard()
        self.carriers: dict[str, Carrier] = {}

    # ------------------------------------------------------------ sessions

    def _carrier(self, session_id: str, create: bool) -> Carrier | None:
        """The session's carrier; a new one if `create` (an HTTP 429 if a per-address cap
        refuses it)."""
        carrier = self.carriers.get(session_id)
        if carrier is not None or not create or len(self.carriers) >= MAX_SESSIONS:
            return carrier
        now = time.monotonic()
        loop_now = asyncio.get_running_loop().time()
        ticket = admit_session(self.guard, request.scope.get("client"), loop_now)
        user = request.args.get("userId")
        policy = self.guard.policy
        carrier = Carrier(SockJSSession(session_id, now),
                          lambda wake: StompEndpoint(
                              self.service, self.limits, self.max_outbox, user, loop_now, wake,
                              connect_timeout_s=policy.connect_timeout_s,
                              max_outbox_bytes=policy.max_outbox_bytes),
                          self.guard, ticket)
        self.carriers[session_id] = carrier
        carrier.task = asyncio.get_running_loop().create_task(self._watch(carrier))
        return carrier

    async def _watch(self, carrier: Carrier) -> None:
        """The STOMP timer, and the end of a session nobody receives any more."""
        try:
            while True:
                await asyncio.sleep(SESSION_TICK_S)
                now = time.monotonic()
                timer = carrier.endpoint.next_timer()
                if timer is not None and timer <= asyncio.get_running_loop().time():
                    carrier.endpoint.tick(asyncio.get_running_loop().time())
                if carrier.sockjs.expired(now):
                    break
        finally:
            carrier.sockjs.close()
            carrier.sockjs.drain()              # nobody will receive it: free it now
            carrier.endpoint.finish()
            if carrier.ticket is not None:
                carrier.ticket.release()
            self.carriers.pop(carrier.sockjs.id, None)

    async def _feed(self, carrier: Carrier, messages: list[str]) -> None:
        loop_now = asyncio.get_running_loop().time()
        for message in messages:
            await carrier.endpoint.feed(message, loop_now)

    # ------------------------------------------------------------ routes

    def install(self, app: Quart, base: str) -> None:
        session_url = base + "/<server_id>/<session_id>"

        @app.route(base, methods=["GET"])
        @app.route(base + "/", methods=["GET"])
        async def greeting():
            return Response("Welcome to SockJS!\n", content_type="text/plain; charset=UTF-8")

        @app.route(base + "/info", methods=["GET", "OPTIONS"])
        async def info():
            if request.method == "OPTIONS":
                return self._options("OPTIONS, GET")
            response = await make_response({"websocket": True, "origins": ["*:*"],
                                            "cookie_needed": False,
                                            "entropy": random.getrandbits(32)})
            return self._cors(self._no_cache(response))

        async def xhr_streaming(session_id: str) -> Response:
            return self._stream(session_id, "h" * 2048 + "\n", lambda f: f + "\n", JS)

        for transport, serve in (("xhr", self._poll), ("xhr_send", self._receive_send),
                                 ("xhr_streaming", xhr_streaming)):
            app.add_url_rule(session_url + "/" + transport, f"sockjs_{transport}",
                             self._xhr_route(serve), methods=["POST", "OPTIONS"])

        @app.route(session_url + "/eventsource", methods=["GET"])
        async def eventsource(server_id: str, session_id: str):
            self._check_ids(server_id, session_id)
            return self._stream(session_id, "\r\n", lambda f: f"data: {f}\r\n\r\n",
                                "text/event-stream; charset=UTF-8")

        @app.websocket(session_url + "/websocket")
        async def sockjs_websocket(server_id: str, session_id: str):
            self._check_ids(server_id, session_id)
            await self._websocket(session_id)

    def _xhr_route(self, serve):
        """An XHR transport's view: CORS preflight, session URL check, then `serve`."""
        async def view(server_id: str, session_id: str):
            if request.method == "OPTIONS":
                return self._options("OPTIONS, POST")
            self._check_ids(server_id, session_id)
            return await serve(session_id)
        return view

    # ------------------------------------------------------------ transports

    async def _poll(self, session_id: str) -> Response:
        carrier = self._carrier(session_id, create=True)
        if carrier is None:
            return self._js(close_frame(*ANOTHER_CONNECTION) + "\n")
        first = carrier.sockjs.first_frame()
        if first is not None:
            return self._js(first + "\n")
        if not carrier.sockjs.attach(time.monotonic()):
            return self._js(close_frame(*ANOTHER_CONNECTION) + "\n")
        carrier.receiver = request.scope.get("client")
        try:
            return self._js(await carrier.wait_frame(HEARTBEAT_S) + "\n")
        finally:
            carrier.receiver = None
            carrier.sockjs.detach(time.monotonic())

    async def _receive_send(self, session_id: str) -> Response:
        carrier = self.carriers.get(session_id)
        if carrier is None:
            return Response("", status=404)
        try:
            messages = decode_payload((await request.get_data()).decode("utf-8", "replace"))
        except PayloadError as exc:
            return self._cors(Response(str(exc), status=500, content_type="text/plain; charset=UTF-8"))
        await self._feed(carrier, messages)
        return self._cors(Response("", status=204, content_type="text/plain; charset=UTF-8"))

    def _stream(self, session_id: str, prelude: str, wrap, content_type: str) -> Response:
        carrier = self._carrier(session_id, create=True)
        client = request.scope.get("client")

        async def body():
            yield prelude.encode()
            if carrier is None:
                yield wrap(close_frame(*ANOTHER_CONNECTION)).encode()
                return
            first = carrier.sockjs.first_frame()
            if first is not None:
                yield wrap(first).encode()
                if carrier.sockjs.state is State.CLOSED:
                    return
            if not carrier.sockjs.attach(time.monotonic()):
                yield wrap(close_frame(*ANOTHER_CONNECTION)).encode()
                return
            carrier.receiver = client        # stuck writing when the outbox overflows: cut off
            sent = 0
            try:
                while sent < STREAMING_LIMIT_BYTES:
                    frame = await carrier.wait_frame(HEARTBEAT_S)
                    data = wrap(frame).encode()
                    sent += len(data)
                    yield data
                    if frame.startswith("c["):
                        return
            finally:
                carrier.receiver = None
                carrier.sockjs.detach(time.monotonic())

        response = Response(body(), content_type=content_type)
        response.timeout = None
        return self._cors(self._no_cache(response))

    async def _websocket(self, session_id: str) -> None:
        # A SockJS websocket is its own session: no other transport may join it.
        loop = asyncio.get_running_loop()
        ticket = admit_session(self.guard, websocket.scope.get("client"), loop.time())
        try:
            await websocket.accept()
            user = websocket.args.get("userId")
            policy = self.guard.policy
            carrier = WebSocketCarrier(websocket, self.guard, SOCKJS_WEBSOCKET,
                                       lambda wake, overflow: StompEndpoint(
                                           self.service, self.limits, self.max_outbox, user,
                                           loop.time(), wake,
                                           connect_timeout_s=policy.connect_timeout_s,
                                           max_outbox_bytes=policy.max_outbox_bytes,
                                           overflow=overflow))
            await carrier.run()
        finally:
            ticket.release()

    # ------------------------------------------------------------ HTTP details

    @staticmethod
    def _check_ids(server_id: str, session_id: str) -> None:
        from werkzeug.exceptions import NotFound
        if not server_id or not session_id or "." in server_id or "." in session_id:
            raise NotFound()

    @staticmethod
    def _no_cache(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store, no-cache, no-transform, must-revalidate, max-age=0"
        return response

    @staticmethod
    def _cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        response.headers["Access-Control-Allow-Origin"] = origin if origin and origin != "null" else "*"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        if request.headers.get("Access-Control-Request-Headers"):
            response.headers["Access-Control-Allow-Headers"] = request.headers["Access-Control-Request-Headers"]
        return response

    def _options(self, methods: str) -> Response:
        response = Response("", status=204)
        response.headers["Access-Control-Allow-Methods"] = methods
        response.headers["Access-Control-Max-Age"] = "31536000"
        response.headers["Cache-Control"] = "public, max-age=31536000"
        return self._cors(response)

    def _js(self, text: str) -> Response:
        return self._cors(self._no_cache(Response(text, content_type=JS)))
