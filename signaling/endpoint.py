"""One STOMP client, whatever carries it: native WebSocket or any SockJS transport.

The transport feeds inbound text (`feed`), writes what `take_output`
returns (one STOMP frame per item), calls `tick` when `next_timer` says, and
`finish` once at the end.  Authentication of CONNECT happens here, so every
transport refuses and accepts clients the same way.
"""

from __future__ import annotations

import itertools
import os
from typing import Callable

from .errors import SignalingError
from .service import SignalingService
from .session import Session
from .stomp import ConnectRequested, Limits, StompServerConnection

_session_numbers = itertools.count(1)


def new_session_id() -> str:
    return f"{os.getpid():x}-{next(_session_numbers):x}"


class StompEndpoint:
    def __init__(self, service: SignalingService, limits: Limits, max_outbox: int,
                 claimed_user: str | None, now: float, wake: Callable[[], None]) -> None:
        self.service = service
        self.claimed_user = claimed_user
        self.max_outbox = max_outbox
        self.wake = wake
        self.conn = StompServerConnection(limits, now=now)
        self.session: Session | None = None
        self._finished = False

    @property
    def closed(self) -> bool:
        return self.conn.closed or (self.session is not None and self.session.closed)

    async def feed(self, data: str | bytes, now: float) -> None:
        for event in self.conn.receive_data(data, now):
            await self._on_event(event, now)
        self._flush()

    def tick(self, now: float) -> None:
        for event in self.conn.handle_timer(now):
            if self.session is not None:
                self.service.handle(self.session, event)
        self._flush()

    def next_timer(self) -> float | None:
        return self.conn.get_timer()

    def take_output(self) -> list[bytes]:
        if self.session is None:
            return self.conn.data_to_send()
        out = list(self.session.outbox)
        self.session.outbox.clear()
        return out

    def finish(self) -> None:
        """The transport is gone: the session leaves the broker (once)."""
        if self._finished:
            return
        self._finished = True
        if self.session is not None:
            self.service.closed(self.session)

    async def _on_event(self, event, now: float) -> None:
        if isinstance(event, ConnectRequested):
            try:
                user = await self.service.authenticate(event, self.claimed_user)
            except SignalingError as err:
                self.conn.reject(err.message)
                return
            self.session = Session(new_session_id(), user, self.conn, self.wake, self.max_outbox)
            self.conn.accept(now, session=self.session.id, user_name=user)
            self.session.flush()
            self.service.connected(self.session)
        elif self.session is not None:
            self.service.handle(self.session, event)

    def _flush(self) -> None:
        if self.session is not None:
            self.session.flush()
        elif self.conn.has_output:          # a refusal or error before any session exists
            self.wake()
