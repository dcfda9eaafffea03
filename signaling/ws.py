"""STOMP over a native WebSocket (`{prefix}/ws?userId=...`), on Quart.

The thin I/O around the sans-I/O pieces: one task reads messages into the
StompServerConnection and hands its events to the SignalingService; one task
writes the session's outbox, one text message per frame (stomp-websocket 2.3
decodes binary messages as Latin-1); the read loop also serves the
connection's heart-beat timer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from .errors import SignalingError
from .service import SignalingService
from .session import Session
from .stomp import ConnectRequested, Limits, StompServerConnection

log = logging.getLogger("signaling.ws")

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")     # preference order
_session_numbers = itertools.count(1)


def choose_subprotocol(offered: list[str]) -> str | None:
    return next((p for p in SUBPROTOCOLS if p in offered), None)


def new_session_id() -> str:
    return f"{os.getpid():x}-{next(_session_numbers):x}"


async def serve_websocket(websocket, service: SignalingService, limits: Limits,
                          max_outbox: int) -> None:
    """Run one client's WebSocket until it closes (called inside a Quart websocket route)."""
    await websocket.accept(subprotocol=choose_subprotocol(list(websocket.requested_subprotocols)))
    loop = asyncio.get_running_loop()
    claimed_user = websocket.args.get("userId")
    conn = StompServerConnection(limits, now=loop.time())
    wake = asyncio.Event()
    session: Session | None = None
    writer: asyncio.Task | None = None

    async def write_outbox() -> None:
        while True:
            await wake.wait()
            wake.clear()
            while session.outbox:
                await websocket.send(session.outbox.popleft().decode("utf-8"))
            if session.closed:
                return

    async def send_direct() -> None:
        # Before the session exists (CONNECT refused, errors before CONNECTED).
        for chunk in conn.data_to_send():
            await websocket.send(chunk.decode("utf-8"))

    try:
        while not conn.closed and (session is None or not session.closed):
            timer = conn.get_timer()
            timeout = None if timer is None else max(0.0, timer - loop.time())
            try:
                data = await asyncio.wait_for(websocket.receive(), timeout)
            except asyncio.TimeoutError:
                events = conn.handle_timer(loop.time())
            else:
                events = conn.receive_data(data, loop.time())
            for event in events:
                if isinstance(event, ConnectRequested):
                    try:
                        user = await service.authenticate(event, claimed_user)
                    except SignalingError as err:
                        conn.reject(err.message)
                        continue
                    session = Session(new_session_id(), user, conn, wake.set, max_outbox)
                    conn.accept(loop.time(), session=session.id, user_name=user)
                    writer = asyncio.create_task(write_outbox())
                    session.flush()
                    service.connected(session)
                elif session is not None:
                    service.handle(session, event)
            if session is None:
                await send_direct()
            else:
                session.flush()
        if writer is not None:
            wake.set()
            await asyncio.wait_for(writer, 5)      # the ERROR/RECEIPT goes out before the close
    except asyncio.CancelledError:
        raise
    except Exception:        # a client must never take the server down with it
        log.exception("websocket session failed")
    finally:
        if writer is not None and not writer.done():
            writer.cancel()
        if session is not None:
            service.closed(session)
