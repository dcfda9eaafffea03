"""The node bus: what a service needs from the other signaling nodes.

A broker that spans nodes offers one (`Broker.node_bus`; redis.RedisBroker is
its own); a broker serving one node offers none, and the services then have
nobody to talk to.  The bus

- sends a JSON message to one named node (`send`); each message has a `Kind`,
  and on the receiving node the one handler subscribed to that kind takes it;
- runs store (Redis) commands in order with everything else this node writes
  (`run`): a call's claim is written before the forward that follows it; or
  at once (`query`), for clean-up that must not wait behind this node's writes;
- names the nodes alive now (`live_nodes`), for questions to all of them;
- tells its `NodeWatcher`s when another node died (one surviving node is told,
  and cleans up after it) and when this node finds it was taken for dead.

Commands are values (`Get`, `Script`, ...): what to ask the store, not how;
the bus turns them into its client's calls.  Whatever way the store fails --
unreachable, overloaded, an error reply -- a command's future fails with
`StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Kind(enum.Enum):
    """What a message between nodes carries; each has one handler per node."""

    DELIVER = "deliver"  # a user destination's message for this node's sessions
    CALL = "call"  # a call message for the node that owns the call
    CALL_RESULT = "call-result"  # the owner's answer to a forwarded call message
    OVERSIGHT = "oversight"  # an operator's question (sessions, calls, disconnect) for a node
    OVERSIGHT_ANSWER = "oversight-answer"  # a node's answer to it


class StoreUnavailable(Exception):
    """The store the nodes share failed or is out of reach (the cause is chained)."""


@dataclass(frozen=True)
class Get:
    key: str


@dataclass(frozen=True)
class HGet:
    key: str
    field: str


@dataclass(frozen=True)
class HGetAll:
    key: str


@dataclass(frozen=True)
class SMembers:
    key: str


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class Script:
    """A Lua script run atomically on `keys` with `args` (Redis EVAL)."""

    source: str
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


Command = Get | HGet | HGetAll | SMembers | Delete | Script

MessageHandler = Callable[[dict], None]


class NodeWatcher(Protocol):
    async def node_gone(self, node: str) -> None:
        """`node` stopped (its heartbeat expired) and this node cleans up after it."""

    def taken_for_dead(self) -> None:
        """This node's heartbeat had lapsed, so the others cleaned up after it; it is
        back and must drop what they ended."""


class NodeBus(Protocol):
    @property
    def node(self) -> str:
        """This node's id: where the others send what is for this node."""

    @property
    def prefix(self) -> str:
        """Every store key of these nodes starts with it."""

    @property
    def healthy(self) -> bool:
        """False while the store is out of reach (messages and commands would fail)."""

    def send(self, node: str, kind: Kind, message: dict) -> None:
        """Publish `message` (JSON-able) to `node`'s handler for `kind`, in order with
        this node's other writes."""

    def subscribe(self, kind: Kind, handler: MessageHandler) -> None:
        """`handler(message)` takes this node's messages of `kind` (one handler a kind)."""

    def run(self, *commands: Command) -> asyncio.Future[list]:
        """Run `commands` in order with this node's other writes; the future gets their
        results as a list, or fails with StoreUnavailable."""

    async def query(self, *commands: Command) -> list:
        """Run `commands` now, not queued behind this node's writes; their results, or
        StoreUnavailable."""

    def watch_nodes(self, watcher: NodeWatcher) -> None:
        """Have `watcher` hear of dead nodes and of this node coming back from the dead."""

    async def live_nodes(self) -> list[str]:
        """Every node whose heartbeat is live now, this one included; StoreUnavailable if
        the store cannot say."""
