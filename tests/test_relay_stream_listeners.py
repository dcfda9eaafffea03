"""The relay's stream listeners on loopback: TCP and TLS on the one turn.tcp port,
PROXY protocol v1 and v2 on turn.tcp and turn.tls (believed from trusted_proxies only),
what each listener refuses and counts, the drain, and RelayNode.adopt_stream (how the
edge hands a stream it accepted to the relay)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import struct
from typing import cast

import pytest

from appliance.config.schema import AppConfig, EdgeConfig, HostPort, TurnConfig
from appliance.ops.metrics import ApplianceCollector, metrics_registry, render
from appliance.wiring.relay import needs_turn_certificate, node_settings, own_endpoints
from demux.proxy import TrustedProxies
from turn import stun
from turn.core import RelaySettings
from turn.node import Endpoint, NodeSettings, RelayNode

from .netports import free_port_pair
from .test_relay_io import REALM, SECRET, AllowAll, Clock, RawClient, make_cert, peer_recv, peer_socket

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT_V4 = ("203.0.113.9", 40001)
CLIENT_V6 = ("2001:db8::5", 40002)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for a certificate valid for 127.0.0.1."""
    cert, key = make_cert(tmp_path_factory.mktemp("stream-listener-cert"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)


async def start_node(
    server_ctx: ssl.SSLContext | None,
    *,
    tcp: bool = True,
    tls: bool = False,
    tcp_tls: bool = True,
    trusted: tuple[str, ...] = (),
) -> RelayNode:
    tcp_port, tls_port = free_port_pair(), free_port_pair()
    settings = NodeSettings(
        relay=RelaySettings(realm=REALM),
        udp=None,
        tcp=Endpoint("127.0.0.1", tcp_port) if tcp else None,
        tls=Endpoint("127.0.0.1", tls_port) if tls else None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(56000, 56999),
        nonce_lifetime_s=600,
        reuse_port=False,
        tcp_tls=tcp_tls,
        trusted_proxies=TrustedProxies(trusted),
    )
    node = RelayNode(settings, (SECRET,), os.urandom(32), AllowAll(), server_ctx, clock=Clock())
    await node.start()
    return node


def port_of(node: RelayNode, listener: str) -> int:
    endpoint = node.settings.tcp if listener == "tcp" else node.settings.tls
    assert endpoint is not None
    return endpoint.port


async def open_stream(
    port: int, *, prefix: bytes = b"", tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends `prefix` (a PROXY header) raw, then speaks TLS if `tls`."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    if prefix:
        await loop.sock_sendall(sock, prefix)
    return await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=tls, server_hostname="127.0.0.1" if tls else None), 5
    )


async def read_message(reader: asyncio.StreamReader) -> stun.Message:
    header = await asyncio.wait_for(reader.readexactly(20), 5)
    body = await asyncio.wait_for(reader.readexactly(struct.unpack_from("!H", header, 2)[0]), 5)
    return stun.parse(header + body)


async def mapped_address(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, int]:
    """XOR-MAPPED-ADDRESS of a Binding response on this stream."""
    tid = os.urandom(12)
    writer.write(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode())
    reply = await read_message(reader)
    assert reply.cls == stun.SUCCESS and reply.transaction_id == tid
    return stun.xor_address(reply.get(stun.XOR_MAPPED_ADDRESS), tid)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """The server closed the stream (EOF or reset) without sending anything."""
    try:
        return await asyncio.wait_for(reader.read(100), 5) == b""
    except (ConnectionError, ssl.SSLError):
        return True


async def counted(node: RelayNode, counter: str, expected: int = 1) -> None:
    assert node.core is not None
    for _ in range(300):
        if node.core.counters[counter] >= expected:
            break
        await asyncio.sleep(0.01)
    assert node.core.counters[counter] == expected, dict(node.core.counters)


def proxy_v1(client: tuple[str, int], server_port: int) -> bytes:
    family = "TCP6" if ":" in client[0] else "TCP4"
    destination = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client[0]} {destination} {client[1]} {server_port}\r\n".encode()


def proxy_v2(client: tuple[str, int], server_port: int) -> bytes:
    source = ipaddress.ip_address(client[0])
    if source.version == 4:
        family, destination = 0x11, ipaddress.ip_address("127.0.0.1")  # AF_INET, STREAM
    else:
        family, destination = 0x21, ipaddress.ip_address("::1")  # AF_INET6, STREAM
    block = source.packed + destination.packed + struct.pack("!HH", client[1], server_port)
    return PROXY_V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


