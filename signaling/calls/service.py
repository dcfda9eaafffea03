"""Calls on the wire: STOMP `/app/call/*` and `/app/rtc/signaling`, their HTTP twins,
dropped sessions and timers -- all feeding the sans-I/O CallRegistry and
delivering the Notices it returns through the broker.

Every call message is one of a few operations (`CallOp`).  On one node they
run here at once; CallCluster (cluster.py), the CallService of nodes that share
a Redis, sends each to the node that owns the call instead.
"""

from __future__ import annotations

import asyncio
import enum
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


class CallOp(enum.Enum):
    """What a call message asks; its value travels between nodes."""
    REQUEST = "request"
    RESPOND = "respond"
    HANGUP = "hangup"                # a None body: every call of the user (HTTP)
    SIGNAL = "signal"
    LOST = "lost"                    # a session of the user dropped


class CallService:
    def __init__(self, broker: Broker, registry: CallRegistry, max_payload_bytes: int,
                 clock=time.monotonic) -> None:
        self.broker = broker
        self.registry = registry
        self.max_payload_bytes = max_payload_bytes
        self.clock = clock
        self.signaling: SignalingService | None = None

    def deliver(self, notices: list[Notice]) -> None:
        for n in notices:
            body = json.dumps(n.body, ensure_ascii=False, separators=(",", ":")).encode()
            self.broker.to_user(n.user, n.destination, body, only=n.sessions,
                                exclude=n.except_sessions)

    def run_local(self, op: CallOp, user: str, session: str | None, body, now: float,
                  last: bool = False) -> list[Notice]:
        """One operation on this node's registry (`last`: for LOST, the session was the
        user's last one)."""
        reg = self.registry
        match op:
            case CallOp.REQUEST:
                return reg.request(user, session, body, now, self.broker.is_online)
            case CallOp.RESPOND:
                return reg.respond(user, session, body, now)
            case CallOp.HANGUP if body is None:
                return reg.hangup_all(user, now)
            case CallOp.HANGUP:
                return reg.hangup(user, session, body, now)
            case CallOp.SIGNAL:
                return reg.signal(user, session, body, now, self.max_payload_bytes)
            case CallOp.LOST:
                return reg.session_lost(user, session, last, now)

    def run(self, op: CallOp, user: str, session: str | None, body, last: bool = False) -> None:
        """Run one operation here, now, and deliver what it says; errors raise."""
        self.deliver(self.run_local(op, user, session, body, self.clock(), last))

    def submit(self, op: CallOp, user: str, session: str | None, body, last: bool = False) -> None:
        """A call message from a STOMP session (or a dropped session); errors raise."""
        self.run(op, user, session, body, last)

    async def perform(self, op: CallOp, user: str, body) -> None:
        """A call message over HTTP; returns when it is done, errors raise."""
        self.run(op, user, None, body)

    async def stop(self) -> None:
        """One node: its calls live in its registry only, and end with its sessions."""

    # ------------------------------------------------------------ STOMP

    def install(self, signaling: SignalingService) -> None:
        self.signaling = signaling
        routes = {"/app/call/request": CallOp.REQUEST, "/app/call/response": CallOp.RESPOND,
                  "/app/call/hangup": CallOp.HANGUP, "/app/rtc/signaling": CallOp.SIGNAL}
        for destination, op in routes.items():
            signaling.route(destination, self._stomp_handler(op))
        signaling.close_hooks.append(self.session_closed)

    def _stomp_handler(self, op: CallOp):
        def handler(_service, session: Session, payload) -> None:
            if op is CallOp.HANGUP and payload is None:
                raise bad_request("body must be a JSON object")
            self.submit(op, session.user_id, session.id, payload)
        return handler

    def session_closed(self, session: Session, last_of_user: bool) -> None:
        try:
            self.submit(CallOp.LOST, session.user_id, session.id, None, last_of_user)
        except SignalingError:
            pass                     # nobody to tell: the session is gone

    # ------------------------------------------------------------ HTTP twins

    def install_http(self, app: Quart, prefix: str, verifier) -> None:
        # Bodies are held to what a STOMP SEND may carry: the same size and nesting bounds.
        max_depth = (self.signaling.limits if self.signaling is not None else Limits()).max_json_depth
        no_body = object()

        async def call_view(op: CallOp, empty_ok: bool = False):
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
            return await call_view(CallOp.REQUEST)

        @app.post(f"{prefix}/call/response")
        async def http_call_response():
            return await call_view(CallOp.RESPOND)

        @app.post(f"{prefix}/call/hangup")
        async def http_call_hangup():
            return await call_view(CallOp.HANGUP, empty_ok=True)

    # ------------------------------------------------------------ time

    async def run_timers(self) -> None:
        while True:
            when = self.registry.get_timer()
            now = self.clock()
            wait = TIMER_MAX_WAIT_S if when is None else min(max(when - now, 0.0), TIMER_MAX_WAIT_S)
            await asyncio.sleep(wait)
            self.deliver(self.registry.handle_timer(self.clock()))
