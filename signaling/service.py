"""The signaling core: what happens when a STOMP session connects, sends and leaves.

Transport-free: the WebSocket and SockJS handlers create a Session, call
`authenticate` on CONNECT, `connected` once accepted, `handle` for each
STOMP event and `closed` at the end.  SENDs to `/app/...` go to the router;
a handler's SignalingError becomes a MESSAGE on the sender's
/user/queue/errors and nobody else hears of it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from .auth import TokenVerifier
from .broker import Broker
from .errors import ERRORS_DESTINATION, SignalingError, parse_json, unavailable
from .presence import Presence
from .session import Session
from .stomp import ConnectRequested, MessageSent, ProtocolError

log = logging.getLogger("signaling")

Handler = Callable[["SignalingService", Session, object], None]


class SignalingService:
    def __init__(self, broker: Broker, verifier: TokenVerifier) -> None:
        self.broker = broker
        self.verifier = verifier
        self.presence = Presence(broker)
        self.routes: dict[str, Handler] = {"/app/user/status": lambda svc, s, p: svc.presence.query(s, p)}
        self.local_routes: set[str] = set()      # routes that work without the broker's Redis
        self.counters: Counter[str] = Counter()
        self.close_hooks: list[Callable[[Session, bool], None]] = []
        if hasattr(broker, "on_presence"):
            # A broker spanning nodes reports users coming and going on other nodes.
            broker.on_presence = self.presence.changed

    def route(self, destination: str, handler: Handler, needs_broker: bool = True) -> None:
        self.routes[destination] = handler
        if not needs_broker:
            self.local_routes.add(destination)

    @property
    def broker_healthy(self) -> bool:
        """False while a broker spanning nodes cannot reach its Redis."""
        return getattr(self.broker, "healthy", True)

    async def authenticate(self, event: ConnectRequested, claimed_user: str | None) -> str:
        """The user id the CONNECT's `ide` token belongs to; SignalingError 401/403 otherwise."""
        token = event.frame.get("ide")
        if not token:
            self.counters["auth_missing_token"] += 1
            raise SignalingError(401, "unauthorized: no ide token")
        user = await self.verifier.verify(token)
        if user is None:
            self.counters["auth_bad_token"] += 1
            raise SignalingError(401, "unauthorized")
        if claimed_user is not None and user != claimed_user:
            self.counters["auth_wrong_user"] += 1
            log.info("connect refused: token of user %s used for userId %s", user, claimed_user)
            raise SignalingError(403, "forbidden")
        return user

    def connected(self, session: Session) -> None:
        first = self.broker.register(session)
        log.info("session %s of user %s connected", session.id, session.user_id)
        if first:
            self.presence.changed(session.user_id, True)

    def handle(self, session: Session, event) -> None:
        if isinstance(event, MessageSent):
            self._on_send(session, event)
        elif isinstance(event, ProtocolError):
            self.counters["protocol_errors"] += 1
            log.info("session %s closed for a protocol error: %s", session.id, event.message)
        session.flush()

    def closed(self, session: Session) -> None:
        last = self.broker.unregister(session)
        self.presence.forget(session)
        if session.slow:
            self.counters["slow_consumers"] += 1
            log.warning("session %s of user %s disconnected: it stopped reading", session.id,
                        session.user_id)
        log.info("session %s of user %s closed", session.id, session.user_id)
        for hook in self.close_hooks:
            hook(session, last)
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

    def error(self, session: Session, err: SignalingError) -> None:
        self.counters[f"error_{err.code}"] += 1
        session.deliver(ERRORS_DESTINATION, err.body())

    def _on_send(self, session: Session, event: MessageSent) -> None:
        destination = event.destination
        try:
            if not destination.startswith("/app/"):
                raise SignalingError(403, f"clients may only SEND to /app destinations, not {destination[:100]}")
            handler = self.routes.get(destination)
            if handler is None:
                raise SignalingError(404, f"no such destination {destination[:100]}")
            if not self.broker_healthy and destination not in self.local_routes:
                raise unavailable()
            handler(self, session, parse_json(event.frame.body))
        except SignalingError as err:
            self.error(session, err)
