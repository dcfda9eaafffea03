"""Where an edge connection goes once its TLS handshake is done (sans-I/O).

The edge serves TURN over TLS and the signaling's HTTPS/WSS on one port. After the
handshake a connection is routed by the ALPN protocol the client and the edge agreed
on: `stun.turn` (RFC 7443) is TURN, `h2` and `http/1.1` are HTTP. A client that named
no protocol the edge speaks (Chromium's TURN over TLS names none) is routed by the first
bytes it sends inside TLS: a STUN header (first two bits 0, the magic cookie at bytes
4-8) is TURN, anything else HTTP, where Hypercorn answers what is not a request with 400.
"""

from __future__ import annotations

import enum

from demux.sniff import SNIFF_BYTES, StreamKind, classify

TURN_ALPN = "stun.turn"  # RFC 7443 §4
HTTP_ALPNS = ("h2", "http/1.1")
# The edge's preference: OpenSSL picks the first of these the client offers too. TURN comes
# first because only a TURN client names it; every browser names h2 and http/1.1.
EDGE_ALPN_PROTOCOLS = [TURN_ALPN, *HTTP_ALPNS]

# The most decrypted bytes routing ever waits for: `classify` answers with this many.
FIRST_BYTES = SNIFF_BYTES


class Route(enum.Enum):
    """Where a connection went, and how that was decided (the label of its counter)."""

    TURN_ALPN = "turn_alpn"
    TURN_SNIFFED = "turn_sniffed"
    HTTP_ALPN = "http_alpn"
    HTTP_SNIFFED = "http_sniffed"

    @property
    def is_turn(self) -> bool:
        return self in (Route.TURN_ALPN, Route.TURN_SNIFFED)


def route_by_alpn(protocol: str | None) -> Route | None:
    """The route the negotiated ALPN protocol decides, or None: decide by the first bytes."""
    if protocol == TURN_ALPN:
        return Route.TURN_ALPN
    if protocol in HTTP_ALPNS:
        return Route.HTTP_ALPN
    return None


def route_by_first_bytes(prefix: bytes) -> Route | None:
    """The route the first decrypted bytes decide, or None while too few have arrived
    (never once there are FIRST_BYTES of them)."""
    kind = classify(prefix)
    if kind is None:
        return None
    return Route.TURN_SNIFFED if kind is StreamKind.STUN else Route.HTTP_SNIFFED
