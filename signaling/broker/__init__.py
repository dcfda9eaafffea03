"""Where sessions are found: by user, for user destinations and presence.

`Broker` is the interface the services use; `MemoryBroker` serves one node,
`redis.RedisBroker` several nodes sharing a user base (a local MemoryBroker
plus a replica of the other nodes' sessions, kept through Redis).  A broker
that spans nodes also offers a `node_bus` (bus.py), which calls across nodes
need; on one node it is None.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from ..session import Session
from .bus import NodeBus

PresenceListener = Callable[[str, bool], object]  # (user id, online); any result is ignored


class Broker(Protocol):
    @property
    def healthy(self) -> bool:
        """False while a broker spanning nodes cannot reach what they share (Redis):
        the services answer 503 and readiness is false."""

    @property
    def node_bus(self) -> NodeBus | None:
        """The way to the other nodes; None when this broker serves one node alone."""

    def watch_presence(self, listener: PresenceListener) -> None:
        """Have `listener(user, online)` called when a user comes online or goes offline
        through sessions on other nodes.  (This node's own sessions are reported by
        `register` and `unregister`.)"""

    async def start(self) -> None:
        """Before the first session: join the other nodes, if any."""

    async def stop(self) -> None:
        """After the last session: leave the other nodes, if any."""

    def register(self, session: Session) -> bool:
        """Add a connected session; True if it is its user's first (the user came online)."""

    def unregister(self, session: Session) -> bool:
        """Remove a session; True if it was its user's last (the user went offline)."""

    def sessions_of(self, user_id: str) -> list[Session]: ...

    def is_online(self, user_id: str) -> bool: ...

    def local_sessions(self) -> list[Session]:
        """Every session connected to this process (for shutdown and metrics)."""
        ...

    def session_count(self) -> int: ...

    def user_count(self) -> int: ...

    def to_user(
        self,
        user_id: str,
        destination: str,
        body: bytes,
        only: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> int:
        """Deliver to the user's sessions (or the given ones of them); how many took it."""


class MemoryBroker:
    """The sessions of this process; with no other node, this is everybody."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, Session]] = {}

    @property
    def healthy(self) -> bool:
        return True  # nothing outside this process to lose

    @property
    def node_bus(self) -> None:
        return None

    def watch_presence(self, listener: PresenceListener) -> None:
        """No other node: every change is a local one, which `register` and
        `unregister` report."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def users(self) -> list[str]:
        """Every user with a session in this process."""
        return list(self._by_user)

    def register(self, session: Session) -> bool:
        sessions = self._by_user.setdefault(session.user_id, {})
        first = not sessions
        sessions[session.id] = session
        return first

    def unregister(self, session: Session) -> bool:
        sessions = self._by_user.get(session.user_id)
        if not sessions or sessions.pop(session.id, None) is None:
            return False
        if sessions:
            return False
        del self._by_user[session.user_id]
        return True

    def sessions_of(self, user_id: str) -> list[Session]:
        return list(self._by_user.get(user_id, {}).values())

    def is_online(self, user_id: str) -> bool:
        return user_id in self._by_user

    def local_sessions(self) -> list[Session]:
        return [s for sessions in self._by_user.values() for s in sessions.values()]

    def session_count(self) -> int:
        return sum(len(sessions) for sessions in self._by_user.values())

    def user_count(self) -> int:
        return len(self._by_user)

    def to_user(
        self,
        user_id: str,
        destination: str,
        body: bytes,
        only: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> int:
        return sum(
            1
            for s in self.sessions_of(user_id)
            if (only is None or s.id in only)
            and s.id not in exclude
            and not s.closed
            and s.deliver(destination, body)
        )
