"""The Broker on Redis: several signaling nodes serving one user base.

Each node keeps its own sessions in a MemoryBroker and a replica of where
everybody else's sessions are, so the services keep calling the broker
synchronously (is_online, to_user) and Redis work happens in the background:

    {p}u:{user}      hash  node id -> sessions of the user on that node
    {p}nu:{node}     set   users with sessions on that node (for reaping it)
    {p}node:{node}   key   the node's heartbeat, expiring after node_ttl_s
    {p}nodes         set   every node that joined and has not left (so a dead one is found
                           even when nobody saw its sessions)
    {p}presence      channel: {"node", "user", "count"} whenever a count changes
    {p}to:{node}     channel: messages for that node only (user deliveries)

A delivery to a user goes to the local sessions directly and, for each other
node holding sessions of the user, one PUBLISH on that node's own channel:
never a broadcast to every node.  A node that dies stops refreshing its
heartbeat; within node_ttl_s every other node drops it from its replica (its
users go OFFLINE where nobody else holds them) and one of them, holding a
short lock, removes its entries from Redis and tells its NodeWatchers
`node_gone` (the call cluster ends the dead node's calls there).  A node that
was only stalled finds its heartbeat key gone when it wakes: it writes its
sessions again and tells its watchers `taken_for_dead` (the cluster drops the
calls the others have ended).

The broker is also the nodes' NodeBus (bus.py): other services share the
node's channel and its ordered writer -- `send` publishes a message of some
Kind to one node, `subscribe` takes this node's messages of a Kind, `run`
sends Redis commands in order with this node's other writes.  Writes go out in
pipelines: whatever waits when the writer is free travels in one round trip.
A failing Redis fails a command with StoreUnavailable.

A Redis outage makes `healthy` false (the service answers 503 and readiness
turns false); the node keeps retrying, and when Redis is back it writes its
sessions again and reloads the replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Collection
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from ..session import Session
from . import MemoryBroker, PresenceListener
from .bus import (
    Command,
    Delete,
    Get,
    HGet,
    HGetAll,
    Kind,
    MessageHandler,
    NodeWatcher,
    Script,
    SMembers,
    StoreUnavailable,
)

log = logging.getLogger("signaling.broker")

RETRY_S = 1.0
MAX_PENDING = 100_000
STOP_DRAIN_S = 2.0
MAX_BATCH = 500  # writes per pipeline round trip


# What waits for the writer, in order: a message to publish, a user's session count
# on this node (written to the user's hash and announced), or a service's commands.


@dataclass(slots=True)
class _Publish:
    channel: str
    data: str


@dataclass(slots=True)
class _Count:
    user: str
    count: int


@dataclass(slots=True)
class _Run:
    commands: tuple[Command, ...]
    future: asyncio.Future


_Write = _Publish | _Count | _Run


def _queue_command(pipe, command: Command) -> None:
    match command:
        case Get(key):
            pipe.get(key)
        case HGet(key, field):
            pipe.hget(key, field)
        case HGetAll(key):
            pipe.hgetall(key)
        case SMembers(key):
            pipe.smembers(key)
        case Delete(key):
            pipe.delete(key)
        case Script(source, keys, args):
            pipe.eval(source, len(keys), *keys, *args)


def _store_failure(exc: BaseException) -> BaseException:
    """What a command's caller gets for `exc`: Redis failing in any way (an error reply,
    a lost connection, a timeout) is StoreUnavailable; anything else is a bug, kept as is."""
    if isinstance(exc, (RedisError, OSError)):
        failure = StoreUnavailable(f"{type(exc).__name__}: {exc}")
        failure.__cause__ = exc
        return failure
    return exc


def _error_name(exc: BaseException) -> str:
    """The name of the error Redis gave, under StoreUnavailable's wrapping."""
    if isinstance(exc, StoreUnavailable) and exc.__cause__ is not None:
        return type(exc.__cause__).__name__
    return type(exc).__name__


def _text(raw: bytes | str) -> str:
    """A key or member as Redis returned it: bytes, as the client does not decode (its
    stubs cannot tell, so they say bytes or str)."""
    return raw.decode() if isinstance(raw, bytes) else raw


