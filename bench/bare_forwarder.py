"""The bare Python forwarder of bench/relay.py: our relay's hot path and nothing else (no
TURN, no authentication, no permissions beyond one peer address), to show what Python on
uvloop allows before any TURN logic.

    python bench/bare_forwarder.py --transport udp|tcp|tls --port P --relays K --peer PORT
                                   [--cert FILE --key FILE]

The same work per packet as bench/forwarder.c, in the shape of turn/udp.py: `add_reader`
and `recvfrom_into` into a preallocated buffer, one dict lookup, one `sendto`.  The first
K distinct clients (UDP source addresses, or accepted TCP/TLS connections in order) each
get a relay socket; ChannelData from client i loses its 4-byte header and goes to the peer
from relay socket i, a datagram from the peer to relay socket i gains the header (channel
0x4000, padded to 4 on a stream) and goes to client i.  Prints "ready" once listening and
runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
import struct

import uvloop

CHANNEL = 0x4000
BUFFER = 65536
STREAM_BUFFER_LIMIT = 1 << 20  # bytes queued to a slow stream client before its frames are dropped


def udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


class UdpForwarder:
    """UDP clients: one listening socket, a relay socket per client address."""

    def __init__(self, loop, listen: socket.socket, relays: list[socket.socket], peer) -> None:
        self.loop, self.listen, self.peer = loop, listen, peer
        self.free = list(relays)
        self.relay_of: dict[tuple, socket.socket] = {}
        self.buffer = bytearray(BUFFER)
        self.view = memoryview(self.buffer)
        self.header = struct.Struct("!HH")
        loop.add_reader(listen.fileno(), self.from_clients)

    def from_clients(self) -> None:
        view = self.view
        for _ in range(64):  # a bounded burst, then the loop's other readers
            try:
                size, client = self.listen.recvfrom_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            relay = self.relay_of.get(client)
            if relay is None:
                if not self.free:
                    continue
                relay = self.free.pop(0)
                self.relay_of[client] = relay
                self.loop.add_reader(relay.fileno(), self.from_peer, relay, client)
            if size < 4 or self.buffer[0] >> 6 != 1:
                continue
            try:
                relay.sendto(view[4 : 4 + self.header.unpack_from(self.buffer)[1]], self.peer)
            except OSError:
                pass

    def from_peer(self, relay: socket.socket, client) -> None:
        buffer, view = self.buffer, self.view
        for _ in range(64):
            try:
                size, source = relay.recvfrom_into(view[4:])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if source != self.peer:
                continue
            self.header.pack_into(buffer, 0, CHANNEL, size)
            try:
                self.listen.sendto(view[: 4 + size], client)
            except OSError:
                pass


class StreamClient(asyncio.Protocol):
    """One TCP/TLS client and its relay socket."""

    def __init__(self, forwarder: StreamForwarder) -> None:
        self.forwarder = forwarder
        self.pending = bytearray()
        self.relay: socket.socket | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(BUFFER)

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.forwarder.free:
            transport.close()
            return
        self.relay = self.forwarder.free.pop(0)
        self.forwarder.loop.add_reader(self.relay.fileno(), self.from_peer)

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        pending += data
        offset, peer, relay = 0, self.forwarder.peer, self.relay
        while len(pending) - offset >= 4:
            length = (pending[offset + 2] << 8) | pending[offset + 3]
            channel_data = pending[offset] >> 6 == 1
            size = (4 + length + 3) & ~3 if channel_data else 20 + length
            if len(pending) - offset < size:
                break
            if channel_data and relay is not None:
                try:
                    relay.sendto(pending[offset + 4 : offset + 4 + length], peer)
                except OSError:
                    pass
            offset += size
        del pending[:offset]

    def from_peer(self) -> None:
        relay, transport = self.relay, self.transport
        assert relay is not None and transport is not None  # the reader is added with both set
        for _ in range(64):
            try:
                size, source = relay.recvfrom_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if source != self.forwarder.peer or transport.get_write_buffer_size() > STREAM_BUFFER_LIMIT:
                continue
            transport.write(struct.pack("!HH", CHANNEL, size) + self.buffer[:size] + b"\0" * (-size % 4))

    def connection_lost(self, exc) -> None:
        if self.relay is not None:
            self.forwarder.loop.remove_reader(self.relay.fileno())


class StreamForwarder:
    def __init__(self, loop, relays: list[socket.socket], peer) -> None:
        self.loop, self.free, self.peer = loop, list(relays), peer


async def serve(args) -> None:
    loop = asyncio.get_running_loop()
    peer = ("127.0.0.1", args.peer)
    relays = [udp_socket(0) for _ in range(args.relays)]
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
    if args.transport == "udp":
        UdpForwarder(loop, udp_socket(args.port), relays, peer)
    else:
        context = None
        if args.transport == "tls":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(args.cert, args.key)
        forwarder = StreamForwarder(loop, relays, peer)
        server = await loop.create_server(
            lambda: StreamClient(forwarder), "127.0.0.1", args.port, ssl=context, reuse_address=True
        )
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("ready", flush=True)
    await stopped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--relays", type=int, required=True)
    parser.add_argument("--peer", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
