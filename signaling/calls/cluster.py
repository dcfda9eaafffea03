"""Calls across signaling nodes that share a Redis (with the RedisBroker).

The node where a call is requested owns it: its CallRegistry holds the call and
its timers, so exactly one node fires a call's ring timeout or grace expiry.
Redis holds what every node must agree on:

    {p}call:{id}     hash  owner node, caller, callee -- while the call lives
    {p}busy:{user}   key   the user's live call (busy checks 1001 / 1006)
    {p}callid:{id}   key   a callId that was used (1005), kept for CALL_ID_MEMORY_S
    {p}calls:{node}  set   live calls the node owns (a dead node's calls are ended)

A request claims them in one Lua script, so two nodes can never both put a
user into a call.  Any other message about a call -- answer, hangup, RTC
signaling, a party's session dropping -- that arrives on a node which does not
own it is forwarded on the owner's channel; the owner runs it as if it were
local and its notices reach the sessions wherever they are.  An error goes
back to the node the message came from, which answers the session on
/user/queue/errors or the HTTP request.

Order is kept per session: a session's message runs here at once only when
nothing of that session waits for Redis, and waiting messages run one after
the other per session, their commands and forwards going out in order on the
broker's writer (so an OFFER never overtakes its call's request).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from ..client_text import loggable
from ..errors import SignalingError, unavailable
from .registry import CallRegistry, ended_notices
from .service import CallService

log = logging.getLogger("signaling.calls")

CALL_ID_MEMORY_S = 86400
REPLY_TIMEOUT_S = 5.0
REDIS_TIMEOUT_S = 5.0
KNOWN_OWNERS = 10_000
MAX_WAITING = 100_000            # sessions with call messages waiting on Redis

# KEYS: callid, busy caller, busy callee, call, owner's calls
# ARGV: call id, owner, caller, callee, callid memory (ms)
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1005 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 1006 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 1001 end
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

CLAIM_REFUSALS = {1005: "callId already used", 1006: "caller already in a call", 1001: "callee busy"}


@dataclass
class Pending:
    op: str
    user: str
    session: str | None
    body: object
    last: bool
    done: asyncio.Future | None          # an HTTP request waiting; None for STOMP


class CallCluster:
    def __init__(self, service: CallService, broker) -> None:
        self.service = service
        self.broker = broker
        self.registry: CallRegistry = service.registry
        self.node: str = broker.node
        self.prefix: str = broker.prefix
        self._chains: dict[object, asyncio.Task] = {}   # session -> its latest waiting message
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._replies: dict[str, asyncio.Future] = {}
        service.cluster = self
        self.registry.on_end = self._release_claims
        broker.handlers["call"] = self._on_forwarded
        broker.handlers["call-result"] = self._on_result
        broker.node_gone.append(self._end_calls_of)
        broker.revived.append(self._drop_calls)

    # ------------------------------------------------------------ keys

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    # ------------------------------------------------------------ entry points

    def submit(self, op: str, user: str, session: str | None, body, last: bool = False) -> None:
        if op != "lost" and not self.broker.healthy:
            raise unavailable()
        if op != "request" and self._is_local(op, user, body) and session not in self._chains:
            self.service.deliver(self.service.run_local(op, user, session, body,
                                                        self.service.clock(), last))
            return
        self._enqueue(Pending(op, user, session, body, last, None))

    async def perform(self, op: str, user: str, body) -> None:
        if not self.broker.healthy:
            raise unavailable()
        done = asyncio.get_running_loop().create_future()
        self._enqueue(Pending(op, user, None, body, False, done))
        await done

    def _is_local(self, op: str, user: str, body) -> bool:
        if op in ("lost", "hangup") and body is None:
            return user in self.registry.live_call_of
        call_id = body.get("callId") if isinstance(body, dict) else None
        # A body without a usable callId runs here: the registry names the bad field.
        return not isinstance(call_id, str) or call_id in self.registry.calls

    def _enqueue(self, item: Pending) -> None:
        """Run `item` after the session's earlier waiting messages (HTTP requests, which
        have no session, wait for nobody); messages of different sessions overlap, so
        their Redis commands share the broker's pipelines."""
        if len(self._chains) >= MAX_WAITING:
            raise unavailable()
        key = item.session if item.session is not None else object()
        task = asyncio.get_running_loop().create_task(self._run_after(self._chains.get(key), item))
        self._chains[key] = task
        task.add_done_callback(lambda done: self._chains.get(key) is done and self._chains.pop(key))

    async def _run_after(self, previous: asyncio.Task | None, item: Pending) -> None:
        if previous is not None:
            await asyncio.wait((previous,))
        try:
            await self._process(item)
        except SignalingError as err:
            self._fail(item, err)
        except Exception as exc:
            log.warning("call %s from %s failed: %s", item.op, loggable(item.user), type(exc).__name__)
            self._fail(item, unavailable())

    async def _process(self, item: Pending) -> None:
        if item.op == "request":
            await self._request(item)
            return
        body = item.body
        if item.op in ("lost", "hangup") and body is None:
            call_id = self.registry.live_call_of.get(item.user)
            if call_id is None:
                (call_id,) = await self._redis(("get", self._key("busy", item.user)))
            if call_id is None:
                self._succeed(item)            # no call to end
                return
            call_id = call_id.decode() if isinstance(call_id, bytes) else call_id
            if item.op == "hangup":
                body = {"callId": call_id}
        else:
            call_id = body.get("callId") if isinstance(body, dict) else None
        if not isinstance(call_id, str) or call_id in self.registry.calls:
            self._run_here(item, body)
            return
        owner = await self._owner_of(call_id)
        if owner is None or owner == self.node:
            if item.op == "lost":
                return
            raise SignalingError(1003, "call not found or already ended")
        message = {"kind": "call", "op": item.op, "user": item.user, "session": item.session,
                   "body": body, "last": item.last, "from": self.node}
        if item.done is not None:
            rid = secrets.token_hex(8)
            message["rid"] = rid
            self._replies[rid] = item.done
            asyncio.get_running_loop().call_later(REPLY_TIMEOUT_S, self._reply_expired, rid)
        self.broker.send_to_node(owner, message)

    def _run_here(self, item: Pending, body) -> None:
        now = self.service.clock()
        self.service.deliver(self.service.run_local(item.op, item.user, item.session, body, now,
                                                    item.last))
        self._succeed(item)

    async def _request(self, item: Pending) -> None:
        call_id, callee, _ = CallRegistry.parse_request(item.user, item.body)
        keys = [self._key("callid", call_id), self._key("busy", item.user), self._key("busy", callee),
                self._key("call", call_id), self._key("calls", self.node)]
        (code,) = await self._redis(("eval", CLAIM, len(keys), *keys, call_id, self.node, item.user,
                                     callee, CALL_ID_MEMORY_S * 1000))
        if code:
            raise SignalingError(code, CLAIM_REFUSALS.get(code, "call refused"))
        try:
            self._run_here(item, item.body)
        except SignalingError:
            self._release(call_id, item.user, callee, forget=True)    # e.g. 1002: never placed
            raise
        self._remember_owner(call_id, self.node)

    # ------------------------------------------------------------ outcomes

    def _succeed(self, item: Pending) -> None:
        if item.done is not None and not item.done.done():
            item.done.set_result(None)

    def _fail(self, item: Pending, err: SignalingError) -> None:
        if item.done is not None:
            if not item.done.done():
                item.done.set_exception(err)
        elif item.op != "lost":
            self._tell_session(item.user, item.session, err)

    def _tell_session(self, user: str, session_id: str | None, err: SignalingError) -> None:
        for session in self.broker.sessions_of(user):
            if session.id == session_id and self.service.signaling is not None:
                self.service.signaling.error(session, err)

    def _reply_expired(self, rid: str) -> None:
        future = self._replies.pop(rid, None)
        if future is not None and not future.done():
            future.set_exception(SignalingError(503, "the node holding this call did not answer"))

    # ------------------------------------------------------------ messages from other nodes

    def _on_forwarded(self, message: dict) -> None:
        """Another node's message about a call this node owns: run it here."""
        op = message["op"]
        try:
            if op != "lost" and not self._owns(message):
                raise SignalingError(1003, "call not found or already ended")
            self.service.deliver(self.service.run_local(op, message["user"], message.get("session"),
                                                        message.get("body"), self.service.clock(),
                                                        bool(message.get("last"))))
            code, text = 0, ""
        except SignalingError as err:
            code, text = err.code, err.message
        if message.get("rid") or (code and op != "lost"):
            self.broker.send_to_node(message["from"], {
                "kind": "call-result", "rid": message.get("rid"), "user": message["user"],
                "session": message.get("session"), "code": code, "message": text})

    def _owns(self, message: dict) -> bool:
        body = message.get("body")
        return isinstance(body, dict) and body.get("callId") in self.registry.calls

    def _on_result(self, message: dict) -> None:
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

    async def _redis(self, *commands: tuple) -> list:
        """Run commands through the broker's ordered, pipelined writer; 503 if Redis fails."""
        if not self.broker.healthy:
            raise unavailable()
        try:
            return await asyncio.wait_for(self.broker.run(*commands), REDIS_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, OSError) as exc:
            raise unavailable() from exc
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):
                raise unavailable() from exc
            raise

    async def _owner_of(self, call_id: str) -> str | None:
        owner = self._owners.get(call_id)
        if owner is None:
            (raw,) = await self._redis(("hget", self._key("call", call_id), "owner"))
            if raw is None:
                return None
            owner = raw.decode()
            self._remember_owner(call_id, owner)
        return owner

    def _remember_owner(self, call_id: str, owner: str) -> None:
        self._owners[call_id] = owner
        while len(self._owners) > KNOWN_OWNERS:
            self._owners.popitem(last=False)

    def _release_command(self, call_id: str, caller: str, callee: str, owner: str,
                         forget: bool = False) -> tuple:
        """The RELEASE script's command: free the parties, forget the call (and, with
        `forget`, its callId too)."""
        keys = [self._key("busy", caller), self._key("busy", callee), self._key("call", call_id),
                self._key("calls", owner), self._key("callid", call_id)]
        return ("eval", RELEASE, len(keys), *keys, call_id, "1" if forget else "0")

    def _release(self, call_id: str, caller: str, callee: str, forget: bool = False) -> asyncio.Future:
        future = self.broker.run(self._release_command(call_id, caller, callee, self.node, forget))
        # A failure here is the broker's outage; recovery is its business, not ours.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _release_claims(self, call) -> None:
        """The registry ended a call: free its parties (queued before its notices go out)."""
        self._owners.pop(call.id, None)
        self._release(call.id, call.caller, call.callee)

    async def _end_calls_of(self, client, node: str) -> None:
        """A dead node's calls: free their parties and tell them the call is over."""
        for raw in await client.smembers(self._key("calls", node)):
            call_id = raw.decode()
            parties = {k.decode(): v.decode()
                       for k, v in (await client.hgetall(self._key("call", call_id))).items()}
            caller, callee = parties.get("caller"), parties.get("callee")
            if caller and callee:
                name, *args = self._release_command(call_id, caller, callee, node)
                await getattr(client, name)(*args)
                log.warning("call %s: %s -> %s ended, its node %s stopped", loggable(call_id),
                            loggable(caller), loggable(callee), node)
                self.service.deliver(ended_notices(call_id, caller, callee))
        await client.delete(self._key("calls", node))

    def _drop_calls(self) -> None:
        """This node was taken for dead, so the others ended its calls: end them here too."""
        self.service.deliver(self.registry.drop_all(self.service.clock()))

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Nothing runs in the background: messages wait in tasks of their own."""

    async def stop(self) -> None:
        """Before the broker stops: this node's calls end, their parties hear so."""
        self._drop_calls()
        for task in list(self._chains.values()):
            task.cancel()
        for future in self._replies.values():
            if not future.done():
                future.set_exception(unavailable())
        self._replies.clear()
