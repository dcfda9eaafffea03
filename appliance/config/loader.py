"""Typed, strict configuration: one YAML file plus APPLIANCE__SECTION__KEY overrides.

Each section is a frozen dataclass (schema.py).  A field's type hint says how its YAML
value is read; its `opt(...)` metadata carries the documentation, the
validator (`check`, or `item_check` for each element of a list) and an
optional text parser.  Adding a section (http, auth, ...) means declaring a
dataclass and a field of that type on `AppConfig`; this loader needs no change.

Anything wrong stops the start with the key's dotted path and the reason, so
an operator fixes the right line the first time.  Relative paths written in a
file resolve against the file's directory, relative paths from the environment
against the working directory.  Path defaults are absolute (data_dir's is
computed: /var/lib/appliance as root, else $XDG_STATE_HOME/appliance), so
every command finds the same state whatever directory it runs in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .schema import AppConfig, ConfigError, HostPort

ENV_PREFIX = "APPLIANCE__"


# ------------------------------------------------------------------ reading values

TEXT_TYPES = (str, Path, HostPort)  # read from the environment as raw text when YAML disagrees


def _is_section(hint) -> bool:
    """A nested mapping of options (HostPort is a dataclass too, but written as one string)."""
    return dataclasses.is_dataclass(hint) and hint not in TEXT_TYPES


@dataclass(frozen=True)
class _EnvValue:
    """An override as written in the environment, read once its field's type is known."""

    var: str
    raw: str


def _optional_of(hint):
    """T for `T | None`, else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _read_env(value: _EnvValue, hint, key: str):
    """YAML reading of an override, except that text fields keep the raw text when YAML
    makes something else of it ("::" is a mapping, "1:30" a number, "[::1]:3478" an error)."""
    text_field = _optional_of(hint) in TEXT_TYPES
    try:
        parsed = yaml.safe_load(value.raw)
    except yaml.YAMLError as exc:
        if text_field:
            return value.raw
        problem = str(exc).splitlines()[0]
        raise ConfigError(key, f"not a YAML value ({problem}); quote IPv6 items, e.g. ['::1']") from None
    if text_field and parsed is not None and not isinstance(parsed, str):
        return value.raw
    return parsed


def _convert(hint, value, key: str, base: Path, meta: Mapping[str, Any]):
    """Read one YAML value as `hint`; ConfigError names `key` on failure."""
    if isinstance(value, _EnvValue):
        value, base = _read_env(value, hint, key), Path.cwd()
    if value is None:
        if _optional_of(hint) is not hint:
            return None
        if _is_section(hint):
            return _build(hint, {}, key, base)  # "turn:" with every line commented out
        raise ConfigError(key, "may not be null")
    hint = _optional_of(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if meta.get("parse") is not None:
        try:
            return meta["parse"](value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if _is_section(hint):
        return _build(hint, value, key, base)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{key}[{i}]", base, {}) for i, v in enumerate(value))
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint in TEXT_TYPES and not isinstance(value, str):
        # YAML reads unquoted 1:30 as a number and :: as a mapping: say how to fix it.
        raise ConfigError(key, f"expected text, got {value!r}; quote the value")
    if hint is str:
        return value
    if hint is HostPort:
        try:
            return HostPort.parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if hint is Path:
        if not value:
            raise ConfigError(key, "expected a path, got an empty string")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    raise TypeError(f"{key}: unsupported type {hint!r} in the schema")


def _check(check, value, key: str) -> None:
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(key, problem)


def _build(cls, data, prefix: str, base: Path):
    """Build section `cls` from a mapping, filling defaults and running validators."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "(top level)", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(f"{prefix}.{name}" if prefix else str(name), "unknown key")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _convert(hints[name], data[name], key, base, f.metadata)
        elif _is_section(hints[name]):
            value = _build(hints[name], {}, key, base)
        else:
            continue  # the dataclass fills in the default
        if value is not None:
            _check(f.metadata.get("check"), value, key)
            for i, item in enumerate(value if f.metadata.get("item_check") else ()):
                _check(f.metadata["item_check"], item, f"{key}[{i}]")
        values[name] = value
    return cls(**values)


