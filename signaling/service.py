"""The signaling core: what happens when a STOMP session connects, sends and leaves.

Transport-free: a StompEndpoint (endpoint.py, one per client, whichever
transport carries it) calls `authenticate` on CONNECT, creates the Session and
calls `connected` once accepted, `handle` for each STOMP event and `closed` at
the end.  SENDs to `/app/...` go to the handler `route` registered for the
destination (the table is stomp_routes.py's: presence, calls, TURN credentials);
a handler's SignalingError becomes a MESSAGE on the sender's
/user/queue/errors and nobody else hears of it.  So does a bug (500, counted,
logged at a bounded rate): one client's message must never end its session
with a traceback, let alone anyone else's.  Bodies are parsed with the size and
depth bounds of `Limits`; SENDs over the session's budget get 429.  Client
text reaches the log only through `loggable`.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable

from ratelog import RateLimitedLog

from .auth import TokenVerifier
from .broker import Broker
from .client_text import loggable, user_id_problem
from .errors import ERRORS_DESTINATION, SignalingError, unavailable
from .json_body import parse_json
from .presence import Presence
from .session import Session
from .stomp import ConnectionFailed, ConnectRequested, Limits, MessageSent, SendRefused

log = logging.getLogger("signaling")

Handler = Callable[[Session, object], None]  # (sender, its parsed JSON body)
CloseListener = Callable[[Session, bool], None]  # (session, it was its user's last)

# How long sessions lasted, CONNECT accepted to close, for the operator's histogram
# (appliance/ops/metrics.py): `counters` holds how many ended within each bound
# ("session_seconds_bucket_<i>", not cumulative, the last index for the longer ones) and
# their sum in milliseconds.
SESSION_SECONDS_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)


class SignalingService:
    def __init__(
        self,
        broker: Broker,
        verifier: TokenVerifier,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.verifier = verifier
        self.limits = limits = limits if limits is not None else Limits()
        self.presence = Presence(broker, limits.max_watched, limits.max_user_id_chars)
        self.routes: dict[str, Handler] = {}
        self.local_routes: set[str] = set()  # routes that work without the broker's Redis
        self.counters: Counter[str] = Counter()
        self._close_listeners: list[CloseListener] = []
        self.clock = clock
        # When each connected session was accepted (as many as are connected: `closed` forgets).
        self._connected_at: dict[Session, float] = {}
        self._failures = RateLimitedLog(log)
        # Users coming and going on other nodes (this node's own: connected and closed).
        broker.watch_presence(self.presence.changed)

    def route(self, destination: str, handler: Handler, needs_broker: bool = True) -> None:
        """SENDs to `destination` go to `handler(session, body)`; a handler that needs
        nothing of the broker's Redis (`needs_broker` False) keeps working while it is down."""
        self.routes[destination] = handler
        if not needs_broker:
            self.local_routes.add(destination)

    def on_session_closed(self, listener: CloseListener) -> None:
        """Have `listener(session, last_of_user)` called when a session is gone, after the
        broker has dropped it and before its user's OFFLINE goes out."""
        self._close_listeners.append(listener)

    @property
    def broker_healthy(self) -> bool:
        """False while a broker spanning nodes cannot reach its Redis."""
        return self.broker.healthy

    async def authenticate(self, event: ConnectRequested, claimed_user: str | None) -> str:
        """The user id the CONNECT's `ide` token belongs to; SignalingError 400 (an unusable
        userId, in the URL or the token), 401 or 403 otherwise."""
        if claimed_user is not None:
            problem = user_id_problem(claimed_user, self.limits.max_user_id_chars)
            if problem is not None:
                self.counters["auth_bad_user_id"] += 1
                log.info("connect refused: the URL's userId %s (%s)", problem, loggable(claimed_user))
                raise SignalingError(400, f"bad request: userId {problem}")
        token = event.frame.get("ide")
        if not token:
            self.counters["auth_missing_token"] += 1
            raise SignalingError(401, "unauthorized: no ide token")
        try:
            user = await self.verifier.verify(token)
        except SignalingError:
            self.counters["auth_bad_user_id"] += 1
            raise
        if user is None:
            self.counters["auth_bad_token"] += 1
            raise SignalingError(401, "unauthorized")
        if claimed_user is not None and user != claimed_user:
            self.counters["auth_wrong_user"] += 1
            log.info(
                "connect refused: token of user %s used for userId %s", loggable(user), loggable(claimed_user)
            )
            raise SignalingError(403, "forbidden")
        return user

    def connected(self, session: Session) -> None:
        self._connected_at[session] = self.clock()
        first = self.broker.register(session)
        log.info("session %s of user %s connected", session.id, loggable(session.user_id))
        if first:
            self.presence.changed(session.user_id, True)

    def handle(self, session: Session, event) -> None:
        if isinstance(event, MessageSent):
            session.received()
            self._on_send(session, event)
        elif isinstance(event, SendRefused):
            self.error(session, SignalingError(429, event.message))
            if event.close_message is not None:
                self.counters["send_floods"] += 1
                log.info(
                    "session %s of user %s closed: %s",
                    session.id,
                    loggable(session.user_id),
                    event.close_message,
                )
                session.conn.close_with_error(event.close_message)
        elif isinstance(event, ConnectionFailed):
            self.counters["protocol_errors"] += 1
            log.info("session %s closed for a protocol error: %s", session.id, loggable(event.message))
        session.flush()

    def closed(self, session: Session) -> None:
        last = self.broker.unregister(session)
        self.presence.forget(session)
        since = self._connected_at.pop(session, None)
        if since is not None:
            seconds = max(0.0, self.clock() - since)
            self.counters[f"session_seconds_bucket_{bisect_left(SESSION_SECONDS_BUCKETS, seconds)}"] += 1
            self.counters["session_seconds_sum_ms"] += round(seconds * 1000)
        if session.slow:
            self.counters["slow_consumers"] += 1
            log.warning(
                "session %s of user %s disconnected: it stopped reading",
                session.id,
                loggable(session.user_id),
            )
        log.info("session %s of user %s closed", session.id, loggable(session.user_id))
        for listener in self._close_listeners:
            listener(session, last)
        if last:
            self.presence.changed(session.user_id, False)

    def shutdown(self, reason: str = "server shutting down") -> int:
        """Close every local session cleanly: an ERROR frame (SockJS adds its close frame),
        then the transport closes.  Clients reconnect, to another node if there is one.
        Returns how many sessions were told."""
        sessions = self.broker.local_sessions()
        for session in sessions:
            session.conn.close_with_error(reason)
            session.flush()
        if sessions:
            log.info("shutdown: closing %d session(s)", len(sessions))
        return len(sessions)

    def disconnect_user(self, user_id: str, reason: str) -> int:
        """End every session of `user_id` on this node with an ERROR frame (an operator's
        disconnect); each close then runs as for a dropped connection, calls included.
        Returns how many sessions were told."""
        sessions = [s for s in self.broker.sessions_of(user_id) if not s.closed]
        for session in sessions:
            session.disconnect(reason)
        if sessions:
            self.counters["operator_disconnects"] += len(sessions)
            log.warning(
                "operator disconnect: %d session(s) of user %s closed", len(sessions), loggable(user_id)
            )
        return len(sessions)

    def error(self, session: Session, err: SignalingError) -> None:
        self.counters[f"error_{err.code}"] += 1
        session.deliver(ERRORS_DESTINATION, err.body())

    def _on_send(self, session: Session, event: MessageSent) -> None:
        destination = event.destination
        try:
            if not destination.startswith("/app/"):
                raise SignalingError(
                    403, f"clients may only SEND to /app destinations, not {destination[:100]}"
                )
            handler = self.routes.get(destination)
            if handler is None:
                raise SignalingError(404, f"no such destination {destination[:100]}")
            if not self.broker_healthy and destination not in self.local_routes:
                raise unavailable()
            payload = parse_json(event.frame.body, self.limits.max_frame_bytes, self.limits.max_json_depth)
            handler(session, payload)
        except SignalingError as err:
            self.error(session, err)
        except Exception:
            self.counters["internal_errors"] += 1
            self._failures.exception(
                time.monotonic(),
                "internal error on a SEND to %s from session %s",
                loggable(destination),
                session.id,
            )
            self.error(session, SignalingError(500, "internal error"))
