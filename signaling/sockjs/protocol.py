"""The SockJS protocol (0.3.x), sans-I/O: frames, payloads and one session's state.

A SockJS session outlives the HTTP requests that carry it: a polling client
makes a new request per batch, a streaming one reopens its stream after
128 KiB.  The session holds the messages waiting for the next receiving
request, knows whether a receiver is attached (a second one gets
c[2010,...]), and expires when no receiver has come back for
DISCONNECT_DELAY_S.
"""

from __future__ import annotations

import enum
import json
import re

from ..json_body import has_unpaired_surrogate, within_depth

HEARTBEAT_S = 25.0
DISCONNECT_DELAY_S = 5.0
STREAMING_LIMIT_BYTES = 128 * 1024
OPEN_FRAME = "o"
HEARTBEAT_FRAME = "h"
GO_AWAY = (3000, "Go away!")
ANOTHER_CONNECTION = (2010, "Another connection still open")

# Characters browsers or proxies may mangle inside a JSON string: escaped as \uXXXX
# (the SockJS protocol's JSONEncoding rule); everything else, Chinese included,
# travels as UTF-8.
_ESCAPE = re.compile(
    "[\x00-\x1f\u007f-\u009f\u00ad\u0600-\u0604\u070f\u17b4\u17b5"
    "\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufeff\ufff0-\uffff\ud800-\udfff]"
)


def quote(text: str) -> str:
    body = json.dumps(text, ensure_ascii=False)
    return _ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", body)


def message_frame(messages: list[str]) -> str:
    return "a[" + ",".join(quote(m) for m in messages) + "]"


def close_frame(code: int, reason: str) -> str:
    return f"c[{code},{quote(reason)}]"


class PayloadError(ValueError):
    pass


def decode_payload(text: str) -> list[str]:
    """A client's send: a JSON array of strings (or one JSON string)."""
    if not text:
        raise PayloadError("Payload expected.")
    # A payload is a string or an array of strings: anything nested is broken, and
    # parsing thousands of levels of it would raise RecursionError (a 500 with a traceback).
    if not within_depth(text, 1):
        raise PayloadError("Broken JSON encoding.")
    try:
        value = json.loads(text)
    except ValueError:
        raise PayloadError("Broken JSON encoding.") from None
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not all(isinstance(m, str) for m in value)
        or has_unpaired_surrogate(text, value)
    ):
        raise PayloadError("Broken JSON encoding.")
    return value


class State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class SockJSSession:
    def __init__(self, session_id: str, now: float) -> None:
        self.id = session_id
        self.state = State.NEW
        self.queue: list[str] = []
        self.attached = False
        self.last_seen = now
        self.close_reason = GO_AWAY

    def attach(self, now: float) -> bool:
        """A receiving request arrives; False if another one is already attached."""
        if self.attached:
            return False
        self.attached = True
        self.last_seen = now
        return True

    def detach(self, now: float) -> None:
        self.attached = False
        self.last_seen = now

    def first_frame(self) -> str | None:
        """The open frame, for the session's first receiver only."""
        if self.state is State.NEW:
            self.state = State.OPEN
            return OPEN_FRAME
        return None

    def send(self, message: str) -> None:
        if self.state is not State.CLOSED:
            self.queue.append(message)

    def drain(self) -> str | None:
        """The queued messages as one frame, or None."""
        if not self.queue:
            return None
        frame = message_frame(self.queue)
        self.queue = []
        return frame

    def close(self, reason: tuple[int, str] = GO_AWAY) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = reason

    def expired(self, now: float) -> bool:
        return not self.attached and now - self.last_seen > DISCONNECT_DELAY_S
