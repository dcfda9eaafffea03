"""UDP I/O for the relay: the client-facing listener and the relay ports.

This is the hot path.  Both directions read with `loop.add_reader` +
`recvfrom_into` a preallocated buffer (asyncio's DatagramProtocol allocates a
`bytes` per datagram and measured 4-6x slower here).
A ChannelData packet from a client costs a 4-byte header read, two dict
lookups (the allocation, then its channel's route: the relay rule's answer,
allocation.py) and a `sendto`; a datagram from a peer costs a route lookup and a
send through the allocation's `ClientLink`, and is received at offset 4 of the
buffer so its ChannelData header is written in front of it without a copy.
Bandwidth caps cost one `is not None` test per packet when off (the
allocation's meters are None) and one token-bucket charge each when on.
What an allocation relayed is counted on it (allocation.py): a relay port adds
its whole batch to its one allocation at the end of a drain, as the node-wide
counters are added; the listener, whose consecutive datagrams come from any
client, adds two integers to the packet's allocation per packet.
Everything that is not ChannelData goes to the sans-I/O core.

Reads are drained in bounded batches so one busy socket cannot starve the
others on the loop.  Nothing here logs per packet.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from . import stun
from .allocation import Allocation, RelayPort
from .core import TurnCore
from .stun import Address

# A relay port, and the next one when it was reserved too (allocation.RelayOpener.open).
RelayPorts = tuple[RelayPort, RelayPort | None]

MAX_DATAGRAM = 65535
READ_BATCH = 64
LISTENER_BUFFER_BYTES = 4 * 1024 * 1024
# Enough to ride out a scheduling hiccup at media rates; the kernel only
# commits memory for datagrams actually queued (and caps it by udp_mem).
RELAY_BUFFER_BYTES = 512 * 1024
PORT_TRIES = 64
# Out of descriptors or kernel memory: no other port would fare better, so the
# Allocate is refused (508) at once instead of trying PORT_TRIES ports.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_WARNING_INTERVAL_S = 10.0

log = logging.getLogger("turn")


class OutOfSockets(Exception):
    """A relay socket could not be made for want of descriptors or kernel memory."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.errno)
        self.code = cause.errno or 0  # never 0: raised only for one of RESOURCE_ERRNOS


def _set_buffers(sock: socket.socket, size: int) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass  # the kernel caps it at net.core.[rw]mem_max; the cap is fine


