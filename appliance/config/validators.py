"""Validators and parsers for configuration values.

A validator takes a converted value and returns None, or the reason it is
wrong (the loader prefixes the key's path).  A parser takes the raw YAML value
and returns the typed one, or raises ValueError with the reason.  Kept apart
from the schema so every section (turn, credentials, and the ones to come)
draws on the same small set.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

MAX_ATTRIBUTE_TEXT = 127  # REALM and SOFTWARE must be fewer than 128 characters (RFC 8489 §14)


def at_least(low: int) -> Callable[[int], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}, got {v}"


def between(low: int, high: int) -> Callable[[int], str | None]:
    return lambda v: None if low <= v <= high else f"must be in {low}-{high}, got {v}"


def one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def ip_of(version: int, allow_unspecified: bool = True) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            return f"{value!r} is not an IP address"
        if addr.version != version:
            return f"{value!r} is not an IPv{version} address"
        if addr.is_unspecified and not allow_unspecified:
            return f"{value!r} is unspecified; give the concrete address clients reach"
        return None

    return check


def network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an IP address or CIDR range"
    return None


def network_or_recommended(value: str) -> str | None:
    # "recommended" is expanded by turn/policy.py; only the word is checked here.
    return None if value == "recommended" else network(value)


def attribute_text(allow_quotes: bool) -> Callable[[str], str | None]:
    """Text sent in a STUN attribute: non-empty, printable, short enough for RFC 8489.

    REALM is a quoted-string (RFC 8489 §14.9), so quotes and backslashes in it
    would be read differently by different clients: refused there.
    """

    def check(value: str) -> str | None:
        if not value:
            return "must be non-empty"
        if not value.isprintable():
            return "must not contain control characters"
        if not allow_quotes and any(c in value for c in '"\\'):
            return "must not contain quotes or backslashes"
        if len(value) > MAX_ATTRIBUTE_TEXT:
            return f"must be at most {MAX_ATTRIBUTE_TEXT} characters, got {len(value)}"
        return None

    return check


def port_range(value: Any) -> tuple[int, int]:
    """Parse "low-high"; ValueError says which end is wrong."""
    if not isinstance(value, str):
        raise ValueError(f'expected "low-high", got {value!r}')
    low, sep, high = value.partition("-")
    low, high = low.strip(), high.strip()
    if not sep or not all(p.isascii() and p.isdigit() for p in (low, high)):
        raise ValueError(f'expected "low-high", got {value!r}')
    lo, hi = int(low), int(high)
    for name, port in (("low", lo), ("high", hi)):
        if not 1 <= port <= 65535:
            raise ValueError(f"{name} port {port} is out of range 1-65535")
    if lo > hi:
        raise ValueError(f"low port {lo} is above high port {hi}")
    return lo, hi


def token_map(value: Any) -> tuple[tuple[str, str], ...]:
    """Parse a YAML mapping of token -> user id into sorted pairs (hashable, immutable)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of token: userId, got {value!r}")
    pairs = []
    for token, user in value.items():
        if not isinstance(token, str) or not token or not isinstance(user, str) or not user:
            raise ValueError("tokens and user ids must be non-empty text")
        pairs.append((token, user))
    return tuple(sorted(pairs))


def url_prefix(value: str) -> str | None:
    if not value.startswith("/") or value.endswith("/") or "//" in value or not value.isprintable():
        return f"must start with '/' and not end with one, got {value!r}"
    return None


def heartbeat_pair(value: Any) -> tuple[int, int]:
    """Parse "send,receive" milliseconds, e.g. "10000,10000"; "0,0" disables heart-beats."""
    text = str(value)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f'expected "send_ms,receive_ms", got {value!r}')
    return int(parts[0]), int(parts[1])


def http_url(value: str) -> str | None:
    if not (value.startswith("http://") or value.startswith("https://")) or " " in value:
        return f"must be an http:// or https:// URL, got {value!r}"
    return None


_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


def _host_problem(host: str) -> str | None:
    """None for an IPv4 address, a bracketed IPv6 address or a DNS name."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host!r} is not an IPv6 address"
        return None
    if ":" in host:
        return f"write IPv6 addresses in brackets, e.g. [2001:db8::1], got {host!r}"
    labels = host.lower().split(".")
    if (
        len(host) > 253
        or not all(labels)
        or any(
            set(label) - _LABEL_CHARS or label.startswith("-") or label.endswith("-") or len(label) > 63
            for label in labels
        )
    ):
        return f"{host!r} is not a host name or IP address"
    return None


def host_name(value: str) -> str | None:
    return _host_problem(value)


ICE_SCHEMES = ("stun", "stuns", "turn", "turns")


def ice_url(value: str) -> str | None:
    """A STUN/TURN URI (RFC 7064, RFC 7065): scheme:host[:port][?transport=udp|tcp]."""
    scheme, sep, rest = value.partition(":")
    if not sep or scheme not in ICE_SCHEMES:
        return f"must start with one of {', '.join(s + ':' for s in ICE_SCHEMES)}, got {value!r}"
    address, _, query = rest.partition("?")
    if query:
        if scheme.startswith("stun"):
            return f"stun URLs take no query, got {value!r}"
        if query not in ("transport=udp", "transport=tcp"):
            return f"the only query is transport=udp or transport=tcp, got {value!r}"
        if scheme == "turns" and query == "transport=udp":
            return f"turns: runs over TLS, so transport=udp is not possible: {value!r}"
    host, port = address, None
    if address.startswith("["):
        close = address.find("]")
        host, after = address[: close + 1], address[close + 1 :]
        if after:
            if not after.startswith(":"):
                return f"expected [addr]:port in {value!r}"
            port = after[1:]
    elif address.count(":") == 1:
        host, port = address.split(":")
    problem = _host_problem(host) if host else f"no host in {value!r}"
    if problem:
        return problem
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port!r} is not in 1-65535 in {value!r}"
    return None


def worker_count(value: Any) -> int:
    """Relay processes: a number, or "auto" for one per core this machine has."""
    if value == "auto":
        return max(
            1,
            min(
                64,
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
            ),
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'expected a number of processes or "auto", got {value!r}')
    return value


def redis_url(value: str) -> str | None:
    if not value.startswith(("redis://", "rediss://", "unix://")) or " " in value:
        return f"must be a redis://, rediss:// or unix:// URL, got {value.split('@')[-1]!r}"
    return None
