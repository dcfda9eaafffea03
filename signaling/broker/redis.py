"""The Broker on Redis: several signaling nodes serving one user base.

Each node keeps its own sessions in a MemoryBroker and a replica of where
everybody else's sessions are, so the services keep calling the broker
synchronously (is_online, to_user) and Redis work happens in the background:

    {p}u:{user}      hash  node id -> sessions of the user on that node
    {p}nu:{node}     set   users with sessions on that node (for reaping it)
    {p}node:{node}   key   the node's heartbeat, expiring after node_ttl_s
    {p}presence      channel: {"node", "user", "count"} whenever a count changes
    {p}to:{node}     channel: messages for that node only (user deliveries)

A delivery to a user goes to the local sessions directly and, for each other
node holding sessions of the user, one PUBLISH on that node's own channel:
never a broadcast to every node.  A node that dies stops refreshing its
heartbeat; within node_ttl_s every other node drops it from its replica (its
users go OFFLINE where nobody else holds them) and one of them, holding a
short lock, removes its entries from Redis.

A Redis outage makes `healthy` false (the service answers 503 and readiness
turns false); the node keeps retrying, and when Redis is back it writes its
sessions again and reloads the replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Callable, Collection

from ..session import Session
from . import MemoryBroker

log = logging.getLogger("signaling.broker")

RETRY_S = 1.0
MAX_PENDING = 100_000


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
            message = json.dumps({"kind": "deliver", "user": user_id, "destination": destination,
                                  "body": body.decode("utf-8"),
                                  "only": None if only is None else sorted(only),
                                  "exclude": sorted(exclude)})
            for node in nodes:
                self._enqueue(("publish", self._node_channel(node), message))
        return delivered

    # ------------------------------------------------------------ local changes -> Redis

    def _count_changed(self, user: str) -> None:
        self._enqueue(("count", user, len(self.local.sessions_of(user))))

    def _enqueue(self, item) -> None:
        try:
            self._pending.put_nowait(item)
        except asyncio.QueueFull:
            self.healthy = False        # Redis is far behind: say so rather than grow
            log.error("redis broker: %d writes pending; dropping", MAX_PENDING)

    async def _write(self, item) -> None:
        kind = item[0]
        if kind == "publish":
            await self._client.publish(item[1], item[2])
            return
        _, user, count = item
        pipe = self._client.pipeline(transaction=True)
        if count:
            pipe.hset(self._user_key(user), self.node, count)
            pipe.sadd(self._node_users_key(self.node), user)
        else:
            pipe.hdel(self._user_key(user), self.node)
            pipe.srem(self._node_users_key(self.node), user)
        pipe.publish(self._presence_channel,
                     json.dumps({"node": self.node, "user": user, "count": count}))
        await pipe.execute()

    async def _writer(self) -> None:
        while True:
            item = await self._pending.get()
            generation = self._generation
            try:
                await self._write(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Recovery rewrites every count of ours, so a lost count is covered; a lost
                # delivery is lost (its sender got 503 while Redis was away).
                await self._recover(exc, generation)

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
        elif message.get("kind") == "deliver":
            only = message.get("only")
            self.local.to_user(message["user"], message["destination"],
                               message["body"].encode("utf-8"),
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
        for user in list(self.local._by_user):
            await self._write(("count", user, len(self.local.sessions_of(user))))

    # ------------------------------------------------------------ liveness

    async def _heartbeat(self) -> None:
        while True:
            generation = self._generation
            try:
                await self._client.set(self._alive_key(self.node), "1",
                                       px=int(self.node_ttl_s * 1000))
                await self._reap()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._recover(exc, generation)
            await asyncio.sleep(self.node_ttl_s / 3)

    async def _reap(self) -> None:
        """Forget nodes whose heartbeat expired; one node cleans up after each."""
        nodes = {n for nodes in self.remote.values() for n in nodes}
        for node in nodes:
            if await self._client.exists(self._alive_key(node)):
                continue
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
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5,
                                         health_check_interval=10)
        await self._client.set(self._alive_key(self.node), "1", px=int(self.node_ttl_s * 1000))
        await self._resubscribe()            # before loading, so no change falls in between
        await self._load_replica()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._listen()),
                       loop.create_task(self._heartbeat())]
        self.healthy = True
        log.info("redis broker: node %s joined (%d users online elsewhere)", self.node,
                 len(self.remote))

    async def stop(self) -> None:
        """Leave cleanly: our sessions are gone from Redis at once, not after the TTL."""
        for task in self._tasks:
            task.cancel()
        if self._client is None:
            return
        try:
            for user in list(self.local._by_user):
                await self._write(("count", user, 0))
            await self._client.delete(self._alive_key(self.node), self._node_users_key(self.node))
        except Exception as exc:
            log.warning("redis broker: could not leave cleanly (%s)", type(exc).__name__)
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:
                pass
        await self._client.aclose()
