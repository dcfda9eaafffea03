"""Operators' sessions and calls (signaling.oversight) through the admin API (Quart's test
client): one node with the MemoryBroker, and two nodes sharing a real Redis, where a
DELETE on node one disconnects alice on node two and bob, in a call with her, hears the
hangup once her grace has run out.  Sessions are STOMP connections fed frames, as in
test_call_cluster; "the transport" is played by calling SignalingService.closed once a
session says it is closed, which is what every carrier does (endpoint.finish)."""

from __future__ import annotations

import asyncio
import json

import pytest

from appliance.ops.admin import AdminContext, create_admin_app
from appliance.ops.metrics import ApplianceCollector, metrics_registry, render
from signaling.app import create_app
from signaling.auth import StaticVerifier
from signaling.broker.bus import Kind
from signaling.broker.redis import RedisBroker
from signaling.calls.cluster import calls_across_nodes
from signaling.calls.registry import CallRegistry
from signaling.lifecycle import run_call_timers
from signaling.oversight import Oversight
from signaling.service import SignalingService
from signaling.session import Arrival, Session
from signaling.stomp import Limits, StompServerConnection
from signaling.stomp_routes import install_stomp_routes

from .test_broker_contract import NODE_TTL_S, eventually
from .test_call_cluster import CALL_DESTINATIONS, call_request, got, messages

TOKEN = "t" * 24
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HOSTILE = 'eve"\n\x1b[31m<script>'


def stomp_session(user: str, sid: str, address: str = "192.0.2.7:5000", transport: str = "websocket"):
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\nide:x\n\n\x00", 0)
    conn.accept(0)
    for i, dest in enumerate(CALL_DESTINATIONS):
        conn.receive_data(f"SUBSCRIBE\nid:s{i}\ndestination:{dest}\n\n\x00".encode(), 0)
    s = Session(sid, user, conn, arrival=Arrival(transport, address, 1_900_000_000.5))
    s.flush()
    s.outbox.clear()
    return s


def send(service: SignalingService, s: Session, destination: str, body) -> None:
    frame = f"SEND\ndestination:{destination}\n\n{json.dumps(body)}\x00".encode()
    for event in s.conn.receive_data(frame, 0):
        service.handle(s, event)


def admin_for(oversight: Oversight | None, token: str | None = TOKEN):
    ctx = AdminContext(
        token=token,
        watcher=None,  # type: ignore[arg-type]  (no secret route is used here)
        store=None,
        grace_s=60,
        activation_s=5,
        registry=metrics_registry(ApplianceCollector(None)),
        readiness=lambda: {},
        secrets_changed=lambda: asyncio.sleep(0),
        signaling=oversight,
    )
    return create_admin_app(ctx).test_client()


def error_frames(s: Session) -> list[str]:
    return [f.decode() for f in s.take() if f.startswith(b"ERROR")]


# ------------------------------------------------------------------ one node


@pytest.fixture
def one_node():
    app = create_app("/im", StaticVerifier({}), Limits(), 100, grace_s=0.2, node_name="solo")
    return app, admin_for(app.oversight)


async def test_sessions_are_listed_with_their_transport_address_counts_and_call(one_node):
    app, admin = one_node
    alice = stomp_session("alice", "a1")
    bob = stomp_session("bob", "b1", "[2001:db8::1]:443", "sockjs-xhr_streaming")
    for s in (alice, bob):
        app.service.connected(s)
    send(app.service, alice, "/app/call/request", call_request("c1"))
    answer = await (await admin.get("/admin/sessions", headers=BEARER)).get_json()
    assert answer["node"] == "solo" and answer["nodes"] == ["solo"] and answer["unanswered"] == []
    assert answer["count"] == 2 and answer["truncated"] is False
    rows = {r["user"]: r for r in answer["sessions"]}
    assert rows["alice"] == {
        "node": "solo",
        "user": "alice",
        "session": "a1",
        "transport": "websocket",
        "address": "192.0.2.7:5000",
        "connectedSince": 1_900_000_000.5,
        "messagesIn": 1,
        "messagesOut": 0,
        "inCall": True,
        "callId": "c1",
    }
    assert rows["bob"]["transport"] == "sockjs-xhr_streaming" and rows["bob"]["messagesOut"] == 1
    only_bob = await (await admin.get("/admin/sessions?user=bob", headers=BEARER)).get_json()
    assert [r["session"] for r in only_bob["sessions"]] == ["b1"]
    calls = await (await admin.get("/admin/calls", headers=BEARER)).get_json()
    (call,) = calls["calls"]
    assert call["callId"] == "c1" and call["caller"] == "alice" and call["callee"] == "bob"
    assert call["state"] == "ringing" and call["node"] == "solo" and call["ageSeconds"] >= 0


