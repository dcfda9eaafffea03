"""The configuration's schema: every section as a frozen dataclass, every option
with its default, documentation and validator (see `opt`).

The loader (loader.py) reads YAML and the environment into these classes;
keeping the schema apart lets a new section be read in one place.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from signaling.origins import origin_problem

from .validators import (
    at_least,
    attribute_text,
    between,
    heartbeat_pair,
    host_name,
    http_url,
    ice_url,
    ip_of,
    network,
    network_or_recommended,
    one_of,
    port_range,
    redis_url,
    token_map,
    url_prefix,
    worker_count,
)


class ConfigError(Exception):
    """A configuration problem: `key` is the dotted path (or env variable), `reason` says what is wrong."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def is_loopback_address(text: str) -> bool:
    """127.0.0.0/8, ::1, or 127.x written IPv4-mapped (::ffff:127.0.0.1, which Python before
    3.13 does not count as loopback, and which a dual-stack socket reports for 127.0.0.1);
    anything that is not an IP address is not loopback."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@dataclass(frozen=True)
class HostPort:
    """A listener address: a literal IP (binding must not depend on DNS) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def local_host(self) -> str:
        """The address to reach this listener from the same machine: loopback for a
        wildcard listener (0.0.0.0, ::), the listener's own address otherwise."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def is_loopback(self) -> bool:
        """Only this machine can reach the listener."""
        return is_loopback_address(self.host)

    def local(self) -> HostPort:
        """This listener as reached from the same machine (see local_host), e.g. for URLs."""
        return HostPort(self.local_host(), self.port)

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Read "1.2.3.4:3478" or "[2001:db8::1]:3478"; ValueError says what is wrong."""
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {text!r}")
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:
            host = host[1:-1]
        elif "[" in host or "]" in host:
            raise ValueError(f"expected host:port or [addr]:port, got {text!r}")
        elif ":" in host:
            raise ValueError(f"write an IPv6 listener as [addr]:port, got {text!r}")
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (hostnames are not allowed)") from None
        if bracketed and addr.version == 4:
            raise ValueError(f"brackets are for IPv6 addresses only, got {text!r}")
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port!r} is not in 1-65535")
        return cls(host, int(port))


def opt(default=MISSING, doc: str = "", check=None, parse=None, item_check=None, factory=MISSING):
    """A field with its documentation, validator and (optional) parser from YAML; `factory`
    instead of `default` computes the default each time a configuration is built."""
    return field(
        default=default,
        default_factory=factory,
        metadata={"doc": doc, "check": check, "parse": parse, "item_check": item_check},
    )


def default_data_dir() -> Path:
    """Where generated state lives when data_dir is not given: the same place whatever the
    working directory, so `appliance token` finds the key `appliance serve` made.
    /var/lib/appliance for root (a system service), else $XDG_STATE_HOME/appliance."""
    if os.geteuid() == 0:
        return Path("/var/lib/appliance")
    state = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative value, as it would depend on the working directory.
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "appliance"


# ------------------------------------------------------------------ schema


