"""Accepting on a shared TCP port: sniff each connection's first bytes, then hand it on.

`SniffingListener` accepts on a listening socket, and for each connection peeks (reads
with MSG_PEEK, leaving the bytes in the socket) until `sniff.classify` can tell what it
speaks. A PROXY header from a trusted peer is parsed and consumed, and the bytes after
it classified in turn; the consumer (`on_stream`) then gets the socket with its first
bytes still unread, so a TLS library or a protocol parser sees the stream from its start.

Hostile clients are the norm on a public port, so every connection is bounded:
- at most `max_pending` connections are being sniffed (or handed on) at once; one more
  is closed at once;
- the whole sniff, PROXY header included, has one deadline;
- a client that sends a prefix too short to decide and then waits would keep the socket
  readable forever (peeked bytes stay unread), so a level-triggered reader would spin:
  the socket is polled instead, with a backoff, until more bytes or the deadline;
- a PROXY header from a peer not in `trusted` closes the connection: anyone else could
  claim any address with it.
Every connection closed before `on_stream` is counted once, by reason (see `COUNTED`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ratelog import RateLimitedLog

from .proxy import MAX_PROXY_HEADER_BYTES, ProxyHeader, ProxyHeaderError, TrustedProxies, parse_proxy_header
from .sniff import SNIFF_BYTES, StreamKind, classify

log = logging.getLogger(__name__)

# The reasons `count` is called with. All but "accept_error" (an accept that failed:
# no connection) are a connection closed without reaching `on_stream`, or ("stream_error")
# one whose `on_stream` raised.
COUNTED = (
    "sniff_timeout",  # no decision before the deadline
    "sniff_overflow",  # max_pending connections were already pending
    "sniff_eof",  # the peer closed or reset before a decision
    "proxy_untrusted",  # a PROXY header from a peer not in trusted_proxies
    "proxy_malformed",  # a trusted peer's PROXY header was invalid (or a second one followed)
    "sniff_error",  # a bug: an unexpected exception while sniffing (logged)
    "stream_error",  # on_stream raised (logged)
    "accept_error",  # accept() failed, e.g. out of file descriptors
)

# Polling a socket whose peeked prefix could not decide: first wait, and the longest.
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.2
# After a failed accept: out of descriptors (or buffers) it takes a while for some to be
# freed; other errors (a connection reset in the backlog) get a short pause, so that a
# persistent one cannot spin the loop.
ACCEPT_EXHAUSTED_PAUSE_S = 0.1
ACCEPT_ERROR_PAUSE_S = 0.01
_RESOURCE_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PROXY_KINDS = frozenset({StreamKind.PROXY_V1, StreamKind.PROXY_V2})

_Decision = TypeVar("_Decision")


@dataclass(frozen=True)
class Sniffed:
    """A connection whose first bytes have been classified, handed to `on_stream`."""

    sock: socket.socket  # non-blocking; the first bytes still unread in it, any PROXY header consumed
    peer: tuple[str, int]  # the TCP peer
    client: tuple[str, int]  # the PROXY header's source if one was accepted, else peer
    proxied: bool  # client came from a PROXY header (False for LOCAL / UNKNOWN headers)
    kind: StreamKind  # of the bytes after any PROXY header (never PROXY_*)


# Takes ownership of sniffed.sock (closes it, or hands it to a transport).
OnStream = Callable[[Sniffed], Awaitable[None]]


class _Refused(Exception):
    """Close this connection before on_stream, counting `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SniffingListener:
    """Accepts on `sock` and hands each connection to `on_stream` once its kind is known."""

    def __init__(
        self,
        sock: socket.socket,
        on_stream: OnStream,
        trusted: TrustedProxies,
        count: Callable[[str], None],
        *,
        deadline_s: float = 10.0,
        max_pending: int = 1024,
    ) -> None:
        """`sock` is a bound, listening TCP socket; the listener owns it from now on
        (close() closes it). `count(reason)` is called for every connection closed
        before on_stream (reasons in COUNTED). `deadline_s` bounds the whole sniff;
        `max_pending` the connections being sniffed or inside on_stream at once."""
        self._sock = sock
        self._on_stream = on_stream
        self._trusted = trusted
        self._count = count
        self._deadline_s = deadline_s
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()  # sniffing or inside on_stream
        self._sniffing: set[asyncio.Task[None]] = set()  # still sniffing: close() cancels these
        self._accepting: asyncio.Task[None] | None = None
        self._closed = False
        self._failures = RateLimitedLog(log)

    @property
    def pending(self) -> int:
        """Connections being sniffed or inside on_stream now."""
        return len(self._pending)

    def start(self) -> None:
        """Begin accepting on the running event loop."""
        if self._accepting is not None or self._closed:
            raise RuntimeError("SniffingListener.start called twice or after close")
        self._sock.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever())
        # Closed once the task is done: after its pending accept is withdrawn from the loop,
        # and even when it is cancelled before it ever ran.
        self._accepting.add_done_callback(lambda _: self._sock.close())

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections still being sniffed
        are closed. Those already handed to on_stream are the consumer's."""
        if self._closed:
            return
        self._closed = True
        if self._accepting is None:
            self._sock.close()
        else:
            self._accepting.cancel()  # which then closes the socket (see start)
        for task in self._sniffing:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until, after close(), the listening socket and the sniffs are closed."""
        tasks = [*self._sniffing, *([self._accepting] if self._accepting is not None else [])]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, address = await loop.sock_accept(self._sock)
            except OSError as error:
                # The listener must outlive whatever accept() runs into, above all
                # running out of descriptors under a flood: count, pause, go on.
                self._count("accept_error")
                self._failures.warning(loop.time(), "accept failed on %s: %s", self._where(), error)
                exhausted = error.errno in _RESOURCE_EXHAUSTION
                await asyncio.sleep(ACCEPT_EXHAUSTED_PAUSE_S if exhausted else ACCEPT_ERROR_PAUSE_S)
                continue
            try:
                self._admit(loop, connection, (address[0], address[1]))
            except Exception:  # a bug (in count, say) must not end the accepting
                connection.close()
                self._failures.exception(loop.time(), "admitting a connection on %s failed", self._where())

    def _admit(
        self, loop: asyncio.AbstractEventLoop, connection: socket.socket, peer: tuple[str, int]
    ) -> None:
        if len(self._pending) >= self._max_pending:
            connection.close()
            self._count("sniff_overflow")
            return
        connection.setblocking(False)
        task = loop.create_task(self._serve(connection, peer))
        self._pending.add(task)
        self._sniffing.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._sniffing.discard(task)

    async def _serve(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(self._deadline_s):
                    sniffed = await self._sniff(connection, peer)
            except TimeoutError:
                raise _Refused("sniff_timeout") from None
        except _Refused as refused:
            connection.close()
            self._count(refused.reason)
            return
        except asyncio.CancelledError:
            connection.close()
            raise
        except Exception:
            connection.close()
            self._count("sniff_error")
            self._failures.exception(loop.time(), "sniffing a connection from %s failed", peer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._sniffing.discard(task)  # from here the connection is the consumer's
        try:
            await self._on_stream(sniffed)
        except Exception:
            connection.close()
            self._count("stream_error")
            self._failures.exception(
                loop.time(), "handling a %s stream from %s failed", sniffed.kind.value, peer
            )

    async def _sniff(self, connection: socket.socket, peer: tuple[str, int]) -> Sniffed:
        kind = await _peek_until_decided(connection, SNIFF_BYTES, classify)
        if kind not in _PROXY_KINDS:
            return Sniffed(connection, peer, peer, proxied=False, kind=kind)
        if peer[0] not in self._trusted:
            raise _Refused("proxy_untrusted")
        header = await _peek_until_decided(
            connection, MAX_PROXY_HEADER_BYTES, lambda data: self._parse_header(data, peer)
        )
        _consume(connection, header.length)
        kind = await _peek_until_decided(connection, SNIFF_BYTES, classify)
        if kind in _PROXY_KINDS:
            raise _Refused("proxy_malformed")  # one proxy, one header: a second is someone's trick
        client = header.source if header.source is not None else peer
        return Sniffed(connection, peer, client, proxied=header.source is not None, kind=kind)

    def _parse_header(self, data: bytes, peer: tuple[str, int]) -> ProxyHeader | None:
        try:
            return parse_proxy_header(data)
        except ProxyHeaderError as error:
            # The message names the fault, never the client's bytes: safe to log.
            now = asyncio.get_running_loop().time()
            self._failures.warning(now, "refused a PROXY header from %s: %s", peer, error)
            raise _Refused("proxy_malformed") from None

    def _where(self) -> str:
        try:
            return repr(self._sock.getsockname())
        except OSError:
            return "a closed socket"


async def _peek_until_decided(
    connection: socket.socket, want: int, decide: Callable[[bytes], _Decision | None]
) -> _Decision:
    """Peek at up to `want` bytes until `decide` returns something other than None
    (it must, given `want` bytes). The bytes stay unread in the socket."""
    delay = POLL_FIRST_S
    while True:
        await _readable(connection)
        try:
            data = connection.recv(want, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue  # a spurious wake-up: wait for readability again
        except OSError:
            raise _Refused("sniff_eof") from None  # reset by the peer
        if not data:
            raise _Refused("sniff_eof")
        decision = decide(data)
        if decision is not None:
            return decision
        if _peer_shut_down(connection):
            raise _Refused("sniff_eof")  # it sent a few bytes and closed: no more will come
        # The peeked bytes keep the socket readable, so waiting for readability would
        # return at once, again and again: poll for more instead, backing off.
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)


async def _readable(connection: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = connection.fileno()
    loop.add_reader(fd, _resolve, ready)
    try:
        await ready
    finally:
        # Before anyone else (a transport, a TLS wrapper) registers this descriptor.
        loop.remove_reader(fd)


def _resolve(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _consume(connection: socket.socket, length: int) -> None:
    """Read and drop exactly `length` bytes, all of them already peeked (so present)."""
    remaining = length
    while remaining:
        try:
            chunk = connection.recv(remaining)
        except OSError:
            raise _Refused("sniff_eof") from None
        if not chunk:
            raise _Refused("sniff_eof")
        remaining -= len(chunk)


if sys.platform == "linux":

    def _peer_shut_down(connection: socket.socket) -> bool:
        """Whether the peer has sent its FIN (or reset): peeking cannot tell, the bytes it
        sent before stay readable; POLLRDHUP can."""
        poller = select.poll()
        poller.register(connection.fileno(), select.POLLIN | select.POLLRDHUP)
        closed = select.POLLRDHUP | select.POLLHUP | select.POLLERR
        return any(events & closed for _, events in poller.poll(0))

else:

    def _peer_shut_down(connection: socket.socket) -> bool:
        """Not known on this platform: such a connection runs into the deadline instead."""
        return False
