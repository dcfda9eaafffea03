"""Typed, strict configuration: YAML file + APPLIANCE__SECTION__KEY overrides.

Each section is a frozen dataclass; each field's type hint says how its YAML
value is read and each field's `check` metadata says what makes it valid.
Anything wrong stops the start with the key's dotted path and the reason, so
an operator fixes the right line the first time.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

ENV_PREFIX = "APPLIANCE__"


class ConfigError(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class HostPort:
    """A listener address: a literal IP (no hostnames: binding must not depend on DNS) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "HostPort":
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {text!r}")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError(f"unbalanced brackets in {text!r}")
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"write an IPv6 listener as [addr]:port, got {text!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port!r} is not in 1-65535")
        return cls(host, int(port))


# ------------------------------------------------------------------ validators

def at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}, got {v}"


def between(low: int, high: int) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be in {low}-{high}, got {v}"


def ip_of(version: int, allow_unspecified: bool = True) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            return f"{value!r} is not an IP address"
        if addr.version != version:
            return f"{value!r} is not an IPv{version} address"
        if addr.is_unspecified and not allow_unspecified:
            return f"{value!r} is unspecified; give a concrete address"
        return None
    return check


def networks(values: tuple[str, ...], allow_recommended: bool = False) -> str | None:
    for value in values:
        if allow_recommended and value == "recommended":
            continue
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not an IP address or CIDR range"
    return None


def port_range(value: str) -> tuple[int, int]:
    low, sep, high = str(value).partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"expected \"low-high\", got {value!r}")
    lo, hi = int(low), int(high)
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} is out of range 1-65535")
    if lo > hi:
        raise ValueError(f"low port {lo} is above high port {hi}")
    return lo, hi


def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def realm_text(value: str) -> str | None:
    if not value or any(c in value for c in '"\\') or not value.isprintable():
        return "must be non-empty printable text without quotes or backslashes"
    return None


def opt(default, doc: str, check=None, parse=None):
    """A field with its documentation, validator and (optional) text parser."""
    return field(default=default, metadata={"doc": doc, "check": check, "parse": parse})


# ------------------------------------------------------------------ schema

@dataclass(frozen=True)
class TurnConfig:
    """The embedded STUN/TURN relay."""

    udp: HostPort | None = opt(HostPort("127.0.0.1", 3478), "UDP listener; null disables")
    tcp: HostPort | None = opt(HostPort("127.0.0.1", 3478), "TCP listener; null disables")
    tls: HostPort | None = opt(HostPort("127.0.0.1", 5349), "TLS listener; null disables")
    tls_cert: Path | None = opt(None, "PEM certificate chain; null: a development certificate")
    tls_key: Path | None = opt(None, "PEM private key for tls_cert")
    relay_ip: str | None = opt("127.0.0.1", "IPv4 address relay sockets bind", ip_of(4))
    relay_ip6: str | None = opt("::1", "IPv6 address relay sockets bind", ip_of(6))
    relay_ports: tuple[int, int] = opt((49152, 65535), "relay port range", parse=port_range)
    allow_peers: tuple[str, ...] = opt((), "peer ranges allowed despite deny_peers", networks)
    deny_peers: tuple[str, ...] = opt(("recommended",), "peer ranges refused (403)",
                                      lambda v: networks(v, allow_recommended=True))
    user_quota: int = opt(10, "allocations per user id; 0 = unlimited", at_least(0))
    total_quota: int = opt(10000, "allocations per relay process; 0 = unlimited", at_least(0))
    max_lifetime_s: int = opt(3600, "longest allocation lifetime", at_least(600))
    max_permissions: int = opt(64, "permissions per allocation", at_least(1))
    max_channels: int = opt(64, "channel bindings per allocation", at_least(1))
    nonce_lifetime_s: int = opt(600, "how long a nonce stays fresh", at_least(30))
    software: str | None = opt(None, "SOFTWARE attribute text; null sends none")
    workers: int = opt(1, "relay processes sharing the ports", between(1, 64))


@dataclass(frozen=True)
class CredentialsConfig:
    """The TURN REST shared secrets and the credentials made from them."""

    secrets_file: Path | None = opt(None, "secret ring file; null: data_dir/secrets.json")
    ttl_s: int = opt(86400, "lifetime of handed-out credentials", at_least(60))


