"""One connected STOMP client as the broker sees it, with a bounded outbox.

The transport (native WebSocket or SockJS) owns the socket; a Session owns
what is waiting to be written.  Each outbound frame is one entry; when a
client stops reading and its outbox passes the bound, the session is marked
slow and closed rather than allowed to grow memory.  `wake` is the
transport's callback for "there is something to write" -- a plain callable,
so the broker never touches asyncio.
"""

from __future__ import annotations

import collections
from typing import Callable

from .stomp import StompServerConnection

DEFAULT_MAX_OUTBOX = 1024


class Session:
    def __init__(self, session_id: str, user_id: str, conn: StompServerConnection,
                 wake: Callable[[], None] = lambda: None, max_outbox: int = DEFAULT_MAX_OUTBOX) -> None:
        self.id = session_id
        self.user_id = user_id
        self.conn = conn
        self.wake = wake
        self.max_outbox = max_outbox
        self.outbox: collections.deque[bytes] = collections.deque()
        self.slow = False

    def __repr__(self) -> str:
        return f"Session({self.id!r}, user={self.user_id!r})"

    @property
    def closed(self) -> bool:
        return self.conn.closed or self.slow

    def flush(self) -> None:
        """Move what the STOMP connection produced into the outbox and wake the writer."""
        chunks = self.conn.data_to_send()
        if not chunks:
            return
        if len(self.outbox) + len(chunks) > self.max_outbox:
            self.slow = True          # the writer sees `closed` and ends the connection
            self.outbox.clear()
        else:
            self.outbox.extend(chunks)
        self.wake()

    def subscription_ids(self, destination: str) -> list[str]:
        return [sid for sid, dest in self.conn.subscriptions.items() if dest == destination]

    def deliver(self, destination: str, body: bytes) -> bool:
        """A MESSAGE on every subscription of this session to `destination`; False if none."""
        ids = self.subscription_ids(destination)
        for sid in ids:
            self.conn.send_message(destination, sid, body)
        if ids:
            self.flush()
        return bool(ids)