@dataclass(frozen=True)
class TurnConfig:
    """The embedded STUN/TURN relay: listeners, relay addresses, peer policy, limits."""

    udp: HostPort | None = opt(HostPort("127.0.0.1", 3478), "UDP listener; null disables")
    tcp: HostPort | None = opt(HostPort("127.0.0.1", 3478), "TCP listener; null disables")
    tls: HostPort | None = opt(HostPort("127.0.0.1", 5349), "TLS listener; null disables")
    tls_cert: Path | None = opt(None, "PEM certificate chain; null: a development certificate")
    tls_key: Path | None = opt(None, "PEM private key for tls_cert")
    tcp_tls: bool = opt(
        True,
        "the TCP listener also accepts TLS clients (told apart by their first byte), "
        "with tls_cert: TURN over TCP and over TLS on one port",
    )
    relay_ip: str | None = opt("127.0.0.1", "IPv4 address relay sockets bind", ip_of(4))
    relay_ip6: str | None = opt("::1", "IPv6 address relay sockets bind", ip_of(6))
    relay_ports: tuple[int, int] = opt((61000, 65535), "relay port range", parse=port_range)
    allow_peers: tuple[str, ...] = opt((), "peer ranges allowed despite deny_peers", item_check=network)
    deny_peers: tuple[str, ...] = opt(
        ("recommended",), "peer ranges refused (403)", item_check=network_or_recommended
    )
    user_quota: int = opt(10, "allocations per user id on the node; 0 = unlimited", at_least(0))
    total_quota: int = opt(10000, "allocations on the node; 0 = unlimited", at_least(0))
    max_lifetime_s: int = opt(3600, "longest allocation lifetime", at_least(600))
    max_permissions: int = opt(64, "permissions per allocation", at_least(1))
    max_channels: int = opt(64, "channel bindings per allocation", at_least(1))
    nonce_lifetime_s: int = opt(600, "how long a nonce stays fresh", at_least(30))
    software: str | None = opt(
        None, "SOFTWARE attribute text; null sends none", attribute_text(allow_quotes=True)
    )
    workers: int = opt(
        1, "relay processes sharing the ports; auto: one per core", between(1, 64), parse=worker_count
    )
    strict_expiry: bool = opt(
        False,
        "refuse expired usernames on live allocations too, and end each allocation at its username's expiry",
    )
    unauth_replies_per_s: int = opt(
        20,
        "error replies per second to one source that has not "
        "authenticated (IPv4 address, IPv6 /64); 0 = no limit",
        at_least(0),
    )
    unauth_reply_burst: int = opt(100, "error replies one such source may get at once", at_least(1))
    max_bps: int = opt(0, "bits per second one allocation may relay each way; 0 = no cap", at_least(0))
    user_max_bps: int = opt(
        0,
        "bits per second one user id's allocations may relay each way in one relay process; 0 = no cap",
        at_least(0),
    )
    total_max_bps: int = opt(
        0,
        "bits per second the node may relay each way, shared evenly by its relay processes; 0 = no cap",
        at_least(0),
    )
    drain_s: int = opt(
        8,
        "on SIGTERM, seconds live allocations keep relaying before the "
        "relay stops (keep it below the stop timeout of your supervisor)",
        between(0, 3600),
    )


@dataclass(frozen=True)
class CredentialsConfig:
    """The TURN REST shared secrets and the credentials made from them."""

    store: str = opt(
        "file", "where the secret ring lives: file | redis (shared by several nodes)", one_of("file", "redis")
    )
    secrets_file: Path | None = opt(None, "secret ring file; null: data_dir/secrets.json")
    redis_url: str | None = opt(
        None, "store redis: redis://[:password@]host:port/db; null: broker.url", redis_url
    )
    redis_key: str = opt(
        "appliance:secrets", "store redis: the key holding the ring", attribute_text(allow_quotes=False)
    )
    ttl_s: int = opt(86400, "lifetime of handed-out credentials", at_least(60))
    secret_grace_s: int | None = opt(
        None,
        "how long a rotated-out secret stays accepted; null: ttl_s (nothing it signed outlives it)",
        at_least(0),
    )
    activation_s: int = opt(
        5,
        "seconds a new secret is accepted before credentials are "
        "signed with it (time for every relay worker, and any external "
        "coturn, to load it)",
        between(0, 86400),
    )
    host: str | None = opt(
        None,
        "host in the TURN URLs handed out (the name on the TLS "
        "certificate); null: external_ip, else the listener address",
        host_name,
    )
    ice_servers: tuple[str, ...] | None = opt(
        None, "replaces the embedded relay's default URLs: stun:, turn: and turns: URLs", item_check=ice_url
    )
    external: tuple[str, ...] = opt(
        (),
        "turn:/turns: URLs of coturn servers that share this secret ring (see `appliance coturn-config`)",
        item_check=ice_url,
    )

    def grace_s(self) -> int:
        """How long a retired secret stays accepted."""
        return self.ttl_s if self.secret_grace_s is None else self.secret_grace_s