PROXY_HEADERS = {"v1": proxy_v1, "v2": proxy_v2}


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2)
    except (OSError, ssl.SSLError, TimeoutError):
        pass


# ------------------------------------------------------------ TCP and TLS on turn.tcp


async def test_tcp_and_tls_clients_share_the_turn_tcp_port(certificate):
    server_ctx, client_ctx = certificate
    node = await start_node(server_ctx, tcp_tls=True)
    try:
        port = port_of(node, "tcp")
        plain = await open_stream(port)
        secure = await open_stream(port, tls=client_ctx)
        plain_address = await mapped_address(*plain)
        secure_address = await mapped_address(*secure)
        assert plain_address == plain[1].get_extra_info("sockname")
        assert secure_address == secure[1].get_extra_info("sockname")
        assert sorted(c.key.split("#")[0] for c in node.connections) == ["tcp", "tls"]
        assert secure[1].get_extra_info("ssl_object") is not None
        await close(plain[1])
        await close(secure[1])
    finally:
        await node.stop()


async def test_tls_on_turn_tcp_is_refused_and_counted_when_tcp_tls_is_off(certificate):
    server_ctx, client_ctx = certificate
    node = await start_node(server_ctx, tcp_tls=False)
    try:
        port = port_of(node, "tcp")
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await open_stream(port, tls=client_ctx)
        await counted(node, "stream_refused_unexpected_tls")
        plain = await open_stream(port)  # plain TCP is still served
        assert await mapped_address(*plain) == plain[1].get_extra_info("sockname")
        await close(plain[1])
    finally:
        await node.stop()


@pytest.mark.parametrize(
    "first_bytes, reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unexpected_http"),
        (b"\xff" * 32, "unexpected_unknown"),
    ],
)
async def test_what_is_neither_stun_nor_tls_on_turn_tcp_is_closed_and_counted(
    certificate, first_bytes, reason
):
    node = await start_node(certificate[0])
    try:
        reader, writer = await open_stream(port_of(node, "tcp"))
        writer.write(first_bytes)
        assert await closed_by_server(reader)
        await counted(node, f"stream_refused_{reason}")
        assert not node.connections
        await close(writer)
    finally:
        await node.stop()


async def test_plain_stun_on_turn_tls_is_closed_and_counted(certificate):
    node = await start_node(certificate[0], tcp=False, tls=True)
    try:
        reader, writer = await open_stream(port_of(node, "tls"))
        writer.write(stun.Builder(stun.BINDING, stun.REQUEST, os.urandom(12)).encode())
        assert await closed_by_server(reader)
        await counted(node, "stream_refused_unexpected_stun")
        await close(writer)
    finally:
        await node.stop()


async def test_a_failed_tls_handshake_is_counted(certificate):
    node = await start_node(certificate[0])
    try:
        distrustful = ssl.create_default_context()  # the system CAs: our certificate fails
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await open_stream(port_of(node, "tcp"), tls=distrustful)
        await counted(node, "stream_refused_tls_handshake_failed")
        assert not node.connections
    finally:
        await node.stop()


async def test_a_stalled_tls_handshake_is_dropped_at_its_deadline(certificate, monkeypatch):
    monkeypatch.setattr("turn.tcp.TLS_HANDSHAKE_S", 0.3)
    node = await start_node(certificate[0])
    try:
        reader, writer = await open_stream(port_of(node, "tcp"))
        # A TLS record header announcing a ClientHello that never comes.
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert await closed_by_server(reader)
        await counted(node, "stream_refused_tls_handshake_failed")
        assert not node.connections
        await close(writer)
    finally:
        await node.stop()


