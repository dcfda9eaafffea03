"""The HTTP API's envelope (docs/api.md §2): every response is {"code", "msg", "data"}.

`code` below 1000 equals the HTTP status; business errors (above 1000) go
out with status 200.  Errors are enveloped too -- a SignalingError raised by a
view with its code and message; unknown paths 404, bad JSON 400 (not UTF-8,
not JSON, nested too deep), a body over the size bound 413, a missing or
invalid `ide` token 401 -- and an unexpected failure is a 500 whose body says
nothing about the code (the stack goes to the log).

The routes themselves are http_routes.py's; this module is what every view
shares: the envelope, the token check, the bounded body.
"""

from __future__ import annotations

import logging

from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .auth import TokenVerifier
from .client_text import loggable
from .errors import STANDARD_MESSAGES, SignalingError, standard_message
from .json_body import parse_json

log = logging.getLogger("signaling.http")


def envelope(code: int = 200, msg: str | None = None, data=None) -> Response:
    response = jsonify({"code": code, "msg": msg or standard_message(code), "data": data})
    response.status_code = code if code < 1000 else 200
    return response


async def authenticated_user(verifier: TokenVerifier) -> str:
    """The user the request's `ide` token belongs to, or SignalingError 401."""
    token = request.headers.get("ide")
    if not token:
        raise SignalingError(401, "unauthorized: no ide token")
    user = await verifier.verify(token)
    if user is None:
        raise SignalingError(401)
    return user


async def request_json(max_bytes: int, max_depth: int, empty=None):
    """The request's JSON body, `empty` if there is none: SignalingError 413 as soon as it
    passes `max_bytes` (a declared length is refused before anything is read), 400 if it is
    not UTF-8, not JSON or nested deeper than `max_depth`."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise SignalingError(413)
    data = bytearray()
    async for chunk in request.body:
        data += chunk
        if len(data) > max_bytes:
            raise SignalingError(413)
    if not data.strip():
        return empty
    return parse_json(bytes(data), max_bytes, max_depth)


def install_envelope_errors(app: Quart) -> None:
    @app.errorhandler(SignalingError)
    async def signaling_error(err: SignalingError):
        return envelope(err.code, err.message)

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException):
        code = err.code or 500
        return envelope(code, STANDARD_MESSAGES.get(code, err.name.lower()))

    @app.errorhandler(Exception)
    async def unexpected(err: Exception):
        log.exception("unhandled error on %s %s", loggable(request.method), loggable(request.path))
        return envelope(500)
