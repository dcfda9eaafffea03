"""The node's ledger (turn/ledger.py): one contract for the in-process and the shared
file; quotas that hold across relay processes, reserved ports counted, a dead process
forgotten; and the core and the peer policy using it."""

from __future__ import annotations

import os

import pytest

from turn import stun
from turn.core import RESERVATION_LIFETIME_S
from turn.ledger import LocalLedger, SharedLedger, user_slots
from turn.policy import build_policy

from .turn_fakes import T0, CoreClient, error_code, lifetime_attr, make_core, peer_attr

KEY = os.urandom(32)


@pytest.fixture(params=["local", "shared"])
def ledger(request, tmp_path):
    if request.param == "local":
        yield LocalLedger()
        return
    shared = SharedLedger.create(2, 1024, KEY, tmp_path)
    yield shared
    shared.remove()


def test_quotas_count_and_refuse_with_the_right_code(ledger):
    assert ledger.admit("alice", 2, 3, 5) == 0
    assert ledger.admit("alice", 2, 3, 5) == 486  # 4 > user quota 3
    assert ledger.admit("alice", 1, 3, 5) == 0
    assert ledger.admit("bob", 2, 3, 5) == 0  # 5: the total quota, reached
    assert ledger.admit("carol", 1, 3, 5) == 508


def test_release_frees_room_and_never_goes_below_zero(ledger):
    assert ledger.admit("alice", 3, 3, 0) == 0
    ledger.release("alice", 5)  # more than it held
    ledger.release("nobody")
    assert ledger.admit("alice", 3, 3, 3) == 0
    assert ledger.admit("bob", 1, 3, 3) == 508


def test_zero_quotas_mean_unlimited(ledger):
    for _ in range(50):
        assert ledger.admit("alice", 1, 0, 0) == 0


def test_ports_are_marked_per_family(ledger):
    ledger.mark_port(stun.FAMILY_IPV4, 61000, True)
    assert ledger.holds_port(stun.FAMILY_IPV4, 61000)
    assert not ledger.holds_port(stun.FAMILY_IPV6, 61000)
    assert not ledger.holds_port(stun.FAMILY_IPV4, 61001)
    ledger.mark_port(stun.FAMILY_IPV4, 61000, False)
    assert not ledger.holds_port(stun.FAMILY_IPV4, 61000)


def test_the_quota_holds_across_processes_of_a_node(tmp_path):
    main = SharedLedger.create(3, 1024, KEY, tmp_path)
    workers = [SharedLedger(main.path, i, key=KEY) for i in (1, 2)]
    try:
        assert main.admit("alice", 1, 3, 0) == 0
        assert workers[0].admit("alice", 1, 3, 0) == 0
        assert workers[1].admit("alice", 1, 3, 0) == 0
        for process in (main, *workers):
            assert process.admit("alice", 1, 3, 0) == 486
        workers[0].mark_port(stun.FAMILY_IPV4, 62000, True)
        assert main.holds_port(stun.FAMILY_IPV4, 62000)
        # Worker 1 dies: what it held goes with it, the others' counts stay.
        main.forget_process(1)
        assert not main.holds_port(stun.FAMILY_IPV4, 62000)
        assert workers[1].admit("alice", 1, 3, 0) == 0
        assert main.admit("alice", 1, 3, 0) == 486
    finally:
        for w in workers:
            w.close()
        main.remove()
    assert not main.path.exists()


def test_a_full_user_table_refuses_instead_of_searching_forever(tmp_path):
    shared = SharedLedger.create(1, 1024, KEY, tmp_path)
    try:
        codes = [shared.admit(f"user{i}", 1, 1, 0) for i in range(3000)]
        # Nearly every slot (a probe gives up after MAX_PROBES), and 508 past that.
        assert 900 <= codes.count(0) <= 1024
        assert codes.count(508) == 3000 - codes.count(0)
        for i in range(3000):
            shared.release(f"user{i}")
        # Users who hold nothing give their slots back.
        assert sum(shared.admit(f"new{i}", 1, 1, 0) == 0 for i in range(600)) == 600
    finally:
        shared.remove()


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    path = tmp_path / "other"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError):
        SharedLedger(path, 0, key=KEY)


@pytest.mark.parametrize("total, slots", [(0, 131072), (10, 1024), (10000, 32768), (1_000_000, 131072)])
def test_user_slots(total, slots):
    assert user_slots(total) == slots


# ------------------------------------------------------------------ in the core

EVEN_PORT_RESERVE = (stun.EVEN_PORT, b"\x80")


def test_a_reserved_port_counts_against_the_user_quota():
    core, _ = make_core(user_quota=3)
    first = CoreClient(core, addr=("198.51.100.20", 40000))
    assert first.allocate(EVEN_PORT_RESERVE).cls == stun.SUCCESS  # 1 + 1 reserved
    second = CoreClient(core, addr=("198.51.100.20", 40001))
    assert second.allocate().cls == stun.SUCCESS  # 3
    third = CoreClient(core, addr=("198.51.100.20", 40002))
    assert error_code(third.allocate()) == 486
    assert core.counters["user_quota_exceeded"] == 1
    # The reservation expires: its count goes with it.
    third.now = T0 + RESERVATION_LIFETIME_S + 1
    core.handle_timer(third.now)
    assert third.allocate().cls == stun.SUCCESS


