"""Who a token belongs to (docs/api.md §1): the `ide` header on CONNECT and on HTTP.

`TokenVerifier` has one method, `verify(token) -> user id | None`; it is
async because the `http` mode (the customer's introspection endpoint) is a
network call.  Tokens never reach a log: failures are logged by reason only.
`UserIdChecked` wraps any of them so that whatever a token names -- a JWT
`sub`, a static map's value, the IM backend's answer -- is a usable user id.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

import httpx
import jwt

from .client_text import DEFAULT_MAX_USER_ID_CHARS, user_id_problem
from .errors import SignalingError

log = logging.getLogger("signaling.auth")

JWT_LEEWAY_S = 5
INTROSPECT_TIMEOUT_S = 3.0
INTROSPECT_CACHE_ENTRIES = 10000


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> str | None: ...


class UserIdChecked:
    """A verifier whose every answer is a user id fit for logs, headers and keys.

    A token that is genuine but names an id with a control character or over
    `max_chars` characters is refused with 400 (a SignalingError: an ERROR frame
    on CONNECT, the envelope over HTTP), not taken for a bad token: the issuer
    made it, and should hear why it does not work.
    """

    def __init__(self, inner: TokenVerifier, max_chars: int = DEFAULT_MAX_USER_ID_CHARS) -> None:
        self.inner = inner
        self.max_chars = max_chars

    async def verify(self, token: str) -> str | None:
        user = await self.inner.verify(token)
        if user is None:
            return None
        problem = user_id_problem(user, self.max_chars)
        if problem is not None:
            log.info("token refused: its user id %s", problem)
            raise SignalingError(400, f"bad request: the token's user id {problem}")
        return user


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
    def hs256(cls, secret: str) -> JwtVerifier:
        return cls(secret, ("HS256",))

    @classmethod
    def public_key(cls, pem: bytes) -> JwtVerifier:
        return cls(pem, ("RS256", "ES256"))

    async def verify(self, token: str) -> str | None:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                leeway=JWT_LEEWAY_S,
                options={"require": ["exp", "sub"]},
            )
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
    return jwt.encode({"sub": user_id, "iat": int(now), "exp": int(now) + ttl_s}, secret, algorithm="HS256")


class HttpVerifier:
    """Asks the customer's IM backend: POST {"token": ...} to `url`.

    The backend answers 200 with {"userId": "..."} (or the API envelope
    {"code": 200, "data": {"userId": "..."}}) for a valid token and anything
    else for an invalid one.  Answers, valid and invalid, are cached for
    `cache_s` in a bounded LRU, so a reconnect storm does not become an
    introspection storm.  A backend that cannot be reached refuses the token
    (and says so in the log) rather than letting anyone in.
    """

    def __init__(
        self,
        url: str,
        cache_s: float,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.cache_s = cache_s
        self.clock = clock
        self._client = client or httpx.AsyncClient(timeout=INTROSPECT_TIMEOUT_S)
        self._cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()

    async def verify(self, token: str) -> str | None:
        now = self.clock()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(token)
            return hit[1]
        user = await self._ask(token)
        self._cache[token] = (now + self.cache_s, user)
        self._cache.move_to_end(token)
        while len(self._cache) > INTROSPECT_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return user

    async def _ask(self, token: str) -> str | None:
        try:
            response = await self._client.post(self.url, json={"token": token})
        except httpx.HTTPError as exc:
            log.warning("token introspection failed: %s", type(exc).__name__)
            return None
        if response.status_code != 200:
            return None
        try:
            answer = response.json()
        except ValueError:
            return None
        if isinstance(answer, dict) and isinstance(answer.get("data"), dict):
            answer = answer["data"]
        user = answer.get("userId") if isinstance(answer, dict) else None
        return user if isinstance(user, str) and user else None
