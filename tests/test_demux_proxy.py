"""demux.proxy: PROXY protocol v1/v2 headers (HAProxy's proxy-protocol.txt) and trusted peers."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from demux.proxy import (
    MAX_PROXY_HEADER_BYTES,
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    parse_proxy_header,
)

V2 = b"\r\n\r\n\x00\r\nQUIT\n"
FULL_IPV6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def v2(version_command: int, family_protocol: int, block: bytes, declared: int | None = None) -> bytes:
    length = len(block) if declared is None else declared
    return V2 + struct.pack("!BBH", version_command, family_protocol, length) + block


def ipv4_block(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(destination).packed
        + struct.pack("!HH", source_port, destination_port)
    )


def ipv6_block(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (
        ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address(destination).packed
        + struct.pack("!HH", source_port, destination_port)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


# (name, header bytes, what it parses to); each is complete at its last byte.
VALID: list[tuple[str, bytes, ProxyHeader]] = [
    (
        "v1 spec example",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(47, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    (
        "v1 TCP4 longest (56 bytes)",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(56, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        "v1 TCP4 port 0",
        b"PROXY TCP4 0.0.0.0 10.0.0.1 0 3478\r\n",
        ProxyHeader(36, ("0.0.0.0", 0), ("10.0.0.1", 3478)),
    ),
    (
        "v1 TCP6 longest (104 bytes)",
        f"PROXY TCP6 {FULL_IPV6} {FULL_IPV6} 65535 65535\r\n".encode(),
        ProxyHeader(104, (FULL_IPV6, 65535), (FULL_IPV6, 65535)),
    ),
    (
        "v1 TCP6 compressed, upper case",
        b"PROXY TCP6 2001:DB8::1 ::1 40000 443\r\n",
        ProxyHeader(38, ("2001:db8::1", 40000), ("::1", 443)),
    ),
    (
        "v1 TCP6 IPv4-mapped",
        b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:192.0.2.1 5000 443\r\n",
        ProxyHeader(55, ("::ffff:192.0.2.7", 5000), ("::ffff:192.0.2.1", 443)),
    ),
    ("v1 UNKNOWN short form (15 bytes)", b"PROXY UNKNOWN\r\n", ProxyHeader(15, None, None)),
    (
        "v1 UNKNOWN worst case (107 bytes)",
        f"PROXY UNKNOWN {FULL_IPV6} {FULL_IPV6} 65535 65535\r\n".encode(),
        ProxyHeader(107, None, None),
    ),
    ("v1 UNKNOWN ignores what follows", b"PROXY UNKNOWN whatever it says\r\n", ProxyHeader(32, None, None)),
    (
        "v2 PROXY TCP over IPv4",
        v2(0x21, 0x11, ipv4_block("203.0.113.9", "10.0.0.1", 51000, 443)),
        ProxyHeader(28, ("203.0.113.9", 51000), ("10.0.0.1", 443)),
    ),
    (
        "v2 PROXY TCP over IPv6",
        v2(0x21, 0x21, ipv6_block("2001:db8::9", "2001:db8::1", 51000, 3478)),
        ProxyHeader(52, ("2001:db8::9", 51000), ("2001:db8::1", 3478)),
    ),
    (
        "v2 PROXY TCP over IPv6, IPv4-mapped",
        v2(0x21, 0x21, ipv6_block("::ffff:203.0.113.9", "::ffff:10.0.0.1", 51000, 3478)),
        ProxyHeader(52, ("::ffff:203.0.113.9", 51000), ("::ffff:10.0.0.1", 3478)),
    ),
    (
        "v2 PROXY TCP over IPv4 with TLVs (ALPN, authority, AWS VPC endpoint) skipped",
        v2(
            0x21,
            0x11,
            ipv4_block("198.51.100.4", "10.0.0.1", 1, 2)
            + tlv(0x01, b"h2")
            + tlv(0x02, b"turn.example")
            + tlv(0xEA, b"\x01vpce-0123456789abcdef"),
        ),
        ProxyHeader(16 + 12 + 5 + 15 + 25, ("198.51.100.4", 1), ("10.0.0.1", 2)),
    ),
    (
        "v2 PROXY with the largest block allowed",
        v2(0x21, 0x11, ipv4_block("198.51.100.4", "10.0.0.1", 1, 2) + tlv(0x04, bytes(2048 - 12 - 3))),
        ProxyHeader(MAX_PROXY_HEADER_BYTES, ("198.51.100.4", 1), ("10.0.0.1", 2)),
    ),
    ("v2 LOCAL (health check)", v2(0x20, 0x00, b""), ProxyHeader(16, None, None)),
    (
        "v2 LOCAL with an address block: ignored",
        v2(0x20, 0x11, ipv4_block("198.51.100.4", "10.0.0.1", 1, 2)),
        ProxyHeader(28, None, None),
    ),
    ("v2 LOCAL ignores even an unassigned family", v2(0x20, 0xFF, b""), ProxyHeader(16, None, None)),
    ("v2 PROXY AF_UNSPEC", v2(0x21, 0x00, b""), ProxyHeader(16, None, None)),
    ("v2 PROXY AF_UNSPEC with TLVs", v2(0x21, 0x00, tlv(0x05, b"id")), ProxyHeader(21, None, None)),
    (
        "v2 PROXY UDP over IPv4: the peer is used",
        v2(0x21, 0x12, ipv4_block("198.51.100.4", "10.0.0.1", 1, 2)),
        ProxyHeader(28, None, None),
    ),
    (
        "v2 PROXY IPv4 with UNSPEC protocol: the peer is used",
        v2(0x21, 0x10, ipv4_block("198.51.100.4", "10.0.0.1", 1, 2)),
        ProxyHeader(28, None, None),
    ),
    ("v2 PROXY UNIX stream: the peer is used", v2(0x21, 0x31, bytes(216)), ProxyHeader(232, None, None)),
]


@pytest.mark.parametrize(("header", "parsed"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_a_valid_header_is_incomplete_until_its_last_byte(header: bytes, parsed: ProxyHeader) -> None:
    assert parsed.length == len(header)
    for length in range(len(header)):
        assert parse_proxy_header(header[:length]) is None, f"prefix of {length} bytes"
    assert parse_proxy_header(header) == parsed


@pytest.mark.parametrize(("header", "parsed"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_the_bytes_after_the_header_are_left_alone(header: bytes, parsed: ProxyHeader) -> None:
    assert parse_proxy_header(header + b"\x16\x03\x01\x00\x05PROXY \r\n") == parsed


V1_NO_CRLF = b"PROXY UNKNOWN " + b"f" * (107 - 14)

# (name, bytes, the shortest prefix that is refused; None: only the whole of it)
MALFORMED: list[tuple[str, bytes, int | None]] = [
    ("v1 without CRLF within 107 bytes", V1_NO_CRLF, 107),
    ("v1 CRLF at bytes 107-108", V1_NO_CRLF[:106] + b"\r\n", 107),
    ("v1 bare LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", None),
    ("v1 CR without LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", 32),
    ("v1 a tab", b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", 11),
    ("v1 a NUL", b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n", 19),
    ("v1 non-ASCII", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2é\r\n".encode(), 31),
    ("v1 empty protocol", b"PROXY \r\n", None),
    ("v1 protocol TCP5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", None),
    ("v1 protocol lower case", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", None),
    ("v1 UNKNOWN with a suffix", b"PROXY UNKNOWNX\r\n", None),
    ("v1 two spaces", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", None),
    ("v1 a field missing", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", None),
    ("v1 a field too many", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", None),
    ("v1 trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", None),
    ("v1 octet over 255", b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n", None),
    ("v1 octet with a leading zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", None),
    ("v1 three octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", None),
    ("v1 IPv6 in TCP4", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", None),
    ("v1 IPv4 in TCP6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", None),
    ("v1 IPv6 with a scope id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", None),
    ("v1 IPv6 not hex", b"PROXY TCP6 ::g ::1 1 2\r\n", None),
    ("v1 IPv6 two double colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", None),
    ("v1 a host name", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", None),
    ("v1 port 65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", None),
    ("v1 port with a leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", None),
    ("v1 port with a sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", None),
    ("v1 negative port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", None),
    ("v1 port with an underscore", b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", None),
    ("v1 port in hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", None),
    ("v2 version 1", v2(0x11, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), 16),
    ("v2 version 3", v2(0x31, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), 16),
    ("v2 version 0", v2(0x01, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), 16),
    ("v2 unassigned command", v2(0x22, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), 16),
    ("v2 unassigned family", v2(0x21, 0x41, bytes(12)), 16),
    ("v2 unassigned protocol", v2(0x21, 0x13, bytes(12)), 16),
    ("v2 length over the bound", v2(0x21, 0x11, bytes(2049)), 16),
    ("v2 length 65535 (refused at once)", v2(0x21, 0x11, b"", declared=0xFFFF), 16),
    ("v2 IPv4 block of 11 bytes", v2(0x21, 0x11, bytes(11)), 16),
    ("v2 IPv6 block of 12 bytes", v2(0x21, 0x21, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), 16),
    ("v2 IPv6 block of 35 bytes", v2(0x21, 0x21, bytes(35)), 16),
    ("v2 UNIX block of 100 bytes", v2(0x21, 0x31, bytes(100)), 16),
    ("not a header: HTTP", b"GET / HTTP/1.1\r\n", 1),
    ("not a header: TLS", b"\x16\x03\x01", 1),
    ("not a header: PROXY lower case", b"proxy TCP4", 1),
    ("not a header: broken v2 signature", V2[:6] + b"\x00", 7),
]


@pytest.mark.parametrize(("data", "refused_at"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_header_is_refused_as_soon_as_it_shows(data: bytes, refused_at: int | None) -> None:
    refused_at = len(data) if refused_at is None else refused_at
    for length in range(refused_at):
        assert parse_proxy_header(data[:length]) is None, f"prefix of {length} bytes"
    for length in (refused_at, len(data)):
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(data[:length])


def test_error_messages_carry_no_client_bytes() -> None:
    attempts = [
        b"PROXY TCP4 EVIL.1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 EVIL::1 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 EVIL 2\r\n",
        b"PROXY EVIL\r\n",
        b"PROXY EVIL\x1b[2J",
        b"EVIL",
    ]
    for data in attempts:
        with pytest.raises(ProxyHeaderError) as refused:
            parse_proxy_header(data)
        assert "EVIL" not in str(refused.value) and "\x1b" not in str(refused.value)


@given(st.sampled_from([b"PROXY ", V2]), st.binary(min_size=MAX_PROXY_HEADER_BYTES))
def test_the_bound_always_decides(signature: bytes, rest: bytes) -> None:
    data = (signature + rest)[:MAX_PROXY_HEADER_BYTES]
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    assert header is not None and header.length <= MAX_PROXY_HEADER_BYTES


@given(st.binary(max_size=64))
def test_random_bytes_after_a_signature_never_escape_as_another_exception(rest: bytes) -> None:
    for signature in (b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2, V2 + b"\x21\x11", V2 + b"\x21\x21"):
        try:
            parse_proxy_header(signature + rest)
        except ProxyHeaderError:
            pass


def test_trusted_proxies_match_addresses_and_networks() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"])
    assert trusted
    for host in ("10.1.2.3", "192.0.2.7", "2001:db8::42", "::1", "::ffff:10.9.8.7", "::ffff:192.0.2.7"):
        assert host in trusted, host
    for host in ("11.0.0.1", "192.0.2.8", "2001:db9::1", "127.0.0.1", "::ffff:11.0.0.1", "", "localhost"):
        assert host not in trusted, host


def test_trusted_proxies_normalise_networks_and_refuse_nonsense() -> None:
    assert "10.255.0.1" in TrustedProxies(["10.0.0.1/8"])  # host bits set: the network still counts
    assert "fe80::1%eth0" in TrustedProxies(["fe80::/10"])  # getpeername's scoped link-local form
    with pytest.raises(ValueError):
        TrustedProxies(["not-a-network"])


def test_no_trusted_proxies_trust_nobody() -> None:
    nobody = TrustedProxies([])
    assert not nobody
    assert "127.0.0.1" not in nobody and "::1" not in nobody
