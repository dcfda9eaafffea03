"""What operators see of the signaling and do to it: the sessions and calls of every node,
and disconnecting a user (appliance's admin API: GET/DELETE /admin/sessions, GET
/admin/calls).  Nothing here speaks HTTP; the admin app turns a Listing into JSON.

One node answers from its own broker and call registry, each row marked with its node.
Nodes that share a Redis (a broker with a node bus) are asked over the bus: a question
(Kind.OVERSIGHT) is sent to every live node (`NodeBus.live_nodes`), each answers from its
own sessions and calls (Kind.OVERSIGHT_ANSWER), and the asking node waits for the answers
for ANSWER_TIMEOUT_S at most; a node that does not answer in time is named in
`unanswered` rather than holding the operator up.  A request/answer rather than session
summaries kept in Redis: nothing is written per session that nobody may ever read, and an
answer is as fresh as the question.  Bounds: at most MAX_ROWS rows in all (each node is
asked for no more; `truncated` says rows were left out), MAX_QUESTIONS questions in flight
on a node (an operator's loop cannot pile them up) and as many answers being prepared.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ratelog import RateLimitedLog

from .broker.bus import Kind, NodeBus, StoreUnavailable
from .calls.registry import Call
from .calls.service import CallService
from .client_text import loggable
from .service import SignalingService
from .session import Session

log = logging.getLogger("signaling.oversight")

MAX_ROWS = 10_000
MAX_NODES = 256  # nodes asked; more live nodes than this is a misconfiguration
MAX_QUESTIONS = 16  # questions of this node's operators waiting for answers
MAX_ANSWERING = 16  # other nodes' questions this node prepares answers to at once
ANSWER_TIMEOUT_S = 2.0
DISCONNECT_REASON = "disconnected by the operator"

SESSIONS = "sessions"
CALLS = "calls"
DISCONNECT = "disconnect"
QUESTIONS = (SESSIONS, CALLS, DISCONNECT)


class OversightBusy(Exception):
    """Too many questions in flight on this node: ask again shortly."""


@dataclass
class Listing:
    """Rows from every node that answered, at most the limit asked (`truncated`: more
    existed); `nodes` answered, `unanswered` were asked and did not answer in time (or
    could not be asked: the store is out of reach, then named "?")."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False
    nodes: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)

    def add(self, node: str, rows: list[dict[str, Any]], truncated: bool, limit: int) -> None:
        self.nodes.append(node)
        room = max(0, limit - len(self.rows))
        self.rows.extend(rows[:room])
        self.truncated = self.truncated or truncated or len(rows) > room


@dataclass
class Disconnected:
    """Sessions told to go, per node that answered."""

    per_node: dict[str, int] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_node.values())


def session_row(node: str, session: Session, call_id: str | None) -> dict[str, Any]:
    """One session as operators see it (user ids and addresses are client text: the JSON
    encoder escapes them)."""
    a = session.arrival
    return {
        "node": node,
        "user": session.user_id,
        "session": session.id,
        "transport": a.transport,
        "address": a.address,
        "connectedSince": round(a.since, 3),
        "messagesIn": session.messages_in,
        "messagesOut": session.messages_out,
        "inCall": call_id is not None,
        "callId": call_id,
    }


def call_row(node: str, call: Call, now: float) -> dict[str, Any]:
    """One live call as operators see it; `now` on the registry's clock."""
    return {
        "node": node,
        "callId": call.id,
        "caller": call.caller,
        "callee": call.callee,
        "type": call.type,
        "state": call.state.value,
        "ageSeconds": round(max(0.0, now - call.created), 3),
    }


