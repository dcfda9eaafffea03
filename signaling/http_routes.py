"""The HTTP API's routes (docs/api.md §2.1): the HTTP twins of the STOMP call messages
and of the TURN credential request, every answer in the envelope (http_api.py).

    POST {prefix}/call/request                CallOp.REQUEST
    POST {prefix}/call/response               CallOp.RESPOND
    POST {prefix}/call/hangup                 CallOp.HANGUP (an empty body: every call of the user)
    GET  {prefix}/turn/get-turn-credentials   TurnCredentialService.answer

Bodies are held to what a STOMP SEND may carry: the same size and nesting bounds.
"""

from __future__ import annotations

from quart import Quart

from .auth import TokenVerifier
from .calls.service import CallOp, CallService
from .errors import bad_request
from .http_api import authenticated_user, envelope, request_json
from .stomp import Limits
from .turn_credentials import TurnCredentialService

_NO_BODY = object()


def install_http_routes(
    app: Quart,
    prefix: str,
    verifier: TokenVerifier,
    limits: Limits,
    calls: CallService,
    credentials: TurnCredentialService | None = None,
) -> None:
    """The routes on `app`; no TURN credential route without `credentials` (a relay-less
    app has nothing to hand out: 404)."""

    async def call_view(op: CallOp, empty_ok: bool = False):
        user = await authenticated_user(verifier)
        body = await request_json(limits.max_frame_bytes, limits.max_json_depth, empty=_NO_BODY)
        if body is _NO_BODY and empty_ok:
            body = None
        elif body is None or body is _NO_BODY:
            raise bad_request("body is not valid JSON")
        await calls.perform(op, user, body)
        return envelope()

    @app.post(f"{prefix}/call/request")
    async def http_call_request():
        return await call_view(CallOp.REQUEST)

    @app.post(f"{prefix}/call/response")
    async def http_call_response():
        return await call_view(CallOp.RESPOND)

    @app.post(f"{prefix}/call/hangup")
    async def http_call_hangup():
        return await call_view(CallOp.HANGUP, empty_ok=True)

    if credentials is not None:

        @app.get(f"{prefix}/turn/get-turn-credentials")
        async def http_turn_credentials():
            user = await authenticated_user(verifier)
            return envelope(data=credentials.answer(user, "http"))
