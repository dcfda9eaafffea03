"""STUN message codec (RFC 8489) with the TURN attributes of RFC 8656.

Pure functions over bytes: no sockets, no clocks.  Parsing is strict about
the header and attribute framing (anything else is not STUN and is dropped by
the caller) and lazy about attribute values: a value is decoded only when a
handler asks for it, so garbage attributes cost nothing until they are used.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E

# Methods (RFC 8489 §18.2, RFC 8656 §17).
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Classes.
REQUEST = 0b00
INDICATION = 0b01
SUCCESS = 0b10
ERROR = 0b11

# Attributes.
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
ADDITIONAL_ADDRESS_FAMILY = 0x8000
ADDRESS_ERROR_CODE = 0x8001
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
ICMP = 0x8004
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C

# Comprehension-required attributes this server understands; any other type
# below 0x8000 in a request is answered with 420 (RFC 8489 §6.3.1).
UNDERSTOOD_REQUIRED = frozenset(
    {
        MAPPED_ADDRESS,
        USERNAME,
        MESSAGE_INTEGRITY,
        ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        CHANNEL_NUMBER,
        LIFETIME,
        XOR_PEER_ADDRESS,
        DATA_ATTR,
        REALM,
        NONCE,
        XOR_RELAYED_ADDRESS,
        REQUESTED_ADDRESS_FAMILY,
        EVEN_PORT,
        REQUESTED_TRANSPORT,
        DONT_FRAGMENT,
        XOR_MAPPED_ADDRESS,
        RESERVATION_TOKEN,
        # ICE attributes (RFC 8445) that a client may put on a Binding request.
        PRIORITY,
        USE_CANDIDATE,
    }
)

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}

Address = tuple[str, int]


class StunParseError(ValueError):
    """The bytes are not a well-formed STUN message."""


class BadAttribute(ValueError):
    """An attribute is present but its value is malformed (answered with 400)."""


def message_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def split_type(mtype: int) -> tuple[int, int]:
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = ((mtype >> 4) & 0b01) | ((mtype >> 7) & 0b10)
    return method, cls


def fingerprint_value(data: bytes) -> int:
    return binascii.crc32(data) ^ FINGERPRINT_XOR


@dataclass
class Message:
    """A parsed STUN message.

    `attrs` keeps the first occurrence of each attribute type (RFC 8489 says
    later duplicates are ignored); `items` keeps every (type, value) in wire
    order, for attributes that may repeat (XOR-PEER-ADDRESS in
    CreatePermission) and to report unknown comprehension-required ones.
    `integrity_offset` is where MESSAGE-INTEGRITY starts in `raw`, or -1.
    """

    method: int
    cls: int
    transaction_id: bytes
    attrs: dict[int, bytes]
    items: list[tuple[int, bytes]]
    raw: bytes
    integrity_offset: int = -1
    has_fingerprint: bool = False

    def get(self, attr: int) -> bytes | None:
        return self.attrs.get(attr)

    def unknown_required(self) -> list[int]:
        return [t for t, _ in self.items if t < 0x8000 and t not in UNDERSTOOD_REQUIRED]

    def get_all(self, attr: int) -> list[bytes]:
        return [v for t, v in self.items if t == attr]

    # Typed attribute values, for the attributes the relay acts on.  Each is None when
    # the attribute is absent and raises BadAttribute when its value is malformed; the
    # handler decides which error code that deserves.

    def lifetime(self) -> int | None:
        """LIFETIME in seconds (RFC 8656 §18.2)."""
        raw = self.attrs.get(LIFETIME)
        return None if raw is None else u32(raw)

    def requested_transport(self) -> int | None:
        """The IP protocol number REQUESTED-TRANSPORT asks for, 17 for UDP (RFC 8656 §18.11)."""
        return _first_byte_of_word(self.attrs.get(REQUESTED_TRANSPORT), "REQUESTED-TRANSPORT")

    def requested_address_family(self) -> int | None:
        """FAMILY_IPV4 or FAMILY_IPV6, or whatever other family byte was sent (RFC 8656 §18.8)."""
        return _first_byte_of_word(self.attrs.get(REQUESTED_ADDRESS_FAMILY), "REQUESTED-ADDRESS-FAMILY")

    def even_port(self) -> bool | None:
        """EVEN-PORT: None when absent, else whether its R bit asks for the next port to be
        reserved too (RFC 8656 §18.9)."""
        raw = self.attrs.get(EVEN_PORT)
        if raw is None:
            return None
        if len(raw) != 1:
            raise BadAttribute("EVEN-PORT is not 1 byte")
        return bool(raw[0] & 0x80)

    def reservation_token(self) -> bytes | None:
        """RESERVATION-TOKEN as sent.  Its length is not checked: a token of any other
        length is simply one the relay never issued."""
        return self.attrs.get(RESERVATION_TOKEN)

    def channel_number(self) -> int | None:
        """CHANNEL-NUMBER (RFC 8656 §18.1); the range is the handler's to check."""
        raw = self.attrs.get(CHANNEL_NUMBER)
        if raw is None:
            return None
        if len(raw) != 4:
            raise BadAttribute("CHANNEL-NUMBER is not 4 bytes")
        return (raw[0] << 8) | raw[1]

    def xor_peer_address(self) -> Address | None:
        """The first XOR-PEER-ADDRESS."""
        raw = self.attrs.get(XOR_PEER_ADDRESS)
        return None if raw is None else xor_address(raw, self.transaction_id)

    def xor_peer_addresses(self) -> Iterator[Address]:
        """Every XOR-PEER-ADDRESS in wire order, each decoded only when reached: a handler
        that refuses the first peer answers that before a later one is even looked at."""
        return (xor_address(raw, self.transaction_id) for raw in self.get_all(XOR_PEER_ADDRESS))

    def data(self) -> bytes | None:
        """DATA (RFC 8656 §18.4)."""
        return self.attrs.get(DATA_ATTR)

    def verify_integrity(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY (HMAC-SHA1) against `key` (RFC 8489 §14.5)."""
        off = self.integrity_offset
        if off < 0:
            return False
        # The HMAC covers the header with its length adjusted to end just after
        # MESSAGE-INTEGRITY, then every byte before the attribute.
        head = self.raw[:2] + struct.pack("!H", off - HEADER_LENGTH + 24) + self.raw[4:off]
        expected = hmac.new(key, head, hashlib.sha1).digest()
        return hmac.compare_digest(expected, self.raw[off + 4 : off + 24])


def parse(data: bytes) -> Message:
    """Parse one STUN message; raise StunParseError if it is not one."""
    n = len(data)
    if n < HEADER_LENGTH:
        raise StunParseError("shorter than a STUN header")
    mtype, length = struct.unpack_from("!HH", data, 0)
    if mtype & 0xC000:
        raise StunParseError("top two bits are not zero")
    if data[4:8] != MAGIC_COOKIE_BYTES:
        raise StunParseError("no magic cookie")
    if length & 3 or HEADER_LENGTH + length != n:
        raise StunParseError("length does not match the datagram")
    method, cls = split_type(mtype)
    attrs: dict[int, bytes] = {}
    items: list[tuple[int, bytes]] = []
    integrity_offset = -1
    has_fingerprint = False
    pos = HEADER_LENGTH
    while pos < n:
        if pos + 4 > n:
            raise StunParseError("truncated attribute header")
        atype, alen = struct.unpack_from("!HH", data, pos)
        start = pos + 4
        end = start + alen
        if end > n:
            raise StunParseError("attribute overruns the message")
        if has_fingerprint:
            raise StunParseError("attribute after FINGERPRINT")
        value = data[start:end]
        if atype == FINGERPRINT:
            if alen != 4 or struct.unpack("!I", value)[0] != fingerprint_value(
                data[:2] + struct.pack("!H", end - HEADER_LENGTH) + data[4:pos]
            ):
                raise StunParseError("bad FINGERPRINT")
            has_fingerprint = True
        elif integrity_offset < 0:
            # Attributes after MESSAGE-INTEGRITY (other than FINGERPRINT) are
            # ignored, RFC 8489 §14.5.
            items.append((atype, value))
            if atype not in attrs:
                attrs[atype] = value
            if atype == MESSAGE_INTEGRITY:
                if alen != 20:
                    raise StunParseError("MESSAGE-INTEGRITY is not 20 bytes")
                integrity_offset = pos
        pos = end + (-alen & 3)
    if pos != n:
        raise StunParseError("attribute padding overruns the message")
    return Message(method, cls, data[8:20], attrs, items, data, integrity_offset, has_fingerprint)


# ---------------------------------------------------------------- values


def xor_address(value: bytes, transaction_id: bytes) -> Address:
    """Decode an XOR-*-ADDRESS value into (ip string, port)."""
    if len(value) < 4 or value[0] != 0:
        raise BadAttribute("malformed address")
    family = value[1]
    port = struct.unpack_from("!H", value, 2)[0] ^ (MAGIC_COOKIE >> 16)
    if family == FAMILY_IPV4 and len(value) == 8:
        raw = struct.unpack_from("!I", value, 4)[0] ^ MAGIC_COOKIE
        return str(ipaddress.IPv4Address(raw)), port
    if family == FAMILY_IPV6 and len(value) == 20:
        mask = MAGIC_COOKIE_BYTES + transaction_id
        raw = bytes(a ^ b for a, b in zip(value[4:20], mask, strict=True))
        return str(ipaddress.IPv6Address(raw)), port
    raise BadAttribute("malformed address")


def address_family(ip: str) -> int:
    return FAMILY_IPV6 if ":" in ip else FAMILY_IPV4


def encode_xor_address(addr: Address, transaction_id: bytes) -> bytes:
    ip, port = addr
    xport = port ^ (MAGIC_COOKIE >> 16)
    if ":" in ip:
        packed = ipaddress.IPv6Address(ip).packed
        mask = MAGIC_COOKIE_BYTES + transaction_id
        return struct.pack("!BBH", 0, FAMILY_IPV6, xport) + bytes(
            a ^ b for a, b in zip(packed, mask, strict=True)
        )
    raw = int(ipaddress.IPv4Address(ip)) ^ MAGIC_COOKIE
    return struct.pack("!BBHI", 0, FAMILY_IPV4, xport, raw)


def _first_byte_of_word(value: bytes | None, name: str) -> int | None:
    """The leading byte of a 4-byte attribute whose other three are RFFU."""
    if value is None:
        return None
    if len(value) != 4:
        raise BadAttribute(f"{name} is not 4 bytes")
    return value[0]


def u32(value: bytes) -> int:
    if len(value) != 4:
        raise BadAttribute("expected a 32-bit value")
    number: int = struct.unpack("!I", value)[0]
    return number


def text(value: bytes, limit: int = 763) -> str:
    """Decode a UTF-8 text attribute (USERNAME, REALM, NONCE...)."""
    if len(value) > limit:
        raise BadAttribute("text attribute too long")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadAttribute("text attribute is not UTF-8") from None


def encode_error(code: int, reason: str | None = None) -> bytes:
    reason = REASONS.get(code, "Error") if reason is None else reason
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()


def decode_error(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise BadAttribute("malformed ERROR-CODE")
    return (value[2] & 0x7) * 100 + value[3], value[4:].decode("utf-8", "replace")


# ---------------------------------------------------------------- encoding


@dataclass
class Builder:
    """Accumulates attributes and serialises a message.

    Integrity and fingerprint are computed over the bytes as they stand, so
    they must be added last, in that order (`encode(key, fingerprint)`).
    """

    method: int
    cls: int
    transaction_id: bytes
    parts: list[bytes] = field(default_factory=list)

    def add(self, atype: int, value: bytes) -> Builder:
        pad = -len(value) & 3
        self.parts.append(struct.pack("!HH", atype, len(value)) + value + b"\x00" * pad)
        return self

    def encode(self, key: bytes | None = None, fingerprint: bool = False) -> bytes:
        body = b"".join(self.parts)
        mtype = message_type(self.method, self.cls)
        head = struct.pack("!HH", mtype, len(body)) + MAGIC_COOKIE_BYTES + self.transaction_id
        if key is not None:
            covered = struct.pack("!HH", mtype, len(body) + 24) + head[4:] + body
            mac = hmac.new(key, covered, hashlib.sha1).digest()
            body += struct.pack("!HH", MESSAGE_INTEGRITY, 20) + mac
        if fingerprint:
            covered = struct.pack("!HH", mtype, len(body) + 8) + head[4:] + body
            body += struct.pack("!HHI", FINGERPRINT, 4, fingerprint_value(covered))
        return struct.pack("!HH", mtype, len(body)) + head[4:] + body


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 §9.2.2: MD5(username ":" realm ":" password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def plain_address(addr: tuple[Any, ...]) -> Address:
    """(ip, port) of a socket address, IPv4-mapped IPv6 shown as IPv4.

    A dual-stack listener bound to "::" sees IPv4 clients as ::ffff:a.b.c.d;
    their XOR-MAPPED-ADDRESS and nonce binding must use the IPv4 they have.
    """
    ip = addr[0]
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:], addr[1]
    return ip, addr[1]
