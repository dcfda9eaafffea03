"""Calls across two signaling nodes sharing a real Redis (CallCluster + RedisBroker).

Each node is the real stack minus the sockets: RedisBroker, SignalingService,
the CallCluster (built by calls_across_nodes, as create_app does) and its timer task.  Sessions are STOMP
connections fed SEND frames, so every message takes the path a client's does.
Alice sits on node one; Bob has a phone on node one and a laptop on node two.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import pytest

from signaling.auth import StaticVerifier
from signaling.broker.redis import RedisBroker
from signaling.calls.cluster import CallCluster, calls_across_nodes
from signaling.calls.registry import CallRegistry
from signaling.calls.service import CallOp
from signaling.lifecycle import run_call_timers
from signaling.service import SignalingService
from signaling.session import Session
from signaling.stomp_routes import install_stomp_routes

from .test_broker_contract import NODE_TTL_S, eventually, session

CALL_DESTINATIONS = (
    "/user/queue/call/request",
    "/user/queue/call/response",
    "/user/queue/call/down",
    "/user/queue/call/hangup",
    "/user/queue/call/timeout",
    "/user/queue/rtc/signaling",
    "/user/queue/errors",
)


@dataclass
class Node:
    broker: RedisBroker
    signaling: SignalingService
    calls: CallCluster
    timers: asyncio.Task

    def connect(self, user: str, sid: str) -> Session:
        s = session(user, sid, CALL_DESTINATIONS)
        self.signaling.connected(s)
        return s

    def send(self, s: Session, destination: str, body) -> None:
        frame = f"SEND\ndestination:{destination}\n\n{json.dumps(body)}\x00".encode()
        for event in s.conn.receive_data(frame, 0):
            self.signaling.handle(s, event)

    async def stop(self, cleanly: bool = True) -> None:
        self.timers.cancel()
        if cleanly:
            await self.calls.stop()
            await self.broker.stop()
        else:  # a crash: no goodbye, heartbeats and queues just stop
            for task in self.broker._tasks:
                task.cancel()


async def make_node(url: str, prefix: str, name: str, ring_timeout_s: float = 30.0) -> Node:
    broker = RedisBroker(url, prefix, name, NODE_TTL_S)
    await broker.start()
    signaling = SignalingService(broker, StaticVerifier({}))
    calls = calls_across_nodes(broker, broker, CallRegistry(ring_timeout_s, 10.0), 65536, signaling.error)
    install_stomp_routes(signaling, calls)
    return Node(broker, signaling, calls, asyncio.get_running_loop().create_task(run_call_timers(calls)))


def messages(s: Session) -> list[tuple[str, object]]:
    """(destination, body) of every MESSAGE the session got since last asked."""
    out = []
    while s.outbox:
        head, _, rest = s.outbox.popleft().partition(b"\n\n")
        lines = head.decode().split("\n")
        if lines[0] == "MESSAGE":
            headers = dict(line.split(":", 1) for line in lines[1:])
            out.append((headers["destination"].rsplit("/", 1)[-1], json.loads(rest[:-1])))
    return out


async def got(s: Session, count: int = 1, timeout: float = 5.0) -> list[tuple[str, object]]:
    await eventually(lambda: len(s.outbox) >= count, timeout)
    await asyncio.sleep(0.05)  # and nothing more is on its way
    return messages(s)


def call_request(call_id: str, callee: str = "bob") -> dict:
    return {
        "callId": call_id,
        "callee": callee,
        "callerUserName": "A",
        "calleeUserName": "B",
        "type": "AUDIO",
    }


async def ringing(one: Node, two: Node) -> tuple[Session, Session]:
    """Alice on node one calls Bob on node two (call c1); Bob's device rings."""
    alice, bob = one.connect("alice", "a1"), two.connect("bob", "b1")
    await eventually(lambda: one.broker.is_online("bob"))
    one.send(alice, "/app/call/request", call_request("c1"))
    assert [d for d, _ in await got(bob)] == ["request"]
    return alice, bob


@pytest.fixture
async def two_nodes(redis_url, redis_prefix):
    nodes = [await make_node(redis_url, redis_prefix, name) for name in ("one", "two")]
    yield nodes
    for node in nodes:
        await node.stop()


async def busy_in_redis(node: Node, user: str):
    return await node.broker._client.get(f"{node.broker.prefix}busy:{user}")


