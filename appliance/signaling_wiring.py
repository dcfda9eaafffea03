"""Builds the signaling service (token verifier, STOMP limits, Quart app, Hypercorn
settings) from the configuration."""

from __future__ import annotations

import os
import secrets
import time
import weakref
from pathlib import Path

from signaling.admission import SessionLimits
from signaling.app import create_app
from signaling.auth import HttpVerifier, JwtVerifier, StaticVerifier, TokenVerifier, mint_jwt
from signaling.guard import CapSettings, ClientGuard, LifecyclePolicy
from signaling.origins import OriginPolicy
from signaling.stomp import Limits
from signaling.ws import max_message_bytes

from .config import AppConfig
from .tls_reload import CertificateReloader, reloadable_hypercorn_config

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
    except FileExistsError:           # another process made it first: use theirs
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
        return HttpVerifier(auth.introspect_url, auth.cache_s)
    if auth.jwt_public_key is not None:
        return JwtVerifier.public_key(auth.jwt_public_key.read_bytes())
    key, _ = jwt_signing_key(config)     # serve making the key on first start is normal
    return JwtVerifier.hs256(key)


def stomp_limits(config: AppConfig) -> Limits:
    s = config.stomp
    return Limits(max_frame_bytes=s.max_frame_bytes, max_subscriptions=s.max_subscriptions,
                  heartbeat_ms=s.heartbeat_ms, send_rate=s.send_rate, send_burst=s.send_burst,
                  send_refusals_to_close=s.send_refusals_to_close, max_watched=s.max_watched,
                  max_json_depth=s.max_json_depth, max_user_id_chars=s.max_user_id_chars)


_guards: weakref.WeakKeyDictionary[AppConfig, ClientGuard] = weakref.WeakKeyDictionary()


def client_guard(config: AppConfig) -> ClientGuard:
    """The ClientGuard of the signaling listener `config` describes: one per configuration,
    because the app (signaling_app) and Hypercorn's connections (hypercorn_config) are built
    apart from the same configuration and must count against the same caps."""
    guard = _guards.get(config)
    if guard is None:
        s = config.stomp
        policy = LifecyclePolicy(connect_timeout_s=s.connect_timeout_s,
                                 send_timeout_s=s.send_timeout_s,
                                 max_outbox_bytes=s.max_outbox_bytes)
        caps = CapSettings(max_connections=s.max_connections,
                           max_connections_per_ip=s.max_connections_per_ip,
                           sessions=SessionLimits(s.max_sessions_per_ip,
                                                  s.new_sessions_per_ip_per_s,
                                                  s.new_session_burst),
                           exempt=s.per_ip_exempt)
        guard = _guards[config] = ClientGuard(policy, caps)
    return guard


def dev_token_minter(config: AppConfig):
    """Mints tokens for the demo page, only with the generated development key and only on
    a loopback listener: an operator's own key (or public key, static tokens, introspection)
    mints nothing, and a listener other machines reach would let anyone log in as anyone.
    The demo page also refuses each request that does not come from loopback."""
    listen = config.http.listen
    if not config.auth.uses_dev_key() or listen is None or not listen.is_loopback():
        return None
    key, _ = dev_jwt_key(config.data_dir)
    return lambda user: mint_jwt(key, user, time.time(), DEV_TOKEN_TTL_S)


def broker(config: AppConfig):
    """The broker spanning nodes (`broker.url`), or None: this process alone."""
    b = config.broker
    if b.url is None:
        return None
    from signaling.broker.redis import RedisBroker
    return RedisBroker(b.url, b.prefix, node_ttl_s=b.node_ttl_s)


def signaling_app(config: AppConfig, issue_credentials=None):
    from signaling.hypercorn_guard import ReceiveDrain

    guard = client_guard(config)
    app = create_app(config.http.prefix, token_verifier(config), stomp_limits(config),
                     config.stomp.max_outbox, config.calls.ring_timeout_s, config.calls.grace_s,
                     issue_credentials, broker(config), guard,
                     OriginPolicy(config.http.allowed_origins))
    app.asgi_app = ReceiveDrain(app.asgi_app, guard)
    if config.http.demo:
        from .demo_site import install_demo
        install_demo(app, config.http.prefix, dev_token_minter(config))
    return app


def decline_websocket_compression() -> None:
    """Answer WebSocket handshakes without permessage-deflate.

    Hypercorn accepts permessage-deflate with context takeover, with no
    setting to change it, so every WebSocket kept a zlib compressor and
    decompressor alive: about 100 KiB of a 140 KiB idle session (measured with
    bench/stomp_sessions.py and tracemalloc).  Without context takeover the
    memory goes but each message pays for a fresh zlib state: 7k instead of
    10.5k status answers/s in the same bench.  Signaling messages are small, so
    the appliance declines the extension, as RFC 6455 lets a server do; every
    client then speaks uncompressed frames.  Hypercorn builds the extension by
    name in ws_stream, so that name is what is replaced.
    """
    import hypercorn.protocol.ws_stream as ws_stream
    from wsproto.extensions import PerMessageDeflate

    class DeclinedDeflate(PerMessageDeflate):
        def accept(self, offer: str) -> None:
            return None

    ws_stream.PerMessageDeflate = DeclinedDeflate


def hypercorn_config(config: AppConfig, bind: str, cert: Path | None, key: Path | None,
                     reloader: CertificateReloader | None = None):
    """Hypercorn's settings for the signaling; `bind` is what listeners.hypercorn_bind gave
    (the appliance binds the socket itself, so a failure names http.listen).  Its
    connections go through the configuration's ClientGuard (signaling.hypercorn_guard):
    the connection caps, the send timeout, bounded closes."""
    from signaling.hypercorn_guard import guard_listener

    decline_websocket_compression()
    h = config.http
    hc = reloadable_hypercorn_config(reloader or CertificateReloader(), "https")
    guard_listener(hc, client_guard(config))
    # A TLS handshake holds a descriptor before the guard sees the connection: give it
    # no longer than a client has for CONNECT (Hypercorn's default is 60 s).
    hc.ssl_handshake_timeout = config.stomp.connect_timeout_s
    hc.websocket_max_message_size = max_message_bytes(config.stomp.max_frame_bytes)
    hc.bind = [bind]
    hc.accesslog = None
    hc.errorlog = None            # our logging, not hypercorn's
    hc.graceful_timeout = 5
    if h.tls:
        hc.certfile, hc.keyfile = str(cert), str(key)
    return hc
