"""The one error a client hears of, whichever way it came in: `SignalingError` (code, message).

A SEND that fails earns a MESSAGE {"code", "message"} on the sender's
/user/queue/errors, connection kept (service.py); an HTTP request that fails
earns the envelope {"code", "msg", "data": null} (http_api.py); a CONNECT that
fails earns an ERROR frame with the message.  The same error object serves all
three, so a call refused over STOMP and over HTTP says the same thing.

Codes are docs/api.md §2's: below 1000 they mirror HTTP statuses (400 bad
parameters, 401 no or bad token, 403 forbidden, 404 unknown destination or path,
413 a body too large, 429 over a budget, 500 a bug, 503 the shared backend
down), above 1000 they are business errors.  An error raised without a message
carries its code's standard one (`STANDARD_MESSAGES`).
"""

from __future__ import annotations

import json

ERRORS_DESTINATION = "/user/queue/errors"

STANDARD_MESSAGES = {
    200: "ok",
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    413: "request too large",
    500: "internal error",
}


def standard_message(code: int) -> str:
    return STANDARD_MESSAGES.get(code, "error")


class SignalingError(Exception):
    """`message` is safe to show the client: it never carries internals."""

    def __init__(self, code: int, message: str | None = None) -> None:
        message = standard_message(code) if message is None else message
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def body(self) -> bytes:
        """The MESSAGE body a STOMP client gets on /user/queue/errors."""
        return json.dumps(
            {"code": self.code, "message": self.message}, ensure_ascii=False, separators=(",", ":")
        ).encode()


def bad_request(message: str) -> SignalingError:
    return SignalingError(400, message)


def unavailable() -> SignalingError:
    """503: the Redis that nodes share is unreachable; the client may retry."""
    return SignalingError(503, "signaling backend unavailable, try again")
