"""Which web pages may use the signaling from a browser: the `Origin` check of WebSocket
handshakes and SockJS requests, and the CORS answer SockJS gives.  Sans-I/O.

A browser names the page behind every WebSocket handshake and every cross-origin (or
non-GET) request in `Origin`; programs (stomp.py, Node clients, mobile apps) send none and
are not browsers being abused, so a request without `Origin` is always let through.  A
page is allowed if it is the appliance's own origin -- the host and port the request was
sent to, its `Host` header -- or one of `http.allowed_origins`.  The scheme is not compared
for the own origin: behind a TLS-terminating proxy the appliance hears http for a page the
browser loaded over https.  "*" allows every page (unsafe: any site a user visits may then
open sessions here and read their answers); "null" (sandboxed frames, file: pages) is
allowed only when listed itself, never by "*".
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

ANY = "*"
NULL = "null"
DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]  # (scheme, host, port), lower case, port filled in


def parse_origin(text: str) -> Origin | None:
    """An Origin header's (scheme, host, port), or None if it is not a serialized origin
    (scheme://host[:port], nothing else)."""
    if not text.isascii() or not text.isprintable() or " " in text:
        return None  # urlsplit would quietly drop tabs and line breaks
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if (
        not scheme
        or not host
        or parts.username is not None
        or parts.password is not None
        or parts.path
        or parts.query
        or parts.fragment
        or text.endswith((":", "?", "#"))
    ):
        return None
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
        if port is None:
            port = 0  # a scheme without a default port (capacitor://localhost)
    return scheme, host, port


def origin_problem(text: str) -> str | None:
    """Why `text` cannot be an entry of http.allowed_origins (None if it can)."""
    if text in (ANY, NULL) or parse_origin(text) is not None:
        return None
    return f'{text!r} is not an origin: write scheme://host[:port] (no path), "null" or "*"'


def _host_and_port(host_header: str, default_port: int) -> tuple[str, int] | None:
    try:
        parts = urlsplit("//" + host_header)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname, default_port if port is None else port


class OriginPolicy:
    def __init__(self, allowed: Iterable[str] = ()) -> None:
        allowed = tuple(allowed)
        for entry in allowed:
            problem = origin_problem(entry)
            if problem is not None:
                raise ValueError(problem)
        self.any = ANY in allowed
        self.null = NULL in allowed
        self.listed = frozenset(parse_origin(e) for e in allowed if e not in (ANY, NULL))

    def allows(self, origin: str | None, host_header: str | None) -> bool:
        """May a page of `origin` (the request's Origin header; None: not sent) use the
        signaling through a request sent to `host_header` (its Host header)?"""
        if origin is None:
            return True  # not a browser
        if origin == NULL:
            return self.null
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if self.any or parsed in self.listed:
            return True
        scheme, host, port = parsed
        if scheme not in DEFAULT_PORTS or not host_header:
            return False
        # A Host header without a port names the default port of the scheme the browser used.
        return _host_and_port(host_header, DEFAULT_PORTS[scheme]) == (host, port)

    def cors_headers(self, origin: str | None, host_header: str | None) -> dict[str, str]:
        """What a SockJS answer carries for `origin`: the origin itself, with credentials
        (sockjs-client's cross-origin XHRs are made withCredentials), if it is allowed;
        nothing otherwise -- never "*" (which browsers refuse with credentials anyway), and
        nothing for a request without Origin, which no browser reads cross-origin."""
        if origin is None or not self.allows(origin, host_header):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}
