"""Which configuration keys a reload (SIGHUP, POST /admin/reload) changes in the running
processes, and which need a restart: one declared table, and the plan a reload follows.

A key is live when every process that uses it takes a new value through a declared
method without touching live allocations or sessions (TurnCore.apply through
RelayNode.apply, the signaling's LiveVerifier and LiveIssuer, CertificateReloader.retarget,
the log level).  Every
other key is built into something that runs -- a bound socket, a process count, a file
or Redis store, a Hypercorn or STOMP setting read at the start -- and a reload reports a
new value of it as "needs restart" and keeps the old one, so what runs is always one
whole, consistent configuration.  tests/test_config_reload.py checks that every schema
key is in exactly one of the two sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .loader import describe
from .schema import AppConfig

# Keys a reload applies in every process.
LIVE_KEYS: frozenset[str] = frozenset(
    {
        "log_level",
        # the relay: per request, never per relayed packet (TurnCore.apply)
        "turn.allow_peers",
        "turn.deny_peers",
        "turn.user_quota",
        "turn.total_quota",
        "turn.max_lifetime_s",
        "turn.max_permissions",
        "turn.max_channels",
        "turn.software",
        "turn.strict_expiry",
        "turn.unauth_replies_per_s",
        "turn.unauth_reply_burst",
        "turn.max_bps",
        "turn.user_max_bps",
        "turn.total_max_bps",
        "turn.drain_s",  # read when a drain begins
        # what the signaling hands out (iceServers) and how it checks tokens
        "credentials.ttl_s",
        "credentials.host",
        "credentials.ice_servers",
        "credentials.external",
        "auth.mode",
        "auth.jwt_key",
        "auth.jwt_public_key",
        "auth.tokens",
        "auth.introspect_url",
        "auth.cache_s",
        # which files the TLS listeners serve: new handshakes, established connections keep
        # theirs (CertificateReloader.retarget; a pair that does not load refuses the reload)
        "turn.tls_cert",
        "turn.tls_key",
        "http.tls_cert",
        "http.tls_key",
        "edge.tls_cert",
        "edge.tls_key",
    }
)

# Keys that need a restart, and why (one reason per group, for whoever moves a key).  The
# nearest candidates to become live: stomp.send_rate/send_burst, http.allowed_origins,
# admin.token, credentials.secret_grace_s/activation_s (each needs a declared method on what
# reads it: the STOMP limits, the origin policy, the admin app, the RingWatchers).
RESTART_KEYS: frozenset[str] = frozenset(
    {
        # bound sockets and the process model
        "turn.udp",
        "turn.tcp",
        "turn.tls",
        "turn.tcp_tls",
        "turn.workers",
        "http.listen",
        "http.tls",
        "edge.listen",
        "admin.listen",
        "trusted_proxies",  # read by the listeners as they were built
        # relay addresses: live allocations hold ports of them, the policy names them
        "realm",  # nonces and message integrity of live allocations
        "external_ip",
        "external_ip6",
        "turn.relay_ip",
        "turn.relay_ip6",
        "turn.relay_ports",
        "turn.nonce_lifetime_s",  # the NonceBook of each relay process
        # stored state: where it lives and how long it is kept
        "data_dir",
        "credentials.store",
        "credentials.secrets_file",
        "credentials.redis_url",
        "credentials.redis_key",
        "credentials.secret_grace_s",  # each process's RingWatcher
        "credentials.activation_s",  # the admin API's ring answers
        "broker.url",
        "broker.prefix",
        "broker.node_ttl_s",
        # the signaling app's routes, guards and session limits, built at the start
        "http.prefix",
        "http.demo",
        "http.allowed_origins",
        "stomp.connect_timeout_s",
        "stomp.send_timeout_s",
        "stomp.max_outbox_bytes",
        "stomp.max_connections",
        "stomp.max_connections_per_ip",
        "stomp.max_sessions_per_ip",
        "stomp.new_sessions_per_ip_per_s",
        "stomp.new_session_burst",
        "stomp.per_ip_exempt",
        "stomp.max_frame_bytes",
        "stomp.heartbeat_ms",
        "stomp.max_subscriptions",
        "stomp.max_outbox",
        "stomp.max_watched",
        "stomp.max_json_depth",
        "stomp.max_user_id_chars",
        "stomp.send_rate",
        "stomp.send_burst",
        "stomp.send_refusals_to_close",
        "calls.ring_timeout_s",
        "calls.grace_s",
        "admin.token",  # the admin app's own check, built at the start
    }
)


def schema_keys() -> list[str]:
    """Every dotted key of the schema, in declaration order."""
    return [key for key, _, _ in describe()]


def _value(config: AppConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _with_value(config: Any, parts: list[str], value: Any) -> Any:
    """`config` (a frozen section) with the value at `parts` replaced."""
    head, *rest = parts
    new = value if not rest else _with_value(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: new})


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: `config` is the configuration the processes run from now on
    (the running one with the new values of the live keys), `applied` the live keys whose
    value changed, `needs_restart` the others whose value changed (kept as they were)."""

    config: AppConfig
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]

    @property
    def changes_anything(self) -> bool:
        return bool(self.applied)


def plan_reload(running: AppConfig, loaded: AppConfig) -> ReloadPlan:
    """The plan to go from the `running` configuration to a freshly `loaded` one."""
    applied, needs_restart = [], []
    config = running
    for key in schema_keys():
        new = _value(loaded, key)
        if new == _value(running, key):
            continue
        if key in LIVE_KEYS:
            applied.append(key)
            config = _with_value(config, key.split("."), new)
        else:
            needs_restart.append(key)
    return ReloadPlan(config, tuple(applied), tuple(needs_restart))
