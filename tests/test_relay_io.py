"""The relay's asyncio layer on loopback: UDP and TCP framing, the ChannelData
fast paths in both directions, Data indications, IPv6 relaying, and expiry
enforced on the hot path (the node runs on a settable clock, so permission and
channel expiry are tested without sleeping)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from turn import stun
from turn.client import ClientCredentials
from turn.core import RelaySettings
from turn.node import Endpoint, NodeSettings, RelayNode

from .netports import free_port_pair
from .turn_fakes import AllowAll

SECRET = b"relay-io-secret"
REALM = "io.test"
T0 = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def start_node(relay: RelaySettings) -> RelayNode:
    clock = Clock()
    port = free_port_pair()
    settings = NodeSettings(
        relay=relay,
        udp=Endpoint("127.0.0.1", port),
        tcp=Endpoint("127.0.0.1", port),
        tls=None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1", stun.FAMILY_IPV6: "::1"},
        relay_ports=(52000, 52999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    n = RelayNode(settings, (SECRET,), os.urandom(32), AllowAll(), clock=clock)
    await n.start()
    n.clock_ref = clock
    n.port = port
    return n


@pytest.fixture
async def node():
    n = await start_node(RelaySettings(realm=REALM, families=frozenset({stun.FAMILY_IPV4, stun.FAMILY_IPV6})))
    yield n
    await n.stop()


class RawClient:
    """A minimal TURN client over a datagram or stream socket, for I/O tests."""

    def __init__(self, sock: socket.socket | None, stream: bool, user: str = "alice") -> None:
        self.sock = sock
        self.stream = stream
        self.creds = ClientCredentials.rest(SECRET, f"{int(T0) + 3600}:{user}", REALM)
        self._buf = b""

    async def _recv_chunk(self) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 70000), 2)

    async def _recv_raw(self) -> bytes:
        if not self.stream:
            return await self._recv_chunk()
        while True:
            if len(self._buf) >= 4:
                first = self._buf[0]
                length = struct.unpack_from("!H", self._buf, 2)[0]
                total = 20 + length if first < 0x40 else 4 + length + (-length & 3)
                if len(self._buf) >= total:
                    frame, self._buf = self._buf[:total], self._buf[total:]
                    return frame
            self._buf += await self._recv_chunk()

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def request(self, method: int, attrs: list) -> stun.Message:
        for _ in range(2):
            await self.send(self.creds.build(method, attrs))
            reply = stun.parse(await self._recv_raw())
            if not self.creds.should_retry(reply):
                return reply
        return reply

    async def allocate(self, family: int = stun.FAMILY_IPV4) -> tuple:
        attrs = [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")]
        if family == stun.FAMILY_IPV6:
            attrs.append((stun.REQUESTED_ADDRESS_FAMILY, b"\x02\x00\x00\x00"))
        reply = await self.request(stun.ALLOCATE, attrs)
        assert reply.cls == stun.SUCCESS, stun.decode_error(reply.get(stun.ERROR_CODE))
        return stun.xor_address(reply.get(stun.XOR_RELAYED_ADDRESS), reply.transaction_id)

    async def channel_bind(self, number: int, peer) -> stun.Message:
        return await self.request(
            stun.CHANNEL_BIND,
            [
                (stun.CHANNEL_NUMBER, struct.pack("!HH", number, 0)),
                (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(peer, tid)),
            ],
        )

    async def create_permission(self, peer) -> stun.Message:
        return await self.request(
            stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(peer, tid))]
        )

    async def recv(self) -> bytes:
        return await self._recv_raw()


async def open_client(node, transport: str) -> RawClient:
    loop = asyncio.get_running_loop()
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", node.port))
        return RawClient(sock, stream=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", node.port))
    return RawClient(sock, stream=True)


def peer_socket(ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


async def peer_recv(sock: socket.socket) -> tuple[bytes, tuple]:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def ready():
        if not fut.done():
            fut.set_result(sock.recvfrom(70000))

    loop.add_reader(sock.fileno(), ready)
    try:
        return await asyncio.wait_for(fut, 2)
    finally:
        loop.remove_reader(sock.fileno())


async def assert_nothing(sock: socket.socket) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(peer_recv(sock), 0.2)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_channel_data_both_ways(node, transport):
    client = await open_client(node, transport)
    relayed = await client.allocate()
    peer = peer_socket()
    peer_addr = peer.getsockname()
    assert (await client.channel_bind(0x4001, peer_addr)).cls == stun.SUCCESS
    payload = b"abcde"  # odd length: padding on streams
    pad = b"\x00" * 3 if transport == "tcp" else b""
    await client.send(struct.pack("!HH", 0x4001, len(payload)) + payload + pad)
    data, src = await peer_recv(peer)
    assert data == payload and src[:2] == relayed
    peer.sendto(b"reply!!", relayed)
    frame = await client.recv()
    assert frame[:4] == struct.pack("!HH", 0x4001, 7)
    assert frame[4:11] == b"reply!!"
    assert len(frame) == (12 if transport == "tcp" else 11)
    client.sock.close()
    peer.close()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_send_and_data_indications(node, transport):
    client = await open_client(node, transport)
    relayed = await client.allocate()
    peer = peer_socket()
    peer_addr = peer.getsockname()
    assert (await client.create_permission(peer_addr)).cls == stun.SUCCESS
    tid = os.urandom(12)
    send = stun.Builder(stun.SEND, stun.INDICATION, tid)
    send.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer_addr, tid))
    send.add(stun.DATA_ATTR, b"via send")
    await client.send(send.encode())
    data, _ = await peer_recv(peer)
    assert data == b"via send"
    peer.sendto(b"via data", relayed)
    msg = stun.parse(await client.recv())
    assert (msg.method, msg.cls) == (stun.DATA, stun.INDICATION)
    assert msg.get(stun.DATA_ATTR) == b"via data"
    assert stun.xor_address(msg.get(stun.XOR_PEER_ADDRESS), msg.transaction_id) == peer_addr
    client.sock.close()
    peer.close()


async def test_ipv6_relay(node):
    client = await open_client(node, "udp")
    relayed = await client.allocate(stun.FAMILY_IPV6)
    assert relayed[0] == "::1"
    peer = peer_socket("::1")
    peer_addr = peer.getsockname()[:2]
    assert (await client.channel_bind(0x4002, peer_addr)).cls == stun.SUCCESS
    await client.send(struct.pack("!HH", 0x4002, 4) + b"six!")
    data, _ = await peer_recv(peer)
    assert data == b"six!"
    peer.sendto(b"back", relayed)
    assert (await client.recv())[4:8] == b"back"
    client.sock.close()
    peer.close()


async def test_hot_path_enforces_permission_and_channel_expiry(node):
    clock = node.clock_ref
    client = await open_client(node, "udp")
    relayed = await client.allocate()
    peer = peer_socket()
    peer_addr = peer.getsockname()
    assert (await client.channel_bind(0x4003, peer_addr)).cls == stun.SUCCESS
    frame = struct.pack("!HH", 0x4003, 4) + b"ping"
    clock.now += 299  # permission (300 s) still live
    await client.send(frame)
    assert (await peer_recv(peer))[0] == b"ping"
    clock.now += 2  # permission expired, channel (600 s) not
    await client.send(frame)
    await assert_nothing(peer)
    peer.sendto(b"late", relayed)  # peer traffic without permission is dropped
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.recv(), 0.2)
    assert (await client.create_permission(peer_addr)).cls == stun.SUCCESS
    await client.send(frame)
    assert (await peer_recv(peer))[0] == b"ping"
    clock.now += 300  # channel expired (601 s after bind)
    assert (await client.create_permission(peer_addr)).cls == stun.SUCCESS
    await client.send(frame)
    await assert_nothing(peer)
    client.sock.close()
    peer.close()


async def test_garbage_is_counted_and_harmless(node):
    client = await open_client(node, "udp")
    for junk in (b"", b"\x00", b"\xff" * 40, b"\x40\x00\xff\xff", os.urandom(100)):
        client.sock.send(junk)
    await asyncio.sleep(0.05)
    relayed = await client.allocate()  # the listener still serves
    assert relayed[0] == "127.0.0.1"
    assert node.core.counters["malformed"] >= 2
    client.sock.close()


async def test_stream_loses_framing_closes_only_that_connection(node):
    bad = await open_client(node, "tcp")
    good = await open_client(node, "tcp")
    await good.allocate()
    # STUN first, so the listener hands the stream on (its first bytes decide that), then
    # bytes that are neither STUN nor ChannelData.
    assert (await bad.request(stun.BINDING, [])).cls == stun.SUCCESS
    await bad.send(b"\xff" * 8)
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(bad.sock, 10), 2) == b""  # closed
    peer = peer_socket()
    assert (await good.channel_bind(0x4004, peer.getsockname())).cls == stun.SUCCESS
    bad.sock.close()
    good.sock.close()
    peer.close()


async def test_tcp_close_ends_allocation(node):
    client = await open_client(node, "tcp")
    await client.allocate()
    assert len(node.core.table) == 1
    client.sock.close()
    for _ in range(100):
        if len(node.core.table) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(node.core.table) == 0


def make_cert(directory) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


async def test_tls_listener_relays_channel_data(tmp_path):
    import ssl

    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    port = free_port_pair()
    settings = NodeSettings(
        relay=RelaySettings(realm=REALM),
        udp=None,
        tcp=None,
        tls=Endpoint("127.0.0.1", port),
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(53000, 53999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    node = RelayNode(settings, (SECRET,), os.urandom(32), AllowAll(), server_ctx, clock=Clock())
    await node.start()
    try:
        client_ctx = ssl.create_default_context(cafile=cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        raw = RawClient(None, stream=True)  # reads and writes go through the TLS stream

        async def send(data):
            writer.write(data)
            await writer.drain()

        async def recv_chunk():
            return await asyncio.wait_for(reader.read(70000), 2)

        raw.send = send
        raw._recv_chunk = recv_chunk
        relayed = await raw.allocate()
        peer = peer_socket()
        assert (await raw.channel_bind(0x4005, peer.getsockname())).cls == stun.SUCCESS
        await send(struct.pack("!HH", 0x4005, 3) + b"tls\x00")
        assert (await peer_recv(peer))[0] == b"tls"
        peer.sendto(b"back", relayed)
        assert (await raw.recv())[:8] == struct.pack("!HH", 0x4005, 4) + b"back"
        writer.close()
        peer.close()
    finally:
        await node.stop()


async def test_stream_without_allocation_is_closed_when_idle(node):
    from turn.tcp import UNALLOCATED_IDLE_S, close_idle_unallocated

    idle = await open_client(node, "tcp")
    # A Binding, not an Allocate: a stream that sends nothing at all is closed by the
    # listener's sniff deadline before it is ever a connection of the node.
    assert (await idle.request(stun.BINDING, [])).cls == stun.SUCCESS
    busy = await open_client(node, "tcp")
    await busy.allocate()
    for _ in range(100):
        if len(node.connections) == 2:
            break
        await asyncio.sleep(0.01)
    later = node.clock_ref.now + UNALLOCATED_IDLE_S + 1
    assert close_idle_unallocated(node.connections, node.core, later) == 1
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(idle.sock, 10), 2) == b""
    assert len(node.core.table) == 1
    idle.sock.close()
    busy.sock.close()


async def test_dual_stack_listener_reports_ipv4_clients_as_ipv4():
    port = free_port_pair()
    settings = NodeSettings(
        relay=RelaySettings(realm=REALM),
        udp=Endpoint("::", port),
        tcp=None,
        tls=None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(54000, 54999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    n = RelayNode(settings, (SECRET,), os.urandom(32), AllowAll(), clock=Clock())
    await n.start()
    try:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        tid = os.urandom(12)
        sock.send(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode())
        reply = stun.parse(await asyncio.wait_for(loop.sock_recv(sock, 2048), 2))
        mapped = stun.xor_address(reply.get(stun.XOR_MAPPED_ADDRESS), tid)
        assert mapped == sock.getsockname()
        client = RawClient(sock, stream=False)
        assert (await client.allocate())[0] == "127.0.0.1"
        sock.close()
    finally:
        await n.stop()


async def counted(core, counter: str, expected: int) -> None:
    for _ in range(200):
        if core.counters[counter] >= expected:
            break
        await asyncio.sleep(0.01)
    assert core.counters[counter] == expected


@pytest.mark.parametrize("framing", ["channel", "indication"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_bandwidth_cap_drops_and_counts_past_the_burst_each_way(transport, framing):
    # 64 kbit/s: 8000 bytes/s with a burst of 3000 bytes.  The node's clock stands still,
    # so exactly three 1000-byte packets pass each way until it moves.
    node = await start_node(RelaySettings(realm=REALM, max_bps=64_000))
    client = await open_client(node, transport)
    peer = peer_socket()
    try:
        relayed = await client.allocate()
        peer_addr = peer.getsockname()
        payload = os.urandom(1000)
        if framing == "channel":
            assert (await client.channel_bind(0x4006, peer_addr)).cls == stun.SUCCESS
            to_peer = struct.pack("!HH", 0x4006, len(payload)) + payload
        else:
            assert (await client.create_permission(peer_addr)).cls == stun.SUCCESS
            tid = os.urandom(12)
            send = stun.Builder(stun.SEND, stun.INDICATION, tid)
            send.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer_addr, tid))
            send.add(stun.DATA_ATTR, payload)
            to_peer = send.encode()

        def relayed_payload(frame: bytes) -> bytes:
            if framing == "channel":
                return frame[4 : 4 + len(payload)]
            return stun.parse(frame).get(stun.DATA_ATTR)

        for _ in range(10):
            await client.send(to_peer)
            peer.sendto(payload, relayed)
        await counted(node.core, "bandwidth_dropped_to_peer", 7)
        await counted(node.core, "bandwidth_dropped_to_client", 7)
        for _ in range(3):
            assert (await peer_recv(peer))[0] == payload
            assert relayed_payload(await client.recv()) == payload
        await assert_nothing(peer)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.recv(), 0.2)
        traffic = node.core.traffic
        assert (traffic.to_peer_packets, traffic.to_client_packets) == (3, 3)
        # The allocation's own counters leave the throttled packets out too.
        (alloc,) = node.core.table.by_client.values()
        assert (alloc.to_peer_packets, alloc.to_peer_bytes) == (3, 3000)
        assert (alloc.to_client_packets, alloc.to_client_bytes) == (3, 3000)

        node.clock_ref.now += 0.125  # 1000 bytes refilled each way
        await client.send(to_peer)
        peer.sendto(payload, relayed)
        assert (await peer_recv(peer))[0] == payload
        assert relayed_payload(await client.recv()) == payload
    finally:
        client.sock.close()
        peer.close()
        await node.stop()


async def test_user_cap_is_shared_by_a_users_allocations_in_the_hot_path():
    node = await start_node(RelaySettings(realm=REALM, user_max_bps=64_000))
    clients = [await open_client(node, "udp") for _ in range(2)]
    peer = peer_socket()
    try:
        for number, client in enumerate(clients, 0x4007):
            await client.allocate()
            assert (await client.channel_bind(number, peer.getsockname())).cls == stun.SUCCESS
        for _ in range(4):
            for number, client in enumerate(clients, 0x4007):
                await client.send(struct.pack("!HH", number, 1000) + bytes(1000))
        await counted(node.core, "bandwidth_dropped_to_peer", 5)
        for _ in range(3):
            await peer_recv(peer)
        await assert_nothing(peer)
        assert set(node.core.bandwidth.users) == {"alice"}
        for client in clients:
            client.sock.close()
        node.core.close_all("test")
        assert node.core.bandwidth.users == {}
    finally:
        peer.close()
        await node.stop()


class BrokenMeter:
    """Stands for a bug on the hot path: whatever the relay asks of it raises."""

    def take(self, nbytes, now):
        raise RuntimeError("a bug on the hot path")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_bug_on_a_packet_path_is_caught_counted_and_the_path_keeps_serving(node, transport, caplog):
    client = await open_client(node, transport)
    relayed = await client.allocate()
    peer = peer_socket()
    assert (await client.channel_bind(0x4001, peer.getsockname())).cls == stun.SUCCESS
    (alloc,) = node.core.table.by_client.values()
    alloc.to_peer_meter = alloc.to_client_meter = BrokenMeter()
    peer.sendto(b"to the client", relayed)
    await counted(node.core, "internal_errors_relay_port", 1)
    pad = b"\x00" * 3 if transport == "tcp" else b""
    await client.send(struct.pack("!HH", 0x4001, 5) + b"abcde" + pad)
    path = "udp_listener" if transport == "udp" else "stream"
    await counted(node.core, f"internal_errors_{path}", 1)
    assert node.core.counters["internal_errors"] == 2
    assert sum("internal error on the relay's" in r.getMessage() for r in caplog.records) == 2
    if transport == "udp":
        # The listener and the relay port still serve: the bug is fixed, traffic flows.
        alloc.to_peer_meter = alloc.to_client_meter = None
        await client.send(struct.pack("!HH", 0x4001, 5) + b"again")
        assert (await peer_recv(peer))[0] == b"again"
        peer.sendto(b"back", relayed)
        assert (await client.recv())[4:8] == b"back"
    else:
        # A stream whose parse hit a bug has unknown framing: it is aborted, and its
        # allocation goes with it.
        for _ in range(200):
            if not node.core.table.by_client:
                break
            await asyncio.sleep(0.01)
        assert not node.core.table.by_client
    client.sock.close()
    peer.close()
