"""The Quart application of the signaling service."""

from __future__ import annotations

import asyncio

from quart import Quart, websocket

from .auth import TokenVerifier, UserIdChecked
from .broker import Broker, MemoryBroker
from .calls.cluster import calls_across_nodes
from .calls.registry import CallRegistry
from .calls.service import CallService
from .guard import ClientGuard
from .http_api import install_envelope_errors
from .origins import OriginPolicy
from .service import SignalingService
from .sockjs.server import SockJSServer
from .stomp import Limits
from .turn_credentials import Issue, TurnCredentialService
from .ws import serve_websocket


def create_app(prefix: str, verifier: TokenVerifier, limits: Limits, max_outbox: int,
               ring_timeout_s: float = 30.0, grace_s: float = 10.0,
               issue_credentials: Issue | None = None, broker: Broker | None = None,
               guard: ClientGuard | None = None, origins: OriginPolicy | None = None) -> Quart:
    """The signaling app; `issue_credentials(userId)` answers TURN credential requests
    (no such routes without it: a relay-less test app has nothing to hand out).  The
    broker is this process's MemoryBroker unless one spanning nodes (RedisBroker) is
    given; the app starts and stops it, and calls span the nodes when it has a node bus.
    `guard` holds the connection and session caps and timeouts (none but the defaults
    without it); it counts in the service's counters.
    `origins` says which web pages may connect from a browser (without it: the appliance's
    own pages only)."""
    app = Quart("signaling")
    # Quart takes in whatever body a client sends to any route, up to this, before a handler
    # looks (16 MB by default, for a long poll as well): no route here takes more than a
    # frame (the HTTP API answers 413 past it, SockJS's xhr_send is read in front of Quart).
    app.config["MAX_CONTENT_LENGTH"] = limits.max_frame_bytes
    broker = broker if broker is not None else MemoryBroker()
    verifier = UserIdChecked(verifier, limits.max_user_id_chars)   # every way in: STOMP and HTTP
    service = SignalingService(broker, verifier, limits)
    guard = guard if guard is not None else ClientGuard()
    guard.count_into(service.counters)
    origins = origins if origins is not None else OriginPolicy()
    app.extensions["signaling"] = service
    install_envelope_errors(app)
    registry = CallRegistry(ring_timeout_s, grace_s)
    bus = broker.node_bus
    # One node runs calls itself; nodes sharing a bus run each call on the node that owns it.
    calls = (CallService(broker, registry, limits.max_frame_bytes) if bus is None
             else calls_across_nodes(broker, bus, registry, limits.max_frame_bytes))
    calls.install(service)
    calls.install_http(app, prefix, verifier)
    app.extensions["calls"] = calls
    if issue_credentials is not None:
        credentials = TurnCredentialService(issue_credentials)
        credentials.install(service)
        credentials.install_http(app, prefix, verifier)
        app.extensions["turn_credentials"] = credentials
    timers: list[asyncio.Task] = []

    @app.before_serving
    async def start_calls():
        await broker.start()
        timers.append(asyncio.get_running_loop().create_task(calls.run_timers()))

    @app.after_serving
    async def stop_calls():
        for task in timers:
            task.cancel()
        await calls.stop()           # across nodes: its calls end while the bus still works
        await broker.stop()

    @app.websocket(f"{prefix}/ws")
    async def stomp_websocket():
        await serve_websocket(websocket._get_current_object(), service, limits, max_outbox, guard,
                              origins)

    SockJSServer(service, limits, max_outbox, guard, origins).install(app, f"{prefix}/ws")
    return app
