"""Builds the relay's pieces (settings, peer policy, TLS context) from the configuration.

Kept apart from the process model so a worker process and the tests build
exactly the same relay from the same `AppConfig`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from demux.proxy import TrustedProxies
from turn import stun
from turn.core import RelaySettings
from turn.node import Endpoint, NodeSettings
from turn.policy import RelayPortsInUse, build_policy

from ..config.schema import AppConfig, HostPort


def _endpoint(hp: HostPort | None) -> Endpoint | None:
    return None if hp is None else Endpoint(hp.host, hp.port)


def relay_ips(config: AppConfig) -> dict[int, str]:
    ips = {}
    if config.turn.relay_ip:
        ips[stun.FAMILY_IPV4] = config.turn.relay_ip
    if config.turn.relay_ip6:
        ips[stun.FAMILY_IPV6] = config.turn.relay_ip6
    return ips


def node_settings(config: AppConfig) -> NodeSettings:
    t = config.turn
    ips = relay_ips(config)
    relay = RelaySettings(
        realm=config.realm,
        max_lifetime_s=t.max_lifetime_s,
        user_quota=t.user_quota,
        total_quota=t.total_quota,
        max_permissions=t.max_permissions,
        max_channels=t.max_channels,
        software=t.software,
        external_ip=config.external_ip,
        external_ip6=config.external_ip6,
        families=frozenset(ips),
        strict_expiry=t.strict_expiry,
        unauth_replies_per_s=t.unauth_replies_per_s,
        unauth_reply_burst=t.unauth_reply_burst,
        max_bps=t.max_bps,
        user_max_bps=t.user_max_bps,
        # The kernel spreads clients evenly over the processes sharing the ports.
        total_max_bps=max(1, t.total_max_bps // t.workers) if t.total_max_bps else 0,
    )
    return NodeSettings(
        relay=relay,
        udp=_endpoint(t.udp),
        tcp=_endpoint(t.tcp),
        tls=_endpoint(t.tls),
        relay_ips=ips,
        relay_ports=t.relay_ports,
        nonce_lifetime_s=t.nonce_lifetime_s,
        reuse_port=t.workers > 1,
        tcp_tls=t.tcp is not None and t.tcp_tls,
        trusted_proxies=TrustedProxies(config.trusted_proxies),
    )


def needs_turn_certificate(config: AppConfig) -> bool:
    """The relay serves TLS: on turn.tls, or on turn.tcp with turn.tcp_tls (one
    certificate, turn.tls_cert, for both)."""
    t = config.turn
    return t.tls is not None or (t.tcp is not None and t.tcp_tls)


def own_endpoints(config: AppConfig) -> list[tuple[str, int]]:
    """Every address:port the appliance listens on (relay, signaling, admin, edge): never a
    relay target, so a client cannot reach the admin API through the relay."""
    t = config.turn
    return [
        (hp.host, hp.port)
        for hp in (t.udp, t.tcp, t.tls, config.http.listen, config.admin.listen, config.edge.listen)
        if hp is not None
    ]


def peer_policy(config: AppConfig, ports_in_use: RelayPortsInUse | None = None):
    t = config.turn
    relay_addresses = [ip for ip in (t.relay_ip, t.relay_ip6, config.external_ip, config.external_ip6) if ip]
    return build_policy(
        deny_specs=t.deny_peers,
        allow_specs=t.allow_peers,
        own_endpoints=own_endpoints(config),
        relay_addresses=relay_addresses,
        relay_ports=t.relay_ports,
        ports_in_use=ports_in_use,
    )


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx
