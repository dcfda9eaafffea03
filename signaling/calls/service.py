"""Calls on the wire: STOMP `/app/call/*` and `/app/rtc/signaling`, their HTTP twins,
dropped sessions and timers -- all feeding the sans-I/O CallRegistry and
delivering the Notices it returns through the broker."""

from __future__ import annotations

import asyncio
import json
import time

from quart import Quart, request

from ..broker import Broker
from ..http_api import authenticated_user, envelope
from ..errors import bad_request
from ..service import SignalingService
from ..session import Session
from .registry import CallRegistry, Notice

TIMER_MAX_WAIT_S = 1.0


class CallService:
    def __init__(self, broker: Broker, registry: CallRegistry, max_payload_bytes: int,
                 clock=time.monotonic) -> None:
        self.broker = broker
        self.registry = registry
        self.max_payload_bytes = max_payload_bytes
        self.clock = clock

    def deliver(self, notices: list[Notice]) -> None:
        for n in notices:
            body = json.dumps(n.body, ensure_ascii=False, separators=(",", ":")).encode()
            self.broker.to_user(n.user, n.destination, body, only=n.sessions,
                                exclude=n.except_sessions)

    # ------------------------------------------------------------ STOMP

    def install(self, signaling: SignalingService) -> None:
        reg = self.registry
        routes = {
            "/app/call/request": lambda s, p, now: reg.request(s.user_id, s.id, p, now, self.broker.is_online),
            "/app/call/response": lambda s, p, now: reg.respond(s.user_id, s.id, p, now),
            "/app/call/hangup": lambda s, p, now: reg.hangup(s.user_id, s.id, p, now),
            "/app/rtc/signaling": lambda s, p, now: reg.signal(s.user_id, s.id, p, now,
                                                               self.max_payload_bytes),
        }
        for destination, handle in routes.items():
            signaling.route(destination, self._stomp_handler(handle))
        signaling.close_hooks.append(self.session_closed)

    def _stomp_handler(self, handle):
        def handler(_service, session: Session, payload) -> None:
            self.deliver(handle(session, payload, self.clock()))
        return handler

    def session_closed(self, session: Session, last_of_user: bool) -> None:
        self.deliver(self.registry.session_lost(session.user_id, session.id, last_of_user, self.clock()))

    # ------------------------------------------------------------ HTTP twins

    def install_http(self, app: Quart, prefix: str, verifier) -> None:
        reg = self.registry

        async def call_view(handle, empty_ok: bool = False):
            user = await authenticated_user(verifier)
            body = await request.get_json(silent=True, force=True)
            if body is None and not (empty_ok and not await request.get_data()):
                raise bad_request("body is not valid JSON")
            self.deliver(handle(user, body, self.clock()))
            return envelope()

        @app.post(f"{prefix}/call/request")
        async def http_call_request():
            return await call_view(lambda u, b, now: reg.request(u, None, b, now, self.broker.is_online))

        @app.post(f"{prefix}/call/response")
        async def http_call_response():
            return await call_view(lambda u, b, now: reg.respond(u, None, b, now))

        @app.post(f"{prefix}/call/hangup")
        async def http_call_hangup():
            return await call_view(lambda u, b, now: reg.hangup_all(u, now) if b is None
                                   else reg.hangup(u, None, b, now), empty_ok=True)

    # ------------------------------------------------------------ time

    async def run_timers(self) -> None:
        while True:
            when = self.registry.get_timer()
            now = self.clock()
            wait = TIMER_MAX_WAIT_S if when is None else min(max(when - now, 0.0), TIMER_MAX_WAIT_S)
            await asyncio.sleep(wait)
            self.deliver(self.registry.handle_timer(self.clock()))
