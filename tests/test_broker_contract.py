"""The Broker contract, run against both brokers: the in-memory one (one node) and the
Redis one (two nodes sharing a real Redis, sessions spread over them).  Whatever node a
session lives on: a user is online while any session is, user destinations reach the
user's sessions (filtered by id), presence changes are reported where they happen, and
with Redis a node that dies stops counting within its TTL."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from redis.exceptions import ResponseError

from signaling.broker import MemoryBroker
from signaling.broker.bus import Delete, Get, HGet, Kind, Script, StoreUnavailable
from signaling.session import Session
from signaling.stomp import StompServerConnection

NODE_TTL_S = 1.0


def session(user: str, sid: str, destinations=("/user/queue/x",)) -> Session:
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\nide:x\n\n\x00", 0)
    conn.accept(0)
    for i, dest in enumerate(destinations):
        conn.receive_data(f"SUBSCRIBE\nid:s{i}\ndestination:{dest}\n\n\x00".encode(), 0)
    s = Session(sid, user, conn)
    s.flush()
    s.outbox.clear()
    return s


def bodies(s: Session) -> list:
    out = []
    while s.outbox:
        head, _, rest = s.outbox.popleft().partition(b"\n\n")
        if head.startswith(b"MESSAGE"):
            out.append(json.loads(rest[:-1]))
    return out


def knows_of(node, user: str, other) -> bool:
    """Has `node` heard that `other` holds sessions of `user`? (One node: trivially.)"""
    return node is other or other.node in node.remote.get(user, {})


def forgot(node, user: str, other) -> bool:
    """Has `node` heard that `other` holds no more sessions of `user`?"""
    return node is other or other.node not in node.remote.get(user, {})


async def eventually(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def redis_pair(request):
    from signaling.broker.redis import RedisBroker

    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    a = RedisBroker(url, prefix, "node-a", NODE_TTL_S)
    b = RedisBroker(url, prefix, "node-b", NODE_TTL_S)
    await a.start()
    await b.start()
    return a, b


@pytest.fixture(params=["memory", "redis"])
async def nodes(request):
    """(node a, node b): the same MemoryBroker twice, or two RedisBroker nodes."""
    if request.param == "memory":
        broker = MemoryBroker()
        yield broker, broker
        return
    a, b = await redis_pair(request)
    yield a, b
    await a.stop()
    await b.stop()


@pytest.fixture
async def redis_nodes(request):
    """Two RedisBroker nodes: for what only several nodes can show."""
    a, b = await redis_pair(request)
    yield a, b
    await a.stop()
    await b.stop()


async def test_every_broker_has_the_whole_protocol(nodes):
    """Health, presence listeners, start and stop, and the node bus: on one node there is
    no bus, across nodes the broker is the bus."""
    a, b = nodes
    for broker in (a, b):
        assert broker.healthy is True
        broker.watch_presence(lambda user, online: None)
    if a is b:
        assert a.node_bus is None
        await a.start()
        await a.stop()
    else:
        assert a.node_bus is a and b.node_bus is b


async def test_the_node_bus_delivers_by_kind_and_runs_typed_commands(redis_nodes):
    a, b = redis_nodes
    heard = []
    b.subscribe(Kind.CALL, heard.append)
    a.send(b.node, Kind.CALL, {"n": 1})
    a.send(b.node, Kind.CALL_RESULT, {"n": 2})  # nobody on b takes this kind
    await eventually(lambda: heard == [{"kind": "call", "n": 1}])
    key = f"{a.prefix}bus-test"
    assert await a.run(
        Script("return redis.call('HSET', KEYS[1], 'f', ARGV[1])", (key,), ("v",)),
        HGet(key, "f"),
        Get(f"{a.prefix}absent"),
    ) == [1, b"v", None]
    assert await b.query(HGet(key, "f"), Delete(key)) == [b"v", 1]
    # An error reply is the store failing, in the redis exception's own class.
    with pytest.raises(StoreUnavailable) as failed:
        await a.run(Script("return redis.error_reply('no')", (), ()))
    assert isinstance(failed.value.__cause__, ResponseError)
    with pytest.raises(StoreUnavailable):
        await a.query(Script("return redis.error_reply('no')", (), ()))


async def test_a_user_is_online_everywhere_while_any_session_is(nodes):
    a, b = nodes
    s1, s2 = session("alice", "a-1"), session("alice", "b-1")
    assert a.register(s1) is True
    await eventually(lambda: b.is_online("alice"))
    assert b.register(s2) is False  # not her first session anywhere
    await eventually(lambda: knows_of(a, "alice", b))
    assert a.unregister(s1) is False  # she is still on b
    await eventually(lambda: forgot(b, "alice", a))
    assert a.is_online("alice")
    assert b.unregister(s2) is True
    await eventually(lambda: not a.is_online("alice") and not b.is_online("alice"))
    assert a.unregister(s1) is False  # twice is harmless


async def test_user_destinations_cross_nodes_with_id_filters(nodes):
    a, b = nodes
    here, there, other = session("bob", "a-1"), session("bob", "b-1"), session("carol", "b-2")
    a.register(here)
    b.register(there)
    b.register(other)
    await eventually(lambda: a.is_online("carol") and b.is_online("bob"))
    a.to_user("bob", "/user/queue/x", b'{"n":1}')
    await eventually(lambda: len(there.outbox) == 1)
    assert bodies(here) == bodies(there) == [{"n": 1}]
    a.to_user("bob", "/user/queue/x", b'{"n":2}', only={"b-1"})
    b.to_user("bob", "/user/queue/x", b'{"n":3}', exclude={"b-1"})
    await eventually(lambda: len(there.outbox) == 1 and len(here.outbox) == 1)
    assert bodies(there) == [{"n": 2}] and bodies(here) == [{"n": 3}]
    assert bodies(other) == []  # never another user's


async def test_presence_changes_are_reported_on_the_other_node(redis_nodes):
    a, b = redis_nodes
    seen = []
    b.watch_presence(lambda user, online: seen.append((user, online)))
    s = session("dave", "a-1")
    a.register(s)
    await eventually(lambda: seen == [("dave", True)])
    a.unregister(s)
    await eventually(lambda: seen == [("dave", True), ("dave", False)])


async def test_a_dead_node_stops_counting_within_its_ttl(redis_nodes):
    a, b = redis_nodes
    seen = []
    b.watch_presence(lambda user, online: seen.append((user, online)))
    a.register(session("erin", "a-1"))
    await eventually(lambda: b.is_online("erin"))
    for task in a._tasks:  # a crash: no goodbye, the heartbeat just stops
        task.cancel()
    died = time.monotonic()
    await eventually(lambda: not b.is_online("erin"), timeout=NODE_TTL_S * 4)
    assert time.monotonic() - died <= NODE_TTL_S * 2 + 0.5
    assert seen[-1] == ("erin", False)
    # The survivor cleans the dead node's entries out of Redis.
    deadline = time.monotonic() + 3
    while await b._client.hget(b._user_key("erin"), "node-a") is not None:
        assert time.monotonic() < deadline, "the dead node's entry stayed in Redis"
        await asyncio.sleep(0.05)


async def test_a_new_node_sees_who_is_already_online(redis_nodes):
    a, b = redis_nodes
    from signaling.broker.redis import RedisBroker

    b.register(session("fay", "b-1"))
    await eventually(lambda: a.is_online("fay"))
    late = RedisBroker(b.url, b.prefix, "node-c", NODE_TTL_S)
    await late.start()
    try:
        assert late.is_online("fay") and not late.is_online("nobody")
    finally:
        await late.stop()


async def test_status_watchers_hear_of_users_on_other_nodes(redis_url, redis_prefix):
    """Two signaling services on two Redis nodes: a status query answered across nodes,
    and the ONLINE/OFFLINE pushes of a user who connects on the other node."""
    from signaling.auth import StaticVerifier
    from signaling.broker.redis import RedisBroker
    from signaling.service import SignalingService

    brokers = [RedisBroker(redis_url, redis_prefix, f"svc-{i}", NODE_TTL_S) for i in (1, 2)]
    for broker in brokers:
        await broker.start()
    one, two = (SignalingService(b, StaticVerifier({})) for b in brokers)
    try:
        watcher = session("amy", "1-amy", ("/topic/user/status",))
        one.connected(watcher)
        one.presence.query(watcher, ["ben"])
        assert bodies(watcher) == [[{"userId": "ben", "status": "OFFLINE"}]]
        ben = session("ben", "2-ben")
        two.connected(ben)
        await eventually(lambda: len(watcher.outbox) == 1)
        assert bodies(watcher) == [[{"userId": "ben", "status": "ONLINE"}]]
        one.presence.query(watcher, ["ben"])
        assert bodies(watcher) == [[{"userId": "ben", "status": "ONLINE"}]]
        two.closed(ben)
        await eventually(lambda: len(watcher.outbox) == 1)
        assert bodies(watcher) == [[{"userId": "ben", "status": "OFFLINE"}]]
    finally:
        for broker in brokers:
            await broker.stop()


async def test_a_redis_outage_turns_unhealthy_and_heals(private_redis):
    """A Redis of this test's own, stopped and started again on the same port: the node
    reports unhealthy meanwhile, and afterwards has written its sessions back and sees
    the other node's again."""
    from signaling.broker.redis import RedisBroker

    url = private_redis.url
    a, b = RedisBroker(url, "o:", "node-a", NODE_TTL_S), RedisBroker(url, "o:", "node-b", NODE_TTL_S)
    try:
        await a.start()
        await b.start()
        a.register(session("gus", "a-1"))
        await eventually(lambda: b.is_online("gus"))
        private_redis.stop()  # Redis gone, and with it every key (no persistence)
        await eventually(lambda: not a.healthy and not b.healthy, timeout=NODE_TTL_S * 3 + 5)
        private_redis.start()
        await eventually(lambda: a.healthy and b.healthy, timeout=10)
        await eventually(lambda: b.is_online("gus"))
        b.register(session("hal", "b-1"))
        await eventually(lambda: a.is_online("hal"))
    finally:
        await a.stop()
        await b.stop()
