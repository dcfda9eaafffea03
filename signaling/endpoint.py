"""One STOMP client, whatever carries it: native WebSocket or any SockJS transport.

The transport feeds inbound text (`feed`), writes what `take_output`
returns (one STOMP frame per item), calls `tick` when `next_timer` says, and
`finish` once at the end.  Authentication of CONNECT happens here, so every
transport refuses and accepts clients the same way -- and the CONNECT
deadline is here too: a client that has not sent CONNECT `connect_timeout_s`
after the transport opened gets an ERROR and is closed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from .errors import SignalingError
from .service import SignalingService
from .session import DEFAULT_MAX_OUTBOX_BYTES, UNKNOWN_ARRIVAL, Arrival, Session
from .stomp import ConnectRequested, Limits, StompServerConnection

_session_numbers = itertools.count(1)


def new_session_id() -> str:
    return f"{os.getpid():x}-{next(_session_numbers):x}"


def _nothing() -> None:
    return None


class StompEndpoint:
    def __init__(
        self,
        service: SignalingService,
        limits: Limits,
        max_outbox: int,
        claimed_user: str | None,
        now: float,
        wake: Callable[[], None],
        *,
        connect_timeout_s: float | None = None,
        max_outbox_bytes: int = DEFAULT_MAX_OUTBOX_BYTES,
        overflow: Callable[[], None] = _nothing,
        arrival: Arrival = UNKNOWN_ARRIVAL,
    ) -> None:
        self.service = service
        self.arrival = arrival
        self.claimed_user = claimed_user
        self.max_outbox = max_outbox
        self.max_outbox_bytes = max_outbox_bytes
        self.wake = wake
        self.overflow = overflow
        self.conn = StompServerConnection(limits, now=now)
        self.connect_timeout_s = connect_timeout_s
        self.connect_deadline = None if connect_timeout_s is None else now + connect_timeout_s
        self.session: Session | None = None
        self._finished = False

    @property
    def closed(self) -> bool:
        return self.conn.closed or (self.session is not None and self.session.closed)

    async def feed(self, data: str | bytes, now: float) -> None:
        events = self.conn.receive_data(data, now)
        while events:
            for event in events:
                await self._on_event(event, now)
            # Frames behind a CONNECT waited for its answer: their turn now.
            events = self.conn.receive_data(b"", now)
        self._flush()

    def tick(self, now: float) -> None:
        if self.session is None:
            self._check_connect_deadline(now)
        for event in self.conn.handle_timer(now):
            if self.session is not None:
                self.service.handle(self.session, event)
        self._flush()

    def next_timer(self) -> float | None:
        if self.session is None:
            return None if self.conn.closed else self.connect_deadline
        return self.conn.get_timer()

    def take_output(self) -> list[bytes]:
        if self.session is None:
            return self.conn.data_to_send()
        return self.session.take()

    def finish(self) -> None:
        """The transport is gone: the session leaves the broker (once), and what it had not
        written is dropped at once."""
        if self._finished:
            return
        self._finished = True
        if self.session is not None:
            self.service.closed(self.session)
            self.session.discard()
        else:
            self.conn.data_to_send()

    def _check_connect_deadline(self, now: float) -> None:
        if self.conn.closed or self.connect_deadline is None or now < self.connect_deadline:
            return
        self.service.counters["connect_timeouts"] += 1
        self.conn.close_with_error(f"no CONNECT within {self.connect_timeout_s:g} s")

    async def _on_event(self, event, now: float) -> None:
        if isinstance(event, ConnectRequested):
            try:
                user = await self.service.authenticate(event, self.claimed_user)
            except SignalingError as err:
                self.conn.reject(err.message)
                return
            if self.conn.closed or self._finished:
                # The deadline (or a shutdown) came while the token was checked, or the
                # transport is gone: finish() has run, and a session registered now would
                # never be closed (a reader that asyncio let finish its receive after the
                # cancel gets here; found by bench/fuzz_signaling.py).
                return
            self.session = Session(
                new_session_id(),
                user,
                self.conn,
                self.wake,
                self.max_outbox,
                self.max_outbox_bytes,
                self.overflow,
                self.arrival,
            )
            self.conn.accept(now, session=self.session.id, user_name=user)
            self.session.flush()
            self.service.connected(self.session)
        elif self.session is not None:
            self.service.handle(self.session, event)

    def _flush(self) -> None:
        if self.session is not None:
            self.session.flush()
        elif self.conn.has_output:  # a refusal or error before any session exists
            self.wake()
