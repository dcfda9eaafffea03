"""A call's states and the one table of its transitions (API.md §5).

Every (state, event, role) either has a row here or is refused with the
business code `refusal()` names -- never a silent no-op (h11's rule).  Roles:
the caller, the callee, or the server itself (timers).
"""

from __future__ import annotations

import enum


class CallState(enum.Enum):
    RINGING = "ringing"
    ACCEPTED = "accepted"
    ENDED = "ended"


class Role(enum.Enum):
    CALLER = "caller"
    CALLEE = "callee"
    SERVER = "server"


class CallEvent(enum.Enum):
    ACCEPT = "accept"                # Call-Response ACCEPT
    REJECT = "reject"                # Call-Response REJECT
    HANGUP = "hangup"                # Call-Hangup
    SIGNAL = "signal"                # RTC signaling (OFFER / ANSWER / ICE_CANDIDATE)
    RING_TIMEOUT = "ring timeout"    # nobody answered within calls.ring_timeout_s
    GRACE_EXPIRED = "grace expired"  # a party's session dropped and did not come back
    SHUTDOWN = "shutdown"            # the node that holds the call is going away


class Outcome(enum.Enum):
    """How a call ended (or that it was answered): one counter each."""
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    HUNG_UP = "hung up"
    TIMED_OUT = "timed out"
    DROPPED = "dropped"


CALL_NOT_FOUND = 1003        # unknown or already ended
NOT_ALLOWED = 1004           # not a participant, or not in this state

R, A, E = CallState.RINGING, CallState.ACCEPTED, CallState.ENDED
TRANSITIONS: dict[tuple[CallState, CallEvent, Role], tuple[CallState, Outcome | None]] = {
    (R, CallEvent.ACCEPT, Role.CALLEE): (A, Outcome.ACCEPTED),
    (R, CallEvent.REJECT, Role.CALLEE): (E, Outcome.REJECTED),
    (R, CallEvent.HANGUP, Role.CALLER): (E, Outcome.CANCELLED),
    # A callee that hangs up a ringing call declines it.
    (R, CallEvent.HANGUP, Role.CALLEE): (E, Outcome.REJECTED),
    # Early signaling (an offer sent while it rings) is relayed unchanged.
    (R, CallEvent.SIGNAL, Role.CALLER): (R, None),
    (R, CallEvent.SIGNAL, Role.CALLEE): (R, None),
    (R, CallEvent.RING_TIMEOUT, Role.SERVER): (E, Outcome.TIMED_OUT),
    (R, CallEvent.GRACE_EXPIRED, Role.CALLER): (E, Outcome.DROPPED),
    (R, CallEvent.GRACE_EXPIRED, Role.CALLEE): (E, Outcome.DROPPED),
    (A, CallEvent.HANGUP, Role.CALLER): (E, Outcome.HUNG_UP),
    (A, CallEvent.HANGUP, Role.CALLEE): (E, Outcome.HUNG_UP),
    (A, CallEvent.SIGNAL, Role.CALLER): (A, None),
    (A, CallEvent.SIGNAL, Role.CALLEE): (A, None),
    (A, CallEvent.GRACE_EXPIRED, Role.CALLER): (E, Outcome.DROPPED),
    (A, CallEvent.GRACE_EXPIRED, Role.CALLEE): (E, Outcome.DROPPED),
    (R, CallEvent.SHUTDOWN, Role.SERVER): (E, Outcome.DROPPED),
    (A, CallEvent.SHUTDOWN, Role.SERVER): (E, Outcome.DROPPED),
}


def refusal(state: CallState, event: CallEvent, role: Role) -> int:
    """The business code for an event the table has no row for."""
    if state is CallState.ENDED:
        return CALL_NOT_FOUND
    return NOT_ALLOWED


def transition(state: CallState, event: CallEvent, role: Role) -> tuple[CallState, Outcome | None] | int:
    """The next state and outcome, or the refusal code."""
    row = TRANSITIONS.get((state, event, role))
    return row if row is not None else refusal(state, event, role)
