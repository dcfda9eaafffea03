"""demux.sniff.classify: every kind, and every prefix length from 0 up (None until decidable)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from demux.sniff import SNIFF_BYTES, StreamKind, classify

COOKIE = b"\x21\x12\xa4\x42"
TXID = bytes(range(12))
REQUESTED_TRANSPORT_UDP = b"\x00\x19\x00\x04\x11\x00\x00\x00"
PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def real_client_hello() -> bytes:
    """The first flight of Python's own TLS client, as a TURN-over-TLS client would send it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="turn.example")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


# (stream, kind, the shortest prefix that decides it)
CASES: list[tuple[str, bytes, StreamKind, int]] = [
    ("tls 1.0 record", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), StreamKind.TLS, 2),
    ("tls 1.2 record", b"\x16\x03\x03\x00\x50\x01", StreamKind.TLS, 2),
    ("tls real ClientHello", real_client_hello(), StreamKind.TLS, 2),
    ("stun binding request", b"\x00\x01\x00\x00" + COOKIE + TXID, StreamKind.STUN, 8),
    (
        "stun allocate",
        b"\x00\x03\x00\x08" + COOKIE + TXID + REQUESTED_TRANSPORT_UDP,
        StreamKind.STUN,
        8,
    ),
    ("stun response class", b"\x01\x01\x00\x0c" + COOKIE + TXID, StreamKind.STUN, 8),
    # A STUN type whose first bytes look like a TLS record's: the TLS test comes first.
    ("stun type 0x1603 reads as tls", b"\x16\x03\x00\x00" + COOKIE + TXID, StreamKind.TLS, 2),
    ("proxy v1", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", StreamKind.PROXY_V1, 6),
    ("proxy v1 unknown", b"PROXY UNKNOWN\r\n", StreamKind.PROXY_V1, 6),
    ("proxy v2", PROXY_V2 + b"\x21\x11\x00\x0c" + bytes(12), StreamKind.PROXY_V2, 12),
    ("proxy v2 signature only", PROXY_V2, StreamKind.PROXY_V2, 12),
    ("http get", b"GET /imserver/demo/ HTTP/1.1\r\nHost: x\r\n\r\n", StreamKind.HTTP, 4),
    ("http post", b"POST /turn/get-turn-credentials HTTP/1.1\r\n", StreamKind.HTTP, 5),
    ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", StreamKind.HTTP, 4),
    ("http options", b"OPTIONS * HTTP/1.1\r\n", StreamKind.HTTP, 8),
    ("http propfind (PRO... is not PROXY)", b"PROPFIND / HTTP/1.1\r\n", StreamKind.HTTP, 9),
    ("http method PROXYX", b"PROXYX / HTTP/1.1\r\n", StreamKind.HTTP, 7),
    ("http 15-letter method", b"VERSION-CONTROL / HTTP/1.1\r\n", StreamKind.HTTP, 16),
    ("unknown: 16 uppercase letters", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", StreamKind.UNKNOWN, 16),
    ("unknown: lowercase method", b"get / HTTP/1.1\r\n", StreamKind.UNKNOWN, 1),
    ("unknown: leading space (could start a STUN header)", b" GET / HTTP/1.1\r\n", StreamKind.UNKNOWN, 5),
    ("unknown: digit in method", b"G3T / HTTP/1.1\r\n", StreamKind.UNKNOWN, 2),
    ("unknown: ssh banner", b"SSH-2.0-OpenSSH_9.6\r\n", StreamKind.UNKNOWN, 5),
    ("unknown: tls application data", b"\x17\x03\x03\x00\x10" + bytes(16), StreamKind.UNKNOWN, 5),
    ("unknown: not a tls version", b"\x16\x02\x00\x00\x00", StreamKind.UNKNOWN, 5),
    ("unknown: sslv2 hello", b"\x80\x2e\x01\x00\x02", StreamKind.UNKNOWN, 1),
    ("unknown: channel data", b"\x40\x00\x00\x04abcd", StreamKind.UNKNOWN, 1),
    ("unknown: stun with a wrong cookie", b"\x00\x01\x00\x00\x21\x12\xa4\x43" + TXID, StreamKind.UNKNOWN, 8),
    ("unknown: zeros", bytes(20), StreamKind.UNKNOWN, 5),
    ("unknown: proxy v2 with a wrong last byte", PROXY_V2[:11] + b"\x0b" + bytes(8), StreamKind.UNKNOWN, 12),
    ("unknown: proxy v1 lowercase", b"proxy TCP4 1.2.3.4", StreamKind.UNKNOWN, 1),
]


@pytest.mark.parametrize(("stream", "kind", "decided_at"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_prefix_is_undecided_until_decidable_then_decided(
    stream: bytes, kind: StreamKind, decided_at: int
) -> None:
    assert decided_at <= SNIFF_BYTES
    for length in range(len(stream) + 1):
        expected = kind if length >= decided_at else None
        assert classify(stream[:length]) == expected, f"prefix of {length} bytes"


def test_every_kind_is_covered() -> None:
    assert {case[2] for case in CASES} == set(StreamKind)


@given(st.binary(min_size=SNIFF_BYTES, max_size=40))
def test_sniff_bytes_always_decide(stream: bytes) -> None:
    assert classify(stream) is not None


@given(st.binary(max_size=40))
def test_a_decision_never_changes_with_more_bytes(stream: bytes) -> None:
    decisions = [classify(stream[:length]) for length in range(len(stream) + 1)]
    first = next((index for index, kind in enumerate(decisions) if kind is not None), None)
    if first is not None:
        assert set(decisions[first:]) == {decisions[first]}
        assert all(kind is None for kind in decisions[:first])
