"""Calls on the wire: STOMP `/app/call/*` and `/app/rtc/signaling`, their HTTP twins,
dropped sessions and timers -- all feeding the sans-I/O CallRegistry and
delivering the Notices it returns through the broker.

Every call message is one of a few operations (`run_local` names them).  On one
node they run here at once; with a `cluster` (calls across nodes, cluster.py)
they go to the node that owns the call.
"""

from __future__ import annotations

import asyncio
import json
import time

from quart import Quart

from ..broker import Broker
from ..errors import SignalingError, bad_request
from ..http_api import authenticated_user, envelope, request_json
from ..service import SignalingService
from ..session import Session
from ..stomp import Limits
from .registry import CallRegistry, Notice

TIMER_MAX_WAIT_S = 1.0


class CallService:
    def __init__(self, broker: Broker, registry: CallRegistry, max_payload_bytes: int,
                 clock=time.monotonic) -> None:
        self.broker = broker
        self.registry = registry
        self.max_payload_bytes = max_payload_bytes
        self.clock = clock
        self.signaling: SignalingService | None = None
        self.cluster = None            # a CallCluster when calls span nodes

    def deliver(self, notices: list[Notice]) -> None:
        for n in notices:
            body = json.dumps(n.body, ensure_ascii=False, separators=(",", ":")).encode()
            self.broker.to_user(n.user, n.destination, body, only=n.sessions,
                                exclude=n.except_sessions)

    def run_local(self, op: str, user: str, session: str | None, body, now: float,
                  last: bool = False) -> list[Notice]:
        """One operation on this node's registry: request, respond, hangup (a None body:
        every call of the user), signal, or lost (a session of the user dropped)."""
        reg = self.registry
        if op == "request":
            return reg.request(user, session, body, now, self.broker.is_online)
        if op == "respond":
            return reg.respond(user, session, body, now)
        if op == "hangup":
            return reg.hangup_all(user, now) if body is None else reg.hangup(user, session, body, now)
        if op == "signal":
            return reg.signal(user, session, body, now, self.max_payload_bytes)
        if op == "lost":
            return reg.session_lost(user, session, last, now)
        raise ValueError(f"unknown call operation {op!r}")

    def submit(self, op: str, user: str, session: str | None, body, last: bool = False) -> None:
        """A call message from a STOMP session (or a dropped session); errors raise."""
        if self.cluster is not None:
            self.cluster.submit(op, user, session, body, last)
        else:
            self.deliver(self.run_local(op, user, session, body, self.clock(), last))

    async def perform(self, op: str, user: str, body) -> None:
        """A call message over HTTP; returns when it is done, errors raise."""
        if self.cluster is not None:
            await self.cluster.perform(op, user, body)
        else:
            self.deliver(self.run_local(op, user, None, body, self.clock()))

    # ------------------------------------------------------------ STOMP

    def install(self, signaling: SignalingService) -> None:
        self.signaling = signaling
        routes = {"/app/call/request": "request", "/app/call/response": "respond",
                  "/app/call/hangup": "hangup", "/app/rtc/signaling": "signal"}
        for destination, op in routes.items():
            signaling.route(destination, self._stomp_handler(op))
        signaling.close_hooks.append(self.session_closed)

    def _stomp_handler(self, op: str):
        def handler(_service, session: Session, payload) -> None:
            if op == "hangup" and payload is None:
                raise bad_request("body must be a JSON object")
            self.submit(op, session.user_id, session.id, payload)
        return handler

    def session_closed(self, session: Session, last_of_user: bool) -> None:
        try:
            self.submit("lost", session.user_id, session.id, None, last_of_user)
        except SignalingError:
            pass                     # nobody to tell: the session is gone

    # ------------------------------------------------------------ HTTP twins

    def install_http(self, app: Quart, prefix: str, verifier) -> None:
        # Bodies are held to what a STOMP SEND may carry: the same size and nesting bounds.
        max_depth = (self.signaling.limits if self.signaling is not None else Limits()).max_json_depth
        no_body = object()

        async def call_view(op: str, empty_ok: bool = False):
            user = await authenticated_user(verifier)
            body = await request_json(self.max_payload_bytes, max_depth, empty=no_body)
            if body is no_body and empty_ok:
                body = None
            elif body is None or body is no_body:
                raise bad_request("body is not valid JSON")
            await self.perform(op, user, body)
            return envelope()

        @app.post(f"{prefix}/call/request")
        async def http_call_request():
            return await call_view("request")

        @app.post(f"{prefix}/call/response")
        async def http_call_response():
            return await call_view("respond")

        @app.post(f"{prefix}/call/hangup")
        async def http_call_hangup():
            return await call_view("hangup", empty_ok=True)

    # ------------------------------------------------------------ time

    async def run_timers(self) -> None:
        while True:
            when = self.registry.get_timer()
            now = self.clock()
            wait = TIMER_MAX_WAIT_S if when is None else min(max(when - now, 0.0), TIMER_MAX_WAIT_S)
            await asyncio.sleep(wait)
            self.deliver(self.registry.handle_timer(self.clock()))
