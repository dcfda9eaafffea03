"""STOMP frames and their wire form (STOMP 1.0, 1.1, 1.2).

Outgoing frames are written the way every client we serve can read them: LF
line ends (the legacy stomp-websocket 2.3 cannot parse CRLF), a
content-length on every body, UTF-8 text, header values escaped as the
negotiated version says (never in CONNECTED, per the 1.2 specification).
Whatever the version, no header leaves with a raw line break or NUL in it: a
value that cannot be escaped (CONNECTED's, or a CR under 1.1, which has no
escape for it) is refused rather than allowed to forge a header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import overload

SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
CLIENT_COMMANDS = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)

_ESCAPE_11 = {"\\": "\\\\", "\n": "\\n", ":": "\\c"}
_ESCAPE_12 = {**_ESCAPE_11, "\r": "\\r"}
_UNESCAPE_11 = {"\\": "\\", "n": "\n", "c": ":"}
_UNESCAPE_12 = {**_UNESCAPE_11, "r": "\r"}
_UNSENDABLE = ("\n", "\r", "\x00")  # would end the header line, or the frame


class FrameError(ValueError):
    """A frame breaks the protocol; the message is safe to show the client."""


@dataclass
class Frame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    @overload
    def get(self, name: str, default: str | None) -> str | None: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)


def escape(value: str, version: str) -> str:
    if version == "1.0":
        # 1.0 has no escaping: a newline would end the header, so it is dropped.
        return value.replace("\n", " ").replace("\r", " ")
    table = _ESCAPE_12 if version == "1.2" else _ESCAPE_11
    if not any(c in value for c in table):
        return value
    return "".join(table.get(c, c) for c in value)


def unescape(value: str, version: str) -> str:
    if version == "1.0" or "\\" not in value:
        return value
    table = _UNESCAPE_12 if version == "1.2" else _UNESCAPE_11
    out = []
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == "\\":
            if i + 1 >= n or value[i + 1] not in table:
                raise FrameError(f"undefined escape sequence in header {value[:40]!r}")
            out.append(table[value[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def encode(frame: Frame, version: str) -> bytes:
    """The frame's bytes: command, escaped headers, content-length, body, NUL."""
    escape_headers = frame.command not in ("CONNECTED", "CONNECT", "STOMP")
    lines = [frame.command]
    for name, value in frame.headers.items():
        if name == "content-length":
            continue
        if escape_headers:
            name, value = escape(name, version), escape(value, version)
        if any(c in name or c in value for c in _UNSENDABLE):
            raise FrameError(f"{frame.command} header {name[:40]!r} would carry a line break")
        lines.append(f"{name}:{value}")
    if frame.body or frame.command in ("MESSAGE", "ERROR", "SEND"):
        lines.append(f"content-length:{len(frame.body)}")
    return ("\n".join(lines) + "\n\n").encode() + frame.body + b"\x00"