@dataclass(frozen=True)
class AppConfig:
    """The whole appliance."""

    realm: str = opt("appliance.local", "STUN realm", realm_text)
    data_dir: Path = opt(Path("data"), "generated secrets and certificates")
    external_ip: str | None = opt(None, "public IPv4 advertised for relays", ip_of(4, False))
    external_ip6: str | None = opt(None, "public IPv6 advertised for relays", ip_of(6, False))
    log_level: str = opt("info", "log level", one_of("debug", "info", "warning", "error"))
    turn: TurnConfig = field(default_factory=TurnConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)

    def secrets_path(self) -> Path:
        return self.credentials.secrets_file or self.data_dir / "secrets.json"


# ------------------------------------------------------------------ loading

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(hint, value, key: str, base: Path, parse):
    """Read one YAML value as `hint`; ConfigError names `key` on failure."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        if value is None:
            raise ConfigError(key, "may not be null")
        return _convert(hint, value, key, base, parse)
    if parse is not None:
        try:
            return parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if hint is HostPort:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected host:port, got {value!r}")
        try:
            return HostPort.parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a path, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"expected text, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{key}[{i}]", base, None) for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, base)
    raise ConfigError(key, f"unsupported type {hint!r}")   # a schema bug, not user input


def _build(cls, data, prefix: str, base: Path):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "(top level)", f"expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(f"{prefix}.{name}" if prefix else str(name), "unknown key")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _convert(hints[name], data[name], key, base, f.metadata.get("parse"))
        elif dataclasses.is_dataclass(hints[name]):
            value = _build(hints[name], {}, key, base)
        else:
            continue
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(key, problem)
        values[name] = value
    return cls(**values)


def _apply_env(data: dict, environ: Mapping[str, str]) -> None:
    for var, raw in sorted(environ.items()):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in var[len(ENV_PREFIX):].split("__")]
        if not all(path):
            raise ConfigError(var, "malformed override name")
        cls, node = AppConfig, data
        for i, part in enumerate(path):
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(var, f"unknown key {'.'.join(path[:i + 1])}")
            hint = _hints(cls)[part]
            if i == len(path) - 1:
                try:
                    node[part] = yaml.safe_load(raw) if raw != "" else None
                except yaml.YAMLError as exc:
                    raise ConfigError(var, f"unreadable value: {exc}") from None
            else:
                if not dataclasses.is_dataclass(hint):
                    raise ConfigError(var, f"{'.'.join(path[:i + 1])} is not a section")
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                cls, node = hint, child


def _cross_checks(config: AppConfig) -> None:
    t = config.turn
    if (t.tls_cert is None) != (t.tls_key is None):
        raise ConfigError("turn.tls_key" if t.tls_key is None else "turn.tls_cert",
                          "tls_cert and tls_key go together")
    for name in ("tls_cert", "tls_key"):
        path = getattr(t, name)
        if path is not None and t.tls is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"turn.{name}", f"{path} does not exist or is not readable")
    listeners = [t.udp, t.tcp, t.tls]
    if any(listeners) and not (t.relay_ip or t.relay_ip6):
        raise ConfigError("turn.relay_ip", "a relay listener is enabled but no relay address is set")
    for key, ip, external in (("turn.relay_ip", t.relay_ip, config.external_ip),
                              ("turn.relay_ip6", t.relay_ip6, config.external_ip6)):
        if ip and ipaddress.ip_address(ip).is_unspecified and not external:
            raise ConfigError(key, f"{ip} binds every interface, so set "
                              f"{'external_ip' if '.' in ip else 'external_ip6'} to the address "
                              "clients reach")
    if t.tcp and t.tls and (t.tcp.host, t.tcp.port) == (t.tls.host, t.tls.port):
        raise ConfigError("turn.tls", f"same address as turn.tcp ({t.tcp})")


def load_config(path: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> AppConfig:
    """Load and validate; raise ConfigError naming the offending key."""
    environ = os.environ if environ is None else environ
    data: Any = {}
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError("(file)", f"cannot read {file}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("(file)", f"{file} is not valid YAML: {exc}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError("(top level)", "the file must hold a mapping of keys")
        base = file.resolve().parent
    _apply_env(data, environ)
    config = _build(AppConfig, data, "", base)
    _cross_checks(config)
    return config


def describe(cls=AppConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every option: the source of `config/appliance.yaml`'s comments."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe(hint, key))
        else:
            rows.append((key, f.default, f.metadata.get("doc", "")))
    return rows
