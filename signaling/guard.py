"""What the signaling allows one client, from TCP accept to the last byte: the caps on
connections and sessions (all, and per address), the CONNECT deadline, the send timeout,
the outbox's byte budget, and how long a finished connection lingers before it is closed.

One ClientGuard serves one listener: the transports (ws.py, sockjs/) ask it before a
session starts and to cut a connection off; Hypercorn's side (hypercorn_guard.py) asks
it at accept and counts stalled writes.  Every refusal and cut-off is counted in
`counters` (the SignalingService's, which /metrics exports).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .admission import AddressPolicy, SessionAdmission, SessionLimits
from .connections import REFUSED_TOTAL, ConnectionTable, Peer, Transport, open_files_share
from .session import DEFAULT_MAX_OUTBOX_BYTES

REFUSAL_MESSAGES = {
    REFUSED_TOTAL: "the server holds as many connections as it can; try again later",
    "connections_per_ip": "too many connections from your address",
    "sessions_per_ip": "too many sessions from your address",
    "session_rate": "too many new sessions from your address; slow down",
}


@dataclass(frozen=True)
class LifecyclePolicy:
    connect_timeout_s: float = 10.0  # from the handshake to CONNECT
    send_timeout_s: float = 10.0  # one write to the client, or a close, at most
    max_outbox_bytes: int = DEFAULT_MAX_OUTBOX_BYTES
    linger_s: float = 2.0  # a finished connection reads and discards this long


@dataclass(frozen=True)
class CapSettings:
    max_connections: int | None = None  # None: open_files_share()
    max_connections_per_ip: int = 0  # 0: no cap
    sessions: SessionLimits = field(default_factory=SessionLimits)
    exempt: tuple[str, ...] = ()  # networks not capped per address


class Refused(Exception):
    """A cap says no: `reason` is the metric label, `status` the HTTP answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(REFUSAL_MESSAGES.get(reason, reason))
        self.reason = reason
        self.status = 503 if reason == REFUSED_TOTAL else 429
        self.message = str(self)


class SessionTicket:
    """A session admitted for an address; `release` (idempotent) when the session ends."""

    def __init__(self, admission: SessionAdmission, key: str | None) -> None:
        self._admission = admission
        self._key = key
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.release(self._key)


class ClientGuard:
    def __init__(
        self,
        policy: LifecyclePolicy = LifecyclePolicy(),
        caps: CapSettings = CapSettings(),
        counters: Counter | None = None,
    ) -> None:
        self.policy = policy
        self.addresses = AddressPolicy(caps.exempt)
        self.sessions = SessionAdmission(caps.sessions)
        fixed = caps.max_connections
        limit: Callable[[], int] = open_files_share if fixed is None else (lambda: fixed)
        self.connections = ConnectionTable(limit, caps.max_connections_per_ip)
        self.counters: Counter = counters if counters is not None else Counter()

    def count_into(self, counters: Counter) -> None:
        """Count in `counters` from now on (the SignalingService's, read by /metrics)."""
        counters.update(self.counters)
        self.counters = counters

    def count(self, name: str) -> None:
        self.counters[name] += 1

    # ------------------------------------------------------------ sessions

    def open_session(self, client: Peer | None, now: float) -> SessionTicket:
        """Admit a new STOMP session (WebSocket or SockJS) from `client`; Refused if a
        per-address cap says no."""
        key = self.addresses.key(client[0] if client else None)
        refusal = self.sessions.admit(key, now)
        if refusal is not None:
            self.count(f"refused_{refusal}")
            raise Refused(refusal)
        return SessionTicket(self.sessions, key)

    # ------------------------------------------------------------ connections

    def open_connection(self, peer: Peer | None, transport: Transport) -> tuple[str | None, Refused | None]:
        """At accept: (the address key to close it with, None) or (None, why refused)."""
        key = self.addresses.key(peer[0] if peer else None)
        refusal = self.connections.open(peer, key, transport)
        if refusal is not None:
            self.count(f"refused_{refusal}")
            return None, Refused(refusal)
        return key, None

    def close_connection(self, peer: Peer | None, key: str | None) -> None:
        self.connections.close(peer, key)

    def connection_open(self, client: Peer | None) -> bool:
        """The connection from `client` is still served (known to the table)."""
        return self.connections.is_open(tuple(client) if client else None)

    def abort(self, client: Peer | None, reason: str) -> bool:
        """Cut the connection from `client` off now (no close handshake, nothing more sent)
        and count it under `reason`; False if no such connection is known."""
        if not self.connections.abort(tuple(client) if client else None):
            return False
        self.count(f"aborted_{reason}")
        return True
