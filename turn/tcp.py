"""TCP and TLS client connections (RFC 8656 §3.1, §12.5).

A stream carries STUN messages and ChannelData back to back; ChannelData is
padded to a multiple of four bytes on streams in both directions.  Each
connection is its own client 5-tuple: the connection object itself is the
allocation's client key, and closing the connection ends its allocation.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from .core import TurnCore
from .stun import plain_address

STUN_HEADER = 20
MAX_BUFFERED = 4 * 65536
# A connection that has not allocated by then is closed: holding sockets open
# without credentials must not be a way to exhaust the relay's descriptors.
UNALLOCATED_IDLE_S = 60.0


class StreamConnection(asyncio.Protocol):
    def __init__(self, core: TurnCore, transport_name: str,
                 connections: set, clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.transport_name = transport_name
        self.connections = connections
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.peer = ("", 0)
        self.opened_at = clock()
        self._buf = bytearray()

    # --------------------------------------------------------- asyncio

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = plain_address(transport.get_extra_info("peername"))
        self.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.connections.discard(self)
        self.core.client_gone(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        now = self.clock()
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            first = buf[pos]
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            if first < 0x40:
                total = STUN_HEADER + length
                if n - pos < total:
                    break
                reply = self.core.handle_stun(bytes(buf[pos:pos + total]), self, self.peer,
                                              self.transport_name, now)
                if reply is not None and self.transport is not None:
                    self.transport.write(reply)
            elif first <= 0x7F:    # ChannelData, see allocation.CHANNEL_MAX
                total = 4 + length + (-length & 3)
                if n - pos < total:
                    break
                self._relay_channel_data(buf, pos, length, now)
            else:
                # Neither STUN nor ChannelData: the stream has lost framing and
                # nothing after this point can be trusted.
                self.core.counters["malformed"] += 1
                self.close()
                return
            pos += total
        if pos:
            del buf[:pos]
        if len(buf) > MAX_BUFFERED:
            self.core.counters["malformed"] += 1
            self.close()

    # --------------------------------------------------------- relay paths

    def _relay_channel_data(self, buf: bytearray, pos: int, length: int, now: float) -> None:
        alloc = self.core.table.by_client.get(self)
        if alloc is None:
            return
        channel = alloc.channels.get((buf[pos] << 8) | buf[pos + 1])
        if channel is None or channel[1] <= now:
            return
        peer = channel[0]
        if alloc.permissions.get(peer[0], 0.0) <= now:
            return
        # The view must be released before the buffer is resized.
        with memoryview(buf) as view:
            try:
                alloc.relay.sock.sendto(view[pos + 4:pos + 4 + length], peer)
            except OSError:
                return
        traffic = self.core.traffic
        traffic.to_peer_packets += 1
        traffic.to_peer_bytes += length

    def send_channel_data(self, view: memoryview, size: int) -> None:
        """Write ChannelData already framed in `view[:size]`, padded to 4 bytes."""
        if self.transport is None:
            return
        pad = -size & 3
        self.transport.write(bytes(view[:size]) + b"\x00" * pad if pad else bytes(view[:size]))

    def send(self, message: bytes) -> None:
        if self.transport is not None:
            self.transport.write(message)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def close_idle_unallocated(connections: set, core: TurnCore, now: float) -> int:
    """Close connections that never allocated within UNALLOCATED_IDLE_S; returns how many."""
    idle = [c for c in connections
            if now - c.opened_at > UNALLOCATED_IDLE_S and core.table.get(c) is None]
    for conn in idle:
        conn.close()
    return len(idle)
