"""The signaling's connection lifecycle, sans-I/O (issue 14, items 1-3): per-address keys
and caps, the connection table, the outbox's byte budget, the CONNECT deadline, and the
ASGI drain that keeps Hypercorn from blocking on a finished app's queue."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from signaling.admission import (
    REFUSED_RATE,
    REFUSED_SESSIONS,
    AddressPolicy,
    SessionAdmission,
    SessionLimits,
)
from signaling.auth import StaticVerifier
from signaling.broker import MemoryBroker
from signaling.connections import REFUSED_PER_ADDRESS, REFUSED_TOTAL, ConnectionTable
from signaling.endpoint import StompEndpoint
from signaling.guard import CapSettings, ClientGuard, LifecyclePolicy, Refused
from signaling.hypercorn_guard import ReceiveDrain
from signaling.service import SignalingService
from signaling.session import Session
from signaling.stomp import Limits, StompServerConnection

CONNECT = "CONNECT\naccept-version:1.2\nide:tok-a\nheart-beat:0,0\n\n\x00"


def test_addresses_are_keyed_per_ipv4_address_and_ipv6_64_and_loopback_can_be_exempt():
    policy = AddressPolicy(["127.0.0.0/8", "::1"])
    assert policy.key("192.0.2.7") == "192.0.2.7"
    assert policy.key("2001:db8:1:2:aaaa::1") == policy.key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert policy.key("2001:db8:1:3::1") != policy.key("2001:db8:1:2::1")
    assert policy.key("::ffff:192.0.2.7") == "192.0.2.7"  # a dual-stack socket's IPv4
    assert policy.key("127.0.0.5") is None and policy.key("::1") is None
    assert policy.key("::ffff:127.0.0.1") is None
    assert policy.key(None) is None and policy.key("not-an-address") is None
    assert AddressPolicy().key("127.0.0.1") == "127.0.0.1"


def test_sessions_per_address_are_capped_and_released():
    admission = SessionAdmission(SessionLimits(max_per_address=2))
    assert admission.admit("a", 0.0) is None and admission.admit("a", 0.0) is None
    assert admission.admit("a", 0.0) == REFUSED_SESSIONS
    assert admission.admit("b", 0.0) is None
    admission.release("a")
    assert admission.admit("a", 0.0) is None
    assert admission.admit(None, 0.0) is None  # exempt: never counted
    for _ in range(3):
        admission.release("a")
    assert admission.live == {"b": 1}


def test_new_sessions_per_address_come_from_a_bucket_that_refills():
    admission = SessionAdmission(SessionLimits(new_per_s=2.0, burst=3))
    assert [admission.admit("a", 0.0) for _ in range(4)] == [None, None, None, REFUSED_RATE]
    assert admission.admit("a", 0.25) == REFUSED_RATE  # half a token
    assert admission.admit("a", 0.5) is None  # one token
    assert admission.admit("b", 0.5) is None  # its own bucket


def test_the_bucket_table_stays_bounded_under_many_addresses():
    admission = SessionAdmission(SessionLimits(new_per_s=1.0, burst=2), max_buckets=100)
    for i in range(1000):
        admission.admit(f"10.0.{i // 256}.{i % 256}", 0.0)
        admission.release(f"10.0.{i // 256}.{i % 256}")
    assert len(admission.buckets) <= 100
    assert admission.live == {}


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_connection_table_caps_the_total_and_each_address_and_aborts_by_peer():
    table = ConnectionTable(lambda: 3, max_per_address=2)
    t1, t2, t3 = FakeTransport(), FakeTransport(), FakeTransport()
    assert table.open(("192.0.2.1", 1000), "192.0.2.1", t1) is None
    assert table.open(("192.0.2.1", 1001), "192.0.2.1", t2) is None
    assert table.open(("192.0.2.1", 1002), "192.0.2.1", FakeTransport()) == REFUSED_PER_ADDRESS
    assert table.open(("127.0.0.1", 5), None, t3) is None  # exempt, but counted
    assert table.open(("192.0.2.9", 1), "192.0.2.9", FakeTransport()) == REFUSED_TOTAL
    assert len(table) == 3
    assert table.abort(("192.0.2.1", 1001)) and t2.aborted and not t1.aborted
    assert not table.abort(("192.0.2.1", 9999)) and not table.abort(None)
    table.close(("192.0.2.1", 1001), "192.0.2.1")
    assert table.open(("192.0.2.9", 1), "192.0.2.9", FakeTransport()) is None
    table.close(("192.0.2.1", 1000), "192.0.2.1")
    assert table.per_address == {"192.0.2.9": 1}


def test_guard_refusals_carry_their_status_and_are_counted():
    counters: Counter = Counter()
    guard = ClientGuard(caps=CapSettings(max_connections=1, sessions=SessionLimits(max_per_address=1)))
    guard.count_into(counters)
    ticket = guard.open_session(("192.0.2.1", 1), 0.0)
    with pytest.raises(Refused) as refused:
        guard.open_session(("192.0.2.1", 2), 0.0)
    assert refused.value.status == 429 and "sessions" in refused.value.message
    ticket.release()
    ticket.release()  # idempotent
    guard.open_session(("192.0.2.1", 3), 0.0)
    assert guard.open_connection(("192.0.2.1", 4), FakeTransport())[1] is None
    _, over = guard.open_connection(("192.0.2.2", 4), FakeTransport())
    assert over is not None and over.status == 503
    assert counters == Counter({"refused_sessions_per_ip": 1, "refused_connections": 1})


# ---------------------------------------------------------------- the outbox's byte budget


def connected_session(max_outbox: int = 1024, max_outbox_bytes: int = 10_000):
    conn = StompServerConnection()
    conn.receive_data(CONNECT, 0.0)
    conn.accept(0.0)
    conn.receive_data("SUBSCRIBE\nid:s\ndestination:/q\n\n\x00", 0.0)
    overflows = []
    session = Session(
        "s1",
        "alice",
        conn,
        max_outbox=max_outbox,
        max_outbox_bytes=max_outbox_bytes,
        overflow=lambda: overflows.append(True),
    )
    session.flush()
    session.take()
    return session, overflows


def test_an_outbox_over_its_byte_budget_is_emptied_and_leaves_only_an_error():
    session, overflows = connected_session(max_outbox_bytes=10_000)
    for _ in range(3):
        session.deliver("/q", b"x" * 3000)
    assert not session.closed and session.outbox_bytes > 9000
    session.deliver("/q", b"x" * 3000)  # past 10,000 bytes
    assert session.slow and session.closed and overflows == [True]
    assert len(session.outbox) == 0 and session.outbox_bytes == 0
    session.deliver("/q", b"x" * 3000)  # nothing more is queued
    (error,) = session.take()
    assert error.startswith(b"ERROR\n") and b"slow consumer" in error
    assert session.take() == []


def test_one_frame_larger_than_the_budget_still_reaches_a_client_that_keeps_up():
    session, overflows = connected_session(max_outbox_bytes=10_000)
    session.deliver("/q", b"x" * 50_000)
    assert not session.closed and overflows == []
    assert len(session.take()) == 1


def test_discard_drops_what_was_never_written():
    session, _ = connected_session()
    session.deliver("/q", b"x" * 3000)
    session.discard()
    assert session.take() == [] and session.outbox_bytes == 0


# ---------------------------------------------------------------- the CONNECT deadline


def make_endpoint(connect_timeout_s: float | None = 10.0) -> tuple[StompEndpoint, SignalingService]:
    service = SignalingService(MemoryBroker(), StaticVerifier({"tok-a": "alice"}))
    endpoint = StompEndpoint(
        service,
        Limits(heartbeat_ms=(0, 0)),
        64,
        "alice",
        100.0,
        lambda: None,
        connect_timeout_s=connect_timeout_s,
    )
    return endpoint, service


def test_a_client_that_sends_no_connect_gets_an_error_at_the_deadline():
    endpoint, service = make_endpoint()
    assert endpoint.next_timer() == 110.0
    endpoint.tick(109.9)
    assert not endpoint.closed
    endpoint.tick(110.0)
    assert endpoint.closed and endpoint.next_timer() is None
    (error,) = endpoint.take_output()
    assert error.startswith(b"ERROR\n") and b"no CONNECT within 10 s" in error
    assert service.counters["connect_timeouts"] == 1


async def test_a_connect_in_time_clears_the_deadline():
    endpoint, service = make_endpoint()
    await endpoint.feed(CONNECT, 105.0)
    assert endpoint.take_output()[0].startswith(b"CONNECTED\n")
    assert endpoint.next_timer() is None  # no heart-beats asked
    endpoint.tick(200.0)
    assert not endpoint.closed and service.counters["connect_timeouts"] == 0
    endpoint.finish()


def test_without_a_deadline_nothing_expires():
    endpoint, _ = make_endpoint(None)
    assert endpoint.next_timer() is None


# ---------------------------------------------------------------- Hypercorn's queue


async def test_the_drain_takes_what_hypercorn_hands_a_finished_app_until_the_disconnect():
    # Hypercorn's per-request queue holds 10 and its read loop awaits each put: an app that
    # returned while the client kept sending would leave that loop blocked forever.
    queue: asyncio.Queue = asyncio.Queue(10)

    async def finished_app(scope, receive, send):
        return None

    drain = ReceiveDrain(finished_app, ClientGuard(LifecyclePolicy(linger_s=0.5, send_timeout_s=0.5)))
    await drain({"type": "websocket", "client": ("192.0.2.1", 5)}, queue.get, None)

    async def hypercorn_reader():
        for _ in range(50):
            await queue.put({"type": "websocket.receive", "text": "x"})
        await queue.put({"type": "websocket.disconnect", "code": 1000})

    await asyncio.wait_for(hypercorn_reader(), 2)
    await asyncio.wait_for(asyncio.gather(*drain.drains), 2)
    assert queue.empty() and not drain.drains


async def test_a_websocket_is_drained_past_its_disconnect_until_the_connection_is_gone():
    # Hypercorn goes on putting the rest of a batch it had read after the stream closed.
    queue: asyncio.Queue = asyncio.Queue(10)
    guard = ClientGuard(LifecyclePolicy(linger_s=5, send_timeout_s=5))
    peer = ("192.0.2.1", 5)
    guard.open_connection(peer, FakeTransport())

    async def finished_app(scope, receive, send):
        return None

    drain = ReceiveDrain(finished_app, guard)
    await drain({"type": "websocket", "client": peer}, queue.get, None)

    async def hypercorn_reader():
        await queue.put({"type": "websocket.disconnect", "code": 1006})
        for _ in range(50):
            await queue.put({"type": "websocket.receive", "text": "x"})
        guard.close_connection(peer, "192.0.2.1")

    await asyncio.wait_for(hypercorn_reader(), 2)  # never blocked on the queue
    await asyncio.wait_for(asyncio.gather(*drain.drains), 2)
    assert guard.counters["aborted_drain"] == 0


async def test_the_drain_aborts_a_connection_whose_disconnect_never_comes(monkeypatch):
    monkeypatch.setattr("signaling.hypercorn_guard.DRAIN_AFTER_ABORT_S", 0.05)
    queue: asyncio.Queue = asyncio.Queue(10)
    guard = ClientGuard(LifecyclePolicy(linger_s=0.05, send_timeout_s=0.05))
    transport = FakeTransport()
    assert guard.open_connection(("192.0.2.1", 5), transport)[1] is None

    async def finished_app(scope, receive, send):
        return None

    drain = ReceiveDrain(finished_app, guard)
    await drain({"type": "http", "client": ("192.0.2.1", 5)}, queue.get, None)
    await asyncio.wait_for(asyncio.gather(*drain.drains), 5)
    assert transport.aborted and guard.counters["aborted_drain"] == 1


async def test_an_app_that_saw_the_disconnect_needs_no_drain():
    queue: asyncio.Queue = asyncio.Queue(10)
    await queue.put({"type": "http.disconnect"})

    async def app(scope, receive, send):
        assert (await receive())["type"] == "http.disconnect"

    drain = ReceiveDrain(app, ClientGuard())
    await drain({"type": "http", "client": None}, queue.get, None)
    assert not drain.drains
