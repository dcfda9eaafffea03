"""An HTTP request body read at the ASGI level with a bound, and answers that reach a client
still sending one.  Sans-framework: `receive` and `send` are the ASGI callables.

Quart reads a body on its own (up to its MAX_CONTENT_LENGTH, 16 MB, all kept) before a
handler can say no, and refuses a larger one by answering and closing at once: the client,
still sending, meets a reset and never reads the answer.  Here nothing beyond `limit` is
kept, and an answer given before the body was read whole goes out first, then the rest of
the body is read and dropped (for a bounded time and size) before the response ends, so the
close that follows is an orderly one.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# After an early answer, what a client may still send before the connection is dropped
# anyway (that client then sees the reset; one sending this much is not a SockJS client).
DRAIN_MAX_BYTES = 64 * 1024 * 1024


class BodyState(enum.Enum):
    COMPLETE = "complete"
    TOO_LARGE = "too large"
    TIMEOUT = "timeout"
    GONE = "gone"  # the client disconnected


@dataclass(frozen=True)
class Body:
    data: bytes | None  # the whole body, only when COMPLETE
    state: BodyState
    finished: bool  # nothing more will arrive (all read, or the client gone)


async def _next(receive: Receive, deadline: float) -> dict | None:
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        return None
    try:
        return await asyncio.wait_for(receive(), left)
    except TimeoutError:
        return None


async def read_body(receive: Receive, limit: int, declared: int | None, timeout_s: float) -> Body:
    """The request body if it has at most `limit` bytes and arrives within `timeout_s`.  A
    declared Content-Length over the limit is refused before a byte is read; a body that
    grows past it (chunked, or a Content-Length that lied) is refused as it does."""
    if declared is not None and declared > limit:
        return Body(None, BodyState.TOO_LARGE, False)
    deadline = asyncio.get_running_loop().time() + timeout_s
    data = bytearray()
    while True:
        message = await _next(receive, deadline)
        if message is None:
            return Body(None, BodyState.TIMEOUT, False)
        if message["type"] != "http.request":
            return Body(None, BodyState.GONE, True)
        data += message.get("body", b"")
        more = message.get("more_body", False)
        if len(data) > limit:
            return Body(None, BodyState.TOO_LARGE, not more)
        if not more:
            return Body(bytes(data), BodyState.COMPLETE, True)


async def drain(receive: Receive, timeout_s: float, max_bytes: int = DRAIN_MAX_BYTES) -> bool:
    """Read and drop the rest of the body; True if it ended (or the client left) within
    `timeout_s` and `max_bytes`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    seen = 0
    while seen <= max_bytes:
        message = await _next(receive, deadline)
        if message is None:
            return False
        if message["type"] != "http.request" or not message.get("more_body", False):
            return True
        seen += len(message.get("body", b""))
    return False


async def respond(
    send: Send,
    status: int,
    headers: dict[str, str],
    text: str,
    receive: Receive | None = None,
    drain_s: float = 0.0,
    max_bytes: int = DRAIN_MAX_BYTES,
) -> bool:
    """Send a complete text response.  With `receive`, the request body is still arriving:
    the answer goes out whole first (its length declared, so the client can read it while
    it sends), then the rest of the body is drained, then the response ends.

    False if the body did not end within `drain_s` and `max_bytes`: the response is then
    left unended and the caller must cut the connection off.  Ending it would wait for
    Hypercorn to queue the disconnect behind the body nobody takes any more (its queue of
    ten), and the client has had its answer anyway."""
    body = text.encode("utf-8")
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    if receive is None:
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return True
    await send({"type": "http.response.body", "body": body, "more_body": True})
    if not await drain(receive, drain_s, max_bytes):
        return False
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return True
