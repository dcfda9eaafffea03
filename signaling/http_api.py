"""The HTTP API's envelope (docs/api.md §2): every response is {"code", "msg", "data"}.

`code` below 1000 equals the HTTP status; business errors (above 1000) go
out with status 200.  Errors are enveloped too -- unknown paths 404, bad
JSON 400 (not UTF-8, not JSON, nested too deep), a body over the size bound 413,
a missing or invalid `ide` token 401 -- and an unexpected failure is a 500
whose body says nothing about the code (the stack goes to the log).
"""

from __future__ import annotations

import logging

from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .auth import TokenVerifier
from .client_text import loggable
from .errors import SignalingError, parse_json

log = logging.getLogger("signaling.http")

MESSAGES = {200: "ok", 400: "bad request", 401: "unauthorized", 403: "forbidden",
            404: "not found", 405: "method not allowed", 413: "request too large",
            500: "internal error"}


class ApiError(Exception):
    def __init__(self, code: int, msg: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.msg = msg or MESSAGES.get(code, "error")


def envelope(code: int = 200, msg: str | None = None, data=None) -> Response:
    response = jsonify({"code": code, "msg": msg or MESSAGES.get(code, "error"), "data": data})
    response.status_code = code if code < 1000 else 200
    return response


async def authenticated_user(verifier: TokenVerifier) -> str:
    """The user the request's `ide` token belongs to, or ApiError 401."""
    token = request.headers.get("ide")
    if not token:
        raise ApiError(401, "unauthorized: no ide token")
    user = await verifier.verify(token)
    if user is None:
        raise ApiError(401)
    return user


async def request_json(max_bytes: int, max_depth: int, empty=None):
    """The request's JSON body, `empty` if there is none: ApiError 413 as soon as it passes
    `max_bytes` (a declared length is refused before anything is read), SignalingError
    400 if it is not UTF-8, not JSON or nested deeper than `max_depth`."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413)
    data = bytearray()
    async for chunk in request.body:
        data += chunk
        if len(data) > max_bytes:
            raise ApiError(413)
    if not data.strip():
        return empty
    return parse_json(bytes(data), max_bytes, max_depth)


def install_envelope_errors(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def api_error(err: ApiError):
        return envelope(err.code, err.msg)

    @app.errorhandler(SignalingError)
    async def signaling_error(err: SignalingError):
        return envelope(err.code, err.message)

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException):
        return envelope(err.code or 500, MESSAGES.get(err.code or 500, err.name.lower()))

    @app.errorhandler(Exception)
    async def unexpected(err: Exception):
        log.exception("unhandled error on %s %s", loggable(request.method), loggable(request.path))
        return envelope(500)