def test_reservations_alone_cannot_take_more_than_the_quota():
    core, _ = make_core(user_quota=10)
    held = 0
    for port in range(40000, 40020):
        client = CoreClient(core, addr=("198.51.100.20", port))
        if client.allocate(EVEN_PORT_RESERVE).cls == stun.SUCCESS:
            held += 1
            # Delete the allocation, keep the reservation (the attack of the issue).
            assert client.send(stun.REFRESH, [lifetime_attr(0)]).cls == stun.SUCCESS
    # Each Allocate needs room for itself and its reservation: 8 reservations + 2 = 10,
    # so the 9th is the last (the issue saw 46 with a quota of 10).
    assert held == 9 and len(core._reservations) == 9
    assert core.ledger.per_user["alice"] == 9


def test_claiming_a_reservation_moves_its_count_to_the_claimer():
    core, _ = make_core(user_quota=2)
    alice = CoreClient(core, user="alice", addr=("198.51.100.20", 40000))
    token = alice.allocate(EVEN_PORT_RESERVE).get(stun.RESERVATION_TOKEN)
    bob = CoreClient(core, user="bob", addr=("198.51.100.21", 40000))
    assert bob.allocate((stun.RESERVATION_TOKEN, token)).cls == stun.SUCCESS
    assert core.ledger.per_user == {"alice": 1, "bob": 1}
    # alice holds one: an allocation with a reservation (two) is past her quota, one is not.
    again = CoreClient(core, user="alice", addr=("198.51.100.20", 40001))
    assert error_code(again.allocate(EVEN_PORT_RESERVE)) == 486
    assert again.allocate().cls == stun.SUCCESS


def test_claiming_ones_own_reservation_costs_nothing_more():
    core, _ = make_core(user_quota=2)
    alice = CoreClient(core, addr=("198.51.100.20", 40000))
    token = alice.allocate(EVEN_PORT_RESERVE).get(stun.RESERVATION_TOKEN)
    claimer = CoreClient(core, addr=("198.51.100.20", 40001))
    assert claimer.allocate((stun.RESERVATION_TOKEN, token)).cls == stun.SUCCESS
    assert core.ledger.per_user == {"alice": 2}


def test_ending_an_allocation_releases_its_count_and_port_once():
    core, _ = make_core(user_quota=1)
    client = CoreClient(core)
    reply = client.allocate()
    relayed = client.relayed(reply)
    assert core.ledger.holds_port(stun.FAMILY_IPV4, relayed[1])
    core.client_gone(client.key_id)
    core.client_gone(client.key_id)
    assert not core.ledger.holds_port(stun.FAMILY_IPV4, relayed[1])
    assert core.ledger.total == 0 and not core.ledger.per_user


# ------------------------------------------------------------------ strict expiry


def test_without_strict_expiry_a_live_allocation_outlives_its_username():
    core, _ = make_core()
    client = CoreClient(core, expiry=int(T0) + 60)
    assert client.allocate().cls == stun.SUCCESS
    client.now = T0 + 120
    assert client.send(stun.REFRESH).cls == stun.SUCCESS


def test_strict_expiry_refuses_every_request_after_the_username_expires():
    core, _ = make_core(strict_expiry=True)
    client = CoreClient(core, expiry=int(T0) + 60)
    reply = client.allocate(lifetime_attr(3600))
    assert stun.u32(reply.get(stun.LIFETIME)) == 60  # capped at the username's expiry
    client.now = T0 + 30
    assert stun.u32(client.send(stun.REFRESH, [lifetime_attr(600)]).get(stun.LIFETIME)) == 30
    client.now = T0 + 61
    for method, attrs in ((stun.REFRESH, []), (stun.CREATE_PERMISSION, [peer_attr(("8.8.8.8", 1))])):
        reply = stun.parse(client.raw(client.build(method, attrs)))
        assert error_code(reply) == 401
    assert core.counters["auth_expired"] == 2


def test_strict_expiry_ends_the_allocation_at_the_username_expiry():
    core, _ = make_core(strict_expiry=True)
    client = CoreClient(core, expiry=int(T0) + 60)
    assert client.allocate().cls == stun.SUCCESS
    core.handle_timer(T0 + 59)
    assert len(core.table) == 1
    core.handle_timer(T0 + 60)
    assert len(core.table) == 0


# ------------------------------------------------------------------ the peer policy


def test_the_own_relay_exception_covers_only_ports_live_allocations_hold():
    ports = LocalLedger()
    policy = build_policy(["recommended"], [], [], ["127.0.0.1", "::1"], (61000, 65535), ports)
    assert not policy.permits("127.0.0.1", 61500)  # in the range, nobody holds it
    ports.mark_port(stun.FAMILY_IPV4, 61500, True)
    assert policy.permits("127.0.0.1", 61500)
    assert policy.permits("::ffff:127.0.0.1", 61500)  # the same address, mapped
    assert not policy.permits("::1", 61500)  # the IPv6 port is another port
    assert not policy.permits("127.0.0.1", 8080)
    ports.mark_port(stun.FAMILY_IPV4, 61500, False)
    assert not policy.permits("127.0.0.1", 61500)
