"""Which protocol a stream speaks, from its first bytes (sans-I/O).

One listening port can carry TLS, plain STUN/TURN over TCP, HTTP and PROXY
protocol headers: each starts with bytes no other one starts with. `classify`
looks at a prefix and says which, or None while the prefix is too short to tell;
it never needs more than `SNIFF_BYTES` bytes, so a caller that has that many
always gets an answer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class StreamKind(enum.Enum):
    TLS = "tls"
    STUN = "stun"
    HTTP = "http"
    PROXY_V1 = "proxy_v1"
    PROXY_V2 = "proxy_v2"
    UNKNOWN = "unknown"


# The longest prefix any test below needs: an HTTP method of up to 15 letters and its space.
SNIFF_BYTES = 16

PROXY_V1_SIGNATURE = b"PROXY "
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
_TLS_HANDSHAKE_RECORD = b"\x16\x03"  # content type 22 (handshake), major version 3 (SSL 3.0 .. TLS 1.3)
_METHOD_FIRST = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_METHOD_REST = _METHOD_FIRST | frozenset(b"-_")  # e.g. VERSION-CONTROL (WebDAV)
_MAX_METHOD_LENGTH = SNIFF_BYTES - 1

# A test answers True (it is this kind), False (it cannot be) or None (not enough bytes yet).
_Test = Callable[[bytes], bool | None]


def _starts_with(signature: bytes) -> _Test:
    def test(prefix: bytes) -> bool | None:
        seen = prefix[: len(signature)]
        if not signature.startswith(seen):
            return False
        return True if len(seen) == len(signature) else None

    return test


def _is_stun(prefix: bytes) -> bool | None:
    # RFC 8489 §5: the two most significant bits of every STUN message are zero, and
    # bytes 4-8 hold the magic cookie.
    if prefix and prefix[0] & 0xC0:
        return False
    return _starts_with(STUN_MAGIC_COOKIE)(prefix[4:8]) if len(prefix) > 4 else None


def _is_http(prefix: bytes) -> bool | None:
    # A request line starts with an uppercase method token and a space; the HTTP/2
    # preface ("PRI * HTTP/2.0") has that shape too.
    for index, byte in enumerate(prefix[: _MAX_METHOD_LENGTH + 1]):
        if byte == 0x20:
            return index > 0
        if byte not in (_METHOD_FIRST if index == 0 else _METHOD_REST):
            return False
    return False if len(prefix) > _MAX_METHOD_LENGTH else None


# In order of precedence: "PROXY " is also method-shaped, and a TLS record and a PROXY v2
# signature both have the two high bits of a STUN message clear.
_TESTS: tuple[tuple[StreamKind, _Test], ...] = (
    (StreamKind.PROXY_V2, _starts_with(PROXY_V2_SIGNATURE)),
    (StreamKind.PROXY_V1, _starts_with(PROXY_V1_SIGNATURE)),
    (StreamKind.TLS, _starts_with(_TLS_HANDSHAKE_RECORD)),
    (StreamKind.STUN, _is_stun),
    (StreamKind.HTTP, _is_http),
)


def classify(prefix: bytes) -> StreamKind | None:
    """The kind of stream that starts with `prefix`, or None if more bytes are needed.

    A prefix of `SNIFF_BYTES` bytes or more always gets a kind (UNKNOWN when no test
    matches). The first kind in precedence order that is not ruled out decides: if its
    test is still undecided the answer is None, even when a later one already matches.
    """
    for kind, test in _TESTS:
        verdict = test(prefix)
        if verdict is None:
            return None
        if verdict:
            return kind
    return StreamKind.UNKNOWN
