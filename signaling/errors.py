"""Errors a client's SEND earns: a MESSAGE on its /user/queue/errors, connection kept.

Codes are API.md §2's: below 1000 they mirror HTTP statuses (400 bad
parameters, 403 forbidden, 404 unknown destination), above 1000 they are
business errors.
"""

from __future__ import annotations

import json

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


def parse_json(body: bytes):
    try:
        return json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, ValueError):
        raise bad_request("body is not valid JSON") from None
