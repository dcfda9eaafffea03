"""STOMP over a native WebSocket (`{prefix}/ws?userId=...`), on Quart.

One task reads messages into the StompEndpoint (which also serves the
heart-beat timer between messages); one writes its output, one text message
per STOMP frame (stomp-websocket 2.3 decodes binary messages as Latin-1).
"""

from __future__ import annotations

import asyncio
import logging

from .endpoint import StompEndpoint
from .service import SignalingService
from .stomp import Limits

log = logging.getLogger("signaling.ws")

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")     # preference order
WRITER_DRAIN_S = 5.0


def choose_subprotocol(offered: list[str]) -> str | None:
    return next((p for p in SUBPROTOCOLS if p in offered), None)


async def serve_websocket(websocket, service: SignalingService, limits: Limits,
                          max_outbox: int) -> None:
    """Run one client's WebSocket until it closes (called inside a Quart websocket route)."""
    await websocket.accept(subprotocol=choose_subprotocol(list(websocket.requested_subprotocols)))
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    endpoint = StompEndpoint(service, limits, max_outbox, websocket.args.get("userId"),
                             loop.time(), wake.set)

    async def write_output() -> None:
        while True:
            await wake.wait()
            wake.clear()
            for chunk in endpoint.take_output():
                await websocket.send(chunk.decode("utf-8"))
            if endpoint.closed:
                return

    async def read_input() -> None:
        while not endpoint.closed:
            timer = endpoint.next_timer()
            timeout = None if timer is None else max(0.0, timer - loop.time())
            try:
                data = await asyncio.wait_for(websocket.receive(), timeout)
            except asyncio.TimeoutError:
                endpoint.tick(loop.time())
            else:
                await endpoint.feed(data, loop.time())

    # The writer ends when the endpoint closes from our side (an ERROR, a slow
    # consumer, shutdown), the reader when the client closes or errs; either ends
    # the connection at once, and the writer always gets to send its last frames.
    writer = loop.create_task(write_output())
    reader = loop.create_task(read_input())
    try:
        done, _ = await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        if reader in done:
            reader.result()
            wake.set()
            await asyncio.wait_for(writer, WRITER_DRAIN_S)   # the ERROR/RECEIPT goes out first
    except asyncio.CancelledError:
        raise
    except Exception:        # one client must never take the server down with it
        log.exception("websocket session failed")
    finally:
        for task in (reader, writer):
            if not task.done():
                task.cancel()
        endpoint.finish()
