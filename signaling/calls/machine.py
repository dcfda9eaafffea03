"""A call's states and the one table of its transitions (docs/api.md §5).

Every (state, event, role) either has a row here or is refused with the
business code `refusal()` names -- never a silent no-op (h11's rule).  Roles:
the caller, the callee, or the server itself (timers).  A call is born NEW and
its request is the first row; the business codes every call refusal carries
live here too, with the messages clients see.
"""

from __future__ import annotations

import enum


class CallState(enum.Enum):
    NEW = "new"  # created, its request not yet applied
    RINGING = "ringing"
    ACCEPTED = "accepted"
    ENDED = "ended"


class Role(enum.Enum):
    CALLER = "caller"
    CALLEE = "callee"
    SERVER = "server"


class CallEvent(enum.Enum):
    REQUEST = "request"  # Call-Request: the caller places the call
    ACCEPT = "accept"  # Call-Response ACCEPT
    REJECT = "reject"  # Call-Response REJECT
    HANGUP = "hangup"  # Call-Hangup
    SIGNAL = "signal"  # RTC signaling (OFFER / ANSWER / ICE_CANDIDATE)
    RING_TIMEOUT = "ring timeout"  # nobody answered within calls.ring_timeout_s
    GRACE_EXPIRED = "grace expired"  # a party's session dropped and did not come back
    LAST_SESSION_CLOSED = "last session closed"  # the party has no session left at all
    SHUTDOWN = "shutdown"  # the node that holds the call is going away


class Outcome(enum.Enum):
    """How a call ended (or that it was answered): one counter each."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    HUNG_UP = "hung up"
    TIMED_OUT = "timed out"
    DROPPED = "dropped"


# Business codes (docs/api.md §2): the only place they are written as numbers.
CALLEE_BUSY = 1001  # the callee is in a call, or being called
CALLEE_OFFLINE = 1002  # the callee has no session anywhere
CALL_NOT_FOUND = 1003  # unknown or already ended
NOT_ALLOWED = 1004  # not a participant, or not in this state
CALL_ID_USED = 1005  # callIds are single use
CALLER_BUSY = 1006  # the caller is in a call already

# What each code says to the client (1004 says more when a state refuses an event).
REFUSALS = {
    CALLEE_BUSY: "callee busy",
    CALLEE_OFFLINE: "callee offline",
    CALL_NOT_FOUND: "call not found or already ended",
    NOT_ALLOWED: "not a participant of this call",
    CALL_ID_USED: "callId already used",
    CALLER_BUSY: "caller already in a call",
}

N, R, A, E = CallState.NEW, CallState.RINGING, CallState.ACCEPTED, CallState.ENDED
TRANSITIONS: dict[tuple[CallState, CallEvent, Role], tuple[CallState, Outcome | None]] = {
    (N, CallEvent.REQUEST, Role.CALLER): (R, None),
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
    # A ringing callee with no device left cannot answer: the call ends at once.  (A
    # caller's, or an answered callee's, dropped session gets a grace period instead.)
    (R, CallEvent.LAST_SESSION_CLOSED, Role.CALLEE): (E, Outcome.DROPPED),
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
