"""Where the edge sends a connection after its TLS handshake (appliance.process.edge.route):
the ALPN protocol decides when there is one it speaks; otherwise the first decrypted
bytes do, STUN to TURN and everything else to HTTP (Hypercorn answers junk with 400)."""

from __future__ import annotations

import struct

import pytest

from appliance.process.edge.route import (
    EDGE_ALPN_PROTOCOLS,
    FIRST_BYTES,
    Route,
    route_by_alpn,
    route_by_first_bytes,
)

COOKIE = b"\x21\x12\xa4\x42"
ALLOCATE = struct.pack("!HH", 0x0003, 0) + COOKIE + bytes(12)
BINDING = struct.pack("!HH", 0x0001, 8) + COOKIE + bytes(12) + bytes(8)


@pytest.mark.parametrize(
    "protocol, route",
    [
        ("stun.turn", Route.TURN_ALPN),
        ("http/1.1", Route.HTTP_ALPN),
        ("h2", Route.HTTP_ALPN),
        (None, None),  # no ALPN (Chromium's TURN over TLS): the first bytes decide
        ("", None),
        ("spdy/3", None),  # never negotiated (not in our list), but never trusted either
    ],
)
def test_alpn_decides_when_it_names_a_protocol_the_edge_speaks(protocol, route):
    assert route_by_alpn(protocol) is route


@pytest.mark.parametrize(
    "prefix, route",
    [
        (ALLOCATE, Route.TURN_SNIFFED),
        (BINDING, Route.TURN_SNIFFED),
        (ALLOCATE[:8], Route.TURN_SNIFFED),  # the cookie is all it takes
        (b"GET /imserver/ws HTTP/1.1\r\n", Route.HTTP_SNIFFED),
        (b"POST /imserver/sockjs/1/a/xhr_send", Route.HTTP_SNIFFED),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Route.HTTP_SNIFFED),  # h2 with prior knowledge
        (b"\xff" * 16, Route.HTTP_SNIFFED),  # junk: Hypercorn's 400
        (b"get / HTTP/1.1\r\n", Route.HTTP_SNIFFED),
        (b"\x16\x03\x01\x02\x00", Route.HTTP_SNIFFED),  # TLS inside TLS: junk to HTTP
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Route.HTTP_SNIFFED),  # too late for PROXY
        (b"\x40\x00\x00\x04abcd", Route.HTTP_SNIFFED),  # ChannelData cannot open a TURN stream
        (b"", None),
        (b"GE", None),
        (ALLOCATE[:5], None),
        (b"\x00\x01\x00\x08\x21\x12", None),
    ],
)
def test_without_alpn_the_first_bytes_decide(prefix, route):
    assert route_by_first_bytes(prefix) is route


def test_first_bytes_always_decide_within_the_bound():
    for first in range(256):
        assert route_by_first_bytes(bytes([first]) + b"A" * (FIRST_BYTES - 1)) is not None
        assert route_by_first_bytes(bytes([first]) * FIRST_BYTES) is not None


def test_turn_is_preferred_when_a_client_offers_it_with_http():
    # OpenSSL takes the server's first protocol the client offers too.
    assert EDGE_ALPN_PROTOCOLS[0] == "stun.turn" and set(EDGE_ALPN_PROTOCOLS[1:]) == {"h2", "http/1.1"}
    assert Route.TURN_SNIFFED.is_turn and Route.TURN_ALPN.is_turn
    assert not Route.HTTP_ALPN.is_turn and not Route.HTTP_SNIFFED.is_turn