async def until_free(node: Node, user: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while await busy_in_redis(node, user) is not None:
        assert time.monotonic() < deadline, f"{user} stayed busy in Redis"
        await asyncio.sleep(0.02)


def test_create_app_runs_calls_across_nodes_when_the_broker_has_a_node_bus():
    from signaling.app import create_app
    from signaling.broker import MemoryBroker
    from signaling.calls.service import CallService
    from signaling.stomp import Limits

    spanning = RedisBroker("redis://127.0.0.1:1/0", "app-test:", "app-node")  # never started
    calls = create_app("/im", StaticVerifier({}), Limits(), 100, broker=spanning).calls
    assert isinstance(calls, CallCluster) and calls.bus is spanning
    alone = create_app("/im", StaticVerifier({}), Limits(), 100, broker=MemoryBroker())
    assert type(alone.calls) is CallService


async def test_a_call_between_nodes_rings_answers_signals_and_hangs_up(two_nodes):
    one, two = two_nodes
    alice, phone, laptop = (
        one.connect("alice", "a1"),
        one.connect("bob", "b-phone"),
        two.connect("bob", "b-laptop"),
    )
    await eventually(lambda: one.broker.is_online("bob") and two.broker.is_online("alice"))

    one.send(alice, "/app/call/request", call_request("c1"))
    assert [d for d, _ in await got(phone)] == ["request"]
    assert await got(laptop) == [("request", {**call_request("c1"), "caller": "alice"})]
    assert await busy_in_redis(two, "bob") == b"c1"

    two.send(laptop, "/app/call/response", {"callId": "c1", "type": "ACCEPT"})  # forwarded to one
    assert await got(alice) == [("response", {"callId": "c1", "type": "ACCEPT"})]
    assert await got(phone) == [("down", {"callId": "c1", "type": "ACCEPT"})]
    assert messages(laptop) == []

    one.send(alice, "/app/rtc/signaling", {"callId": "c1", "type": "OFFER", "payload": "v=0 offer"})
    two.send(laptop, "/app/rtc/signaling", {"callId": "c1", "type": "ANSWER", "payload": "v=0 answer"})
    for n in range(3):  # order kept through the forwarding
        two.send(
            laptop,
            "/app/rtc/signaling",
            {"callId": "c1", "type": "ICE_CANDIDATE", "payload": {"candidate": f"candidate:{n}"}},
        )
    assert await got(laptop) == [
        ("signaling", {"callId": "c1", "type": "OFFER", "payload": "v=0 offer", "from": "alice"})
    ]
    received = await got(alice, 4)
    assert [b["type"] for _, b in received] == ["ANSWER"] + ["ICE_CANDIDATE"] * 3
    assert [b["payload"]["candidate"] for _, b in received[1:]] == [f"candidate:{n}" for n in range(3)]
    assert messages(phone) == []  # the device that did not answer hears nothing

    two.send(laptop, "/app/call/hangup", {"callId": "c1"})
    assert await got(alice) == [("hangup", {"callId": "c1"})]
    await eventually(lambda: not one.calls.registry.calls)
    await until_free(one, "alice")  # both free again, for every node
    await until_free(one, "bob")
    two.send(laptop, "/app/call/hangup", {"callId": "c1"})
    assert await got(laptop) == [("errors", {"code": 1003, "message": "call not found or already ended"})]


async def test_busy_and_call_ids_hold_across_nodes(two_nodes):
    one, two = two_nodes
    alice, bob, carol = one.connect("alice", "a1"), two.connect("bob", "b1"), two.connect("carol", "c1")
    await eventually(lambda: one.broker.is_online("bob") and one.broker.is_online("carol"))
    one.send(alice, "/app/call/request", call_request("c1"))
    assert [d for d, _ in await got(bob)] == ["request"]

    two.send(carol, "/app/call/request", call_request("c2"))  # bob rings for alice
    assert await got(carol) == [("errors", {"code": 1001, "message": "callee busy"})]
    two.send(carol, "/app/call/request", call_request("c1", callee="dave"))  # alice's callId
    assert await got(carol) == [("errors", {"code": 1005, "message": "callId already used"})]
    two.send(carol, "/app/call/request", call_request("c3", callee="nobody"))
    assert await got(carol) == [("errors", {"code": 1002, "message": "callee offline"})]
    two.send(carol, "/app/call/response", {"callId": "c1", "type": "ACCEPT"})  # not hers
    assert (await got(carol))[0][1]["code"] == 1004
    two.send(carol, "/app/call/response", {"callId": "c1"})  # bad body, named
    assert (await got(carol))[0][1] == {"code": 400, "message": "type must be ACCEPT or REJECT"}
    two.send(bob, "/app/call/request", call_request("c4", callee="carol"))  # bob is in a call
    assert await got(bob) == [("errors", {"code": 1006, "message": "caller already in a call"})]
    assert messages(alice) == []

    two.send(bob, "/app/call/response", {"callId": "c1", "type": "REJECT"})
    assert await got(alice) == [("response", {"callId": "c1", "type": "REJECT"})]
    two.send(carol, "/app/call/request", call_request("c3"))  # a failed id is free
    assert [d for d, _ in await got(bob)] == ["request"]


async def test_the_ring_timeout_fires_once_on_the_owning_node(redis_url, redis_prefix):
    one, two = [await make_node(redis_url, redis_prefix, name, ring_timeout_s=0.5) for name in ("t1", "t2")]
    try:
        alice, bob = await ringing(one, two)
        assert await got(bob, timeout=3) == [("timeout", {"callId": "c1"})]
        assert await got(alice) == [("timeout", {"callId": "c1"})]
        await asyncio.sleep(0.6)
        assert messages(alice) == messages(bob) == []  # exactly once
        assert one.calls.registry.outcomes and not two.calls.registry.outcomes
        two.send(bob, "/app/call/request", call_request("c2", callee="alice"))  # both free
        assert [d for d, _ in await got(alice)] == ["request"]
    finally:
        await one.stop()
        await two.stop()


async def test_a_dropped_session_on_the_other_node_reaches_the_owner(redis_url, redis_prefix):
    one, two = [await make_node(redis_url, redis_prefix, n) for n in ("d1", "d2")]
    try:
        alice, bob = await ringing(one, two)
        two.signaling.closed(bob)  # bob's only device goes while it rings
        assert await got(alice) == [("timeout", {"callId": "c1"})]
        await eventually(lambda: not one.calls.registry.calls)
    finally:
        await one.stop()
        await two.stop()


async def test_http_twins_wait_for_the_owner_and_get_its_errors(two_nodes):
    from signaling.errors import SignalingError

    one, two = two_nodes
    alice, bob = await ringing(one, two)
    await two.calls.perform(CallOp.RESPOND, "bob", {"callId": "c1", "type": "ACCEPT"})
    assert await got(alice) == [("response", {"callId": "c1", "type": "ACCEPT"})]
    with pytest.raises(SignalingError) as refused:
        await two.calls.perform(CallOp.RESPOND, "bob", {"callId": "c1", "type": "ACCEPT"})
    assert refused.value.code == 1004  # answered already: the owner says so
    await two.calls.perform(CallOp.HANGUP, "bob", None)  # empty body: every call of bob's
    assert await got(alice) == [("hangup", {"callId": "c1"})]
    await two.calls.perform(CallOp.HANGUP, "bob", None)  # nothing left: fine


async def test_calls_of_a_dead_node_end_and_free_their_parties(redis_url, redis_prefix):
    one, two = [await make_node(redis_url, redis_prefix, n) for n in ("x1", "x2")]
    try:
        alice, bob, carol = one.connect("alice", "a1"), two.connect("bob", "b1"), two.connect("carol", "c1")
        await eventually(lambda: one.broker.is_online("bob") and two.broker.is_online("alice"))
        one.send(alice, "/app/call/request", call_request("c1"))
        assert [d for d, _ in await got(bob)] == ["request"]
        two.send(bob, "/app/call/response", {"callId": "c1", "type": "ACCEPT"})
        assert [d for d, _ in await got(alice)] == ["response"]
        await one.stop(cleanly=False)
        died = time.monotonic()
        assert await got(bob, timeout=NODE_TTL_S * 4) == [("hangup", {"callId": "c1"})]
        assert time.monotonic() - died <= NODE_TTL_S * 2 + 1
        assert await busy_in_redis(two, "bob") is None
        two.send(carol, "/app/call/request", call_request("c2"))  # bob can take calls again
        assert [d for d, _ in await got(bob)] == ["request"]
    finally:
        await two.stop()


async def test_a_node_that_stops_cleanly_ends_its_calls(two_nodes):
    one, two = two_nodes
    alice, bob = await ringing(one, two)
    await one.calls.stop()
    assert await got(bob) == [("hangup", {"callId": "c1"})]
    await until_free(two, "bob")


async def test_a_node_taken_for_dead_drops_its_calls_and_comes_back(two_nodes):
    one, two = two_nodes
    alice, bob = await ringing(one, two)
    await one.broker._client.delete(one.broker._alive_key("one"))  # as after a long stall
    assert await got(bob, timeout=3) == [("hangup", {"callId": "c1"})]
    assert await got(alice) == [("hangup", {"callId": "c1"})]
    assert not one.calls.registry.calls
    await until_free(two, "bob")
    await until_free(two, "alice")
    assert two.broker.is_online("alice")  # her session is announced again
    two.send(bob, "/app/call/request", call_request("c2", callee="alice"))
    assert [d for d, _ in await got(alice)] == ["request"]


async def test_without_redis_call_messages_get_503(two_nodes):
    one, two = two_nodes
    alice = one.connect("alice", "a1")
    one.broker.healthy = False  # as during an outage
    one.send(alice, "/app/call/request", call_request("c1"))
    one.send(alice, "/app/user/status", ["bob"])
    assert [b for _, b in messages(alice)] == [
        {"code": 503, "message": "signaling backend unavailable, try again"}
    ] * 2
    one.broker.healthy = True


async def quiet(nodes) -> None:
    """Until nothing waits on Redis anywhere and published messages have arrived."""
    for _ in range(3):
        await eventually(
            lambda: all(
                not n.calls._chains and n.broker._pending.empty() and not n.broker._writing for n in nodes
            )
        )
        await asyncio.sleep(0.05)


async def shared_state(node: Node) -> tuple[dict, set]:
    """Redis's view: user -> busy call, and the live calls (call hashes)."""
    client, prefix = node.broker._client, node.broker.prefix
    busy = {
        key.decode()[len(prefix) + 5 :]: (await client.get(key)).decode()
        async for key in client.scan_iter(f"{prefix}busy:*")
    }
    calls = {key.decode()[len(prefix) + 5 :] async for key in client.scan_iter(f"{prefix}call:*")}
    return busy, calls


@pytest.mark.parametrize("seed", range(4))
async def test_random_call_traffic_keeps_redis_and_the_owners_in_step(two_nodes, seed):
    """Random requests, answers, hangups and signals from random sessions on both nodes.
    At every quiet point the owners' registries and Redis agree on who is busy with which
    call, each live call lives on exactly one node, and at the end nothing is left."""
    import random

    rng = random.Random(seed)
    nodes = two_nodes
    users = ["u0", "u1", "u2", "u3"]
    sessions = [
        (node, node.connect(user, f"{user}-{i}-{n}"))
        for user in users
        for n, node in enumerate(nodes)
        for i in range(rng.randint(0, 1) + (n == 0))
    ]
    await eventually(lambda: all(n.broker.is_online(u) for n in nodes for u in users))
    used: list[str] = []

    def party_session(call):
        """Mostly a session of a party of a live call; sometimes anybody's."""
        if rng.random() < 0.2:
            return rng.choice(sessions)
        user = rng.choice([call.caller, call.callee])
        return rng.choice([(n, s) for n, s in sessions if s.user_id == user])

    for step in range(200):
        live = [c for n in nodes for c in n.calls.registry.calls.values()]
        kind = rng.random()
        if kind < 0.3 or not live:
            node, s = rng.choice(sessions)
            call_id = rng.choice(used) if used and rng.random() < 0.15 else f"r{seed}-{step}"
            used.append(call_id)
            node.send(s, "/app/call/request", call_request(call_id, callee=rng.choice(users)))
        else:
            call = rng.choice(live)
            node, s = party_session(call)
            if kind < 0.55:
                node.send(
                    s,
                    "/app/call/response",
                    {"callId": call.id, "type": rng.choice(["ACCEPT", "ACCEPT", "REJECT"])},
                )
            elif kind < 0.7:
                node.send(s, "/app/call/hangup", {"callId": call.id})
            else:
                node.send(s, "/app/rtc/signaling", {"callId": call.id, "type": "OFFER", "payload": "v=0"})
        if rng.random() < 0.3:
            await asyncio.sleep(0.005)  # let some messages cross before the next
        if step % 25 == 24:
            await quiet(nodes)
            busy, live = await shared_state(nodes[0])
            owned = [set(n.calls.registry.calls) for n in nodes]
            assert not owned[0] & owned[1]
            assert live == owned[0] | owned[1]
            assert busy == {u: c for n in nodes for u, c in n.calls.registry.live_call_of.items()}
        for _, other in sessions:
            messages(other)
    for node in nodes:
        for call in list(node.calls.registry.calls.values()):
            owner_session = next(s for n, s in sessions if s.user_id == call.caller)
            caller_node = next(n for n, s in sessions if s is owner_session)
            caller_node.send(owner_session, "/app/call/hangup", {"callId": call.id})
    await quiet(nodes)
    assert await shared_state(nodes[0]) == ({}, set())
    assert not any(n.calls.registry.calls for n in nodes)
