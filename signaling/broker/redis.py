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
short lock, removes its entries from Redis and runs the `node_gone` hooks
(the call cluster ends the dead node's calls there).  A node that was only
stalled finds its heartbeat key gone when it wakes: it writes its sessions
again and runs the `revived` hooks (the cluster drops the calls the others
have ended).

Other services share the node's channel and its ordered writer: `handlers`
maps a message "kind" to a callback, `send_to_node` publishes to one node and
`run` sends Redis commands in order with this node's other writes.  Writes
go out in pipelines: whatever waits when the writer is free travels in one
round trip.

A Redis outage makes `healthy` false (the service answers 503 and readiness
turns false); the node keeps retrying, and when Redis is back it writes its
sessions again and reloads the replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Awaitable, Callable, Collection

from ..session import Session
from . import MemoryBroker

log = logging.getLogger("signaling.broker")

RETRY_S = 1.0
MAX_PENDING = 100_000
STOP_DRAIN_S = 2.0
MAX_BATCH = 500              # writes per pipeline round trip


class RedisBroker:
    def __init__(self, url: str, prefix: str = "appliance:", node_id: str | None = None,
                 node_ttl_s: float = 15.0) -> None:
        self.url = url
        self.prefix = prefix
        self.node = node_id or secrets.token_hex(6)
        self.node_ttl_s = node_ttl_s
        self.local = MemoryBroker()
        self.remote: dict[str, dict[str, int]] = {}      # user -> {other node: sessions}
        self.on_presence: Callable[[str, bool], None] | None = None
        self.healthy = False
        self._pending: asyncio.Queue = asyncio.Queue(MAX_PENDING)
        self._tasks: list[asyncio.Task] = []
        self._client = None
        self._pubsub = None
        self._generation = 0                 # bumped by every recovery
        self._recovering = asyncio.Lock()
        self._writing = False
        self.handlers: dict[str, Callable[[dict], None]] = {"deliver": self._on_deliver}
        self.node_gone: list[Callable[[object, str], Awaitable[None]]] = []
        self.revived: list[Callable[[], None]] = []

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
        return len(set(self.local._by_user) | set(self.remote))

    def is_online(self, user_id: str) -> bool:
        return self.local.is_online(user_id) or bool(self.remote.get(user_id))

    def to_user(self, user_id: str, destination: str, body: bytes,
                only: Collection[str] | None = None, exclude: Collection[str] = ()) -> int:
        delivered = self.local.to_user(user_id, destination, body, only, exclude)
        nodes = self.remote.get(user_id)
        if nodes:
            message = {"kind": "deliver", "user": user_id, "destination": destination,
                       "body": body.decode("utf-8"),
                       "only": None if only is None else sorted(only), "exclude": sorted(exclude)}
            for node in nodes:
                self.send_to_node(node, message)
        return delivered

    # ------------------------------------------------------------ for other services

    def send_to_node(self, node: str, message: dict) -> None:
        """Publish `message` (with a "kind" some node's `handlers` knows) to one node."""
        self._enqueue(("publish", self._node_channel(node), json.dumps(message)))

    def run(self, *commands: tuple) -> asyncio.Future:
        """Redis commands such as ("get", key) or ("eval", script, 1, key), sent in order
        with this node's other writes (pipelined with whatever else is waiting); the
        future gets their results as a list, or the first command's error."""
        future = asyncio.get_running_loop().create_future()
        if not self._enqueue(("run", commands, future)):
            future.set_exception(ConnectionError("redis broker overloaded"))
        return future

    # ------------------------------------------------------------ local changes -> Redis

    def _count_changed(self, user: str) -> None:
        self._enqueue(("count", user, len(self.local.sessions_of(user))))

    def _enqueue(self, item) -> bool:
        try:
            self._pending.put_nowait(item)
            return True
        except asyncio.QueueFull:
            self.healthy = False        # Redis is far behind: say so rather than grow
            log.error("redis broker: %d writes pending; dropping", MAX_PENDING)
            return False

    def _queue_commands(self, pipe, item) -> None:
        kind = item[0]
        if kind == "publish":
            pipe.publish(item[1], item[2])
        elif kind == "run":
            for name, *args in item[1]:
                getattr(pipe, name)(*args)
        else:
            _, user, count = item
            if count:
                pipe.hset(self._user_key(user), self.node, count)
                pipe.sadd(self._node_users_key(self.node), user)
            else:
                pipe.hdel(self._user_key(user), self.node)
                pipe.srem(self._node_users_key(self.node), user)
            pipe.publish(self._presence_channel,
                         json.dumps({"node": self.node, "user": user, "count": count}))

    async def _write(self, batch: list) -> None:
        """One round trip for everything waiting: a pipeline keeps the order, and each
        `run` item gets the results of its own commands."""
        pipe = self._client.pipeline(transaction=False)
        spans = []
        for item in batch:
            first = len(pipe)
            self._queue_commands(pipe, item)
            spans.append((item, first, len(pipe)))
        results = await pipe.execute(raise_on_error=False)
        for item, first, last in spans:
            if item[0] != "run" or item[2].done():
                continue
            mine = results[first:last]
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is None:
                item[2].set_result(mine)
            else:
                item[2].set_exception(error)

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
                    if item[0] == "run" and not item[2].done():
                        item[2].set_exception(exc)
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
        if now_online != was_online and self.on_presence is not None:
            self.on_presence(user, now_online)

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
        handler = self.handlers.get(message.get("kind"))
        if handler is None:
            log.warning("redis broker: message of unknown kind %r", message.get("kind"))
            return
        try:
            handler(message)
        except Exception:                   # one bad message never stops the listener
            log.exception("redis broker: handling a %s message failed", message.get("kind"))

    def _on_deliver(self, message: dict) -> None:
        only = message.get("only")
        self.local.to_user(message["user"], message["destination"], message["body"].encode("utf-8"),
                           None if only is None else set(only), set(message.get("exclude", ())))

    async def _listen(self) -> None:
        while True:
            generation = self._generation
            try:
                async for message in self._pubsub.listen():
                    if message.get("type") == "message":
                        channel = message["channel"]
                        self._on_message(channel.decode() if isinstance(channel, bytes) else channel,
                                         message["data"])
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
        async for key in self._client.scan_iter(match=f"{self.prefix}u:*", count=500):
            user = key.decode()[len(self.prefix) + 2:]
            for node, count in (await self._client.hgetall(key)).items():
                node = node.decode()
                if node == self.node or int(count) <= 0:
                    continue
                if node not in alive:
                    alive[node] = bool(await self._client.exists(self._alive_key(node)))
                if alive[node]:
                    remote.setdefault(user, {})[node] = int(count)
        for user in set(self.remote) | set(remote):        # announce what changed
            for node in set(self.remote.get(user, {})) | set(remote.get(user, {})):
                self._set_remote(node, user, remote.get(user, {}).get(node, 0))

    async def _publish_own(self) -> None:
        counts = [("count", user, len(self.local.sessions_of(user))) for user in list(self.local._by_user)]
        for i in range(0, len(counts), MAX_BATCH):
            await self._write(counts[i:i + MAX_BATCH])

    # ------------------------------------------------------------ liveness

    async def _heartbeat(self) -> None:
        while True:
            generation = self._generation
            try:
                was_alive = await self._client.set(self._alive_key(self.node), "1",
                                                   px=int(self.node_ttl_s * 1000), get=True)
                await self._client.sadd(self._nodes_key, self.node)
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
        log.warning("redis broker: node %s was taken for dead; announcing its sessions again",
                    self.node)
        await self._publish_own()
        for hook in self.revived:
            hook()

    async def _reap(self) -> None:
        """Forget nodes whose heartbeat expired; one node cleans up after each."""
        nodes = {n for nodes in self.remote.values() for n in nodes}
        nodes |= {n.decode() for n in await self._client.smembers(self._nodes_key)}
        nodes.discard(self.node)
        for node in nodes:
            if await self._client.exists(self._alive_key(node)):
                continue
            if any(node in ns for ns in self.remote.values()):
                log.warning("redis broker: node %s stopped; its sessions are offline", node)
            for user in [u for u, ns in self.remote.items() if node in ns]:
                self._set_remote(node, user, 0)
            if await self._client.set(f"{self.prefix}reap:{node}", self.node, nx=True,
                                      px=int(self.node_ttl_s * 1000)):
                users = await self._client.smembers(self._node_users_key(node))
                pipe = self._client.pipeline(transaction=False)
                for user in users:
                    pipe.hdel(self._user_key(user.decode()), node)
                pipe.delete(self._node_users_key(node))
                await pipe.execute()
                for hook in self.node_gone:
                    await hook(self._client, node)
                await self._client.srem(self._nodes_key, node)

    async def _recover(self, exc: Exception, generation: int) -> None:
        """After a Redis error: unhealthy until a ping answers, then resynchronise (our
        counts written again, the subscription and the replica renewed).  The writer,
        listener and heartbeat may all fail at once; one of them recovers, and the others,
        whose failure predates that recovery, just carry on."""
        async with self._recovering:
            if generation != self._generation:
                return
            if self.healthy:
                log.error("redis broker: Redis unavailable (%s); retrying", type(exc).__name__)
            self.healthy = False
            while True:
                await asyncio.sleep(RETRY_S)
                try:
                    await self._client.ping()
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

    async def _resubscribe(self) -> None:
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:
                pass
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(self._presence_channel, self._node_channel(self.node))

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Join the other nodes.  A Redis that does not answer yet is an outage like any
        other: the node serves (503 to what needs Redis, readiness false) and joins when
        Redis answers, rather than failing to start."""
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5,
                                         health_check_interval=10)
        try:
            await self._client.set(self._alive_key(self.node), "1", px=int(self.node_ttl_s * 1000))
            await self._client.sadd(self._nodes_key, self.node)
            await self._resubscribe()            # before loading, so no change falls in between
            await self._load_replica()
            self.healthy = True
            log.info("redis broker: node %s joined (%d users online elsewhere)", self.node,
                     len(self.remote))
        except Exception as exc:
            log.error("redis broker: Redis does not answer (%s: %s); signaling answers 503 "
                      "until it does", type(exc).__name__, exc)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._listen()),
                       loop.create_task(self._heartbeat())]

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
            await self._write([("count", user, 0) for user in list(self.local._by_user)])
            await self._client.delete(self._alive_key(self.node), self._node_users_key(self.node))
            await self._client.srem(self._nodes_key, self.node)
        except Exception as exc:
            log.warning("redis broker: could not leave cleanly (%s)", type(exc).__name__)
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:
                pass
        await self._client.aclose()
