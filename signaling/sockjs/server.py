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

Who may use a session (issue 14): a SockJS client picks its session id itself, so the id in
the URL is no secret the server can make.  A session is therefore bound to the address that
opened it -- the socket peer's whole address, not its /64 -- and a receiver or an xhr_send
for it from any other address is answered 404, as for an unknown session, and counted.
Browsers are held to `origins` (signaling/origins.py): a request carrying a disallowed
Origin is refused (403, no CORS headers) and allowed ones get their origin echoed.  An
xhr_send body is read at the ASGI level (request_body.py), never past stomp.max_frame_bytes:
a larger one gets a 413 that reaches the client, and is dropped as it arrives.

One clock: the event loop's (`loop.time()`), read once where an event happens and passed
to what needs it -- the SockJS session's receiver bookkeeping and expiry, the STOMP
endpoint's heart-beats and CONNECT deadline, the per-address caps -- so their times can
be compared with each other and with the loop's own timers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re

from quart import Quart, Response, make_response, request, websocket
from werkzeug.exceptions import NotFound

from ..admission import exact_address_key
from ..client_text import loggable
from ..endpoint import StompEndpoint
from ..forwarded import transport_peer
from ..guard import ClientGuard, SessionTicket
from ..origins import OriginPolicy
from ..service import SignalingService
from ..stomp import Limits
from ..ws import (
    REFUSED_ORIGIN,
    EndpointFactory,
    Framing,
    admit_session,
    arrival_of,
    endpoint_factory,
    serve_websocket,
)
from .protocol import (
    ANOTHER_CONNECTION,
    GO_AWAY,
    HEARTBEAT_FRAME,
    HEARTBEAT_S,
    OPEN_FRAME,
    STREAMING_LIMIT_BYTES,
    PayloadError,
    SockJSSession,
    State,
    close_frame,
    decode_payload,
    message_frame,
)
from .request_body import BodyState, read_body, respond

log = logging.getLogger("signaling.sockjs")

JS = "application/javascript; charset=UTF-8"
TEXT = "text/plain; charset=UTF-8"
SESSION_TICK_S = 1.0
MAX_SESSIONS = 20000
BODY_TIMEOUT_S = 30.0  # an xhr_send body (or what is left of a refused one) arrives within

REFUSED_OTHER_ADDRESS = "refused_sockjs_other_address"
REFUSED_BODY_TOO_LARGE = "refused_sockjs_body_too_large"


