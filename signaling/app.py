"""The signaling application: its parts built and connected in one place (`create_app`).

What the process needs of it comes back as a SignalingApp: the Quart app to serve, and the
services behind it for metrics, readiness and shutdown.  The routes are the transports'
modules' (ws.py, sockjs/server.py, stomp_routes.py, http_routes.py); the services
(service.py, calls/, turn_credentials.py) know nothing of Quart.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from quart import Quart, websocket

from .auth import TokenVerifier, UserIdChecked
from .broker import Broker, MemoryBroker
from .calls.cluster import calls_across_nodes
from .calls.registry import CallRegistry
from .calls.service import CallService
from .guard import ClientGuard
from .http_api import install_envelope_errors
from .http_routes import install_http_routes
from .lifecycle import SignalingLifecycle
from .origins import OriginPolicy
from .oversight import Oversight
from .service import SignalingService
from .sockjs.server import SockJSServer
from .stomp import Limits
from .stomp_routes import install_stomp_routes
from .turn_credentials import Issue, TurnCredentialService
from .ws import serve_websocket


@dataclass(frozen=True)
class SignalingApp:
    web: Quart  # the ASGI app Hypercorn serves
    service: SignalingService  # sessions, counters, shutdown
    calls: CallService  # a CallCluster when the broker spans nodes
    credentials: TurnCredentialService | None  # None: no relay, no credentials to hand out
    broker: Broker
    guard: ClientGuard
    oversight: Oversight  # sessions and calls for operators, of every node


def create_app(
    prefix: str,
    verifier: TokenVerifier,
    limits: Limits,
    max_outbox: int,
    ring_timeout_s: float = 30.0,
    grace_s: float = 10.0,
    issue_credentials: Issue | None = None,
    broker: Broker | None = None,
    guard: ClientGuard | None = None,
    origins: OriginPolicy | None = None,
    node_name: str | None = None,
) -> SignalingApp:
    """The signaling app; `issue_credentials(userId)` answers TURN credential requests
    (no such routes without it: a relay-less test app has nothing to hand out).  The
    broker is this process's MemoryBroker unless one spanning nodes (RedisBroker) is
    given; the app starts and stops it, and calls span the nodes when it has a node bus.
    `guard` holds the connection and session caps and timeouts (none but the defaults
    without it); it counts in the service's counters.
    `origins` says which web pages may connect from a browser (without it: the appliance's
    own pages only).  Operators see this node's sessions and calls marked with the broker's
    node id when it spans nodes, else with `node_name` (by default the host name)."""
    broker = broker if broker is not None else MemoryBroker()
    verifier = UserIdChecked(verifier, limits.max_user_id_chars)  # every way in: STOMP and HTTP
    service = SignalingService(broker, verifier, limits)
    guard = guard if guard is not None else ClientGuard()
    guard.count_into(service.counters)
    origins = origins if origins is not None else OriginPolicy()
    registry = CallRegistry(ring_timeout_s, grace_s)
    bus = broker.node_bus
    # One node runs calls itself; nodes sharing a bus run each call on the node that owns it.
    calls = (
        CallService(broker, registry, limits.max_frame_bytes)
        if bus is None
        else calls_across_nodes(broker, bus, registry, limits.max_frame_bytes, service.error)
    )
    credentials = TurnCredentialService(issue_credentials) if issue_credentials is not None else None
    install_stomp_routes(service, calls, credentials)
    node = bus.node if bus is not None else (node_name or socket.gethostname())
    oversight = Oversight(node, service, calls, bus)

    web = Quart("signaling")
    # Quart takes in whatever body a client sends to any route, up to this, before a handler
    # looks (16 MB by default, for a long poll as well): no route here takes more than a
    # frame (the HTTP API answers 413 past it, SockJS's xhr_send is read in front of Quart).
    web.config["MAX_CONTENT_LENGTH"] = limits.max_frame_bytes
    install_envelope_errors(web)
    install_http_routes(web, prefix, verifier, limits, calls, credentials)
    lifecycle = SignalingLifecycle(broker, calls)
    web.before_serving(lifecycle.start)
    web.after_serving(lifecycle.stop)

    @web.websocket(f"{prefix}/ws")
    async def stomp_websocket():
        await serve_websocket(websocket._get_current_object(), service, limits, max_outbox, guard, origins)

    SockJSServer(service, limits, max_outbox, guard, origins).install(web, f"{prefix}/ws")
    return SignalingApp(web, service, calls, credentials, broker, guard, oversight)
