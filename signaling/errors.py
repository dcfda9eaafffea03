"""Errors a client's SEND earns: a MESSAGE on its /user/queue/errors, connection kept.

Codes are docs/api.md §2's: below 1000 they mirror HTTP statuses (400 bad
parameters, 403 forbidden, 404 unknown destination, 429 over the session's SEND
budget, 500 a bug), above 1000 they are business errors.
"""

from __future__ import annotations

import json

from .json_body import DEFAULT_MAX_DEPTH, JsonBodyError, decode_json

ERRORS_DESTINATION = "/user/queue/errors"


class SignalingError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def body(self) -> bytes:
        return json.dumps({"code": self.code, "message": self.message}, ensure_ascii=False,
                          separators=(",", ":")).encode()


def bad_request(message: str) -> SignalingError:
    return SignalingError(400, message)


def unavailable() -> SignalingError:
    """503: the Redis that nodes share is unreachable; the client may retry."""
    return SignalingError(503, "signaling backend unavailable, try again")


def parse_json(body: bytes, max_bytes: int = 65536, max_depth: int = DEFAULT_MAX_DEPTH):
    """A SEND's or a request's JSON body (None if empty); 400 naming what is wrong with it --
    too large, not UTF-8, not JSON, nested too deep -- and never anything else."""
    try:
        return decode_json(body, max_bytes, max_depth)
    except JsonBodyError as exc:
        raise bad_request(str(exc)) from None
