"""How the signaling checks clients' tokens (`auth`), and the development HS256 key that
`appliance serve`, `appliance token` and the demo page share when no key is configured."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from signaling.auth import HttpVerifier, JwtVerifier, StaticVerifier, TokenVerifier, mint_jwt

from ..config.schema import AppConfig

DEV_JWT_KEY_FILE = "jwt.key"
DEV_TOKEN_TTL_S = 86400


def dev_jwt_key(data_dir: Path) -> tuple[str, bool]:
    """The development HS256 key under data_dir, created (0600) on first use, and whether
    this call created it."""
    path = Path(data_dir) / DEV_JWT_KEY_FILE
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True


def jwt_signing_key(config: AppConfig) -> tuple[str, bool]:
    """The HS256 key tokens are checked (and `appliance token` signs) with, and whether this
    call created it (a new development key)."""
    if config.auth.jwt_key is not None:
        return config.auth.jwt_key, False
    return dev_jwt_key(config.data_dir)


def token_verifier(config: AppConfig) -> TokenVerifier:
    auth = config.auth
    if auth.mode == "static":
        return StaticVerifier(dict(auth.tokens))
    if auth.mode == "http":
        if auth.introspect_url is None:  # the loader refuses this; a hand-built config may not
            raise ValueError("auth.mode http needs auth.introspect_url")
        return HttpVerifier(auth.introspect_url, auth.cache_s)
    if auth.jwt_public_key is not None:
        return JwtVerifier.public_key(auth.jwt_public_key.read_bytes())
    key, _ = jwt_signing_key(config)  # serve making the key on first start is normal
    return JwtVerifier.hs256(key)


def dev_token_minter(config: AppConfig) -> Callable[[str], str] | None:
    """Mints tokens for the demo page, only with the generated development key and only on
    a loopback listener: an operator's own key (or public key, static tokens, introspection)
    mints nothing, and a listener other machines reach would let anyone log in as anyone.
    The demo page also refuses each request that does not come from loopback."""
    listen = config.http.listen
    if not config.auth.uses_dev_key() or listen is None or not listen.is_loopback():
        return None
    key, _ = dev_jwt_key(config.data_dir)
    return lambda user: mint_jwt(key, user, time.time(), DEV_TOKEN_TTL_S)