class RedisBroker:
    def __init__(
        self, url: str, prefix: str = "appliance:", node_id: str | None = None, node_ttl_s: float = 15.0
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.node = node_id or secrets.token_hex(6)
        self.node_ttl_s = node_ttl_s
        self.local = MemoryBroker()
        self.remote: dict[str, dict[str, int]] = {}  # user -> {other node: sessions}
        self.healthy = False
        self._pending: asyncio.Queue[_Write] = asyncio.Queue(MAX_PENDING)
        self._tasks: list[asyncio.Task] = []
        self._client: aioredis.Redis | None = None  # made by start()
        self._pubsub: PubSub | None = None
        self._generation = 0  # bumped by every recovery
        self._recovering = asyncio.Lock()
        self._writing = False
        self._presence_listeners: list[PresenceListener] = []
        self._watchers: list[NodeWatcher] = []
        self._handlers: dict[str, MessageHandler] = {}  # Kind's value -> its handler
        self.subscribe(Kind.DELIVER, self._on_deliver)

    # ------------------------------------------------------------ keys

    def _user_key(self, user: str) -> str:
        return f"{self.prefix}u:{user}"

    def _node_users_key(self, node: str) -> str:
        return f"{self.prefix}nu:{node}"

    def _alive_key(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def _node_channel(self, node: str) -> str:
        return f"{self.prefix}to:{node}"

    @property
    def _presence_channel(self) -> str:
        return f"{self.prefix}presence"

    @property
    def _nodes_key(self) -> str:
        return f"{self.prefix}nodes"

    # ------------------------------------------------------------ the Broker protocol

    def register(self, session: Session) -> bool:
        was_online = self.is_online(session.user_id)
        self.local.register(session)
        self._count_changed(session.user_id)
        return not was_online

    def unregister(self, session: Session) -> bool:
        if session not in self.local.sessions_of(session.user_id):
            return False
        self.local.unregister(session)
        self._count_changed(session.user_id)
        return not self.is_online(session.user_id)

    def sessions_of(self, user_id: str) -> list[Session]:
        return self.local.sessions_of(user_id)

    def local_sessions(self) -> list[Session]:
        return self.local.local_sessions()

    def session_count(self) -> int:
        return self.local.session_count()

    def user_count(self) -> int:
        return len(set(self.local.users()) | set(self.remote))

    def is_online(self, user_id: str) -> bool:
        return self.local.is_online(user_id) or bool(self.remote.get(user_id))

    def to_user(
        self,
        user_id: str,
        destination: str,
        body: bytes,
        only: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> int:
        delivered = self.local.to_user(user_id, destination, body, only, exclude)
        nodes = self.remote.get(user_id)
        if nodes:
            message = {
                "user": user_id,
                "destination": destination,
                "body": body.decode("utf-8"),
                "only": None if only is None else sorted(only),
                "exclude": sorted(exclude),
            }
            for node in nodes:
                self.send(node, Kind.DELIVER, message)
        return delivered

    @property
    def node_bus(self) -> RedisBroker:
        return self

    def watch_presence(self, listener: PresenceListener) -> None:
        self._presence_listeners.append(listener)

    # ------------------------------------------------------------ the NodeBus protocol

    def send(self, node: str, kind: Kind, message: dict) -> None:
        self._enqueue(_Publish(self._node_channel(node), json.dumps({"kind": kind.value, **message})))

    def subscribe(self, kind: Kind, handler: MessageHandler) -> None:
        self._handlers[kind.value] = handler

    def run(self, *commands: Command) -> asyncio.Future[list]:
        """Pipelined with whatever else waits for the writer."""
        future: asyncio.Future[list] = asyncio.get_running_loop().create_future()
        if not self._enqueue(_Run(commands, future)):
            future.set_exception(StoreUnavailable("redis broker overloaded"))
        return future

    async def query(self, *commands: Command) -> list:
        """At once, in one round trip of their own."""
        pipe = self._started_client.pipeline(transaction=False)
        for command in commands:
            _queue_command(pipe, command)
        try:
            return await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _store_failure(exc) from exc

    def watch_nodes(self, watcher: NodeWatcher) -> None:
        self._watchers.append(watcher)

    async def live_nodes(self) -> list[str]:
        """The joined nodes whose heartbeat key exists, in one round trip after the set."""
        client = self._started_client
        try:
            members = sorted(_text(n) for n in await client.smembers(self._nodes_key))
            pipe = client.pipeline(transaction=False)
            for node in members:
                pipe.exists(self._alive_key(node))
            alive = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _store_failure(exc) from exc
        return [node for node, up in zip(members, alive, strict=True) if up]

    # ------------------------------------------------------------ local changes -> Redis

    def _count_changed(self, user: str) -> None:
        self._enqueue(_Count(user, len(self.local.sessions_of(user))))

    def _enqueue(self, item: _Write) -> bool:
        try:
            self._pending.put_nowait(item)
            return True
        except asyncio.QueueFull:
            self.healthy = False  # Redis is far behind: say so rather than grow
            log.error("redis broker: %d writes pending; dropping", MAX_PENDING)
            return False

    def _queue_commands(self, pipe, item: _Write) -> None:
        match item:
            case _Publish(channel, data):
                pipe.publish(channel, data)
            case _Run(commands):
                for command in commands:
                    _queue_command(pipe, command)
            case _Count(user, count):
                if count:
                    pipe.hset(self._user_key(user), self.node, count)
                    pipe.sadd(self._node_users_key(self.node), user)
                else:
                    pipe.hdel(self._user_key(user), self.node)
                    pipe.srem(self._node_users_key(self.node), user)
                pipe.publish(
                    self._presence_channel, json.dumps({"node": self.node, "user": user, "count": count})
                )

    async def _write(self, batch: list[_Write]) -> None:
        """One round trip for everything waiting: a pipeline keeps the order, and each
        `run` item gets the results of its own commands."""
        pipe = self._started_client.pipeline(transaction=False)
        runs = []
        for item in batch:
            first = len(pipe)
            self._queue_commands(pipe, item)
            if isinstance(item, _Run):
                runs.append((item.future, first, len(pipe)))
        results = await pipe.execute(raise_on_error=False)
        for future, first, last in runs:
            if future.done():
                continue
            mine = results[first:last]
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is None:
                future.set_result(mine)
            else:
                future.set_exception(_store_failure(error))

    async def _writer(self) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < MAX_BATCH and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            generation = self._generation
            self._writing = True
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                for item in batch:
                    if isinstance(item, _Run) and not item.future.done():
                        item.future.set_exception(_store_failure(exc))
                # Recovery rewrites every count of ours, so a lost count is covered; a lost
                # delivery is lost (its sender got 503 while Redis was away).
                await self._recover(exc, generation)
            finally:
                self._writing = False

    # ------------------------------------------------------------ Redis -> replica

    def _set_remote(self, node: str, user: str, count: int) -> None:
        was_online = self.is_online(user)
        nodes = self.remote.setdefault(user, {})
        if count > 0:
            nodes[node] = count
        else:
            nodes.pop(node, None)
        if not nodes:
            del self.remote[user]
        now_online = self.is_online(user)
        if now_online != was_online:
            for listener in self._presence_listeners:
                listener(user, now_online)

    def _on_message(self, channel: str, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("redis broker: unreadable message on %s", channel)
            return
        if channel == self._presence_channel:
            if message.get("node") != self.node:
                self._set_remote(message["node"], message["user"], int(message["count"]))
            return
        handler = self._handlers.get(message.get("kind"))
        if handler is None:
            log.warning("redis broker: message of unknown kind %r", message.get("kind"))
            return
        try:
            handler(message)
        except Exception:  # one bad message never stops the listener
            log.exception("redis broker: handling a %s message failed", message.get("kind"))

    def _on_deliver(self, message: dict) -> None:
        only = message.get("only")
        self.local.to_user(
            message["user"],
            message["destination"],
            message["body"].encode("utf-8"),
            None if only is None else set(only),
            set(message.get("exclude", ())),
        )

    async def _listen(self) -> None:
        while True:
            generation = self._generation
            try:
                async for message in self._started_pubsub.listen():
                    if message.get("type") == "message":
                        channel = message["channel"]
                        self._on_message(
                            channel.decode() if isinstance(channel, bytes) else channel, message["data"]
                        )
                # listen() also ends quietly when nothing is subscribed (a subscription
                # that failed half-way): resubscribe rather than spin.
                raise ConnectionError("not subscribed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._recover(exc, generation)

    async def _load_replica(self) -> None:
        """Every other live node's sessions, from the user hashes."""
        remote: dict[str, dict[str, int]] = {}
        alive: dict[str, bool] = {}
        async for key in self._started_client.scan_iter(match=f"{self.prefix}u:*", count=500):
            user = _text(key)[len(self.prefix) + 2 :]
            for raw_node, count in (await self._started_client.hgetall(key)).items():
                node = _text(raw_node)
                if node == self.node or int(count) <= 0:
                    continue
                if node not in alive:
                    alive[node] = bool(await self._started_client.exists(self._alive_key(node)))
                if alive[node]:
                    remote.setdefault(user, {})[node] = int(count)
        for user in set(self.remote) | set(remote):  # announce what changed
            for node in set(self.remote.get(user, {})) | set(remote.get(user, {})):
                self._set_remote(node, user, remote.get(user, {}).get(node, 0))

    async def _publish_own(self) -> None:
        counts: list[_Write] = [
            _Count(user, len(self.local.sessions_of(user))) for user in self.local.users()
        ]
        for i in range(0, len(counts), MAX_BATCH):
            await self._write(counts[i : i + MAX_BATCH])

    # ------------------------------------------------------------ liveness

    async def _heartbeat(self) -> None:
        while True:
            generation = self._generation
            try:
                was_alive = await self._started_client.set(
                    self._alive_key(self.node), "1", px=int(self.node_ttl_s * 1000), get=True
                )
                await self._started_client.sadd(self._nodes_key, self.node)
                if was_alive is None:
                    await self._written_off()
                await self._reap()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._recover(exc, generation)
            await asyncio.sleep(self.node_ttl_s / 3)

    async def _written_off(self) -> None:
        """Our heartbeat had lapsed (a stall longer than node_ttl_s, or a Redis that lost
        its keys): the other nodes count us gone and ended our calls.  Say again who is
        here, and let the services drop what the others already ended."""
        log.warning("redis broker: node %s was taken for dead; announcing its sessions again", self.node)
        await self._publish_own()
        for watcher in self._watchers:
            watcher.taken_for_dead()

    async def _reap(self) -> None:
        """Forget nodes whose heartbeat expired; one node cleans up after each."""
        nodes = {n for nodes in self.remote.values() for n in nodes}
        nodes |= {_text(n) for n in await self._started_client.smembers(self._nodes_key)}
        nodes.discard(self.node)
        for node in nodes:
            if await self._started_client.exists(self._alive_key(node)):
                continue
            if any(node in ns for ns in self.remote.values()):
                log.warning("redis broker: node %s stopped; its sessions are offline", node)
            for user in [u for u, ns in self.remote.items() if node in ns]:
                self._set_remote(node, user, 0)
            if await self._started_client.set(
                f"{self.prefix}reap:{node}", self.node, nx=True, px=int(self.node_ttl_s * 1000)
            ):
                users = await self._started_client.smembers(self._node_users_key(node))
                pipe = self._started_client.pipeline(transaction=False)
                for member in users:
                    pipe.hdel(self._user_key(_text(member)), node)
                pipe.delete(self._node_users_key(node))
                await pipe.execute()
                for watcher in self._watchers:
                    await watcher.node_gone(node)
                await self._started_client.srem(self._nodes_key, node)

    async def _recover(self, exc: Exception, generation: int) -> None:
        """After a Redis error: unhealthy until a ping answers, then resynchronise (our
        counts written again, the subscription and the replica renewed).  The writer,
        listener and heartbeat may all fail at once; one of them recovers, and the others,
        whose failure predates that recovery, just carry on."""
        async with self._recovering:
            if generation != self._generation:
                return
            if self.healthy:
                log.error("redis broker: Redis unavailable (%s); retrying", _error_name(exc))
            self.healthy = False
            while True:
                await asyncio.sleep(RETRY_S)
                try:
                    await self._started_client.ping()
                    await self._resubscribe()
                    await self._publish_own()
                    await self._load_replica()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    continue
                break
            self._generation += 1
            self.healthy = True
            log.info("redis broker: Redis is back; node %s resynchronised", self.node)

    @property
    def _started_client(self) -> aioredis.Redis:
        """The client start() made (a broker is used only once started)."""
        assert self._client is not None, "RedisBroker used before start()"
        return self._client

    @property
    def _started_pubsub(self) -> PubSub:
        assert self._pubsub is not None, "RedisBroker listening before start()"
        return self._pubsub

    async def _resubscribe(self) -> None:
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:
                pass
        self._pubsub = self._started_client.pubsub()
        await self._pubsub.subscribe(self._presence_channel, self._node_channel(self.node))

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Join the other nodes.  A Redis that does not answer yet is an outage like any
        other: the node serves (503 to what needs Redis, readiness false) and joins when
        Redis answers, rather than failing to start."""
        self._client = aioredis.from_url(
            self.url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10
        )
        try:
            await self._started_client.set(self._alive_key(self.node), "1", px=int(self.node_ttl_s * 1000))
            await self._started_client.sadd(self._nodes_key, self.node)
            await self._resubscribe()  # before loading, so no change falls in between
            await self._load_replica()
            self.healthy = True
            log.info("redis broker: node %s joined (%d users online elsewhere)", self.node, len(self.remote))
        except Exception as exc:
            log.error(
                "redis broker: Redis does not answer (%s: %s); signaling answers 503 until it does",
                type(exc).__name__,
                exc,
            )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._writer()),
            loop.create_task(self._listen()),
            loop.create_task(self._heartbeat()),
        ]

    async def stop(self) -> None:
        """Leave cleanly: what is queued is written (for a moment at most), and our
        sessions are gone from Redis at once, not after the TTL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_DRAIN_S
        while self.healthy and (self._writing or not self._pending.empty()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        if self._client is None:
            return
        try:
            await self._write([_Count(user, 0) for user in self.local.users()])
            await self._client.delete(self._alive_key(self.node), self._node_users_key(self.node))
            await self._started_client.srem(self._nodes_key, self.node)
        except Exception as exc:
            log.warning("redis broker: could not leave cleanly (%s)", type(exc).__name__)
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:
                pass
        await self._client.aclose()