async def test_a_tcp_listener_on_the_ipv6_wildcard_takes_ipv4_clients_as_ipv4():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    port = free_port_pair()
    settings = NodeSettings(
        relay=RelaySettings(realm=REALM),
        udp=None,
        tcp=Endpoint("::", port),
        tls=None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(56000, 56999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    node = RelayNode(settings, (SECRET,), os.urandom(32), AllowAll(), clock=Clock())
    await node.start()
    try:
        reader, writer = await open_stream(port)
        assert await mapped_address(reader, writer) == writer.get_extra_info("sockname")
        await close(writer)
    finally:
        await node.stop()


# ------------------------------------------------------------ PROXY protocol


@pytest.mark.parametrize("client", [CLIENT_V4, CLIENT_V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("listener", ["tcp", "tcp+tls", "tls"])
async def test_a_trusted_proxy_header_names_the_client_in_xor_mapped_address(
    certificate, listener, version, client
):
    server_ctx, client_ctx = certificate
    node = await start_node(server_ctx, tls=True, trusted=("127.0.0.0/8",))
    try:
        port = port_of(node, "tls" if listener == "tls" else "tcp")
        header = PROXY_HEADERS[version](client, port)
        reader, writer = await open_stream(port, prefix=header, tls=client_ctx if "tls" in listener else None)
        assert await mapped_address(reader, writer) == client
        await counted(node, "stream_proxied")
        (conn,) = node.connections
        assert conn.address == client
        await close(writer)
    finally:
        await node.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("listener", ["tcp", "tls"])
async def test_a_proxy_header_from_an_untrusted_peer_closes_the_connection(certificate, listener, version):
    node = await start_node(certificate[0], tls=True, trusted=("10.0.0.0/8",))
    try:
        port = port_of(node, listener)
        reader, writer = await open_stream(port)
        writer.write(PROXY_HEADERS[version](CLIENT_V4, port))
        assert await closed_by_server(reader)
        await counted(node, "stream_refused_proxy_untrusted")
        assert not node.connections
        await close(writer)
    finally:
        await node.stop()


async def test_a_trusted_peer_without_a_header_is_served_with_its_own_address(certificate):
    server_ctx, client_ctx = certificate
    node = await start_node(server_ctx, tls=True, trusted=("127.0.0.1",))
    try:
        for port, tls in ((port_of(node, "tcp"), None), (port_of(node, "tls"), client_ctx)):
            reader, writer = await open_stream(port, tls=tls)
            assert await mapped_address(reader, writer) == writer.get_extra_info("sockname")
            await close(writer)
        assert node.core is not None and node.core.counters["stream_proxied"] == 0
    finally:
        await node.stop()


# ------------------------------------------------------------ drain


async def test_drain_stops_accepting_and_closes_unsniffed_connections_but_keeps_live_ones(certificate):
    node = await start_node(certificate[0])
    try:
        port = port_of(node, "tcp")
        live = await open_stream(port)
        await mapped_address(*live)
        silent = await open_stream(port)  # connected, nothing sent yet: still being sniffed
        await asyncio.sleep(0.05)
        node.begin_drain()
        assert await closed_by_server(silent[0])
        with pytest.raises(OSError):
            await open_stream(port)
        assert await mapped_address(*live) == live[1].get_extra_info("sockname")
        await close(live[1])
        await close(silent[1])
    finally:
        await node.stop()


# ------------------------------------------------------------ adopt_stream


class Handoff(asyncio.Protocol):
    """A stand-in for the edge: takes a connection, reads its first bytes, and hands the
    transport and those bytes to the relay node."""

    def __init__(self, node: RelayNode, client: tuple[str, int], adopted: list) -> None:
        self.node = node
        self.client = client
        self.adopted = adopted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.adopted.append(self.node.adopt_stream(self.transport, data, self.client))


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "plain"])
async def test_adopt_stream_makes_a_handed_over_transport_a_turn_connection(certificate, secure):
    server_ctx, client_ctx = certificate
    node = await start_node(server_ctx, tcp=False)  # no listener of its own: only adopted streams
    loop = asyncio.get_running_loop()
    adopted: list = []
    client = ("198.51.100.7", 5555)
    edge = await loop.create_server(
        lambda: Handoff(node, client, adopted), "127.0.0.1", 0, ssl=server_ctx if secure else None
    )
    peer = peer_socket()
    try:
        port = edge.sockets[0].getsockname()[1]
        reader, writer = await open_stream(port, tls=client_ctx if secure else None)
        # The first request arrives with the handover (the edge read it to route the stream).
        assert await mapped_address(reader, writer) == client
        (conn,) = adopted
        assert conn in node.connections and conn.key.startswith("tls#")
        raw = RawClient(None, stream=True)

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def recv_chunk() -> bytes:
            return await asyncio.wait_for(reader.read(70000), 2)

        raw.send = send  # type: ignore[method-assign]
        raw._recv_chunk = recv_chunk  # type: ignore[method-assign]
        relayed = await raw.allocate()
        assert node.core is not None and len(node.core.table) == 1
        assert (await raw.channel_bind(0x4001, peer.getsockname())).cls == stun.SUCCESS
        await send(struct.pack("!HH", 0x4001, 4) + b"edge")
        assert (await peer_recv(peer))[0] == b"edge"
        peer.sendto(b"back", relayed)
        assert (await raw.recv())[:8] == struct.pack("!HH", 0x4001, 4) + b"back"
        await close(writer)
        for _ in range(200):  # closing the adopted stream ends its allocation, as any other
            if not len(node.core.table):
                break
            await asyncio.sleep(0.01)
        assert not len(node.core.table) and not node.connections
    finally:
        peer.close()
        edge.close()
        await node.stop()


async def test_adopt_stream_parses_initial_bytes_split_across_the_handover(certificate):
    node = await start_node(certificate[0], tcp=False)
    loop = asyncio.get_running_loop()
    server_sock, client_sock = socket.socketpair()
    try:
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server_sock)
        tid = os.urandom(12)
        request = stun.Builder(stun.BINDING, stun.REQUEST, tid).encode()
        node.adopt_stream(
            cast(asyncio.Transport, transport), request[:7], ("192.0.2.44", 7), transport_name="tcp"
        )
        client_sock.setblocking(False)
        await loop.sock_sendall(client_sock, request[7:])
        reply = stun.parse(await asyncio.wait_for(loop.sock_recv(client_sock, 2048), 5))
        assert stun.xor_address(reply.get(stun.XOR_MAPPED_ADDRESS), tid) == ("192.0.2.44", 7)
    finally:
        client_sock.close()
        await node.stop()


async def test_adopt_stream_before_start_aborts_the_transport():
    settings = NodeSettings(
        relay=RelaySettings(realm=REALM),
        udp=None,
        tcp=None,
        tls=None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(56000, 56999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    node = RelayNode(settings, (SECRET,), os.urandom(32), AllowAll())
    loop = asyncio.get_running_loop()
    server_sock, client_sock = socket.socketpair()
    try:
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server_sock)
        with pytest.raises(RuntimeError):
            node.adopt_stream(cast(asyncio.Transport, transport), b"", ("192.0.2.1", 1))
        assert transport.is_closing()
    finally:
        client_sock.close()


# ------------------------------------------------------------ wiring and metrics


def test_settings_come_from_the_configuration():
    config = AppConfig(
        trusted_proxies=("10.1.0.0/16",),
        turn=TurnConfig(tls=None, tcp_tls=True),
        edge=EdgeConfig(listen=HostPort("0.0.0.0", 443)),
    )
    settings = node_settings(config)
    assert settings.tcp_tls
    assert "10.1.2.3" in settings.trusted_proxies and "10.2.0.1" not in settings.trusted_proxies
    # TLS on turn.tcp needs the certificate even with turn.tls off.
    assert needs_turn_certificate(config)
    assert not needs_turn_certificate(AppConfig(turn=TurnConfig(tls=None, tcp_tls=False)))
    assert not node_settings(AppConfig(turn=TurnConfig(tcp=None))).tcp_tls
    assert ("0.0.0.0", 443) in own_endpoints(config)  # the edge port is never a relay target


def test_refusals_and_proxied_connections_are_exported():
    stats = {
        "to_peer_packets": 0,
        "to_client_packets": 0,
        "to_peer_bytes": 0,
        "to_client_bytes": 0,
        "dropped_packets": 0,
        "counters": {
            "stream_refused_proxy_untrusted": 2,
            "stream_refused_unexpected_http": 1,
            "stream_proxied": 5,
        },
    }
    text = render(metrics_registry(ApplianceCollector(relay_stats=lambda: stats))).decode()
    assert 'appliance_relay_stream_refused_total{reason="proxy_untrusted"} 2.0' in text
    assert 'appliance_relay_stream_refused_total{reason="unexpected_http"} 1.0' in text
    assert 'appliance_relay_stream_refused_total{reason="sniff_timeout"} 0.0' in text
    assert "appliance_relay_stream_proxied_total 5.0" in text