def open_udp_listener(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        _set_buffers(sock, LISTENER_BUFFER_BYTES)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpClientLink:
    """A UDP client (allocation.ClientLink): datagrams from the listener's socket to the
    address the client sends from, which is also its allocation's key."""

    __slots__ = ("sock", "key", "address")
    transport_name = "udp"

    def __init__(self, sock: socket.socket, source: tuple[Any, ...]) -> None:
        self.sock = sock
        self.key = source  # as recvfrom gave it: what the listener looks up
        self.address = stun.plain_address(source)

    def send_channel_data(self, view: memoryview, size: int) -> bool:
        try:
            self.sock.sendto(view[:size], self.key)
        except OSError:
            return False
        return True

    def send_data_indication(self, message: bytes) -> bool:
        try:
            self.sock.sendto(message, self.key)
        except OSError:
            return False
        return True


class UdpListener:
    """Client-facing UDP socket: STUN to the core, ChannelData straight to peers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        core: TurnCore,
        sock: socket.socket,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.loop = loop
        self.core = core
        self.sock = sock
        self.clock = clock
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self.dropped = 0

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _on_readable(self) -> None:
        # The safety net of the I/O loop: a bug here must not leave asyncio logging a
        # traceback per datagram (add_reader callbacks' exceptions go to the loop's
        # handler, unbounded) while the rest of the batch waits.  Free when nothing raises.
        try:
            self._drain()
        except Exception:
            self.core.internal_error(self.clock(), "udp_listener")

    def _drain(self) -> None:
        sock, buf, view = self.sock, self._buf, self._view
        # Source address (a UdpClientLink's key) -> Allocation: the AllocationTable's dict.
        allocations = self.core.table.by_client
        now = self.clock()
        packets = octets = throttled = 0
        for _ in range(READ_BATCH):
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. an ICMP error queued on the socket
            first = buf[0] if n else 0xFF
            if 0x40 <= first <= 0x7F:  # see allocation.CHANNEL_MAX
                # ChannelData (RFC 8656 §12.4): the relay's fast path.
                alloc = allocations.get(addr)
                length = (buf[2] << 8) | buf[3] if n >= 4 else MAX_DATAGRAM
                if alloc is None or 4 + length > n:
                    self.dropped += 1
                    continue
                route = alloc.channel_routes.get((first << 8) | buf[1])
                if route is None or route[1] <= now:  # "the relay rule", allocation.py
                    self.dropped += 1
                    continue
                peer = route[0]
                meter = alloc.to_peer_meter
                if meter is not None and not meter.take(length, now):
                    throttled += 1
                    continue
                try:
                    alloc.relay.sock.sendto(view[4 : 4 + length], peer)
                except OSError:
                    self.dropped += 1
                    continue
                packets += 1
                octets += length
                alloc.to_peer_packets += 1
                alloc.to_peer_bytes += length
            elif first < 0x40 and n >= stun.HEADER_LENGTH:
                reply = self.core.handle_stun(bytes(view[:n]), UdpClientLink(sock, addr), now)
                if reply is not None:
                    try:
                        sock.sendto(reply, addr)
                    except OSError:
                        self.dropped += 1
            else:
                self.core.counters["malformed"] += 1
        if packets:
            traffic = self.core.traffic
            traffic.to_peer_packets += packets
            traffic.to_peer_bytes += octets
        if throttled:
            self.core.counters["bandwidth_dropped_to_peer"] += throttled


class UdpRelayPort:
    """One allocation's relay socket; peers' datagrams go to its client."""

    __slots__ = ("loop", "sock", "address", "allocation", "owner", "_fd")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, owner: UdpRelayOpener) -> None:
        self.loop = loop
        self.sock = sock
        self.address = sock.getsockname()[:2]
        self.allocation: Allocation | None = None
        self.owner = owner
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._on_readable)

    def sendto(self, data: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            self.sock.close()
            self.owner.release(self.address[1])
            self._fd = -1

    def _on_readable(self) -> None:
        try:  # see UdpListener._on_readable
            self._drain()
        except Exception:
            self.owner.core.internal_error(self.owner.clock(), "relay_port")

    def _drain(self) -> None:
        owner = self.owner
        buf, view, sock = owner.buf, owner.view, self.sock
        into = owner.into
        now = owner.clock()
        packets = octets = throttled = 0
        # Read once: nothing a drain calls ends or claims an allocation (the core does that
        # on requests and timers), so the whole batch is this one's.
        alloc = self.allocation
        for _ in range(READ_BATCH):
            try:
                n, addr = sock.recvfrom_into(into)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if alloc is None:
                continue  # a reserved port (EVEN-PORT R bit) not yet claimed
            peer = addr if len(addr) == 2 else addr[:2]
            route = alloc.peer_routes.get(peer)  # "the relay rule", allocation.py
            if route is not None and route[1] > now:
                number = route[0]
            elif alloc.permits(peer[0], now):
                number = 0  # no live channel: a Data indication
            else:
                owner.dropped += 1
                continue
            meter = alloc.to_client_meter
            if meter is not None and not meter.take(n, now):
                throttled += 1
                continue
            if number:
                buf[0] = number >> 8
                buf[1] = number & 0xFF
                buf[2] = n >> 8
                buf[3] = n & 0xFF
                sent = alloc.client.send_channel_data(view, 4 + n)
            else:
                sent = alloc.client.send_data_indication(
                    owner.core.data_indication(alloc, peer, bytes(view[4 : 4 + n]))
                )
            if not sent:
                owner.dropped += 1
                continue
            packets += 1
            octets += n
        if packets and alloc is not None:
            traffic = owner.core.traffic
            traffic.to_client_packets += packets
            traffic.to_client_bytes += octets
            alloc.to_client_packets += packets
            alloc.to_client_bytes += octets
        if throttled:
            owner.core.counters["bandwidth_dropped_to_client"] += throttled


class UdpRelayOpener:
    """Binds relay ports in the configured range (the core's RelayOpener).

    Several worker processes draw from the same range; a port another worker
    holds just fails to bind and the next candidate is tried.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        core_ref: Callable[[], TurnCore],
        relay_ips: dict[int, str],
        port_range: tuple[int, int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.loop = loop
        self._core_ref = core_ref
        self.relay_ips = relay_ips
        self.low, self.high = port_range
        self.clock = clock
        self.buf = bytearray(MAX_DATAGRAM + 4)
        self.view = memoryview(self.buf)
        self.into = self.view[4:]
        self.in_use: set[int] = set()
        self.dropped = 0
        self._random = random.Random()
        self._resource_warned_at = float("-inf")

    @property
    def core(self) -> TurnCore:
        return self._core_ref()

    def release(self, port: int) -> None:
        self.in_use.discard(port)

    def _bind(self, ip: str, port: int) -> socket.socket | None:
        if port in self.in_use or not self.low <= port <= self.high:
            return None
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise OutOfSockets(exc) from exc
            raise
        try:
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return None
            if exc.errno in RESOURCE_ERRNOS:
                raise OutOfSockets(exc) from exc
            raise
        sock.setblocking(False)
        _set_buffers(sock, RELAY_BUFFER_BYTES)
        self.in_use.add(port)
        return sock

    def open(self, family: int, even_port: bool, reserve_next: bool) -> RelayPorts | None:
        """(port, reserved port or None), or None when no port can be had: the core
        answers 508.  Running out of descriptors is counted apart (relay_fd_exhausted)
        so an operator can tell it from a full port range."""
        ip = self.relay_ips.get(family)
        if ip is None:
            return None
        try:
            return self._open(ip, even_port, reserve_next)
        except OutOfSockets as exc:
            self._out_of_sockets(exc.code)
            return None

    def _open(self, ip: str, even_port: bool, reserve_next: bool) -> RelayPorts | None:
        for _ in range(PORT_TRIES):
            port = self._random.randint(self.low, self.high)
            if even_port:
                port &= ~1
            sock = self._bind(ip, port)
            if sock is None:
                continue
            reserved = None
            if reserve_next:
                try:
                    second = self._bind(ip, port + 1)
                except BaseException:
                    sock.close()
                    self.release(port)
                    raise
                if second is None:
                    sock.close()
                    self.release(port)
                    continue
                reserved = UdpRelayPort(self.loop, second, self)
            return UdpRelayPort(self.loop, sock, self), reserved
        return None

    def _out_of_sockets(self, code: int) -> None:
        counters = self.core.counters
        counters["relay_fd_exhausted"] += 1
        now = self.clock()
        if now - self._resource_warned_at >= RESOURCE_WARNING_INTERVAL_S:
            self._resource_warned_at = now
            log.warning(
                "cannot open a relay socket (%s): Allocates are answered 508 until "
                "descriptors or memory free up (%d so far; raise the open-files limit?)",
                os.strerror(code),
                counters["relay_fd_exhausted"],
            )
