"""The Quart application of the signaling service."""

from __future__ import annotations

from quart import Quart, websocket

from .auth import TokenVerifier
from .broker import MemoryBroker
from .http_api import install_envelope_errors
from .service import SignalingService
from .sockjs.server import SockJSServer
from .stomp import Limits
from .ws import serve_websocket


def create_app(prefix: str, verifier: TokenVerifier, limits: Limits, max_outbox: int) -> Quart:
    app = Quart("signaling")
    service = SignalingService(MemoryBroker(), verifier)
    app.extensions["signaling"] = service
    install_envelope_errors(app)

    @app.websocket(f"{prefix}/ws")
    async def stomp_websocket():
        await serve_websocket(websocket._get_current_object(), service, limits, max_outbox)

    SockJSServer(service, limits, max_outbox).install(app, f"{prefix}/ws")
    return app
