"""Builds the signaling service (STOMP limits, connection guard, broker, Quart app) and
Hypercorn's settings for it from the configuration."""

from __future__ import annotations

import weakref
from pathlib import Path

from hypercorn.config import Config

from demux.proxy import TrustedProxies
from signaling.admission import SessionLimits
from signaling.app import SignalingApp, create_app
from signaling.auth import TokenVerifier
from signaling.broker.redis import RedisBroker
from signaling.forwarded import TrustedForwarded
from signaling.guard import CapSettings, ClientGuard, LifecyclePolicy
from signaling.hypercorn_guard import ReceiveDrain, guard_listener
from signaling.origins import OriginPolicy
from signaling.stomp import Limits
from signaling.ws import max_message_bytes

from ..config.schema import AppConfig
from ..demo.site import install_demo
from ..tls.reload import CertificateReloader
from .auth import dev_token_minter, token_verifier
from .hypercorn_patches import decline_websocket_compression

HTTPS_CERTIFICATE = "https"  # the http listener's TLS context, in the CertificateReloader


def stomp_limits(config: AppConfig) -> Limits:
    s = config.stomp
    return Limits(
        max_frame_bytes=s.max_frame_bytes,
        max_subscriptions=s.max_subscriptions,
        heartbeat_ms=s.heartbeat_ms,
        send_rate=s.send_rate,
        send_burst=s.send_burst,
        send_refusals_to_close=s.send_refusals_to_close,
        max_watched=s.max_watched,
        max_json_depth=s.max_json_depth,
        max_user_id_chars=s.max_user_id_chars,
    )


_guards: weakref.WeakKeyDictionary[AppConfig, ClientGuard] = weakref.WeakKeyDictionary()


def client_guard(config: AppConfig) -> ClientGuard:
    """The ClientGuard of the signaling listener `config` describes: one per configuration,
    because the app (signaling_app) and Hypercorn's connections (hypercorn_config) are built
    apart from the same configuration and must count against the same caps."""
    guard = _guards.get(config)
    if guard is None:
        s = config.stomp
        policy = LifecyclePolicy(
            connect_timeout_s=s.connect_timeout_s,
            send_timeout_s=s.send_timeout_s,
            max_outbox_bytes=s.max_outbox_bytes,
        )
        caps = CapSettings(
            max_connections=s.max_connections,
            max_connections_per_ip=s.max_connections_per_ip,
            sessions=SessionLimits(s.max_sessions_per_ip, s.new_sessions_per_ip_per_s, s.new_session_burst),
            # A trusted proxy carries many clients: its own connections are not capped per
            # address (the clients it names are, by TrustedForwarded).
            exempt=s.per_ip_exempt + config.trusted_proxies,
        )
        guard = _guards[config] = ClientGuard(policy, caps)
    return guard


def broker(config: AppConfig):
    """The broker spanning nodes (`broker.url`), or None: this process alone."""
    b = config.broker
    if b.url is None:
        return None
    return RedisBroker(b.url, b.prefix, node_ttl_s=b.node_ttl_s)


def signaling_app(
    config: AppConfig, issue_credentials=None, verifier: TokenVerifier | None = None
) -> SignalingApp:
    """The signaling app; `verifier` checks tokens (default: the one `auth` describes; the
    supervisor passes a LiveVerifier, which a configuration reload can point elsewhere)."""
    guard = client_guard(config)
    app = create_app(
        config.http.prefix,
        verifier if verifier is not None else token_verifier(config),
        stomp_limits(config),
        config.stomp.max_outbox,
        config.calls.ring_timeout_s,
        config.calls.grace_s,
        issue_credentials,
        broker(config),
        guard,
        OriginPolicy(config.http.allowed_origins),
    )
    # Wrapping asgi_app is Quart's way to put ASGI middleware in front of the app: the
    # client a trusted proxy names replaces the proxy's address before the app sees it.
    forwarded = TrustedForwarded(app.web.asgi_app, TrustedProxies(config.trusted_proxies), guard.count)
    app.web.asgi_app = ReceiveDrain(forwarded, guard)  # type: ignore[method-assign]
    if config.http.demo:
        install_demo(app.web, config.http.prefix, dev_token_minter(config))
    return app


def reloadable_hypercorn_config(reloader: CertificateReloader, name: str) -> Config:
    """A Hypercorn Config whose TLS contexts are tracked by `reloader` (SIGHUP reloads them)."""

    class TrackedConfig(Config):
        def create_ssl_context(self):
            ctx = super().create_ssl_context()
            if ctx is not None:
                reloader.track(name, ctx, Path(self.certfile), Path(self.keyfile))
            return ctx

    return TrackedConfig()


def hypercorn_config(
    config: AppConfig,
    bind: str,
    cert: Path | None,
    key: Path | None,
    reloader: CertificateReloader | None = None,
) -> Config:
    """Hypercorn's settings for the signaling; `bind` is what process.listeners.hypercorn_bind
    gave (the appliance binds the socket itself, so a failure names http.listen).  Its
    connections go through the configuration's ClientGuard (signaling.hypercorn_guard):
    the connection caps, the send timeout, bounded closes."""
    h = config.http
    hc = _connection_settings(
        reloadable_hypercorn_config(reloader or CertificateReloader(), HTTPS_CERTIFICATE), config
    )
    # A TLS handshake holds a descriptor before the guard sees the connection: give it
    # no longer than a client has for CONNECT (Hypercorn's default is 60 s).
    hc.ssl_handshake_timeout = config.stomp.connect_timeout_s
    hc.bind = [bind]
    if h.tls:
        hc.certfile, hc.keyfile = str(cert), str(key)
    return hc


def edge_hypercorn_config(config: AppConfig) -> Config:
    """Hypercorn's settings for the signaling connections the edge listener hands over
    (appliance.process.edge): the http listener's, through the same ClientGuard, with no
    bind and no certificate -- the edge accepts and does TLS itself."""
    return _connection_settings(Config(), config)


def _connection_settings(hc: Config, config: AppConfig) -> Config:
    """What every signaling connection gets, on the http listener and on the edge."""
    decline_websocket_compression()
    guard_listener(hc, client_guard(config))
    hc.websocket_max_message_size = max_message_bytes(config.stomp.max_frame_bytes)
    hc.accesslog = None
    hc.errorlog = None  # our logging, not hypercorn's
    hc.graceful_timeout = 5
    return hc