async def test_a_listing_is_bounded_and_says_it_was_cut(one_node):
    app, admin = one_node
    for i in range(5):
        app.service.connected(stomp_session(f"u{i}", f"s{i}"))
    answer = await (await admin.get("/admin/sessions?limit=3", headers=BEARER)).get_json()
    assert answer["count"] == 3 and answer["truncated"] is True
    for bad in ("0", "-1", "x", "10001"):
        assert (await admin.get(f"/admin/sessions?limit={bad}", headers=BEARER)).status_code == 400


async def test_hostile_user_ids_are_escaped_in_answers_and_logs(one_node, caplog):
    app, admin = one_node
    eve = stomp_session(HOSTILE, "e1", address='1.2.3.4:5"\n')
    app.service.connected(eve)
    response = await admin.get("/admin/sessions", headers=BEARER)
    raw = await response.get_data(as_text=True)
    assert "\n\x1b" not in raw and "\x1b" not in raw  # JSON escapes control characters
    assert (await response.get_json())["sessions"][0]["user"] == HOSTILE
    caplog.clear()
    response = await admin.delete("/admin/sessions", query_string={"user": HOSTILE}, headers=BEARER)
    assert (await response.get_json())["disconnected"] == 1
    assert caplog.records and all("\x1b" not in r.getMessage() for r in caplog.records)
    too_long = await admin.delete("/admin/sessions", query_string={"user": "x" * 2000}, headers=BEARER)
    assert too_long.status_code == 400


async def test_routes_need_the_token_and_a_disconnect_needs_one_set(one_node):
    app, admin = one_node
    for method, path in (
        ("GET", "/admin/sessions"),
        ("GET", "/admin/calls"),
        ("DELETE", "/admin/sessions?user=a"),
    ):
        assert (await admin.open(path, method=method)).status_code == 401
        assert (
            await admin.open(path, method=method, headers={"Authorization": "Bearer no"})
        ).status_code == 401
    open_admin = admin_for(app.oversight, token=None)
    assert (await open_admin.get("/admin/sessions")).status_code == 200
    assert (await open_admin.delete("/admin/sessions?user=a")).status_code == 403
    assert (await admin.delete("/admin/sessions", headers=BEARER)).status_code == 400  # no user
    assert (await admin_for(None).get("/admin/sessions", headers=BEARER)).status_code == 404


async def test_a_disconnect_sends_an_error_and_the_call_ends_as_for_a_dropped_session(one_node):
    app, admin = one_node
    service = app.service
    alice, bob, other = stomp_session("alice", "a1"), stomp_session("bob", "b1"), stomp_session("carol", "c1")
    for s in (alice, bob, other):
        service.connected(s)
    timers = asyncio.get_running_loop().create_task(run_call_timers(app.calls))
    try:
        send(service, alice, "/app/call/request", call_request("k1"))
        send(service, bob, "/app/call/response", {"callId": "k1", "type": "ACCEPT"})
        messages(alice), messages(bob)
        answer = await (await admin.delete("/admin/sessions?user=alice", headers=BEARER)).get_json()
        assert answer == {"user": "alice", "disconnected": 1, "perNode": {"solo": 1}, "unanswered": []}
        assert alice.closed and not other.closed
        (error,) = error_frames(alice)
        assert "disconnected by the operator" in error
        assert service.counters["operator_disconnects"] == 1
        metrics = render(metrics_registry(ApplianceCollector(None, signaling=app))).decode()
        assert "appliance_signaling_operator_disconnects_total 1.0" in metrics
        service.closed(alice)  # what the transport does once the ERROR is out
        assert await got(bob) == [("hangup", {"callId": "k1"})]  # after the grace period
        again = await (await admin.delete("/admin/sessions?user=alice", headers=BEARER)).get_json()
        assert again["disconnected"] == 0
    finally:
        timers.cancel()


