"""Calls, sans-I/O: the whole transition table, every docs/api.md §5 rule with its code,
multi-device routing, timers on a float clock, and random event sequences that
keep the invariants."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import signaling
from signaling.calls.machine import (
    CALL_NOT_FOUND,
    NOT_ALLOWED,
    TRANSITIONS,
    CallEvent,
    CallState,
    Outcome,
    Role,
    transition,
)
from signaling.calls.registry import CallEnded, CallRegistry, Notice
from signaling.errors import SignalingError

ONLINE = {"alice", "bob", "carol"}


def online(user: str) -> bool:
    return user in ONLINE


def request(call_id="c1", callee="bob", **extra):
    return {
        "callId": call_id,
        "type": "VIDEO",
        "callee": callee,
        "callerUserName": "Alice",
        "calleeUserName": "Bob",
        **extra,
    }


def code_of(fn, *args) -> int:
    with pytest.raises(SignalingError) as info:
        fn(*args)
    return info.value.code


@pytest.mark.parametrize("state, event, role", list(itertools.product(CallState, CallEvent, Role)))
def test_every_state_event_role_has_a_row_or_a_precise_refusal(state, event, role):
    result = transition(state, event, role)
    if (state, event, role) in TRANSITIONS:
        assert result == TRANSITIONS[(state, event, role)]
    else:
        assert result == (CALL_NOT_FOUND if state is CallState.ENDED else NOT_ALLOWED)


def test_the_table_never_leaves_ended_and_only_ends_with_an_outcome():
    for (state, _, _), (new_state, outcome) in TRANSITIONS.items():
        assert state is not CallState.ENDED
        if new_state is CallState.ENDED:
            assert outcome is not None


def test_calls_are_born_and_the_last_device_leaving_ends_them_by_rows_of_the_table():
    assert transition(CallState.NEW, CallEvent.REQUEST, Role.CALLER) == (CallState.RINGING, None)
    assert transition(CallState.RINGING, CallEvent.LAST_SESSION_CLOSED, Role.CALLEE) == (
        CallState.ENDED,
        Outcome.DROPPED,
    )
    # Only a ringing callee's last device ends the call at once; anybody else gets a grace.
    assert [key for key in TRANSITIONS if key[1] is CallEvent.LAST_SESSION_CLOSED] == [
        (CallState.RINGING, CallEvent.LAST_SESSION_CLOSED, Role.CALLEE)
    ]
    reg = CallRegistry()
    reg.request("alice", "a1", request(), 0.0, online)
    assert reg.calls["c1"].state is CallState.RINGING


class Ends:
    """A CallEndedListener that keeps what it hears."""

    def __init__(self) -> None:
        self.heard: list[CallEnded] = []

    def call_ended(self, ended: CallEnded) -> None:
        self.heard.append(ended)


def test_every_way_a_call_ends_is_announced_once():
    reg = CallRegistry(ring_timeout_s=30, grace_s=10)
    ends = Ends()
    reg.listen(ends)
    reg.request("alice", "a1", request("rejected"), 0.0, online)
    reg.respond("bob", "b1", {"callId": "rejected", "type": "REJECT"}, 1.0)
    reg.request("alice", "a1", request("timed-out"), 2.0, online)
    reg.handle_timer(32.0)
    reg.request("alice", "a1", request("callee-left"), 40.0, online)
    reg.session_lost("bob", "b1", True, 41.0)
    reg.request("alice", "a1", request("shut-down"), 50.0, online)
    reg.respond("bob", "b2", {"callId": "shut-down", "type": "ACCEPT"}, 51.0)
    code_of(reg.request, "carol", "c1", request("refused", callee="alice"), 52.0, online)  # busy
    reg.drop_all(53.0)
    assert ends.heard == [
        CallEnded(call_id, "alice", "bob")
        for call_id in ("rejected", "timed-out", "callee-left", "shut-down")
    ]


def test_business_codes_are_written_as_numbers_in_machine_py_only():
    root = Path(signaling.__file__).parent
    for path in root.rglob("*.py"):
        if path != root / "calls" / "machine.py":
            assert not re.search(r"\b100[1-6]\b", path.read_text()), path


def test_accept_flow_routes_to_the_bound_sessions_only():
    reg = CallRegistry()
    (ring,) = reg.request("alice", "a1", request(), 0.0, online)
    assert ring == Notice("bob", "/user/queue/call/request", {**request(), "caller": "alice"})
    response, down = reg.respond("bob", "b-phone", {"callId": "c1", "type": "ACCEPT"}, 1.0)
    assert response == Notice(
        "alice", "/user/queue/call/response", {"callId": "c1", "type": "ACCEPT"}, frozenset({"a1"})
    )
    assert down.user == "bob" and down.destination == "/user/queue/call/down"
    assert down.sessions is None and down.except_sessions == frozenset({"b-phone"})
    assert code_of(reg.respond, "bob", "b-laptop", {"callId": "c1", "type": "ACCEPT"}, 1.5) == 1004
    (offer,) = reg.signal("alice", "a1", {"callId": "c1", "type": "OFFER", "payload": "v=0"}, 2.0, 65536)
    assert offer == Notice(
        "bob",
        "/user/queue/rtc/signaling",
        {"callId": "c1", "type": "OFFER", "payload": "v=0", "from": "alice"},
        frozenset({"b-phone"}),
    )
    (answer,) = reg.signal("bob", "b-phone", {"callId": "c1", "type": "ANSWER", "payload": "v=0"}, 2.1, 65536)
    assert answer.user == "alice" and answer.sessions == frozenset({"a1"})
    (hangup,) = reg.hangup("alice", "a1", {"callId": "c1"}, 3.0)
    assert hangup == Notice("bob", "/user/queue/call/hangup", {"callId": "c1"}, frozenset({"b-phone"}))
    assert reg.outcomes[Outcome.ACCEPTED] == 1 and reg.outcomes[Outcome.HUNG_UP] == 1
    assert code_of(reg.hangup, "bob", "b-phone", {"callId": "c1"}, 4.0) == 1003
    assert not reg.live_call_of


def test_reject_cancel_and_timeout():
    reg = CallRegistry(ring_timeout_s=30)
    reg.request("alice", "a1", request("r"), 0.0, online)
    response, _ = reg.respond("bob", "b1", {"callId": "r", "type": "REJECT"}, 1.0)
    assert response.body == {"callId": "r", "type": "REJECT"}
    reg.request("alice", "a1", request("c"), 2.0, online)
    (cancel,) = reg.hangup("alice", "a1", {"callId": "c"}, 3.0)
    assert cancel == Notice("bob", "/user/queue/call/hangup", {"callId": "c"}, None)
    reg.request("alice", "a1", request("t"), 10.0, online)
    assert reg.get_timer() <= 40.0
    assert reg.handle_timer(39.9) == []
    to_callee, to_caller = reg.handle_timer(40.0)
    assert to_callee == Notice("bob", "/user/queue/call/timeout", {"callId": "t"}, None)
    assert to_caller == Notice("alice", "/user/queue/call/timeout", {"callId": "t"}, frozenset({"a1"}))
    assert reg.outcomes == {Outcome.REJECTED: 1, Outcome.CANCELLED: 1, Outcome.TIMED_OUT: 1}


@pytest.mark.parametrize(
    "caller, body, code",
    [
        ("alice", request(callee="alice"), 400),
        ("alice", request(callee="dave"), 1002),
        ("alice", request(type="FAX"), 400),
        ("alice", request(callId=""), 400),
        ("alice", request(callId="x" * 101), 400),
        ("alice", {"callId": "c", "callee": "bob"}, 400),
        ("alice", ["not", "an", "object"], 400),
    ],
)
def test_request_validation(caller, body, code):
    assert code_of(CallRegistry().request, caller, "s", body, 0.0, online) == code


def test_busy_caller_busy_and_reused_ids():
    reg = CallRegistry()
    reg.request("alice", "a1", request("c1"), 0.0, online)
    assert code_of(reg.request, "carol", "c1s", request("c2", callee="bob"), 0.0, online) == 1001
    assert code_of(reg.request, "carol", "c1s", request("c3", callee="alice"), 0.0, online) == 1001
    assert code_of(reg.request, "alice", "a1", request("c4", callee="carol"), 0.0, online) == 1006
    reg.hangup("alice", "a1", {"callId": "c1"}, 1.0)
    assert code_of(reg.request, "alice", "a1", request("c1"), 2.0, online) == 1005


def test_only_parties_act_and_only_the_callee_answers():
    reg = CallRegistry()
    reg.request("alice", "a1", request(), 0.0, online)
    assert code_of(reg.respond, "carol", "x", {"callId": "c1", "type": "ACCEPT"}, 1.0) == 1004
    assert code_of(reg.respond, "alice", "a1", {"callId": "c1", "type": "ACCEPT"}, 1.0) == 1004
    assert (
        code_of(reg.signal, "carol", "x", {"callId": "c1", "type": "OFFER", "payload": "v"}, 1.0, 99) == 1004
    )
    assert code_of(reg.respond, "bob", "b", {"callId": "nope", "type": "ACCEPT"}, 1.0) == 1003
    assert code_of(reg.respond, "bob", "b", {"callId": "c1", "type": "MAYBE"}, 1.0) == 400
    assert (
        code_of(reg.signal, "alice", "a1", {"callId": "c1", "type": "OFFER", "payload": "x" * 100}, 1.0, 50)
        == 400
    )
    assert (
        code_of(reg.signal, "alice", "a1", {"callId": "c1", "type": "ICE_CANDIDATE", "payload": "s"}, 1.0, 99)
        == 400
    )


def test_dropped_session_gets_a_grace_period_and_a_rebind():
    reg = CallRegistry(grace_s=10)
    reg.request("alice", "a1", request(), 0.0, online)
    reg.respond("bob", "b1", {"callId": "c1", "type": "ACCEPT"}, 1.0)
    assert reg.session_lost("bob", "b1", True, 2.0) == []
    reg.signal("bob", "b2", {"callId": "c1", "type": "ANSWER", "payload": "v=0"}, 5.0, 999)  # rebind
    assert reg.handle_timer(20.0) == []
    (offer,) = reg.signal("alice", "a1", {"callId": "c1", "type": "OFFER", "payload": "v"}, 21.0, 999)
    assert offer.sessions == frozenset({"b2"})
    reg.session_lost("alice", "a1", True, 30.0)
    assert reg.handle_timer(39.9) == []
    (hangup,) = reg.handle_timer(40.0)
    assert hangup == Notice("bob", "/user/queue/call/hangup", {"callId": "c1"}, frozenset({"b2"}))
    assert reg.outcomes[Outcome.DROPPED] == 1 and not reg.calls


def test_callee_leaving_while_ringing_times_out_for_the_caller():
    reg = CallRegistry()
    reg.request("alice", "a1", request(), 0.0, online)
    assert reg.session_lost("bob", "b1", False, 1.0) == []  # another device still rings
    (timeout,) = reg.session_lost("bob", "b2", True, 2.0)
    assert timeout == Notice("alice", "/user/queue/call/timeout", {"callId": "c1"}, frozenset({"a1"}))
    assert reg.outcomes[Outcome.DROPPED] == 1


def test_http_calls_reach_every_caller_session_and_empty_hangup_ends_all():
    reg = CallRegistry()
    reg.request("alice", None, request(), 0.0, online)
    response, _ = reg.respond("bob", "b1", {"callId": "c1", "type": "ACCEPT"}, 1.0)
    assert response.sessions is None
    (hangup,) = reg.hangup_all("bob", 2.0)
    assert hangup.user == "alice" and hangup.sessions is None
    assert reg.hangup_all("bob", 3.0) == []


USERS = ["alice", "bob", "carol"]
SESSIONS = {u: [f"{u}-1", f"{u}-2"] for u in USERS}

action = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(USERS), st.sampled_from(USERS), st.integers(0, 3)),
    st.tuples(
        st.just("respond"), st.sampled_from(USERS), st.sampled_from(["ACCEPT", "REJECT"]), st.integers(0, 3)
    ),
    st.tuples(st.just("hangup"), st.sampled_from(USERS), st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.just("signal"), st.sampled_from(USERS), st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.just("lost"), st.sampled_from(USERS), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("tick"), st.floats(0, 40), st.just(0), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(action, max_size=40))
def test_random_sequences_keep_the_invariants(actions):
    reg = CallRegistry(ring_timeout_s=30, grace_s=10)
    ends = Ends()
    reg.listen(ends)
    now = 0.0
    ended_notices: dict[str, Counter] = {}
    participants: dict[str, set[str]] = {}
    created: set[str] = set()
    for kind, a, b, c in actions:
        now += 1.0
        try:
            if kind == "request":
                notices = reg.request(a, SESSIONS[a][0], request(f"call{c}", callee=b), now, online)
                participants.setdefault(f"call{c}", {a, b})
            elif kind == "respond":
                notices = reg.respond(a, SESSIONS[a][0], {"callId": f"call{c}", "type": b}, now)
            elif kind == "hangup":
                notices = reg.hangup(a, SESSIONS[a][b], {"callId": f"call{c}"}, now)
            elif kind == "signal":
                notices = reg.signal(
                    a, SESSIONS[a][b], {"callId": f"call{c}", "type": "OFFER", "payload": "v=0"}, now, 999
                )
            elif kind == "lost":
                notices = reg.session_lost(a, SESSIONS[a][b], c, now)
            else:
                now += a
                notices = reg.handle_timer(now)
        except SignalingError as err:
            assert err.code in (400, 1001, 1002, 1003, 1004, 1005, 1006)
            notices = []
        for n in notices:
            call_id = n.body["callId"]
            assert n.user in participants[call_id]  # nobody outside the call hears of it
            if n.destination in ("/user/queue/call/hangup", "/user/queue/call/timeout"):
                ended_notices.setdefault(call_id, Counter())[n.user] += 1
        # A user is in at most one live call, and the index agrees with the calls.
        for user, call_id in reg.live_call_of.items():
            assert user in (reg.calls[call_id].caller, reg.calls[call_id].callee)
        assert len(reg.live_call_of) == 2 * len(reg.calls)
        # Every call that left the registry was announced, once (callIds are single use).
        created |= set(reg.calls)
        ended = [e.call_id for e in ends.heard]
        assert len(ended) == len(set(ended)) and set(ended) == created - set(reg.calls)
    for call_id, counts in ended_notices.items():
        assert all(n == 1 for n in counts.values()), (call_id, counts)


def test_callee_hanging_up_while_ringing_stops_its_other_devices():
    reg = CallRegistry()
    reg.request("alice", "a1", request(), 0.0, online)
    to_caller, down = reg.hangup("bob", "b-phone", {"callId": "c1"}, 1.0)
    assert to_caller == Notice("alice", "/user/queue/call/hangup", {"callId": "c1"}, frozenset({"a1"}))
    assert down == Notice(
        "bob", "/user/queue/call/down", {"callId": "c1", "type": "REJECT"}, None, frozenset({"b-phone"})
    )
    assert reg.outcomes[Outcome.REJECTED] == 1
