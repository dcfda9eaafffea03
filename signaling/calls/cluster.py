"""Calls across signaling nodes that share a Redis: CallCluster, the CallService of
a broker with a node bus (broker/bus.py; the RedisBroker is one).

The node where a call is requested owns it: its CallRegistry holds the call and
its timers, so exactly one node fires a call's ring timeout or grace expiry.
Redis holds what every node must agree on:

    {p}call:{id}     hash  owner node, caller, callee -- while the call lives
    {p}busy:{user}   key   the user's live call (callee busy, caller busy)
    {p}callid:{id}   key   a callId that was used, kept for CALL_ID_MEMORY_S
    {p}calls:{node}  set   live calls the node owns (a dead node's calls are ended)

A request claims them in one Lua script, so two nodes can never both put a
user into a call.  Any other message about a call -- answer, hangup, RTC
signaling, a party's session dropping -- that arrives on a node which does not
own it is forwarded to the owner (a Kind.CALL message on the bus); the owner
runs it as if it were local and its notices reach the sessions wherever they
are.  An error goes back to the node the message came from (Kind.CALL_RESULT),
which answers the session on /user/queue/errors or the HTTP request.  When the
registry ends a call (CallEnded) the claims are released; when a node dies, the
node that cleans up after it ends its calls.

Order is kept per session: a session's message runs here at once only when
nothing of that session waits for Redis, and waiting messages run one after
the other per session, their commands and forwards going out in order on the
bus's writer (so an OFFER never overtakes its call's request).

`calls_across_nodes` builds a CallCluster and connects it to the registry and
the bus; nothing else does.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from ..broker import Broker
from ..broker.bus import (
    Command,
    Delete,
    Get,
    HGet,
    HGetAll,
    Kind,
    NodeBus,
    Script,
    SMembers,
    StoreUnavailable,
)
from ..client_text import loggable
from ..errors import SignalingError, unavailable
from ..session import Session
from .machine import CALL_ID_USED, CALL_NOT_FOUND, CALLEE_BUSY, CALLER_BUSY
from .registry import CallEnded, CallRegistry, ended_notices, refused
from .service import CallOp, CallService

log = logging.getLogger("signaling.calls")

CALL_ID_MEMORY_S = 86400
REPLY_TIMEOUT_S = 5.0
REDIS_TIMEOUT_S = 5.0
KNOWN_OWNERS = 10_000
MAX_WAITING = 100_000  # sessions with call messages waiting on Redis

# How a session hears of an error that came after its SEND was handled (a refusal from
# Redis or from the call's owner): SignalingService.error, a MESSAGE on its
# /user/queue/errors.
TellError = Callable[[Session, SignalingError], None]

# KEYS: callid, busy caller, busy callee, call, owner's calls
# ARGV: call id, owner, caller, callee, callid memory (ms)
# Returns 0, or the business code that refuses the call.
CLAIM = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return {CALL_ID_USED} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {CALLER_BUSY} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {CALLEE_BUSY} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[5])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[4], 'owner', ARGV[2], 'caller', ARGV[3], 'callee', ARGV[4])
redis.call('SADD', KEYS[5], ARGV[1])
return 0
"""

# KEYS: busy caller, busy callee, call, owner's calls, callid (forgotten when ARGV[2] == '1')
# ARGV: call id, forget
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[5]) end
return 0
"""


@dataclass
class Pending:
    op: CallOp
    user: str
    session: str | None
    body: object
    last: bool
    done: asyncio.Future[None] | None  # an HTTP request waiting; None for STOMP


def calls_across_nodes(
    broker: Broker,
    bus: NodeBus,
    registry: CallRegistry,
    max_payload_bytes: int,
    tell_error: TellError,
    clock: Callable[[], float] = time.monotonic,
) -> CallCluster:
    """The CallService of nodes that share a Redis, connected to what it hears from: the
    registry's ended calls, the bus's call messages, dead nodes and this node's return."""
    cluster = CallCluster(broker, bus, registry, max_payload_bytes, tell_error, clock)
    registry.listen(cluster)
    bus.subscribe(Kind.CALL, cluster.run_forwarded)
    bus.subscribe(Kind.CALL_RESULT, cluster.take_result)
    bus.watch_nodes(cluster)
    return cluster


