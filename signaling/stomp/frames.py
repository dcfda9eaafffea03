"""STOMP frames and their wire form (STOMP 1.0, 1.1, 1.2).

Outgoing frames are written the way every client we serve can read them: LF
line ends (the legacy stomp-websocket 2.3 cannot parse CRLF), a
content-length on every body, UTF-8 text, header values escaped as the
negotiated version says (never in CONNECTED, per the 1.2 specification).
Whatever the version, no header leaves with a raw line break or NUL in it: a
value that cannot be escaped (CONNECTED's, or a CR under 1.1, which has no
escape for it) is refused rather than allowed to forge a header.

Incoming bytes go through `FrameParser`, the incremental parser. It takes bytes
as they arrive -- several frames in one WebSocket message, one frame over
several (stomp-websocket 2.3 splits at 16 KiB), heart-beat EOLs between frames,
LF or CRLF line ends, bodies delimited by content-length (which may contain NUL
bytes) or by the first NUL -- and returns whole frames. Every limit is checked
before the bytes are kept, so a client can hold at most one frame's worth of
memory.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, overload

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


# ------------------------------------------------------------ the incremental parser


class Heartbeat(enum.Enum):
    """Returned once for a run of EOLs between frames (a one-member enum: a typed marker)."""

    HEARTBEAT = "heartbeat"


HEARTBEAT: Final = Heartbeat.HEARTBEAT


@dataclass(frozen=True)
class ParserLimits:
    max_frame_bytes: int = 65536
    max_headers: int = 64
    max_header_line_bytes: int = 8192


class FrameParser:
    def __init__(
        self, limits: ParserLimits = ParserLimits(), commands: frozenset[str] = CLIENT_COMMANDS
    ) -> None:
        """`commands`: the frames this side may receive (a server parses client commands)."""
        self.limits = limits
        self.commands = commands
        self.version = "1.2"  # how header values are unescaped; set on CONNECT
        self._buf = bytearray()
        # The frame being received: (raw headers, body start, version read with, Frame) once
        # its headers are complete, and how far its buffer has been searched.
        self._head: tuple[bytes, int, str, Frame] | None = None
        self._scanned = 0

    def feed(self, data: bytes) -> list[Frame | Heartbeat]:
        """Frames (and HEARTBEAT markers) completed by `data`; FrameError on a violation.

        Linear in what arrives: the searches for the end of the headers and for the body's
        NUL resume where the last feed left off, and a frame's headers are parsed once (a
        frame sent a byte at a time used to be rescanned from its start on every byte)."""
        self.add(data)
        out: list[Frame | Heartbeat] = []
        while True:
            item = self.next()
            if item is None:
                return out
            out.append(item)

    def add(self, data: bytes) -> None:
        """Data to parse; `next` takes the frames out of it one at a time."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a frame."""
        return len(self._buf)

    def next(self) -> Frame | Heartbeat | None:
        """The next frame (or HEARTBEAT marker) of what was added, or None until more comes;
        FrameError on a violation."""
        buf = self._buf
        if self._head is None:
            start = 0
            n = len(buf)
            while start < n and buf[start] in (0x0A, 0x0D):
                if buf[start] == 0x0D and (start + 1 >= n or buf[start + 1] != 0x0A):
                    if start + 1 >= n:
                        break  # a lone CR may be the start of CRLF
                    raise FrameError("stray carriage return between frames")
                start += 1
            if start:
                del buf[:start]
                return HEARTBEAT
            if not buf:
                return None
            head_end, body_start = self._find_header_end(buf, self._scanned)
            if head_end < 0:
                self._check_size(len(buf))
                self._scanned = max(0, len(buf) - 2)  # a marker may straddle the feeds
                return None
            self._head = (
                bytes(buf[:head_end]),
                body_start,
                self.version,
                self._parse_head(bytes(buf[:head_end])),
            )
            self._scanned = body_start
        head, body_start, version, frame = self._head
        if version != self.version:  # CONNECT came in between: re-read them
            frame = self._parse_head(head)
            self._head = (head, body_start, self.version, frame)
        length = frame.headers.get("content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 9:
                raise FrameError(f"bad content-length {length[:20]!r}")
            end = body_start + int(length)
            self._check_size(end + 1)
            if len(buf) < end + 1:
                return None
            if buf[end] != 0:
                raise FrameError("frame body is not followed by NUL")
        else:
            end = buf.find(b"\x00", self._scanned)
            if end < 0:
                self._check_size(len(buf))
                self._scanned = len(buf)
                return None
            self._check_size(end + 1)
        frame.body = bytes(buf[body_start:end])
        del buf[: end + 1]
        self._head = None
        self._scanned = 0
        return frame

    def _check_size(self, size: int) -> None:
        if size > self.limits.max_frame_bytes:
            raise FrameError(f"frame larger than {self.limits.max_frame_bytes} bytes")

    @staticmethod
    def _find_header_end(buf: bytearray, start: int) -> tuple[int, int]:
        """(end of the header block, start of the body), or (-1, -1) if incomplete; the
        search starts at `start`."""
        best = (-1, -1)
        for marker in (b"\n\n", b"\n\r\n"):
            i = buf.find(marker, start)
            if i >= 0 and (best[0] < 0 or i < best[0]):
                best = (i, i + len(marker))
        return best

    def _parse_head(self, head: bytes) -> Frame:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("frame headers are not UTF-8") from None
        if "\x00" in text:
            # No header may hold a NUL: echoed in a RECEIPT or MESSAGE it would end the frame.
            raise FrameError("NUL in frame headers")
        lines = text.split("\n")
        command = lines[0].rstrip("\r")
        if command not in self.commands:
            raise FrameError(f"unknown command {command[:32]!r}")
        if len(lines) - 1 > self.limits.max_headers:
            raise FrameError(f"more than {self.limits.max_headers} headers")
        # CONNECT headers are never escaped (STOMP 1.2, "Value Encoding").
        version = "1.0" if command in ("CONNECT", "STOMP") else self.version
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if len(line) > self.limits.max_header_line_bytes:
                raise FrameError(f"header line longer than {self.limits.max_header_line_bytes} bytes")
            line = line[:-1] if line.endswith("\r") else line
            if "\r" in line:
                # Only an EOL may hold a raw CR (1.2 escapes one in a value as \r, 1.1 has no
                # way to write one); kept, it would come back out in a RECEIPT or MESSAGE.
                raise FrameError("carriage return inside a header line")
            name, sep, value = line.partition(":")
            if not sep:
                raise FrameError(f"header line without ':' {line[:40]!r}")
            name, value = unescape(name, version), unescape(value, version)
            headers.setdefault(name, value)  # the first occurrence wins
        return Frame(command, headers)
