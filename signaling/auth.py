"""Who a token belongs to (API.md §1): the `ide` header on CONNECT and on HTTP.

`TokenVerifier` has one method, `verify(token) -> user id | None`; it is
async because the `http` mode (the customer's introspection endpoint) is a
network call.  Tokens never reach a log: failures are logged by reason only.
"""

from __future__ import annotations

import logging
from typing import Mapping, Protocol

import jwt

log = logging.getLogger("signaling.auth")

JWT_LEEWAY_S = 5


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> str | None: ...


class StaticVerifier:
    """A fixed token -> user id map, for development."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = dict(tokens)

    async def verify(self, token: str) -> str | None:
        return self._tokens.get(token)


class JwtVerifier:
    """JWTs signed with an HS256 key or an RS256/ES256 key pair; `sub` is the user id."""

    def __init__(self, key: str | bytes, algorithms: tuple[str, ...]) -> None:
        self._key = key
        self._algorithms = list(algorithms)

    @classmethod
    def hs256(cls, secret: str) -> "JwtVerifier":
        return cls(secret, ("HS256",))

    @classmethod
    def public_key(cls, pem: bytes) -> "JwtVerifier":
        return cls(pem, ("RS256", "ES256"))

    async def verify(self, token: str) -> str | None:
        try:
            claims = jwt.decode(token, self._key, algorithms=self._algorithms, leeway=JWT_LEEWAY_S,
                                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            log.info("token refused: expired")
            return None
        except jwt.InvalidTokenError as exc:
            log.info("token refused: %s", type(exc).__name__)
            return None
        sub = claims.get("sub")
        return sub if isinstance(sub, str) and sub else None


def mint_jwt(secret: str, user_id: str, now: float, ttl_s: int) -> str:
    """A development HS256 token for `user_id` (`appliance token`)."""
    return jwt.encode({"sub": user_id, "iat": int(now), "exp": int(now) + ttl_s}, secret,
                      algorithm="HS256")
