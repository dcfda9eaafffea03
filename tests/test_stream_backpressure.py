"""Write backpressure on TCP/TLS client connections (turn/tcp.py).

A client that does not read must stop being read, must not make the relay
queue relayed data past a budget, and is aborted (not closed: close() waits for
a flush that never comes) once its output has been stalled for the deadline.
The connection logic runs against a fake transport on a float clock; the
node's periodic sweep runs against real loopback connections.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct

import pytest

from turn import stun
from turn.core import RelaySettings
from turn.node import IDLE_CHECK_S, Endpoint, NodeSettings, RelayNode
from turn.tcp import (
    OUTPUT_BUDGET_BYTES,
    PAUSE_AT_BYTES,
    STALLED_WRITE_S,
    UNALLOCATED_IDLE_S,
    StreamConnection,
    abort_stalled,
    close_idle_unallocated,
)

from .netports import free_port_pair
from .test_relay_io import AllowAll, Clock, make_cert
from .turn_fakes import REALM, SECRET, T0, make_core


class FakeTransport:
    """Queues writes until `drain()`, pausing and resuming its protocol as asyncio does."""

    def __init__(self) -> None:
        self.protocol: StreamConnection | None = None
        self.queued = 0
        self.writes: list[bytes] = []
        self.high = self.low = 0
        self.writing_paused = False
        self.reading = True
        self.closing = False
        self.aborted = False

    def connect(self, protocol: StreamConnection) -> None:
        self.protocol = protocol
        protocol.connection_made(self)

    def get_extra_info(self, name):
        return ("198.51.100.7", 50000) if name == "peername" else None

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high = high
        self.low = high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self.queued

    def write(self, data) -> None:
        assert not self.aborted, "write after abort (uvloop raises)"
        self.writes.append(bytes(data))
        self.queued += len(data)
        if self.queued > self.high and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        """The client read everything queued."""
        self.queued = 0
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True  # and waits for a flush that never comes

    def abort(self) -> None:
        self.closing = self.aborted = True
        self.protocol.connection_lost(None)


def connected(core, clock, connections=None) -> tuple[StreamConnection, FakeTransport]:
    conn = StreamConnection(core, "tcp", set() if connections is None else connections, clock)
    transport = FakeTransport()
    transport.connect(conn)
    return conn, transport


def bindings(count: int) -> tuple[bytes, list[bytes]]:
    ids = [os.urandom(12) for _ in range(count)]
    return b"".join(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode() for tid in ids), ids


def channel_data(size: int) -> memoryview:
    return memoryview(struct.pack("!HH", 0x4000, size) + b"x" * size)


async def test_a_client_that_does_not_read_stops_being_read_and_loses_no_answer():
    core, _ = make_core()
    clock = Clock()
    conn, transport = connected(core, clock)
    flood, ids = bindings(5000)  # 100 KB in, 160 KB of answers
    conn.data_received(flood)
    assert transport.writing_paused and not transport.reading
    assert conn.write_paused_since == clock.now
    # Parsing stopped at the pause: one answer past the high-water mark, no more.
    assert transport.queued <= PAUSE_AT_BYTES + 64
    answered = [stun.parse(w).transaction_id for w in transport.writes]
    assert 0 < len(answered) < len(ids)
    for _ in range(20):
        if len(answered) == len(ids):
            break
        transport.writes.clear()
        transport.drain()  # the client read: the rest is answered
        assert transport.reading
        await asyncio.sleep(0)
        answered += [stun.parse(w).transaction_id for w in transport.writes]
    assert answered == ids  # all of them, in order
    assert not transport.aborted and core.counters["malformed"] == 0


def test_relayed_data_past_the_budget_is_dropped_and_counted():
    core, _ = make_core()
    conn, transport = connected(core, Clock())
    frame = channel_data(1000)
    for _ in range(400):  # 400 KB offered to a client that reads nothing
        conn.send_channel_data(frame, len(frame))
    assert transport.queued <= OUTPUT_BUDGET_BYTES
    taken = len(transport.writes)
    assert taken == OUTPUT_BUDGET_BYTES // 1004
    assert core.counters["stream_output_dropped"] == 400 - taken
    indication = b"\x00\x17" + b"i" * 998
    conn.send_data_indication(indication)  # a Data indication is relayed data too
    assert core.counters["stream_output_dropped"] == 400 - taken + 1
    transport.drain()
    conn.send_data_indication(indication)
    assert transport.writes[-1] == indication  # room again once the client read


def test_nothing_is_written_to_a_closing_connection():
    core, _ = make_core()
    conn, transport = connected(core, Clock())
    transport.closing = True
    frame = channel_data(10)
    conn.send_channel_data(frame, len(frame))
    conn.send_data_indication(b"\x00\x17\x00\x00")
    assert transport.writes == []
    assert core.counters["stream_output_dropped"] == 2


def test_a_connection_stalled_past_the_deadline_is_aborted_not_closed():
    core, _ = make_core()
    clock = Clock()
    connections: set = set()
    stalled, stalled_transport = connected(core, clock, connections)
    reading, reading_transport = connected(core, clock, connections)
    frame = channel_data(1000)
    for _ in range(100):
        stalled.send_channel_data(frame, len(frame))
        reading.send_channel_data(frame, len(frame))
    assert stalled.write_paused_since == T0 and reading.write_paused_since == T0
    clock.now = T0 + STALLED_WRITE_S / 2
    reading_transport.drain()  # progress: its deadline starts over
    assert abort_stalled(connections, T0 + STALLED_WRITE_S - 0.5) == 0
    assert abort_stalled(connections, T0 + STALLED_WRITE_S) == 1
    assert stalled_transport.aborted and not reading_transport.closing
    assert connections == {reading}
    assert abort_stalled(connections, T0 + 10 * STALLED_WRITE_S) == 0


def test_a_closed_connection_that_never_flushes_is_aborted_at_the_deadline():
    core, _ = make_core()
    clock = Clock()
    connections: set = set()
    conn, transport = connected(core, clock, connections)
    frame = channel_data(1000)
    for _ in range(10):  # under the pause mark: never paused
        conn.send_channel_data(frame, len(frame))
    clock.now = T0 + 5
    conn.data_received(b"\xff" * 8)  # lost framing: closed, waits for a flush
    assert transport.closing and not transport.aborted and conn in connections
    assert abort_stalled(connections, T0 + 5 + STALLED_WRITE_S - 0.5) == 0
    assert abort_stalled(connections, T0 + 5 + STALLED_WRITE_S) == 1
    assert transport.aborted and not connections


def test_idle_unallocated_connections_are_aborted():
    core, _ = make_core()
    clock = Clock()
    connections: set = set()
    conn, transport = connected(core, clock, connections)
    conn.close()  # a close that never flushes must not hold it
    assert close_idle_unallocated(connections, core, T0 + UNALLOCATED_IDLE_S) == 0
    assert close_idle_unallocated(connections, core, T0 + UNALLOCATED_IDLE_S + 1) == 1
    assert transport.aborted and not connections


def test_a_request_stream_held_over_a_pause_is_still_bounded():
    core, _ = make_core()
    conn, transport = connected(core, Clock())
    flood, _ = bindings(5000)
    conn.data_received(flood)
    assert not transport.reading
    # A transport that kept delivering while paused: the buffer still has a bound.
    for _ in range(20):
        if transport.closing:
            break
        conn.data_received(flood)
    assert transport.closing and core.counters["malformed"] == 1


# ------------------------------------------------------------ the node's sweep, on loopback


@pytest.fixture(params=["tcp", "tls"])
async def stream_node(request, tmp_path):
    clock = Clock()
    port = free_port_pair()
    server_ctx = None
    endpoint = Endpoint("127.0.0.1", port)
    if request.param == "tls":
        cert, key = make_cert(tmp_path)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context(cafile=cert)
    settings = NodeSettings(
        relay=RelaySettings(realm=REALM),
        udp=Endpoint("127.0.0.1", port),
        tcp=endpoint if request.param == "tcp" else None,
        tls=endpoint if request.param == "tls" else None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(55000, 55999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    node = RelayNode(settings, (SECRET,), os.urandom(32), AllowAll(), server_ctx, clock=clock)
    await node.start()
    node.clock_ref = clock
    node.port = port
    node.client_ctx = client_ctx if request.param == "tls" else None
    yield node
    await node.stop()


async def wait_for(condition, timeout_s: float = 5.0) -> bool:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def test_the_node_sweep_aborts_a_client_that_stopped_reading(stream_node):
    node = stream_node
    # limit: the client's StreamReader stops reading once it holds 2 KiB.
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # our kernel holds little
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", node.port))
    # limit: the client's StreamReader stops reading once it holds 2 KiB.
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=node.client_ctx, limit=1024, server_hostname="127.0.0.1" if node.client_ctx else None
    )
    flood, _ = bindings(100_000)
    writer.write(flood)
    assert await wait_for(lambda: any(c.write_paused_since is not None for c in node.connections))
    (conn,) = node.connections
    assert conn.transport.get_write_buffer_size() <= OUTPUT_BUDGET_BYTES
    node.clock_ref.now += STALLED_WRITE_S + IDLE_CHECK_S + 1
    assert await wait_for(lambda: not node.connections), "the stalled connection was not aborted"
    assert node.core.counters["stalled_connections_aborted"] == 1
    writer.transport.abort()
    # The listener still serves.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=node.client_ctx)
    request, (tid,) = bindings(1)
    writer.write(request)
    reply = stun.parse(await asyncio.wait_for(reader.readexactly(32), 2))
    assert reply.transaction_id == tid and reply.cls == stun.SUCCESS
    writer.close()