class CallCluster(CallService):
    def __init__(
        self,
        broker: Broker,
        bus: NodeBus,
        registry: CallRegistry,
        max_payload_bytes: int,
        tell_error: TellError,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(broker, registry, max_payload_bytes, clock)
        self.bus = bus
        self.tell_error = tell_error
        self._chains: dict[object, asyncio.Task[None]] = {}  # session -> its latest waiting message
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._replies: dict[str, asyncio.Future[None]] = {}

    # ------------------------------------------------------------ keys

    def _key(self, kind: str, name: str) -> str:
        return f"{self.bus.prefix}{kind}:{name}"

    # ------------------------------------------------------------ entry points

    def submit(self, op: CallOp, user: str, session: str | None, body: object, last: bool = False) -> None:
        if op is not CallOp.LOST and not self.bus.healthy:
            raise unavailable()
        if op is not CallOp.REQUEST and self._is_local(op, user, body) and session not in self._chains:
            self.run(op, user, session, body, last)
            return
        self._enqueue(Pending(op, user, session, body, last, None))

    async def perform(self, op: CallOp, user: str, body: object) -> None:
        if not self.bus.healthy:
            raise unavailable()
        done = asyncio.get_running_loop().create_future()
        self._enqueue(Pending(op, user, None, body, False, done))
        await done

    def _is_local(self, op: CallOp, user: str, body: object) -> bool:
        if op in (CallOp.LOST, CallOp.HANGUP) and body is None:
            return user in self.registry.live_call_of
        call_id = body.get("callId") if isinstance(body, dict) else None
        # A body without a usable callId runs here: the registry names the bad field.
        return not isinstance(call_id, str) or call_id in self.registry.calls

    def _enqueue(self, item: Pending) -> None:
        """Run `item` after the session's earlier waiting messages (HTTP requests, which
        have no session, wait for nobody); messages of different sessions overlap, so
        their Redis commands share the bus's pipelines."""
        if len(self._chains) >= MAX_WAITING:
            raise unavailable()
        key = item.session if item.session is not None else object()
        task = asyncio.get_running_loop().create_task(self._run_after(self._chains.get(key), item))
        self._chains[key] = task
        task.add_done_callback(lambda done: self._chains.get(key) is done and self._chains.pop(key))

    async def _run_after(self, previous: asyncio.Task[None] | None, item: Pending) -> None:
        if previous is not None:
            await asyncio.wait((previous,))
        try:
            await self._process(item)
        except SignalingError as err:
            self._fail(item, err)
        except Exception as exc:
            log.warning("call %s from %s failed: %s", item.op.value, loggable(item.user), type(exc).__name__)
            self._fail(item, unavailable())

    async def _process(self, item: Pending) -> None:
        if item.op is CallOp.REQUEST:
            await self._request(item)
            return
        body = item.body
        if item.op in (CallOp.LOST, CallOp.HANGUP) and body is None:
            call_id = self.registry.live_call_of.get(item.user)
            if call_id is None:
                (call_id,) = await self._redis(Get(self._key("busy", item.user)))
            if call_id is None:
                self._succeed(item)  # no call to end
                return
            call_id = call_id.decode() if isinstance(call_id, bytes) else call_id
            if item.op is CallOp.HANGUP:
                body = {"callId": call_id}
        else:
            call_id = body.get("callId") if isinstance(body, dict) else None
        if not isinstance(call_id, str) or call_id in self.registry.calls:
            self._run_here(item, body)
            return
        owner = await self._owner_of(call_id)
        if owner is None or owner == self.bus.node:
            if item.op is CallOp.LOST:
                return
            raise refused(CALL_NOT_FOUND)
        message = {
            "op": item.op.value,
            "user": item.user,
            "session": item.session,
            "body": body,
            "last": item.last,
            "from": self.bus.node,
        }
        if item.done is not None:
            rid = secrets.token_hex(8)
            message["rid"] = rid
            self._replies[rid] = item.done
            asyncio.get_running_loop().call_later(REPLY_TIMEOUT_S, self._reply_expired, rid)
        self.bus.send(owner, Kind.CALL, message)

    def _run_here(self, item: Pending, body: object) -> None:
        self.run(item.op, item.user, item.session, body, item.last)
        self._succeed(item)

    async def _request(self, item: Pending) -> None:
        call_id, callee, _ = CallRegistry.parse_request(item.user, item.body)
        keys = (
            self._key("callid", call_id),
            self._key("busy", item.user),
            self._key("busy", callee),
            self._key("call", call_id),
            self._key("calls", self.bus.node),
        )
        (code,) = await self._redis(
            Script(CLAIM, keys, (call_id, self.bus.node, item.user, callee, CALL_ID_MEMORY_S * 1000))
        )
        if code:
            raise refused(code)
        try:
            self._run_here(item, item.body)
        except SignalingError:
            self._release(call_id, item.user, callee, forget=True)  # e.g. callee offline: never placed
            raise
        self._remember_owner(call_id, self.bus.node)

    # ------------------------------------------------------------ outcomes

    def _succeed(self, item: Pending) -> None:
        if item.done is not None and not item.done.done():
            item.done.set_result(None)

    def _fail(self, item: Pending, err: SignalingError) -> None:
        if item.done is not None:
            if not item.done.done():
                item.done.set_exception(err)
        elif item.op is not CallOp.LOST:
            self._tell_session(item.user, item.session, err)

    def _tell_session(self, user: str, session_id: str | None, err: SignalingError) -> None:
        for session in self.broker.sessions_of(user):
            if session.id == session_id:
                self.tell_error(session, err)

    def _reply_expired(self, rid: str) -> None:
        future = self._replies.pop(rid, None)
        if future is not None and not future.done():
            future.set_exception(SignalingError(503, "the node holding this call did not answer"))

    # ------------------------------------------------------------ messages from other nodes

    def run_forwarded(self, message: dict[str, Any]) -> None:
        """Another node's message about a call this node owns (Kind.CALL): run it here."""
        op = CallOp(message["op"])
        try:
            if op is not CallOp.LOST and not self._owns(message):
                raise refused(CALL_NOT_FOUND)
            self.run(
                op, message["user"], message.get("session"), message.get("body"), bool(message.get("last"))
            )
            code, text = 0, ""
        except SignalingError as err:
            code, text = err.code, err.message
        if message.get("rid") or (code and op is not CallOp.LOST):
            self.bus.send(
                message["from"],
                Kind.CALL_RESULT,
                {
                    "rid": message.get("rid"),
                    "user": message["user"],
                    "session": message.get("session"),
                    "code": code,
                    "message": text,
                },
            )

    def _owns(self, message: dict[str, Any]) -> bool:
        body = message.get("body")
        return isinstance(body, dict) and body.get("callId") in self.registry.calls

    def take_result(self, message: dict[str, Any]) -> None:
        """The owner's answer to a message forwarded from here (Kind.CALL_RESULT)."""
        code = int(message.get("code") or 0)
        err = SignalingError(code, message.get("message") or "") if code else None
        rid = message.get("rid")
        if rid:
            future = self._replies.pop(rid, None)
            if future is not None and not future.done():
                if err is None:
                    future.set_result(None)
                else:
                    future.set_exception(err)
        elif err is not None:
            self._tell_session(message["user"], message.get("session"), err)

    # ------------------------------------------------------------ Redis

    async def _redis(self, *commands: Command) -> list[Any]:
        """Run commands through the bus's ordered, pipelined writer; 503 if Redis fails."""
        if not self.bus.healthy:
            raise unavailable()
        try:
            return await asyncio.wait_for(self.bus.run(*commands), REDIS_TIMEOUT_S)
        except (TimeoutError, StoreUnavailable) as exc:
            raise unavailable() from exc

    async def _owner_of(self, call_id: str) -> str | None:
        owner = self._owners.get(call_id)
        if owner is None:
            (raw,) = await self._redis(HGet(self._key("call", call_id), "owner"))
            if raw is None:
                return None
            owner = raw.decode()
            self._remember_owner(call_id, owner)
        return owner

    def _remember_owner(self, call_id: str, owner: str) -> None:
        self._owners[call_id] = owner
        while len(self._owners) > KNOWN_OWNERS:
            self._owners.popitem(last=False)

    def _release_script(
        self, call_id: str, caller: str, callee: str, owner: str, forget: bool = False
    ) -> Script:
        """The RELEASE script: free the parties, forget the call (and, with `forget`, its
        callId too)."""
        keys = (
            self._key("busy", caller),
            self._key("busy", callee),
            self._key("call", call_id),
            self._key("calls", owner),
            self._key("callid", call_id),
        )
        return Script(RELEASE, keys, (call_id, "1" if forget else "0"))

    def _release(
        self, call_id: str, caller: str, callee: str, forget: bool = False
    ) -> asyncio.Future[list[Any]]:
        future = self.bus.run(self._release_script(call_id, caller, callee, self.bus.node, forget))
        # A failure here is the bus's outage; recovery is its business, not ours.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def live_calls_of(self, users: Collection[str]) -> dict[str, str]:
        """This node's calls from the registry, the others' from the parties' busy keys (one
        round trip); without Redis, this node's only."""
        found = await super().live_calls_of(users)
        others = [user for user in users if user not in found]
        if not others or not self.bus.healthy:
            return found
        try:
            values = await asyncio.wait_for(
                self.bus.query(*(Get(self._key("busy", user)) for user in others)), REDIS_TIMEOUT_S
            )
        except (TimeoutError, StoreUnavailable):
            return found
        for user, value in zip(others, values, strict=True):
            if value is not None:
                found[user] = value.decode() if isinstance(value, bytes) else str(value)
        return found

    # ------------------------------------------------------------ what the registry and the bus tell

    def call_ended(self, ended: CallEnded) -> None:
        """The registry ended a call: free its parties (queued before its notices go out)."""
        self._owners.pop(ended.call_id, None)
        self._release(ended.call_id, ended.caller, ended.callee)

    async def node_gone(self, node: str) -> None:
        """A dead node's calls: free their parties and tell them the call is over."""
        (members,) = await self.bus.query(SMembers(self._key("calls", node)))
        for raw in members:
            call_id = raw.decode()
            (fields,) = await self.bus.query(HGetAll(self._key("call", call_id)))
            parties = {k.decode(): v.decode() for k, v in fields.items()}
            caller, callee = parties.get("caller"), parties.get("callee")
            if caller and callee:
                await self.bus.query(self._release_script(call_id, caller, callee, node))
                log.warning(
                    "call %s: %s -> %s ended, its node %s stopped",
                    loggable(call_id),
                    loggable(caller),
                    loggable(callee),
                    node,
                )
                self.deliver(ended_notices(call_id, caller, callee))
        await self.bus.query(Delete(self._key("calls", node)))

    def taken_for_dead(self) -> None:
        """This node was taken for dead, so the others ended its calls: end them here too."""
        self._drop_calls()

    def _drop_calls(self) -> None:
        self.deliver(self.registry.drop_all(self.clock()))

    # ------------------------------------------------------------ lifecycle

    async def stop(self) -> None:
        """Before the broker stops: this node's calls end, their parties hear so."""
        self._drop_calls()
        for task in list(self._chains.values()):
            task.cancel()
        for future in self._replies.values():
            if not future.done():
                future.set_exception(unavailable())
        self._replies.clear()