@dataclass
class _Question:
    """A question of ours on the bus: the nodes it went to and what they answered."""

    waiting: set[str]
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Oversight:
    """Sessions and calls for operators, on this node or, with a `bus`, on every node."""

    def __init__(
        self,
        node: str,
        service: SignalingService,
        calls: CallService,
        bus: NodeBus | None = None,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self.node = node
        self.service = service
        self.calls = calls
        self.bus = bus
        self.answer_timeout_s = answer_timeout_s
        self._questions: dict[str, _Question] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._failures = RateLimitedLog(log)
        if bus is not None:
            bus.subscribe(Kind.OVERSIGHT, self._on_question)
            bus.subscribe(Kind.OVERSIGHT_ANSWER, self._on_answer)

    # ------------------------------------------------------------ what the admin API calls

    async def sessions(self, user: str | None = None, limit: int = MAX_ROWS) -> Listing:
        """Every session (of `user`, if given) on every node, at most `limit` rows."""
        limit = _bounded(limit)
        listing = Listing()
        rows, truncated = await self._local_sessions(user, limit)
        listing.add(self.node, rows, truncated, limit)
        answers = await self._ask_others({"question": SESSIONS, "user": user, "limit": limit}, listing)
        _add_rows(listing, answers, limit)
        return listing

    async def live_calls(self, limit: int = MAX_ROWS) -> Listing:
        """Every live call, each listed by the node that owns it, at most `limit` rows."""
        limit = _bounded(limit)
        listing = Listing()
        rows, truncated = self._local_calls(limit)
        listing.add(self.node, rows, truncated, limit)
        answers = await self._ask_others({"question": CALLS, "limit": limit}, listing)
        _add_rows(listing, answers, limit)
        return listing

    async def disconnect(self, user: str, reason: str = DISCONNECT_REASON) -> Disconnected:
        """Disconnect `user`'s sessions on every node with an ERROR frame; their calls end as
        for a dropped connection (grace, then the other party's hangup)."""
        result = Disconnected({self.node: self.service.disconnect_user(user, reason)})
        listing = Listing()
        answers = await self._ask_others({"question": DISCONNECT, "user": user, "reason": reason}, listing)
        for node, answer in answers.items():
            count = answer.get("count")
            result.per_node[node] = count if isinstance(count, int) else 0
        result.unanswered = listing.unanswered
        return result

    # ------------------------------------------------------------ this node

    async def _local_sessions(self, user: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        broker = self.service.broker
        found = broker.sessions_of(user) if user is not None else broker.local_sessions()
        chosen = [s for s in found if not s.closed][:limit]
        in_call = await self.calls.live_calls_of({s.user_id for s in chosen})
        rows = [session_row(self.node, s, in_call.get(s.user_id)) for s in chosen]
        return rows, len(found) > limit

    def _local_calls(self, limit: int) -> tuple[list[dict[str, Any]], bool]:
        calls = list(self.calls.registry.calls.values())
        now = self.calls.clock()
        return [call_row(self.node, c, now) for c in calls[:limit]], len(calls) > limit

    async def _answer_locally(self, question: dict[str, Any]) -> dict[str, Any]:
        kind = question.get("question")
        limit = _bounded(question.get("limit"))
        user = question.get("user")
        user = user if isinstance(user, str) else None
        if kind == SESSIONS:
            rows, truncated = await self._local_sessions(user, limit)
            return {"rows": rows, "truncated": truncated}
        if kind == CALLS:
            rows, truncated = self._local_calls(limit)
            return {"rows": rows, "truncated": truncated}
        if kind == DISCONNECT and user is not None:
            reason = question.get("reason")
            reason = reason[:200] if isinstance(reason, str) else DISCONNECT_REASON
            return {"count": self.service.disconnect_user(user, reason)}
        return {"error": "unknown question"}

    # ------------------------------------------------------------ the other nodes

    async def _ask_others(self, question: dict[str, Any], listing: Listing) -> dict[str, dict[str, Any]]:
        """Send `question` to every other live node; their answers by node (those that did
        not answer in time are added to the listing's `unanswered`)."""
        bus = self.bus
        if bus is None:
            return {}
        if len(self._questions) >= MAX_QUESTIONS:
            raise OversightBusy()
        try:
            others = [n for n in await bus.live_nodes() if n != self.node][:MAX_NODES]
        except StoreUnavailable:
            listing.unanswered.append("?")
            return {}
        if not others:
            return {}
        rid = secrets.token_hex(8)
        pending = _Question(set(others))
        self._questions[rid] = pending
        try:
            for node in others:
                bus.send(node, Kind.OVERSIGHT, {**question, "rid": rid, "from": self.node})
            try:
                await asyncio.wait_for(pending.done.wait(), self.answer_timeout_s)
            except TimeoutError:
                pass
        finally:
            del self._questions[rid]
        listing.unanswered.extend(n for n in others if n not in pending.answers)
        return {n: pending.answers[n] for n in others if n in pending.answers}

    def _on_question(self, message: dict[str, Any]) -> None:
        """Another node's question (Kind.OVERSIGHT): answered from a task of its own."""
        asker, rid = message.get("from"), message.get("rid")
        if not isinstance(asker, str) or not isinstance(rid, str):
            return
        if len(self._answering) >= MAX_ANSWERING:
            self.service.counters["oversight_unanswered"] += 1
            self._failures.warning(
                time.monotonic(),
                "oversight: too many questions at once; one from %s unanswered",
                loggable(asker),
            )
            return
        task = asyncio.get_running_loop().create_task(self._answer(asker, rid, message))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, asker: str, rid: str, question: dict[str, Any]) -> None:
        assert self.bus is not None, "questions come over the bus"
        try:
            answer = await self._answer_locally(question)
        except Exception:  # a bug must not end the bus's listener; the asker times out
            self.service.counters["internal_errors"] += 1
            self._failures.exception(time.monotonic(), "oversight: answering a question failed")
            return
        self.bus.send(asker, Kind.OVERSIGHT_ANSWER, {**answer, "rid": rid, "node": self.node})

    def _on_answer(self, message: dict[str, Any]) -> None:
        """A node's answer to a question of ours (Kind.OVERSIGHT_ANSWER)."""
        rid, node = message.get("rid"), message.get("node")
        pending = self._questions.get(rid) if isinstance(rid, str) else None
        if pending is None or not isinstance(node, str) or node not in pending.waiting:
            return  # late, or not ours
        pending.waiting.discard(node)
        pending.answers[node] = message
        if not pending.waiting:
            pending.done.set()


def _add_rows(listing: Listing, answers: dict[str, dict[str, Any]], limit: int) -> None:
    """The other nodes' rows, in the order they were asked."""
    for node, answer in answers.items():
        rows = answer.get("rows")
        listing.add(node, rows if isinstance(rows, list) else [], bool(answer.get("truncated")), limit)


def _bounded(limit: object) -> int:
    """A row limit from anywhere (a query string, another node): 1..MAX_ROWS."""
    if not isinstance(limit, int) or isinstance(limit, bool):
        return MAX_ROWS
    return max(1, min(limit, MAX_ROWS))