# ------------------------------------------------------------------ two nodes, one Redis


class Node:
    def __init__(self, broker: RedisBroker, grace_s: float) -> None:
        self.broker = broker
        self.signaling = SignalingService(broker, StaticVerifier({}))
        self.calls = calls_across_nodes(
            broker, broker, CallRegistry(30.0, grace_s), 65536, self.signaling.error
        )
        install_stomp_routes(self.signaling, self.calls)
        self.oversight = Oversight(broker.node, self.signaling, self.calls, broker)
        self.timers = asyncio.get_running_loop().create_task(run_call_timers(self.calls))

    async def stop(self) -> None:
        self.timers.cancel()
        await self.calls.stop()
        await self.broker.stop()


@pytest.fixture
async def two_nodes(redis_url, redis_prefix):
    nodes = []
    for name in ("one", "two"):
        broker = RedisBroker(redis_url, redis_prefix, name, NODE_TTL_S)
        await broker.start()
        nodes.append(Node(broker, grace_s=0.2))
    yield nodes
    for node in nodes:
        await node.stop()


async def test_two_nodes_list_every_session_and_call_marked_with_its_node(two_nodes):
    one, two = two_nodes
    admin = admin_for(one.oversight)
    bob, alice = stomp_session("bob", "b1"), stomp_session("alice", "a1")
    one.signaling.connected(bob)
    two.signaling.connected(alice)
    await eventually(lambda: two.broker.is_online("bob") and one.broker.is_online("alice"))
    send(two.signaling, alice, "/app/call/request", call_request("x1"))
    await got(bob)
    answer = await (await admin.get("/admin/sessions", headers=BEARER)).get_json()
    assert sorted(answer["nodes"]) == ["one", "two"] and answer["unanswered"] == []
    rows = {r["user"]: r for r in answer["sessions"]}
    assert rows["alice"]["node"] == "two" and rows["bob"]["node"] == "one"
    assert rows["bob"]["inCall"] and rows["bob"]["callId"] == "x1"  # owned by two: from Redis
    only = await (await admin.get("/admin/sessions?user=alice", headers=BEARER)).get_json()
    assert [(r["node"], r["session"]) for r in only["sessions"]] == [("two", "a1")]
    calls = await (await admin.get("/admin/calls", headers=BEARER)).get_json()
    assert [(c["callId"], c["node"], c["state"]) for c in calls["calls"]] == [("x1", "two", "ringing")]


async def test_a_delete_on_node_one_disconnects_alice_on_node_two_and_bob_hears_the_hangup(two_nodes):
    one, two = two_nodes
    admin = admin_for(one.oversight)
    bob, alice = stomp_session("bob", "b1"), stomp_session("alice", "a1")
    one.signaling.connected(bob)
    two.signaling.connected(alice)
    await eventually(lambda: two.broker.is_online("bob") and one.broker.is_online("alice"))
    send(two.signaling, alice, "/app/call/request", call_request("x2"))
    assert [d for d, _ in await got(bob)] == ["request"]
    send(one.signaling, bob, "/app/call/response", {"callId": "x2", "type": "ACCEPT"})
    assert [d for d, _ in await got(alice)] == ["response"]
    response = await admin.delete("/admin/sessions?user=alice", headers=BEARER)
    assert await response.get_json() == {
        "user": "alice",
        "disconnected": 1,
        "perNode": {"one": 0, "two": 1},
        "unanswered": [],
    }
    assert alice.closed and "disconnected by the operator" in error_frames(alice)[0]
    assert two.signaling.counters["operator_disconnects"] == 1
    two.signaling.closed(alice)  # the transport on node two, once its ERROR is out
    assert await got(bob) == [("hangup", {"callId": "x2"})]
    await eventually(lambda: not two.calls.registry.calls)


async def test_a_node_that_does_not_answer_is_named_not_waited_for(two_nodes):
    one, two = two_nodes
    impatient = Oversight("one", one.signaling, one.calls, one.broker, answer_timeout_s=0.2)
    two.broker.subscribe(Kind.OVERSIGHT, lambda message: None)  # node two is deaf to questions
    answer = await (await admin_for(impatient).get("/admin/sessions", headers=BEARER)).get_json()
    assert answer["nodes"] == ["one"] and answer["unanswered"] == ["two"]