@dataclass(frozen=True)
class HttpConfig:
    """The signaling service's HTTP/WebSocket listener."""

    listen: HostPort | None = opt(HostPort("127.0.0.1", 8443), "HTTP listener; null disables signaling")
    tls: bool = opt(True, "serve HTTPS (false: plain HTTP behind a TLS-terminating proxy)")
    tls_cert: Path | None = opt(None, "PEM certificate chain; null: the development certificate")
    tls_key: Path | None = opt(None, "PEM private key for tls_cert")
    prefix: str = opt("/imserver", "path prefix of every URL", url_prefix)
    demo: bool = opt(True, "serve the call demo page at {prefix}/demo/ (off in production)")
    allowed_origins: tuple[str, ...] = opt(
        (),
        "web pages (scheme://host[:port]) that may use "
        "the signaling from a browser besides the "
        'appliance\'s own; "*": any page (unsafe)',
        item_check=origin_problem,
    )

    def local_url(self) -> str:
        """The signaling's base URL from this machine: {scheme}://host:port{prefix}."""
        if self.listen is None:
            raise ValueError("http.listen is null: the signaling is off")
        return f"{'https' if self.tls else 'http'}://{self.listen.local()}{self.prefix}"


@dataclass(frozen=True)
class EdgeConfig:
    """One TLS port for everything: TURN over TLS and the signaling's HTTPS and WSS,
    told apart after the handshake by ALPN or by the first bytes."""

    listen: HostPort | None = opt(None, "edge listener (e.g. 0.0.0.0:443); null disables")
    tls_cert: Path | None = opt(None, "PEM certificate chain; null: http's certificate")
    tls_key: Path | None = opt(None, "PEM private key for tls_cert")


@dataclass(frozen=True)
class AuthConfig:
    """How the `ide` token of a client is checked."""

    mode: str = opt("jwt", "jwt | static | http", one_of("jwt", "static", "http"))
    jwt_key: str | None = opt(None, "HS256 key; null: a development key under data_dir")
    jwt_public_key: Path | None = opt(None, "PEM public key for RS256/ES256 tokens (instead of jwt_key)")
    tokens: tuple[tuple[str, str], ...] = opt((), "static mode: token -> userId", parse=token_map)
    introspect_url: str | None = opt(None, "http mode: where tokens are POSTed", http_url)
    cache_s: int = opt(60, "http mode: how long an answer is reused", at_least(0))

    def uses_dev_key(self) -> bool:
        """jwt mode with neither jwt_key nor jwt_public_key: tokens are checked with the key
        generated under data_dir, which anyone with access to it can sign with."""
        return self.mode == "jwt" and self.jwt_key is None and self.jwt_public_key is None


@dataclass(frozen=True)
class StompConfig:
    """Limits and timing of STOMP sessions."""

    connect_timeout_s: int = opt(
        10, "seconds a WebSocket or SockJS session has to send CONNECT", between(1, 3600)
    )
    send_timeout_s: int = opt(
        10,
        "seconds one write may wait for a client to read before its connection is cut off",
        between(1, 600),
    )
    max_outbox_bytes: int = opt(1048576, "bytes queued for a client that is not reading", at_least(65536))
    max_connections: int | None = opt(
        None,
        "signaling connections at once, beyond: 503; null: half the open-files limit less 64",
        at_least(1),
    )
    max_connections_per_ip: int = opt(
        256, "connections one address may hold, beyond: 429; 0 = no cap", at_least(0)
    )
    max_sessions_per_ip: int = opt(
        128, "WebSocket and SockJS sessions one address may hold; 0 = no cap", at_least(0)
    )
    new_sessions_per_ip_per_s: int = opt(
        10, "new sessions per second from one address; 0 = no cap", at_least(0)
    )
    new_session_burst: int = opt(60, "new sessions one address may open at once", at_least(1))
    per_ip_exempt: tuple[str, ...] = opt(
        ("127.0.0.0/8", "::1"),
        "networks the per-address caps do not apply to (a reverse proxy)",
        item_check=network,
    )
    max_frame_bytes: int = opt(65536, "largest frame a client may send", between(1024, 16 * 1024 * 1024))
    heartbeat_ms: tuple[int, int] = opt(
        (10000, 10000), "heart-beats we send, and want, in ms", parse=heartbeat_pair
    )
    max_subscriptions: int = opt(100, "subscriptions per session", at_least(1))
    max_outbox: int = opt(1024, "frames queued for a client that is not reading", at_least(16))
    max_watched: int = opt(
        1000,
        "userIds one session may watch through status queries; past it a query is 400",
        between(200, 1_000_000),
    )
    max_json_depth: int = opt(
        32, "nesting depth of a JSON body (STOMP SEND or HTTP); deeper is 400", between(4, 512)
    )
    max_user_id_chars: int = opt(
        128,
        "longest userId, in the URL or a token; longer, or with a control character, is refused",
        between(16, 1024),
    )
    send_rate: int = opt(
        50, "SEND frames a second one session may keep up; past it 429; 0 = no limit", at_least(0)
    )
    send_burst: int = opt(200, "SEND frames one session may make at once", at_least(1))
    send_refusals_to_close: int = opt(
        50, "SENDs refused with 429 within 10 s that end the session with an ERROR frame", at_least(1)
    )


