"""The signaling listener's open TCP connections: a cap on all of them, a cap per address,
and a way to cut one off at once for code that knows only its peer (an ASGI scope's
`client`).

The total cap keeps file descriptors for the rest of the process: every TURN allocation
and the admin listener need one, and a signaling listener that takes them all leaves
Allocate unanswered and /healthz failing while STUN still looks healthy.  By default it
is half the soft RLIMIT_NOFILE less a reserve, read again at each accept (a limit raised
or lowered at run time counts at once).
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Protocol

REFUSED_TOTAL = "connections"
REFUSED_PER_ADDRESS = "connections_per_ip"
FD_RESERVE = 64  # descriptors the process keeps besides its half
MIN_AUTO_CONNECTIONS = 16


def open_files_share() -> int:
    """Connections the signaling may hold: half the soft open-files limit less FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(MIN_AUTO_CONNECTIONS, soft // 2 - FD_RESERVE)


class Transport(Protocol):
    def abort(self) -> None: ...


Peer = tuple  # (host, port) as Hypercorn reports it, and as ASGI scopes carry it


class ConnectionTable:
    def __init__(self, max_total: Callable[[], int], max_per_address: int = 0) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.per_address: dict[str, int] = {}
        self.transports: dict[Peer, tuple[str | None, Transport]] = {}

    def __len__(self) -> int:
        return self.total

    def open(self, peer: Peer | None, key: str | None, transport: Transport) -> str | None:
        """Count a new connection and return None, or return why it is refused (and count
        nothing).  `key` is its address's (admission.AddressPolicy), None if exempt."""
        if self.total >= self.max_total():
            return REFUSED_TOTAL
        if key is not None and self.max_per_address and self.per_address.get(key, 0) >= self.max_per_address:
            return REFUSED_PER_ADDRESS
        self.total += 1
        if key is not None:
            self.per_address[key] = self.per_address.get(key, 0) + 1
        if peer is not None:
            self.transports[peer] = (key, transport)
        return None

    def close(self, peer: Peer | None, key: str | None) -> None:
        """The connection opened with these (admitted) is gone."""
        self.total = max(0, self.total - 1)
        if key is not None:
            left = self.per_address.get(key, 0) - 1
            if left > 0:
                self.per_address[key] = left
            else:
                self.per_address.pop(key, None)
        if peer is not None:
            self.transports.pop(peer, None)

    def is_open(self, peer: Peer | None) -> bool:
        return peer is not None and peer in self.transports

    def abort(self, peer: Peer | None) -> bool:
        """Drop the connection from `peer` now, and whatever it had not sent yet; False if
        there is no such connection (already gone, or not served through this table)."""
        entry = self.transports.get(peer) if peer is not None else None
        if entry is None:
            return False
        entry[1].abort()
        return True
