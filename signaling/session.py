"""One connected STOMP client as the broker sees it, with a bounded outbox.

The transport (native WebSocket or SockJS) owns the socket; a Session owns
what is waiting to be written.  Each outbound frame is one entry; the outbox
is bounded in frames and in bytes.  When a client stops reading and its
outbox passes either bound, the session is marked slow and closed rather than
allowed to grow memory: the outbox is emptied at once, an ERROR frame waits
in the STOMP connection for a writer that can still send it, and `overflow`
tells the transport, which cuts the connection off if its writer is stuck.
`wake` is the transport's callback for "there is something to write" -- a
plain callable, so the broker never touches asyncio.

What operators see of a session (appliance's GET /admin/sessions) is its
`Arrival` (which transport, from which address, since when: given by the
transport, which knows them) and the messages it counts each way.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from .stomp import StompServerConnection

DEFAULT_MAX_OUTBOX = 1024
DEFAULT_MAX_OUTBOX_BYTES = 1024 * 1024


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Arrival:
    """How a session came: its transport ("websocket", or a SockJS kind such as
    "sockjs-xhr_streaming"), the client's address as text (client text: escape it before
    logging), and when the transport opened, in epoch seconds."""

    transport: str = "unknown"
    address: str = ""
    since: float = 0.0


UNKNOWN_ARRIVAL = Arrival()


class Session:
    def __init__(
        self,
        session_id: str,
        user_id: str,
        conn: StompServerConnection,
        wake: Callable[[], None] = _nothing,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        max_outbox_bytes: int = DEFAULT_MAX_OUTBOX_BYTES,
        overflow: Callable[[], None] = _nothing,
        arrival: Arrival = UNKNOWN_ARRIVAL,
    ) -> None:
        self.id = session_id
        self.user_id = user_id
        self.conn = conn
        self.wake = wake
        self.overflow = overflow
        self.max_outbox = max_outbox
        self.max_outbox_bytes = max_outbox_bytes
        self.outbox: collections.deque[bytes] = collections.deque()
        self.outbox_bytes = 0
        self.slow = False
        self.arrival = arrival
        self.messages_in = 0  # SENDs the client made
        self.messages_out = 0  # MESSAGE frames queued for it

    def __repr__(self) -> str:
        return f"Session({self.id!r}, user={self.user_id!r})"

    @property
    def closed(self) -> bool:
        return self.conn.closed or self.slow

    def flush(self) -> None:
        """Move what the STOMP connection produced into the outbox and wake the writer."""
        if self.slow:
            return  # cut off: only the ERROR is left, for take()
        chunks = self.conn.data_to_send()
        if not chunks:
            return
        size = sum(len(c) for c in chunks)
        # An empty outbox takes one flush whatever its size: a frame larger than the
        # budget (max_frame_bytes may be set above it) must not end a reading client.
        if len(self.outbox) + len(chunks) > self.max_outbox or (
            self.outbox and self.outbox_bytes + size > self.max_outbox_bytes
        ):
            self._cut_off()
        else:
            self.outbox.extend(chunks)
            self.outbox_bytes += size
        self.wake()

    def take(self) -> list[bytes]:
        """Everything waiting to be written, in order; the outbox is empty afterwards."""
        out = list(self.outbox)
        self.outbox.clear()
        self.outbox_bytes = 0
        if self.slow:
            out.extend(self.conn.data_to_send())  # the ERROR of _cut_off
        return out

    def discard(self) -> None:
        """The transport is gone: drop what it will never write, now -- not whenever the
        garbage collector gets to the transport's objects (they hold cycles)."""
        self.outbox.clear()
        self.outbox_bytes = 0
        self.conn.data_to_send()

    def _cut_off(self) -> None:
        self.slow = True  # the writer sees `closed` and ends the connection
        self.outbox.clear()
        self.outbox_bytes = 0
        self.conn.data_to_send()  # what did not fit goes too
        self.conn.close_with_error("slow consumer: too much unread output")
        self.overflow()

    def received(self) -> None:
        """Count one SEND the client made (whatever became of it)."""
        self.messages_in += 1

    def disconnect(self, reason: str) -> None:
        """End the session as shutdown does: an ERROR frame with `reason`, then the
        transport closes (it sees `closed`); the close is reported as for any other."""
        if self.closed:
            return
        self.conn.close_with_error(reason)
        self.flush()

    def subscription_ids(self, destination: str) -> list[str]:
        return [sid for sid, dest in self.conn.subscriptions.items() if dest == destination]

    def deliver(self, destination: str, body: bytes) -> bool:
        """A MESSAGE on every subscription of this session to `destination`; False if none."""
        ids = self.subscription_ids(destination)
        for sid in ids:
            self.conn.send_message(destination, sid, body)
        self.messages_out += len(ids)
        if ids:
            self.flush()
        return bool(ids)
