"""PROXY protocol v1 and v2 headers (sans-I/O), and which peers may send them.

A load balancer in front of the appliance opens its own TCP connection to us, so the
peer address we see is the balancer's. With the PROXY protocol
(https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt) it first writes one
header naming the real client. `parse_proxy_header` reads that header from the start
of a stream; `TrustedProxies` says whose headers to believe: anyone else could name any
address they like, so a header from an untrusted peer must close the connection.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .sniff import PROXY_V1_SIGNATURE, PROXY_V2_SIGNATURE

# v1: the longest line the spec allows, CRLF included ("PROXY UNKNOWN" with two full
# IPv6 addresses and two ports). A line without its CRLF by then is invalid.
MAX_PROXY_V1_BYTES = 107
# v2: 16 fixed bytes and a length-prefixed block. The length field allows 64 KiB, but
# real balancers send the addresses and a few TLVs (AWS, Azure, GCP: well under 1 KiB);
# a bound keeps a hostile header from holding that much per pending connection.
MAX_PROXY_V2_BLOCK = 2048
MAX_PROXY_HEADER_BYTES = 16 + MAX_PROXY_V2_BLOCK

_V2_FIXED = struct.Struct("!12sBBH")  # signature, version|command, family|protocol, length
_V2_VERSION = 0x2
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM = 0x0, 0x1, 0x2
# Bytes of the address block each family needs (two addresses, then two ports for IP).
_V2_ADDRESS_BYTES = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

# Decimal, no leading zeros (the spec forbids them so nobody reads them as octal).
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # dots: an IPv4-mapped tail (::ffff:1.2.3.4)


class ProxyHeaderError(ValueError):
    """A malformed PROXY header. The message names what is wrong, never the client's bytes."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete, valid PROXY header at the start of a stream."""

    length: int  # bytes the header takes at the stream's start
    source: tuple[str, int] | None  # the client; None for LOCAL / UNKNOWN (use the peer)
    destination: tuple[str, int] | None


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the PROXY header (v1 or v2) at the start of `data`.

    Returns None while `data` is a valid but incomplete start of a header (read more,
    up to `MAX_PROXY_HEADER_BYTES`: by then there is always an answer); raises
    ProxyHeaderError when it is not a valid header. Bytes after the header are ignored.
    """
    if data.startswith(PROXY_V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(PROXY_V1_SIGNATURE):
        return _parse_v1(data)
    if PROXY_V2_SIGNATURE.startswith(data) or PROXY_V1_SIGNATURE.startswith(data):
        return None
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    window = data[:MAX_PROXY_V1_BYTES]
    end = _v1_line_end(window)
    if end is None:
        if len(window) >= MAX_PROXY_V1_BYTES:
            raise ProxyHeaderError(f"PROXY v1 line without CRLF in its first {MAX_PROXY_V1_BYTES} bytes")
        return None
    fields = window[:end].split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        # The spec: the receiver ignores whatever follows UNKNOWN up to the CRLF.
        return ProxyHeader(length=end + 2, source=None, destination=None)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError("PROXY v1 line does not have 6 single-space separated fields")
    version = 4 if protocol == b"TCP4" else 6
    source_ip, destination_ip = (_v1_address(field, version) for field in fields[2:4])
    source_port, destination_port = (_v1_port(field) for field in fields[4:6])
    return ProxyHeader(
        length=end + 2, source=(source_ip, source_port), destination=(destination_ip, destination_port)
    )


def _v1_line_end(window: bytes) -> int | None:
    """Where the CRLF of a v1 line starts, None if not seen yet; raises on bytes no line has."""
    for index, byte in enumerate(window):
        if byte == 0x0D:  # CR: must be followed by LF
            if index + 1 == len(window):
                return None
            if window[index + 1] != 0x0A:
                raise ProxyHeaderError("PROXY v1 line has a CR without LF")
            return index
        if not 0x20 <= byte <= 0x7E:  # a bare LF, a control or a non-ASCII byte
            raise ProxyHeaderError("PROXY v1 line has a byte that is not printable US-ASCII")
    return None


def _v1_address(field: bytes, version: int) -> str:
    pattern = _V1_IPV4 if version == 4 else _V1_IPV6
    if not pattern.fullmatch(field):
        raise ProxyHeaderError(f"PROXY v1 address is not an IPv{version} address")
    try:
        # The pattern already kept out scope ids (%eth0); ipaddress rejects IPv4 octets
        # with leading zeros and out of range, and malformed IPv6.
        address = ipaddress.ip_address(field.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address is not an IPv{version} address") from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY v1 address is not an IPv{version} address")
    return _address_text(address)


def _v1_port(field: bytes) -> int:
    if not _V1_PORT.fullmatch(field) or int(field) > 0xFFFF:
        raise ProxyHeaderError("PROXY v1 port is not a decimal number 0-65535")
    return int(field)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED.size:
        return None
    _, version_command, family_protocol, block_length = _V2_FIXED.unpack_from(data)
    if version_command >> 4 != _V2_VERSION:
        raise ProxyHeaderError("PROXY v2 header has a version other than 2")
    command = version_command & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError("PROXY v2 header has an unassigned command")
    if block_length > MAX_PROXY_V2_BLOCK:
        raise ProxyHeaderError(f"PROXY v2 header is longer than {MAX_PROXY_HEADER_BYTES} bytes")
    family, protocol = family_protocol >> 4, family_protocol & 0x0F
    if command == _V2_PROXY:
        # LOCAL (a balancer's health check) ignores the family byte; PROXY must make sense.
        if family not in _V2_ADDRESS_BYTES or protocol not in (_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM):
            raise ProxyHeaderError("PROXY v2 header has an unassigned address family or protocol")
        if block_length < _V2_ADDRESS_BYTES[family]:
            raise ProxyHeaderError("PROXY v2 address block is shorter than its address family needs")
    length = _V2_FIXED.size + block_length
    if len(data) < length:
        return None
    if command == _V2_LOCAL or protocol != _PROTO_STREAM or family not in (_AF_INET, _AF_INET6):
        # LOCAL, UNSPEC, UNIX sockets, datagrams: the spec lets a receiver fall back to the
        # connection's own endpoints. The rest of the block (TLVs) is skipped unread.
        return ProxyHeader(length=length, source=None, destination=None)
    source, destination = _v2_addresses(data[_V2_FIXED.size : length], family)
    return ProxyHeader(length=length, source=source, destination=destination)


def _v2_addresses(block: bytes, family: int) -> tuple[tuple[str, int], tuple[str, int]]:
    size = 4 if family == _AF_INET else 16
    source_ip = _address_text(ipaddress.ip_address(block[:size]))
    destination_ip = _address_text(ipaddress.ip_address(block[size : 2 * size]))
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
    return (source_ip, source_port), (destination_ip, destination_port)


def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as getpeername writes it: compressed, and an IPv4-mapped IPv6 address
    with its IPv4 tail dotted (str() of one changed between Python versions)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


class TrustedProxies:
    """The peers (IP addresses or CIDR ranges) whose PROXY headers are believed."""

    def __init__(self, networks: Iterable[str]) -> None:
        """Raises ValueError for an entry that is not an address or a network."""
        self._networks = tuple(ipaddress.ip_network(network, strict=False) for network in networks)

    def __contains__(self, host: str) -> bool:
        """Whether `host` (an address as getpeername gives it) is in a trusted network.

        A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6 (::ffff:a.b.c.d):
        those match IPv4 networks too. Anything that is not an address is not trusted.
        """
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(
            candidate in network
            for network in self._networks
            for candidate in candidates
            if candidate.version == network.version
        )

    def __bool__(self) -> bool:
        """Whether any network is configured."""
        return bool(self._networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(network) for network in self._networks]!r})"
