"""A client that holds its connection open through a shutdown: Hypercorn cancels its
connection task once its graceful timeout is over, and that must end the connection without
a traceback (Python 3.11's StreamReaderProtocol logs "Exception in callback" with a
CancelledError for every connection task that ends cancelled)."""

from __future__ import annotations

import asyncio

from hypercorn.asyncio import serve
from hypercorn.config import Config
from websockets.asyncio.client import connect

from signaling.app import create_app
from signaling.auth import StaticVerifier
from signaling.guard import ClientGuard
from signaling.hypercorn_guard import ReceiveDrain, guard_listener
from signaling.stomp import Limits

from .netports import free_port_pair


async def held_open(port: int):
    """A WebSocket that never sends CONNECT: the app waits for it (up to its CONNECT
    deadline), so Hypercorn still holds the connection when it is told to stop."""
    for _ in range(100):  # until the listener is up
        try:
            return await connect(f"ws://127.0.0.1:{port}/imserver/ws", open_timeout=5)
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("the listener never came up")


async def test_a_connection_still_open_when_hypercorn_gives_up_ends_without_a_traceback():
    guard = ClientGuard()
    app = create_app("/imserver", StaticVerifier({}), Limits(), 64, guard=guard)
    app.web.asgi_app = ReceiveDrain(app.web.asgi_app, guard)  # type: ignore[method-assign]
    port = free_port_pair()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = config.errorlog = None
    config.graceful_timeout = 0.2
    guard_listener(config, guard)
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(app.web, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    client = await held_open(port)
    try:
        await asyncio.sleep(0.2)  # Hypercorn has taken the connection
        stop.set()
        began = loop.time()
        await asyncio.wait_for(server, 10)
        assert loop.time() - began >= config.graceful_timeout  # it had to give up on it
        await asyncio.sleep(0.1)  # the connection task's done-callbacks have run
    finally:
        await client.close()
        loop.set_exception_handler(None)
    assert reported == []