def _sockjs_decode(data: str | bytes) -> str | None:
    """A SockJS websocket message's elements, joined: each is a piece of the STOMP stream."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    if not text:
        return ""
    try:
        return "".join(decode_payload(text))
    except PayloadError:
        return None  # the protocol says: broken JSON closes the connection


SOCKJS_WEBSOCKET = Framing(
    encode=lambda frames: [message_frame([f.decode("utf-8") for f in frames])],
    decode=_sockjs_decode,
    opening=OPEN_FRAME,
    subprotocols=False,
    closing=close_frame(*GO_AWAY),
    idle=(HEARTBEAT_S, HEARTBEAT_FRAME),
    transport="sockjs-websocket",
)


class Carrier:
    """A SockJS session together with the STOMP client it carries."""

    def __init__(
        self,
        session: SockJSSession,
        make_endpoint: EndpointFactory,
        guard: ClientGuard | None = None,
        ticket: SessionTicket | None = None,
        owner: str | None = None,
    ) -> None:
        self.sockjs = session
        self.guard = guard
        self.ticket = ticket
        self.owner = owner  # the opener's address: the only one served
        self.ready = asyncio.Event()  # a frame is waiting for a receiver
        self.receiver: tuple[str, int] | None = None  # the attached receiving request's client address
        self.endpoint: StompEndpoint = make_endpoint(self.ready.set, self._overflow)
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
            except TimeoutError:
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
    def __init__(
        self,
        service: SignalingService,
        limits: Limits,
        max_outbox: int,
        guard: ClientGuard | None = None,
        origins: OriginPolicy | None = None,
    ) -> None:
        self.service = service
        self.limits = limits
        self.max_outbox = max_outbox
        self.guard = guard if guard is not None else ClientGuard()
        self.origins = origins if origins is not None else OriginPolicy()
        self.carriers: dict[str, Carrier] = {}

    # ------------------------------------------------------------ sessions

    def _owned(self, carrier: Carrier | None, client) -> Carrier | None:
        """`carrier` if `client` may use it; None (counted) if it belongs to another address."""
        if carrier is None or carrier.owner == exact_address_key(client[0] if client else None):
            return carrier
        self.guard.count(REFUSED_OTHER_ADDRESS)
        log.debug(
            "SockJS session %s refused to %r: opened from another address",
            loggable(carrier.sockjs.id),
            client,
        )
        return None

    def _carrier(self, session_id: str, create: bool) -> Carrier | None:
        """The session's carrier; a new one if `create` (an HTTP 429 if a per-address cap
        refuses it).  A session another address opened is a 404 (NotFound)."""
        client = request.scope.get("client")
        carrier = self.carriers.get(session_id)
        if carrier is not None:
            if self._owned(carrier, client) is None:
                raise NotFound()
            return carrier
        if not create or len(self.carriers) >= MAX_SESSIONS:
            return None
        now = asyncio.get_running_loop().time()
        ticket = admit_session(self.guard, client, now)
        user = request.args.get("userId")
        carrier = Carrier(
            SockJSSession(session_id, now),
            endpoint_factory(
                self.service,
                self.limits,
                self.max_outbox,
                self.guard,
                user,
                now,
                # The transport that opened it: the URL's last segment (xhr, eventsource...).
                arrival_of(request.scope, "sockjs-" + request.path.rsplit("/", 1)[-1]),
            ),
            self.guard,
            ticket,
            exact_address_key(client[0] if client else None),
        )
        self.carriers[session_id] = carrier
        carrier.task = asyncio.get_running_loop().create_task(self._watch(carrier))
        return carrier

    async def _watch(self, carrier: Carrier) -> None:
        """The STOMP timer, and the end of a session nobody receives any more."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(SESSION_TICK_S)
                now = loop.time()
                timer = carrier.endpoint.next_timer()
                if timer is not None and timer <= now:
                    carrier.endpoint.tick(now)
                if carrier.endpoint.closed:
                    # A heart-beat timeout closes the session without output that would wake
                    # the receiver: wake it, so the client gets its close frame now and the
                    # session ends DISCONNECT_DELAY_S later, not after the receiver's 25 s.
                    carrier.ready.set()
                if carrier.sockjs.expired(now):
                    break
        finally:
            carrier.sockjs.close()
            carrier.sockjs.drain()  # nobody will receive it: free it now
            carrier.endpoint.finish()
            if carrier.ticket is not None:
                carrier.ticket.release()
            self.carriers.pop(carrier.sockjs.id, None)

    @staticmethod
    async def _feed(carrier: Carrier, messages: list[str]) -> None:
        """An envelope's elements are pieces of one STOMP stream: fed at once, not one by one
        (200,000 one-byte elements fed singly held the event loop for seconds)."""
        if messages:
            await carrier.endpoint.feed("".join(messages), asyncio.get_running_loop().time())

    # ------------------------------------------------------------ routes

    def install(self, app: Quart, base: str) -> None:
        """The SockJS routes under `base`; xhr_send's POST is served in front of Quart (see
        serve_xhr_send), so the app's asgi_app is wrapped."""
        session_url = base + "/<server_id>/<session_id>"
        # Wrapping asgi_app is Quart's way to put ASGI middleware in front of the app.
        app.asgi_app = self._xhr_send_in_front(app.asgi_app, base)  # type: ignore[method-assign]

        @app.route(base, methods=["GET"])
        @app.route(base + "/", methods=["GET"])
        async def greeting():
            return Response("Welcome to SockJS!\n", content_type="text/plain; charset=UTF-8")

        @app.route(base + "/info", methods=["GET", "OPTIONS"])
        async def info():
            refusal = self._refuse_origin()
            if refusal is not None:
                return refusal
            if request.method == "OPTIONS":
                return self._options("OPTIONS, GET")
            response = await make_response(
                {
                    "websocket": True,
                    "origins": ["*:*"],
                    "cookie_needed": False,
                    "entropy": random.getrandbits(32),
                }
            )
            return self._cors(self._no_cache(response))

        async def xhr_streaming(session_id: str) -> Response:
            return self._stream(session_id, "h" * 2048 + "\n", lambda f: f + "\n", JS)

        for transport, serve in (("xhr", self._poll), ("xhr_streaming", xhr_streaming)):
            app.add_url_rule(
                session_url + "/" + transport,
                f"sockjs_{transport}",
                self._xhr_route(serve),
                methods=["POST", "OPTIONS"],
            )
        # Its POST never reaches Quart (_xhr_send_in_front); the preflight does.
        app.add_url_rule(
            session_url + "/xhr_send", "sockjs_xhr_send", self._xhr_route(None), methods=["OPTIONS"]
        )

        @app.route(session_url + "/eventsource", methods=["GET"])
        async def eventsource(server_id: str, session_id: str):
            self._check_ids(server_id, session_id)
            refusal = self._refuse_origin()
            if refusal is not None:
                return refusal
            return self._stream(
                session_id, "\r\n", lambda f: f"data: {f}\r\n\r\n", "text/event-stream; charset=UTF-8"
            )

        @app.websocket(session_url + "/websocket")
        async def sockjs_websocket(server_id: str, session_id: str):
            self._check_ids(server_id, session_id)
            await self._websocket()

    def _xhr_route(self, serve):
        """An XHR transport's view: the Origin check, CORS preflight, session URL check,
        then `serve`."""

        async def view(server_id: str, session_id: str):
            refusal = self._refuse_origin()
            if refusal is not None:
                return refusal
            if request.method == "OPTIONS":
                return self._options("OPTIONS, POST")
            self._check_ids(server_id, session_id)
            return await serve(session_id)

        return view

    def _refuse_origin(self) -> Response | None:
        """A 403 (without CORS headers, so a page cannot even read it) if the request comes
        from a page the origin policy does not allow; None if it may go on."""
        origin = request.headers.get("Origin")
        if self.origins.allows(origin, request.headers.get("Host")):
            return None
        self.guard.count(REFUSED_ORIGIN)
        log.debug("SockJS request from origin %s refused", loggable(origin))
        return Response("Origin not allowed.\n", status=403, content_type=TEXT)

    # ------------------------------------------------------------ transports

    async def _poll(self, session_id: str) -> Response:
        carrier = self._carrier(session_id, create=True)
        if carrier is None:
            return self._js(close_frame(*ANOTHER_CONNECTION) + "\n")
        first = carrier.sockjs.first_frame()
        if first is not None:
            return self._js(first + "\n")
        loop = asyncio.get_running_loop()
        if not carrier.sockjs.attach(loop.time()):
            return self._js(close_frame(*ANOTHER_CONNECTION) + "\n")
        carrier.receiver = transport_peer(request.scope)
        try:
            return self._js(await carrier.wait_frame(HEARTBEAT_S) + "\n")
        finally:
            carrier.receiver = None
            carrier.sockjs.detach(loop.time())

    def _xhr_send_in_front(self, app, base: str):
        """ASGI middleware: POST {base}/{server}/{session}/xhr_send goes to serve_xhr_send,
        everything else to `app`."""
        path = re.compile(re.escape(base) + r"/([^/]+)/([^/]+)/xhr_send")

        async def asgi(scope, receive, send) -> None:
            match = path.fullmatch(scope.get("path", "")) if scope["type"] == "http" else None
            if match is None or scope.get("method") != "POST":
                await app(scope, receive, send)
                return
            await self.serve_xhr_send(scope, receive, send, match.group(1), match.group(2))

        return asgi

    async def serve_xhr_send(self, scope, receive, send, server_id: str, session_id: str) -> None:
        """A client's messages for its session.  Every refusal is answered before the body is
        read (and the body then dropped as it arrives); the body itself is read only up to
        stomp.max_frame_bytes."""
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in reversed(scope.get("headers", []))
        }  # the first one wins
        origin, host = headers.get("origin"), headers.get("host")
        client = scope.get("client")
        peer = transport_peer(scope)  # the connection itself, behind a trusted proxy too
        # CORS headers only for an allowed page: a refused one cannot even read its 403.
        answer = {"Content-Type": TEXT, "Vary": "Origin", **self.origins.cors_headers(origin, host)}

        async def answer_early(status: int, text: str) -> None:
            if not await respond(send, status, answer, text, receive, BODY_TIMEOUT_S):
                self.guard.abort(peer, "drain")  # it sends on and on: cut it off

        if not server_id or not session_id or "." in server_id or "." in session_id:
            await answer_early(404, "")
            return
        if not self.origins.allows(origin, host):
            self.guard.count(REFUSED_ORIGIN)
            log.debug("SockJS xhr_send from origin %s refused", loggable(origin))
            await answer_early(403, "Origin not allowed.\n")
            return
        carrier = self._owned(self.carriers.get(session_id), client)
        if carrier is None:
            await answer_early(404, "")
            return
        try:
            declared = int(headers["content-length"]) if "content-length" in headers else None
        except ValueError:
            declared = None  # h11 refuses such a request before us
        body = await read_body(receive, self.limits.max_frame_bytes, declared, BODY_TIMEOUT_S)
        if body.state is BodyState.TOO_LARGE:
            self.guard.count(REFUSED_BODY_TOO_LARGE)
            text = f"Payload too large (more than {self.limits.max_frame_bytes} bytes)."
            if body.finished:
                await respond(send, 413, answer, text)
            else:
                await answer_early(413, text)
            return
        if body.state is BodyState.TIMEOUT:
            await respond(send, 408, answer, "Payload not received in time.")
            return
        if body.state is BodyState.GONE or body.data is None:  # data: None unless COMPLETE
            return
        try:
            messages = decode_payload(body.data.decode("utf-8", "replace"))
        except PayloadError as exc:
            await respond(send, 500, answer, str(exc))
            return
        try:
            await self._feed(carrier, messages)
        except Exception:  # a bug must not take the connection's answer with it
            log.exception("SockJS xhr_send for session %s failed", loggable(session_id))
            await respond(send, 500, answer, "Internal error.")
            return
        await respond(send, 204, answer, "")

    def _stream(self, session_id: str, prelude: str, wrap, content_type: str) -> Response:
        carrier = self._carrier(session_id, create=True)
        client = transport_peer(request.scope)  # the connection to cut off when stuck

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
            loop = asyncio.get_running_loop()
            if not carrier.sockjs.attach(loop.time()):
                yield wrap(close_frame(*ANOTHER_CONNECTION)).encode()
                return
            carrier.receiver = client  # stuck writing when the outbox overflows: cut off
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
                carrier.sockjs.detach(loop.time())

        response = Response(body(), content_type=content_type)
        response.timeout = None
        return self._cors(self._no_cache(response))

    async def _websocket(self) -> None:
        # A SockJS websocket is its own session: no other transport may join it.
        await serve_websocket(
            websocket, self.service, self.limits, self.max_outbox, self.guard, self.origins, SOCKJS_WEBSOCKET
        )

    # ------------------------------------------------------------ HTTP details

    @staticmethod
    def _check_ids(server_id: str, session_id: str) -> None:
        if not server_id or not session_id or "." in server_id or "." in session_id:
            raise NotFound()

    @staticmethod
    def _no_cache(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store, no-cache, no-transform, must-revalidate, max-age=0"
        return response

    def _cors(self, response: Response) -> Response:
        """The CORS headers of an allowed page's request (none for a request without Origin:
        no browser reads across origins without sending one)."""
        response.headers["Vary"] = "Origin"
        cors = self.origins.cors_headers(request.headers.get("Origin"), request.headers.get("Host"))
        if cors:
            response.headers.update(cors)
            if request.headers.get("Access-Control-Request-Headers"):
                response.headers["Access-Control-Allow-Headers"] = request.headers[
                    "Access-Control-Request-Headers"
                ]
        return response

    def _options(self, methods: str) -> Response:
        response = Response("", status=204)
        response.headers["Access-Control-Allow-Methods"] = methods
        response.headers["Access-Control-Max-Age"] = "31536000"
        response.headers["Cache-Control"] = "public, max-age=31536000"
        return self._cors(response)

    def _js(self, text: str) -> Response:
        return self._cors(self._no_cache(Response(text, content_type=JS)))
