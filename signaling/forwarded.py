"""The client behind a trusted reverse proxy: `TrustedForwarded`, ASGI middleware that puts
the address the proxy names (X-Forwarded-For, or RFC 7239 Forwarded `for=`) into the
scope's `client`, and the scheme it names (X-Forwarded-Proto, or Forwarded `proto=`) into
its `scheme` -- but only for a request whose TCP peer is in `trusted_proxies`.  Any client
can write these headers, so from every other peer they are ignored (and counted).

Everything downstream that keys on the client's address then sees the real client: the
per-address session caps (`ws.admit_session`, the SockJS opener's address), the demo page's
loopback check, logs.  What cuts a connection off must still name the TCP peer the
connection table knows, which the scope keeps apart: `transport_peer(scope)`.

Which entry is the client: proxies append the address they received the request from to
the right of the list, so it is read from the right, skipping addresses that are
themselves trusted proxies (a chain of them); the first other address is the client.
Entries to its left are whatever the client wrote and are never read, so garbage there
does not matter (in a Forwarded header, as long as the header as a whole parses: its
quoting is read from the left).  If every entry is a trusted proxy, the left-most is the
client.

Which header: X-Forwarded-For when the request has one, else Forwarded.  Nearly every
proxy writes X-Forwarded-For (nginx, HAProxy's `option forwardfor`, Caddy, Traefik, Envoy,
cloud load balancers) and passes a Forwarded header the client wrote through untouched,
so preferring Forwarded would let any client pick its own address.  A proxy that writes
only Forwarded must remove X-Forwarded-For for the same reason.

Bounds: each header (all its lines joined) at most MAX_HEADER_CHARS, at most MAX_HOPS
entries read from the right.  An entry that cannot be read (not an IP address, `unknown`,
an obfuscated name, a bad port, broken quoting) leaves the peer's address in place and is
counted as `forwarded_malformed`: the request is served as the proxy's own.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from demux.proxy import TrustedProxies
from ratelog import RateLimitedLog

from .client_text import loggable

log = logging.getLogger("signaling.forwarded")

MAX_HEADER_CHARS = 4096  # one header, all its lines joined; 32 bracketed IPv6 with ports is ~1.5 KiB
MAX_HOPS = 32  # entries read from the right before giving up
PEER_KEY = "signaling.transport_peer"  # the scope's own TCP peer, kept when `client` is replaced

COUNT_FORWARDED = "forwarded"  # a client address taken from a trusted proxy's header
COUNT_MALFORMED = "forwarded_malformed"  # a trusted proxy's header that could not be read
COUNT_UNTRUSTED = "forwarded_untrusted"  # forwarding headers from a peer not trusted: ignored

FORWARDED_FOR = b"x-forwarded-for"
FORWARDED_PROTO = b"x-forwarded-proto"
FORWARDED = b"forwarded"
_HEADERS = (FORWARDED_FOR, FORWARDED_PROTO, FORWARDED)

_SCHEMES = {  # what a proxy may name -> (http scope's scheme, websocket scope's scheme)
    "http": ("http", "ws"),
    "https": ("https", "wss"),
    "ws": ("http", "ws"),
    "wss": ("https", "wss"),
}
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWS = " \t"

Address = tuple[str, int]


class ForwardingError(ValueError):
    """A forwarding header that cannot be read; the message is safe to log (no client text)."""


@dataclass(frozen=True)
class Forwarding:
    """What a trusted proxy's headers say: the client (None: keep the peer), the scheme the
    client used ("http" or "https"; None: keep the scope's), and why part of it was not
    believed (None if all of it was)."""

    client: Address | None
    scheme: str | None
    problem: str | None = None


def read_forwarding(headers: Iterable[tuple[bytes, bytes]], trusted: TrustedProxies) -> Forwarding:
    """What the forwarding headers among `headers` (an ASGI scope's: lowercase names, raw
    values) say, for a request that came from a trusted proxy."""
    values: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in _HEADERS:
            values.setdefault(name, []).append(value)
    try:
        forwarded_for = _joined(values, FORWARDED_FOR)
        forwarded = _joined(values, FORWARDED)
        proto = _joined(values, FORWARDED_PROTO)
    except ForwardingError as err:
        return Forwarding(None, None, str(err))
    if forwarded_for is not None:
        return _from_x_forwarded(forwarded_for, proto, trusted)
    if forwarded is not None:
        return _from_forwarded(forwarded, trusted)
    if proto is not None:
        return _scheme_only(proto)
    return Forwarding(None, None)


def _joined(values: Mapping[bytes, list[bytes]], name: bytes) -> str | None:
    """All lines of header `name` as one comma-separated list (RFC 9110 5.3), or None."""
    lines = values.get(name)
    if not lines:
        return None
    if sum(len(line) for line in lines) + len(lines) > MAX_HEADER_CHARS:
        raise ForwardingError(f"{name.decode()} longer than {MAX_HEADER_CHARS} bytes")
    try:
        return ",".join(line.decode("ascii") for line in lines)
    except UnicodeDecodeError:
        raise ForwardingError(f"{name.decode()} is not ASCII") from None


# ------------------------------------------------------------------ X-Forwarded-*


def _from_x_forwarded(forwarded_for: str, proto: str | None, trusted: TrustedProxies) -> Forwarding:
    hops = forwarded_for.split(",")
    try:
        index, client = _walk(hops, _x_forwarded_node, trusted)
    except ForwardingError as err:
        return Forwarding(None, None, f"X-Forwarded-For: {err}")
    if proto is None:
        return Forwarding(client, None)
    protos = proto.split(",")
    # A proxy that appends to X-Forwarded-Proto wrote the client's scheme at the client's
    # index; one that sets it wrote one value, the right-most.
    chosen = protos[index] if len(protos) == len(hops) else protos[-1]
    try:
        return Forwarding(client, _scheme(chosen.strip(_OWS)))
    except ForwardingError as err:
        return Forwarding(client, None, f"X-Forwarded-Proto: {err}")


def _scheme_only(proto: str) -> Forwarding:
    try:
        return Forwarding(None, _scheme(proto.split(",")[-1].strip(_OWS)))
    except ForwardingError as err:
        return Forwarding(None, None, f"X-Forwarded-Proto: {err}")


def _x_forwarded_node(entry: str) -> Address:
    """One X-Forwarded-For entry: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`,
    `[2001:db8::1]:80`."""
    entry = entry.strip(_OWS)
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ForwardingError("a bracketed address without its closing bracket")
        return _ip(host), _port(rest[1:]) if rest else 0
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return _ip(host), _port(port)
    return _ip(entry), 0


# ------------------------------------------------------------------ RFC 7239 Forwarded


def _from_forwarded(value: str, trusted: TrustedProxies) -> Forwarding:
    try:
        elements = parse_forwarded(value)
        index, client = _walk(elements, _forwarded_node, trusted)
    except ForwardingError as err:
        return Forwarding(None, None, f"Forwarded: {err}")
    proto = elements[index].get("proto")
    if proto is None:
        return Forwarding(client, None)
    try:
        return Forwarding(client, _scheme(proto))
    except ForwardingError as err:
        return Forwarding(client, None, f"Forwarded proto: {err}")


def parse_forwarded(value: str) -> list[dict[str, str]]:
    """RFC 7239's Forwarded header: one dict of (lowercase) parameter -> value per element,
    quoted values unquoted; empty elements are skipped.  ForwardingError if it is not one."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    i, n = 0, len(value)
    while True:
        i = _skip(value, i, _OWS)
        if i < n and value[i] not in ",;":
            start = i
            i = _skip(value, i, _TCHAR)
            name = value[start:i].lower()
            if not name or i >= n or value[i] != "=":
                raise ForwardingError("a parameter that is not token=value")
            i, param = _parameter_value(value, i + 1)
            if name in pairs:
                raise ForwardingError("a parameter given twice in one element")
            pairs[name] = param
            i = _skip(value, i, _OWS)
        if i >= n or value[i] == ",":
            if pairs:
                elements.append(pairs)
                pairs = {}
            if i >= n:
                return elements
        elif value[i] != ";":
            raise ForwardingError("text after a parameter's value")
        i += 1


def _skip(value: str, i: int, chars: Iterable[str]) -> int:
    n = len(value)
    while i < n and value[i] in chars:
        i += 1
    return i


def _parameter_value(value: str, i: int) -> tuple[int, str]:
    """The token or quoted-string starting at `i`: (the index after it, its text)."""
    n = len(value)
    if i < n and value[i] == '"':
        out: list[str] = []
        i += 1
        while i < n:
            char = value[i]
            if char == '"':
                return i + 1, "".join(out)
            if char == "\\":
                i += 1
                if i >= n:
                    break
                char = value[i]
            if char != "\t" and not " " <= char <= "~":
                raise ForwardingError("a control character in a quoted value")
            out.append(char)
            i += 1
        raise ForwardingError("a quoted value without its closing quote")
    end = _skip(value, i, _TCHAR)
    if end == i:
        raise ForwardingError("a parameter without a value")
    return end, value[i:end]


def _forwarded_node(element: dict[str, str]) -> Address:
    """An element's `for=` node: `192.0.2.60`, `192.0.2.60:47011`, `[2001:db8::17]`,
    `[2001:db8::17]:4711`; an obfuscated port (`_abc`) counts as 0.  `unknown`, an
    obfuscated name or a missing `for=` names nobody: ForwardingError."""
    node = element.get("for")
    if node is None:
        raise ForwardingError("an element without for=")
    if node.startswith("["):
        host, sep, rest = node[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ForwardingError("a bracketed address without its closing bracket")
        port, version = rest[1:] if rest else "", 6
    else:
        host, _, port = node.partition(":")
        version = 4
    address = _ip_address(host)
    if address.version != version:
        raise ForwardingError("an IPv6 address without brackets, or an IPv4 one within them")
    return str(address), 0 if port.startswith("_") else _port(port) if port else 0


# ------------------------------------------------------------------ shared


def _walk(hops: list[Any], node: Callable[[Any], Address], trusted: TrustedProxies) -> tuple[int, Address]:
    """(index, address) of the right-most hop that is not a trusted proxy, reading at most
    MAX_HOPS from the right; the left-most hop if all of them are trusted proxies."""
    if not hops:
        raise ForwardingError("no entries")
    first = max(0, len(hops) - MAX_HOPS)
    for index in range(len(hops) - 1, first - 1, -1):
        address = node(hops[index])
        if address[0] not in trusted or index == 0:
            return index, address
    raise ForwardingError(f"more than {MAX_HOPS} trusted proxies in a row")


def _ip(text: str) -> str:
    """`text` as an IP address in its canonical form; ForwardingError if it is not one."""
    return str(_ip_address(text))


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ForwardingError("an entry that is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ForwardingError("an IPv6 address with a zone")
    return address


def _port(text: str) -> int:
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ForwardingError("a port that is not a number up to 65535")
    return int(text)


def _scheme(text: str) -> str:
    scheme = text.lower()
    if scheme not in _SCHEMES:
        raise ForwardingError("a scheme other than http, https, ws or wss")
    return _SCHEMES[scheme][0]


def scope_scheme(scheme: str, scope_type: str) -> str:
    """The scope's `scheme` for a client that used `scheme` ("http"/"https"): ws/wss for a
    WebSocket."""
    return _SCHEMES[scheme][1] if scope_type == "websocket" else scheme


# ------------------------------------------------------------------ the middleware


def transport_peer(scope: Mapping[str, Any]) -> Any:
    """The TCP peer of the connection `scope` arrived on, as Hypercorn reported it: what the
    connection table (guard.abort, guard.connection_open) knows it by, even when `client`
    was replaced by the address a trusted proxy named."""
    return scope.get(PEER_KEY, scope.get("client"))


class TrustedForwarded:
    """ASGI middleware: a request or WebSocket from a peer in `trusted` gets the client and
    scheme its forwarding headers name (see the module's docstring); from any other peer
    they are ignored.  `count(name)` is told of each COUNT_* event (by default counted in
    `counters`)."""

    def __init__(self, app: Any, trusted: TrustedProxies, count: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.trusted = trusted
        self.counters: Counter[str] = Counter()
        self.count: Callable[[str], None] = count if count is not None else self._count
        self._malformed_log = RateLimitedLog(log, burst=3, interval_s=10.0)
        self._untrusted_log = RateLimitedLog(log, burst=1, interval_s=60.0)

    def _count(self, name: str) -> None:
        self.counters[name] += 1

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        await self.app(self.forwarded_scope(scope), receive, send)

    def forwarded_scope(self, scope: dict[str, Any]) -> dict[str, Any]:
        """`scope` as the app should see it: a copy with the forwarded client and scheme for
        a trusted peer whose headers say so, else `scope` itself."""
        peer = scope.get("client")
        headers = scope.get("headers", ())
        if not peer or not self.trusted or peer[0] not in self.trusted:
            if any(name in _HEADERS for name, _ in headers):
                self.count(COUNT_UNTRUSTED)
                self._untrusted_log.info(
                    time.monotonic(),
                    "forwarding headers from %s ignored: it is not in trusted_proxies",
                    loggable(peer[0] if peer else None),
                )
            return scope
        forwarding = read_forwarding(headers, self.trusted)
        if forwarding.problem is not None:
            self.count(COUNT_MALFORMED)
            self._malformed_log.warning(
                time.monotonic(),
                "forwarding headers from proxy %s not believed: %s",
                loggable(peer[0]),
                forwarding.problem,
            )
        if forwarding.client is None and forwarding.scheme is None:
            return scope
        changed = {**scope, PEER_KEY: peer}
        if forwarding.client is not None:
            self.count(COUNT_FORWARDED)
            changed["client"] = forwarding.client
        if forwarding.scheme is not None:
            changed["scheme"] = scope_scheme(forwarding.scheme, scope["type"])
        return changed
