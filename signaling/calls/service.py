"""Calls on one node: the operations clients ask for, run on the sans-I/O CallRegistry,
and the Notices it returns delivered through the broker.

Every call message is one of a few operations (`CallOp`).  Whatever carries
it -- a STOMP SEND (stomp_routes.py), an HTTP request (http_routes.py), a
session that dropped -- calls one plain method here: `sent_by` for a STOMP
session's message (routed here directly; errors raise, to be answered on its
/user/queue/errors), which `submit`s it,
`perform` for an HTTP request (returns when done, errors raise),
`session_closed` for a dropped session.  The timers (ring timeouts, grace
periods) are served by whoever runs the app's lifecycle (lifecycle.py) through
`next_timer` and `handle_timer`.

On one node the operations run here at once; CallCluster (cluster.py), the
CallService of nodes that share a Redis, sends each to the node that owns the
call instead.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Collection

from ..broker import Broker
from ..errors import SignalingError, bad_request
from ..session import Session
from .registry import CallRegistry, Notice


class CallOp(enum.Enum):
    """What a call message asks; its value travels between nodes."""

    REQUEST = "request"
    RESPOND = "respond"
    HANGUP = "hangup"  # a None body: every call of the user (HTTP)
    SIGNAL = "signal"
    LOST = "lost"  # a session of the user dropped


class CallService:
    def __init__(
        self,
        broker: Broker,
        registry: CallRegistry,
        max_payload_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.registry = registry
        self.max_payload_bytes = max_payload_bytes
        self.clock = clock

    def deliver(self, notices: list[Notice]) -> None:
        for n in notices:
            body = json.dumps(n.body, ensure_ascii=False, separators=(",", ":")).encode()
            self.broker.to_user(n.user, n.destination, body, only=n.sessions, exclude=n.except_sessions)

    def run_local(
        self, op: CallOp, user: str, session: str | None, body: object, now: float, last: bool = False
    ) -> list[Notice]:
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

    def run(self, op: CallOp, user: str, session: str | None, body: object, last: bool = False) -> None:
        """Run one operation here, now, and deliver what it says; errors raise."""
        self.deliver(self.run_local(op, user, session, body, self.clock(), last))

    # ------------------------------------------------------------ what the transports call

    def sent_by(self, op: CallOp, session: Session, body: object) -> None:
        """A call message a STOMP session SENT: the route of each call destination
        (stomp_routes.py); errors raise, to be answered on its /user/queue/errors."""
        if op is CallOp.HANGUP and body is None:
            # An empty hangup means "every call of mine" over HTTP only: a STOMP client
            # names its call.
            raise bad_request("body must be a JSON object")
        self.submit(op, session.user_id, session.id, body)

    def submit(self, op: CallOp, user: str, session: str | None, body: object, last: bool = False) -> None:
        """A call message from a STOMP session (or a dropped session); errors raise."""
        self.run(op, user, session, body, last)

    async def perform(self, op: CallOp, user: str, body: object) -> None:
        """A call message over HTTP; returns when it is done, errors raise."""
        self.run(op, user, None, body)

    def session_closed(self, user: str, session: str, last_of_user: bool) -> None:
        """A session of `user` is gone (`last_of_user`: the user has none left here)."""
        try:
            self.submit(CallOp.LOST, user, session, None, last_of_user)
        except SignalingError:
            pass  # nobody to tell: the session is gone

    async def live_calls_of(self, users: Collection[str]) -> dict[str, str]:
        """The live call of each of `users` who is in one (user -> callId), for operators;
        on one node the registry knows every call."""
        live = self.registry.live_call_of
        return {user: live[user] for user in users if user in live}

    # ------------------------------------------------------------ time

    def next_timer(self) -> float | None:
        """When `handle_timer` is next due, on `clock`; None: no call is waiting for time."""
        return self.registry.get_timer()

    def handle_timer(self) -> None:
        """Ring timeouts and grace periods that are due now: their notices go out."""
        self.deliver(self.registry.handle_timer(self.clock()))

    # ------------------------------------------------------------ lifecycle

    async def stop(self) -> None:
        """One node: its calls live in its registry only, and end with its sessions."""
