"""Live calls, sans-I/O: requests, answers, hang-ups, RTC signaling, timers.

A party's message (request, respond, hangup, signal) takes the acting user, the
session it came from (None over HTTP), its JSON body and `now`; it validates
the body (400 naming the field), applies one row of machine.py's table (or
raises the row's refusal code) and returns the Notices to deliver -- who gets
which destination with which body.  Dropped sessions (`session_lost`), timers
(`handle_timer`) and a node going away (`drop_all`) go through the same table.
The transport layer only delivers the Notices.  Whatever else must happen when
a call ends (another node's record of it) listens for `CallEnded`.  Whether a
user is busy, and which call is whose, are dictionary reads (`live_call_of`,
`calls`).

Routing (docs/api.md §5.7): before the answer the callee rings on every
session; after it, messages for the callee go only to the accepting session
and messages for the caller to the calling session (all caller sessions when
the call was placed over HTTP).  A bound session that drops starts a grace
period; a new session of the same user that sends any call message for that
call takes its place; otherwise the other party gets a hangup.  When the
callee's last session drops while the call still rings, nobody can answer:
the caller gets call/timeout, as if the ring had run out (the outcome counts
it as dropped).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..client_text import loggable
from ..errors import SignalingError, bad_request
from .machine import (
    CALL_ID_USED,
    CALL_NOT_FOUND,
    CALLEE_BUSY,
    CALLEE_OFFLINE,
    CALLER_BUSY,
    NOT_ALLOWED,
    REFUSALS,
    CallEvent,
    CallState,
    Outcome,
    Role,
    transition,
)

log = logging.getLogger("signaling.calls")

MAX_CALL_ID = 100
REMEMBERED_CALL_IDS = 100_000
CALL_TYPES = ("VIDEO", "AUDIO")
RESPONSE_TYPES = ("ACCEPT", "REJECT")
SIGNAL_TYPES = ("OFFER", "ANSWER", "ICE_CANDIDATE")


def refused(code: int) -> SignalingError:
    """The error a business code sends the client, with the message machine.py gives it."""
    return SignalingError(code, REFUSALS[code])


@dataclass(frozen=True)
class Notice:
    user: str
    destination: str
    body: dict[str, Any]
    sessions: frozenset[str] | None = None  # None: every session of the user
    except_sessions: frozenset[str] = frozenset()


@dataclass
class Call:
    id: str
    type: str
    caller: str
    callee: str
    request: dict[str, Any]
    ring_deadline: float
    caller_sessions: frozenset[str] | None  # None: placed over HTTP, all caller sessions
    callee_session: str | None = None
    state: CallState = CallState.NEW
    grace: dict[Role, float] = field(default_factory=dict)
    created: float = 0.0  # when it was requested, on the registry's clock

    def role_of(self, user: str) -> Role | None:
        return Role.CALLER if user == self.caller else Role.CALLEE if user == self.callee else None

    def other(self, role: Role) -> str:
        return self.callee if role is Role.CALLER else self.caller

    def sessions_of(self, role: Role) -> frozenset[str] | None:
        """Where messages for `role` go now (None: every session of that user)."""
        if role is Role.CALLER:
            return self.caller_sessions
        return frozenset({self.callee_session}) if self.callee_session else None


@dataclass(frozen=True)
class CallEnded:
    """A call left the registry, whichever row ended it."""

    call_id: str
    caller: str
    callee: str


class CallEndedListener(Protocol):
    def call_ended(self, ended: CallEnded) -> None:
        """Called as the call ends, before the Notices that say so are returned."""


def ended_notices(call_id: str, *users: str) -> list[Notice]:
    """A hangup on every session of each user: the call is over, whatever its state was."""
    return [Notice(user, "/user/queue/call/hangup", {"callId": call_id}) for user in users]


def _text(body: dict[str, Any], name: str, limit: int = 100) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{name} is required")
    if len(value) > limit:
        raise bad_request(f"{name} must be at most {limit} characters")
    return value


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object")
    return body


class CallRegistry:
    def __init__(self, ring_timeout_s: float = 30.0, grace_s: float = 10.0) -> None:
        self.ring_timeout_s = ring_timeout_s
        self.grace_s = grace_s
        self.calls: dict[str, Call] = {}
        self.live_call_of: dict[str, str] = {}  # user -> live call id
        self.outcomes: Counter[Outcome] = Counter()
        self._used_ids: OrderedDict[str, None] = OrderedDict()
        self._timers: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._listeners: list[CallEndedListener] = []

    def listen(self, listener: CallEndedListener) -> None:
        """Have `listener` hear of every call that ends from now on."""
        self._listeners.append(listener)

    # ------------------------------------------------------------ requests

    @staticmethod
    def parse_request(caller: str, body: object) -> tuple[str, str, dict[str, Any]]:
        """(callId, callee, the request as the callee sees it), or 400 naming the field."""
        body = _object(body)
        call_id = _text(body, "callId", MAX_CALL_ID)
        callee = _text(body, "callee", 128)
        for name in ("callerUserName", "calleeUserName"):
            _text(body, name, 128)
        call_type = body.get("type", "VIDEO")
        if call_type not in CALL_TYPES:
            raise bad_request("type must be VIDEO or AUDIO")
        if callee == caller:
            raise bad_request("a user cannot call themselves")
        return call_id, callee, {**body, "type": call_type, "caller": caller}

    def request(
        self, caller: str, session: str | None, body: object, now: float, online: Callable[[str], bool]
    ) -> list[Notice]:
        call_id, callee, request = self.parse_request(caller, body)
        if call_id in self.calls or call_id in self._used_ids:
            raise refused(CALL_ID_USED)
        if caller in self.live_call_of:
            raise refused(CALLER_BUSY)
        if callee in self.live_call_of:
            raise refused(CALLEE_BUSY)
        if not online(callee):
            raise refused(CALLEE_OFFLINE)
        call = Call(
            call_id,
            request["type"],
            caller,
            callee,
            request,
            now + self.ring_timeout_s,
            frozenset({session}) if session else None,
            created=now,
        )
        self._step(call, CallEvent.REQUEST, Role.CALLER, now)
        self.calls[call_id] = call
        self.live_call_of[caller] = self.live_call_of[callee] = call_id
        self._remember(call_id)
        self._arm(call.ring_deadline, call_id)
        return [Notice(callee, "/user/queue/call/request", request)]

    def respond(self, user: str, session: str | None, body: object, now: float) -> list[Notice]:
        body = _object(body)
        answer = body.get("type")
        if answer not in RESPONSE_TYPES:
            raise bad_request("type must be ACCEPT or REJECT")
        call, role = self._party(user, _text(body, "callId", MAX_CALL_ID))
        event = CallEvent.ACCEPT if answer == "ACCEPT" else CallEvent.REJECT
        self._step(call, event, role, now)
        if event is CallEvent.ACCEPT:
            call.callee_session = session
        message = {"callId": call.id, "type": answer}
        answered_on = frozenset({session}) if session else frozenset()
        return [
            Notice(call.caller, "/user/queue/call/response", message, call.caller_sessions),
            Notice(call.callee, "/user/queue/call/down", message, None, answered_on),
        ]

    def hangup(self, user: str, session: str | None, body: object, now: float) -> list[Notice]:
        body = _object(body)
        call, role = self._party(user, _text(body, "callId", MAX_CALL_ID))
        self._rebind(call, role, session)
        was_ringing = call.state is CallState.RINGING
        self._step(call, CallEvent.HANGUP, role, now)
        other = Role.CALLEE if role is Role.CALLER else Role.CALLER
        notices = [
            Notice(call.other(role), "/user/queue/call/hangup", {"callId": call.id}, call.sessions_of(other))
        ]
        if was_ringing and role is Role.CALLEE:
            # Declined from one device: the callee's other devices stop ringing.
            notices.append(
                Notice(
                    call.callee,
                    "/user/queue/call/down",
                    {"callId": call.id, "type": "REJECT"},
                    None,
                    frozenset({session}) if session else frozenset(),
                )
            )
        return notices

    def hangup_all(self, user: str, now: float) -> list[Notice]:
        """HTTP hangup with an empty body: every call the user is in."""
        call_id = self.live_call_of.get(user)
        return [] if call_id is None else self.hangup(user, None, {"callId": call_id}, now)

    def signal(
        self, user: str, session: str | None, body: object, now: float, max_bytes: int
    ) -> list[Notice]:
        body = _object(body)
        kind = body.get("type")
        if kind not in SIGNAL_TYPES:
            raise bad_request("type must be OFFER, ANSWER or ICE_CANDIDATE")
        payload = body.get("payload")
        if kind == "ICE_CANDIDATE":
            if not isinstance(payload, dict) or not isinstance(payload.get("candidate"), str):
                raise bad_request("payload must be {candidate, sdpMid, sdpMLineIndex}")
        elif not isinstance(payload, str) or not payload:
            raise bad_request("payload must be an SDP string")
        if len(str(payload)) > max_bytes:
            raise bad_request(f"payload larger than {max_bytes} bytes")
        call, role = self._party(user, _text(body, "callId", MAX_CALL_ID))
        self._rebind(call, role, session)
        self._step(call, CallEvent.SIGNAL, role, now)
        other = Role.CALLEE if role is Role.CALLER else Role.CALLER
        return [
            Notice(
                call.other(role), "/user/queue/rtc/signaling", {**body, "from": user}, call.sessions_of(other)
            )
        ]

    # ------------------------------------------------------------ sessions and time

    def session_lost(self, user: str, session: str | None, last_of_user: bool, now: float) -> list[Notice]:
        call_id = self.live_call_of.get(user)
        call = self.calls.get(call_id) if call_id else None
        if call is None:
            return []
        role = call.role_of(user)
        if role is None:
            return []  # never: live_call_of names only a call's parties
        if role is Role.CALLEE and call.state is CallState.RINGING:
            if not last_of_user:
                return []  # another device still rings
            self._step(call, CallEvent.LAST_SESSION_CLOSED, Role.CALLEE, now)
            return [
                Notice(call.caller, "/user/queue/call/timeout", {"callId": call.id}, call.caller_sessions)
            ]
        bound = call.sessions_of(role)
        if bound is not None and session in bound and role not in call.grace:
            call.grace[role] = now + self.grace_s
            self._arm(call.grace[role], call.id)
        return []

    def drop_all(self, now: float) -> list[Notice]:
        """The node holding these calls is going away: each ends, both parties hear a hangup
        on every session (their clients may call again through another node)."""
        notices: list[Notice] = []
        for call in list(self.calls.values()):
            self._step(call, CallEvent.SHUTDOWN, Role.SERVER, now)
            notices += ended_notices(call.id, call.caller, call.callee)
        return notices

    def get_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> list[Notice]:
        notices: list[Notice] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, call_id = heapq.heappop(self._timers)
            call = self.calls.get(call_id)
            if call is None:
                continue
            if call.state is CallState.RINGING and call.ring_deadline <= now:
                self._step(call, CallEvent.RING_TIMEOUT, Role.SERVER, now)
                timeout = {"callId": call.id}
                notices += [
                    Notice(call.callee, "/user/queue/call/timeout", timeout),
                    Notice(call.caller, "/user/queue/call/timeout", timeout, call.caller_sessions),
                ]
                continue
            for role, deadline in list(call.grace.items()):
                if deadline <= now and call.state is not CallState.ENDED:
                    self._step(call, CallEvent.GRACE_EXPIRED, role, now)
                    other = Role.CALLEE if role is Role.CALLER else Role.CALLER
                    notices.append(
                        Notice(
                            call.other(role),
                            "/user/queue/call/hangup",
                            {"callId": call.id},
                            call.sessions_of(other),
                        )
                    )
        return notices

    # ------------------------------------------------------------ helpers

    def _party(self, user: str, call_id: str) -> tuple[Call, Role]:
        call = self.calls.get(call_id)
        if call is None:
            raise refused(CALL_NOT_FOUND)
        role = call.role_of(user)
        if role is None:
            raise refused(NOT_ALLOWED)
        return call, role

    def _rebind(self, call: Call, role: Role, session: str | None) -> None:
        """A party's message from another session of theirs takes the dropped one's place."""
        if role in call.grace and session is not None:
            del call.grace[role]
            if role is Role.CALLER and call.caller_sessions is not None:
                call.caller_sessions = frozenset({session})
            elif role is Role.CALLEE and call.callee_session is not None:
                call.callee_session = session

    def _step(self, call: Call, event: CallEvent, role: Role, now: float) -> None:
        result = transition(call.state, event, role)
        if isinstance(result, int):
            if result == NOT_ALLOWED:
                raise SignalingError(
                    result, f"{event.value} is not allowed while the call is {call.state.value}"
                )
            raise refused(result)
        new_state, outcome = result
        if new_state is not call.state:
            log.info(
                "call %s: %s -> %s, %s -> %s (%s by %s)",
                loggable(call.id),
                loggable(call.caller),
                loggable(call.callee),
                call.state.value,
                new_state.value,
                event.value,
                role.value,
            )
        call.state = new_state
        if outcome is not None:
            self.outcomes[outcome] += 1
        if new_state is CallState.ENDED:
            self._end(call)

    def _end(self, call: Call) -> None:
        del self.calls[call.id]
        for user in (call.caller, call.callee):
            if self.live_call_of.get(user) == call.id:
                del self.live_call_of[user]
        ended = CallEnded(call.id, call.caller, call.callee)
        for listener in self._listeners:
            listener.call_ended(ended)

    def _remember(self, call_id: str) -> None:
        self._used_ids[call_id] = None
        while len(self._used_ids) > REMEMBERED_CALL_IDS:
            self._used_ids.popitem(last=False)

    def _arm(self, when: float, call_id: str) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), call_id))