@dataclass(frozen=True)
class CallsConfig:
    """Call timing (docs/api.md §5)."""

    ring_timeout_s: int = opt(30, "seconds a call rings before call/timeout", between(1, 600))
    grace_s: int = opt(10, "seconds a dropped party may take to come back", between(0, 600))


@dataclass(frozen=True)
class BrokerConfig:
    """Where sessions, presence and calls are shared: this process alone, or every node on
    one Redis."""

    url: str | None = opt(
        None,
        "null: one node, in memory; redis://[:password@]host:port/db: "
        "every node with the same url serves one user base",
        redis_url,
    )
    prefix: str = opt(
        "appliance:",
        "prefix of every Redis key and channel the nodes share",
        attribute_text(allow_quotes=False),
    )
    node_ttl_s: int = opt(
        15,
        "a node that stops answering counts as gone after this long (its sessions offline, its calls ended)",
        between(3, 600),
    )


@dataclass(frozen=True)
class AdminConfig:
    """The operators' HTTP listener: health, readiness, metrics, secret rotation."""

    listen: HostPort | None = opt(HostPort("127.0.0.1", 9090), "admin listener; null disables")
    token: str | None = opt(None, "bearer token for every admin request; required off loopback")


@dataclass(frozen=True)
class AppConfig:
    """The whole appliance."""

    realm: str = opt("appliance.local", "STUN realm", attribute_text(allow_quotes=False))
    data_dir: Path = opt(
        doc="generated secrets, certificates and the development JWT key; "
        "default: /var/lib/appliance as root, else "
        "$XDG_STATE_HOME/appliance (~/.local/state/appliance)",
        factory=default_data_dir,
    )
    external_ip: str | None = opt(None, "public IPv4 advertised for relays", ip_of(4, False))
    external_ip6: str | None = opt(None, "public IPv6 advertised for relays", ip_of(6, False))
    log_level: str = opt("info", "log level", one_of("debug", "info", "warning", "error"))
    trusted_proxies: tuple[str, ...] = opt(
        (),
        "load balancers and reverse proxies (IP or CIDR) trusted to name the client: by a PROXY "
        "protocol v1/v2 header on the TCP, TLS and edge listeners, by X-Forwarded-For or Forwarded "
        "on the signaling; a PROXY header from any other source closes the connection",
        item_check=network,
    )
    turn: TurnConfig = field(default_factory=TurnConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    stomp: StompConfig = field(default_factory=StompConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)

    def secrets_path(self) -> Path:
        """Where the secret ring lives: credentials.secrets_file or data_dir/secrets.json."""
        return self.credentials.secrets_file or self.data_dir / "secrets.json"

    def ring_redis_url(self) -> str:
        """Where a `credentials.store: redis` ring lives: credentials.redis_url, else
        broker.url (the loader refuses a redis store with neither)."""
        url = self.credentials.redis_url or self.broker.url
        if url is None:
            raise ValueError("credentials.store redis needs credentials.redis_url or broker.url")
        return url
