"""The core's budget for error replies to sources without an allocation (RelaySettings
unauth_replies_per_s / unauth_reply_burst): past it the core stays silent and counts
`unauth_replies_suppressed`; success responses and clients with an allocation are
never held to it."""

from __future__ import annotations

import os

import pytest

from turn import stun

from .test_core_safety_net import BrokenOpener
from .turn_fakes import T0, CoreClient, FakeClientLink, error_code, make_core

ATTACKER = ("203.0.113.66", 50000)


def unauthenticated_allocate() -> bytes:
    b = stun.Builder(stun.ALLOCATE, stun.REQUEST, os.urandom(12))
    b.add(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")
    return b.encode()


def unknown_method() -> bytes:
    return stun.Builder(0x00F, stun.REQUEST, os.urandom(12)).encode()


def binding_with_unknown_attribute() -> bytes:
    b = stun.Builder(stun.BINDING, stun.REQUEST, os.urandom(12))
    b.add(0x0031, b"x")  # comprehension-required and unknown: 420
    return b.encode()


def binding() -> bytes:
    return stun.Builder(stun.BINDING, stun.REQUEST, os.urandom(12)).encode()


def flood(core, data_for, count: int, addr=ATTACKER, now: float = T0) -> list[bytes | None]:
    link = FakeClientLink(addr, addr)
    return [core.handle_stun(data_for(), link, now) for _ in range(count)]


@pytest.mark.parametrize(
    "name, data_for, code",
    [
        ("401 challenge", unauthenticated_allocate, 401),
        ("400 unknown method", unknown_method, 400),
        ("420 Binding", binding_with_unknown_attribute, 420),
    ],
)
def test_error_replies_to_one_source_stop_at_the_burst(name, data_for, code):
    core, _ = make_core(unauth_replies_per_s=20, unauth_reply_burst=10)
    replies = flood(core, data_for, 500)
    answered = [r for r in replies if r is not None]
    assert len(answered) == 10
    assert all(error_code(stun.parse(r)) == code for r in answered)
    assert core.counters["unauth_replies_suppressed"] == 490
    assert core.counters[f"error_{code}"] == 10  # error_* counts what was sent
    # A quarter of a second later the bucket holds 20/s x 0.25 s; after 10 s, the burst.
    assert sum(r is not None for r in flood(core, data_for, 100, now=T0 + 0.25)) == 5
    assert sum(r is not None for r in flood(core, data_for, 100, now=T0 + 10)) == 10


def test_another_source_still_gets_its_challenge_and_allocates():
    core, _ = make_core(unauth_replies_per_s=20, unauth_reply_burst=10)
    flood(core, unauthenticated_allocate, 1000)
    client = CoreClient(core, addr=("198.51.100.20", 40000))
    assert client.allocate().cls == stun.SUCCESS


def test_binding_success_is_not_budgeted():
    core, _ = make_core(unauth_replies_per_s=20, unauth_reply_burst=10)
    flood(core, unauthenticated_allocate, 100)  # the source's error budget is spent
    replies = flood(core, binding, 100)
    assert all(r is not None and stun.parse(r).cls == stun.SUCCESS for r in replies)


def test_a_client_with_an_allocation_is_never_budgeted():
    core, _ = make_core(unauth_replies_per_s=1, unauth_reply_burst=2)
    client = CoreClient(core, addr=ATTACKER)
    assert client.allocate().cls == stun.SUCCESS  # spent one token on its 401
    # Its errors keep coming however many: 437 for a second Allocate with another id.
    for _ in range(50):
        reply = stun.parse(
            client.raw(client.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")]))
        )
        assert error_code(reply) == 437
    assert core.counters["unauth_replies_suppressed"] == 0


def test_a_second_5_tuple_on_an_allocated_address_shares_the_source_budget():
    # The budget is per source address; only the 5-tuple that holds the allocation is exempt.
    core, _ = make_core(unauth_replies_per_s=1, unauth_reply_burst=3)
    client = CoreClient(core, addr=("203.0.113.66", 50000))
    assert client.allocate().cls == stun.SUCCESS
    other_port = ("203.0.113.66", 50001)
    replies = flood(core, unauthenticated_allocate, 10, addr=other_port)
    assert sum(r is not None for r in replies) == 2  # burst 3, one spent above


def test_the_500_answer_is_budgeted_too():
    core, _ = make_core(unauth_replies_per_s=20, unauth_reply_burst=5)
    core.relays = BrokenOpener()
    client = CoreClient(core, addr=ATTACKER)
    client.allocate()  # its 401 and one 500
    replies = [
        client.raw(client.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")]))
        for _ in range(20)
    ]
    assert sum(r is not None for r in replies) == 3
    assert core.counters["error_500"] == 4 and core.counters["internal_errors"] == 21
    assert core.counters["unauth_replies_suppressed"] == 17


def test_rate_zero_answers_every_error():
    core, _ = make_core(unauth_replies_per_s=0, unauth_reply_burst=1)
    assert all(r is not None for r in flood(core, unauthenticated_allocate, 2000))
    assert core.counters["unauth_replies_suppressed"] == 0