# ------------------------------------------------------------------ sources


def _apply_env(data: dict, environ: Mapping[str, str]) -> dict[str, str]:
    """Put APPLIANCE__* overrides into `data`; return {dotted key: variable} for error messages."""
    origins = {}
    for var, raw in sorted(environ.items()):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in var[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(var, "malformed override name; use APPLIANCE__SECTION__KEY")
        cls, node = AppConfig, data
        for i, part in enumerate(path):
            dotted = ".".join(path[: i + 1])
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(var, f"unknown key {dotted}")
            if i == len(path) - 1:
                node[part] = _EnvValue(var, raw)
                origins[dotted] = var
                break
            hint = typing.get_type_hints(cls)[part]
            if not _is_section(hint):
                raise ConfigError(var, f"{dotted} is not a section")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, _EnvValue):
                raise ConfigError(var, f"conflicts with {child.var}, which sets all of {dotted}")
            elif not isinstance(child, dict):
                raise ConfigError(dotted, f"expected a mapping, got {child!r}")
            cls, node = hint, child
    return origins


def _reject_duplicate_keys(node: yaml.Node | None, prefix: str = "") -> None:
    """yaml.safe_load keeps the last of two equal keys; a strict loader refuses them."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{prefix}.{name}" if prefix else str(name)
            line = key_node.start_mark.line + 1
            if name is not None and name in seen:
                raise ConfigError(dotted, f"duplicate key (lines {seen[name]} and {line})")
            seen[name] = line
            _reject_duplicate_keys(value_node, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, f"{prefix}[{i}]")


def _read_file(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("(file)", f"cannot read {file}: {reason}") from None
    try:
        _reject_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("(file)", f"{file} is not valid YAML: {exc}") from None


def _check_readable(key: str, path: Path | None) -> None:
    if path is None:
        return
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(key, f"{path} is not a readable file")


def _check_tls_files(section: str, cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ConfigError(
            f"{section}.tls_key" if key is None else f"{section}.tls_cert",
            "tls_cert and tls_key go together: give both or neither",
        )
    _check_readable(f"{section}.tls_cert", cert)
    _check_readable(f"{section}.tls_key", key)


def _cross_checks(config: AppConfig) -> None:
    """Rules that involve more than one key."""
    t = config.turn
    _check_tls_files("turn", t.tls_cert, t.tls_key)
    if any((t.udp, t.tcp, t.tls, config.edge.listen)) and not (t.relay_ip or t.relay_ip6):
        raise ConfigError(
            "turn.relay_ip", "a TURN listener is enabled but neither relay_ip nor relay_ip6 is set"
        )
    for family, ip, external in (
        ("", t.relay_ip, config.external_ip),
        ("6", t.relay_ip6, config.external_ip6),
    ):
        if ip and ipaddress.ip_address(ip).is_unspecified and not external:
            raise ConfigError(
                f"turn.relay_ip{family}",
                f"{ip} binds every interface, so set external_ip{family} to the address clients reach",
            )
        if external and not ip:
            raise ConfigError(
                f"external_ip{family}", f"is set but turn.relay_ip{family} is null (no relaying to advertise)"
            )
    if t.tcp and t.tls and (t.tcp.host, t.tcp.port) == (t.tls.host, t.tls.port):
        raise ConfigError("turn.tls", f"same address as turn.tcp ({t.tcp})")
    _check_tls_files("http", config.http.tls_cert, config.http.tls_key)
    _edge_checks(config)
    a = config.auth
    _check_readable("auth.jwt_public_key", a.jwt_public_key)
    if a.mode == "http" and not a.introspect_url:
        raise ConfigError("auth.introspect_url", "http mode needs the introspection URL")
    if a.mode == "static" and not a.tokens:
        raise ConfigError("auth.tokens", "static mode needs at least one token: userId entry")
    if a.mode == "jwt" and a.jwt_key is not None and a.jwt_public_key is not None:
        raise ConfigError("auth.jwt_public_key", "give jwt_key (HS256) or jwt_public_key, not both")
    if a.jwt_key is not None and len(a.jwt_key) < 32:
        raise ConfigError(
            "auth.jwt_key", "must be at least 32 characters (HS256 keys shorter than the hash are guessable)"
        )
    _credential_checks(config)
    _admin_checks(config.admin)


def _edge_checks(config: AppConfig) -> None:
    """The edge shares one TLS port between TURN and the signaling: it needs the signaling
    (its HTTPS side is the signaling app), and an address of its own."""
    e = config.edge
    _check_tls_files("edge", e.tls_cert, e.tls_key)
    if e.listen is None:
        return
    if config.http.listen is None:
        raise ConfigError(
            "edge.listen",
            "the edge serves the signaling's HTTPS and WSS, but http.listen is null "
            "(signaling off); for TURN over TLS alone set turn.tls to this address instead",
        )
    t = config.turn
    for key, other in (("http.listen", config.http.listen), ("turn.tcp", t.tcp), ("turn.tls", t.tls)):
        if other is not None and (other.host, other.port) == (e.listen.host, e.listen.port):
            raise ConfigError("edge.listen", f"same address as {key} ({other})")


def _credential_checks(config: AppConfig) -> None:
    c, t = config.credentials, config.turn
    if c.store == "redis" and c.redis_url is None and config.broker.url is None:
        raise ConfigError(
            "credentials.redis_url",
            "store redis needs the Redis URL (this key, or broker.url to use the same Redis)",
        )
    for i, url in enumerate(c.external):
        if not url.startswith(("turn:", "turns:")):
            raise ConfigError(f"credentials.external[{i}]", f"must be a turn: or turns: URL, got {url!r}")
    if c.ice_servers is not None and not c.ice_servers:
        raise ConfigError(
            "credentials.ice_servers",
            "is an empty list; give URLs, or null for the embedded relay's defaults",
        )
    relay_on = any((t.udp, t.tcp, t.tls, config.edge.listen))
    if config.http.listen is not None and not (relay_on or c.external or c.ice_servers):
        raise ConfigError(
            "credentials.external",
            "the signaling would hand out no ICE server: "
            "enable a turn listener, or list external "
            "TURN servers or credentials.ice_servers",
        )


def _admin_checks(admin) -> None:
    if admin.token is not None and len(admin.token) < 16:
        raise ConfigError("admin.token", "must be at least 16 characters")
    if admin.listen is not None and admin.token is None and not admin.listen.is_loopback():
        raise ConfigError(
            "admin.token", f"admin.listen {admin.listen} is not a loopback address, so a token is required"
        )


def check_whole(config: AppConfig) -> None:
    """The rules that involve more than one key, for a configuration put together from two
    (a reload keeps the running values of the keys that need a restart); ConfigError."""
    _cross_checks(config)


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Load `path` (or the defaults) with APPLIANCE__* overrides from `environ` (os.environ).

    Raises ConfigError naming the offending key; when an environment variable
    set that key, the reason says so.
    """
    environ = os.environ if environ is None else environ
    data: Any = {}
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        data = _read_file(file)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError("(top level)", f"{file} must hold a mapping of keys, not {type(data).__name__}")
        base = file.resolve().parent
    origins = _apply_env(data, environ)
    try:
        config = _build(AppConfig, data, "", base)
        _cross_checks(config)
    except ConfigError as exc:
        var = next(
            (v for k, v in origins.items() if exc.key == k or exc.key.startswith((k + ".", k + "["))), None
        )
        if var is None:
            raise
        raise ConfigError(exc.key, f"{exc.reason} (set by {var})") from None
    return config


def describe(cls=AppConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every option, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if _is_section(hints[f.name]):
            rows.extend(describe(hints[f.name], key))
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            rows.append((key, default, f.metadata.get("doc", "")))
    return rows
