"""The edge listener in-process on loopback (appliance.process.edge): one TLS port routes
TURN (by ALPN stun.turn, or by a STUN header when there is no ALPN) to a relay node and
HTTP (by ALPN h2/http/1.1, or by anything else) to a Hypercorn app that sees the real
client and https; and the hostile clients: silent after TLS, junk after TLS, a handshake
never finished, plain text, an untrusted PROXY header, a bug in the hand-off, draining.
Deadlines are short here (DEADLINE_S); the supervisor uses stomp.connect_timeout_s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl

import httpx
import pytest
from hypercorn.app_wrappers import ASGIWrapper

from appliance.config.schema import AppConfig, HostPort
from appliance.ops.metrics import ApplianceCollector, metrics_registry, render
from appliance.process.edge import EdgeListener, HypercornConnections, bind_edge_socket, edge_tls_context
from appliance.process.listeners import ListenerError
from appliance.tls.devcert import ensure_dev_certificate
from appliance.tls.reload import CertificateReloader
from appliance.wiring.signaling import edge_hypercorn_config
from demux.proxy import TrustedProxies
from turn import stun
from turn.core import RelaySettings
from turn.node import NodeSettings, RelayNode

from .netports import free_port_pair
from .turn_fakes import AllowAll

DEADLINE_S = 0.5
GRACEFUL_S = 0.5  # Hypercorn's graceful_timeout for the edge's HTTP connections here
WAIT_S = 5.0


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a test's scenario on a fresh loop of each kind: the supervisor runs on uvloop
    when it is installed, and the two differ in how a transport takes over an accepted
    socket and a TLS session (uvloop's connect_accepted_socket returns its SSLProtocol)."""
    factory = None
    if request.param == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner.run


async def echo_scope(scope, receive, send) -> None:
    """An ASGI app that answers with what Hypercorn told it about the connection."""
    if scope["type"] != "http":
        return
    body = json.dumps(
        {"client": list(scope["client"]), "scheme": scope["scheme"], "version": scope["http_version"]}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def relay_node() -> RelayNode:
    settings = NodeSettings(
        relay=RelaySettings(realm="edge.test", families=frozenset({stun.FAMILY_IPV4})),
        udp=None,
        tcp=None,
        tls=None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(54000, 54999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    return RelayNode(settings, (b"edge-secret",), os.urandom(32), AllowAll())


class Edge:
    def __init__(self, tmp_path, trusted=(), host: str = "127.0.0.1") -> None:
        self.cert, self.key, _ = ensure_dev_certificate(tmp_path / "certs")
        self.host = host
        self.port = free_port_pair()
        self.node = relay_node()
        self.reloader = CertificateReloader()
        hypercorn = edge_hypercorn_config(AppConfig())
        hypercorn.graceful_timeout = GRACEFUL_S
        http = HypercornConnections(ASGIWrapper(echo_scope), hypercorn)
        self.listener = EdgeListener(
            bind_edge_socket("edge.listen", HostPort(host, self.port)),
            edge_tls_context(self.cert, self.key, self.reloader),
            self.node,
            http,
            TrustedProxies(trusted),
            deadline_s=DEADLINE_S,
        )

    def client_tls(self, alpn: list[str] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    async def open(self, alpn: list[str] | None = None, prefix: bytes = b""):
        """A TLS connection to the edge (after `prefix` in plain text, e.g. a PROXY header)."""
        sock = socket.create_connection((self.host, self.port))
        sock.sendall(prefix)
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock, ssl=self.client_tls(alpn), server_hostname=self.host)

    def counts(self) -> dict:
        return self.listener.stats()


@contextlib.asynccontextmanager
async def running_edge(tmp_path, trusted=(), start_node: bool = True, host: str = "127.0.0.1"):
    """An edge on a free loopback port with its relay node (started unless told not to)."""
    e = Edge(tmp_path, trusted, host)
    if start_node:
        await e.node.start()
    e.listener.start()
    try:
        yield e
    finally:
        await e.listener.stop()
        await e.node.stop()


def binding_request() -> tuple[bytes, bytes]:
    tid = os.urandom(12)
    return stun.Builder(stun.BINDING, stun.REQUEST, tid).encode(), tid


async def stun_exchange(reader, writer) -> stun.Message:
    request, tid = binding_request()
    writer.write(request)
    await writer.drain()
    header = await asyncio.wait_for(reader.readexactly(20), WAIT_S)
    body = await asyncio.wait_for(reader.readexactly(int.from_bytes(header[2:4], "big")), WAIT_S)
    answer = stun.parse(header + body)
    assert answer.transaction_id == tid and answer.cls == stun.SUCCESS
    return answer


def mapped(answer: stun.Message) -> tuple[str, int]:
    value = answer.get(stun.XOR_MAPPED_ADDRESS)
    assert value is not None
    return stun.xor_address(value, answer.transaction_id)


async def closed_by_server(reader) -> bool:
    """The server ends the connection (EOF or reset) within WAIT_S."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT_S) == b""
    except (ConnectionError, ssl.SSLError):
        return True


async def http_get(reader, writer, path: str = "/") -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode())
    await writer.drain()
    return await asyncio.wait_for(reader.read(), WAIT_S)


def body_of(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


# ------------------------------------------------------------------ routes


@pytest.mark.parametrize("alpn, route", [(["stun.turn"], "turn_alpn"), (None, "turn_sniffed")])
def test_turn_reaches_the_relay_node_by_alpn_or_by_its_stun_header(run, tmp_path, alpn, route):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(alpn)
            local = writer.get_extra_info("sockname")
            answer = await stun_exchange(reader, writer)
            assert mapped(answer) == (local[0], local[1])  # the relay saw the TLS client itself
            assert edge.counts()["routes"][route] == 1
            (conn,) = edge.node.connections  # one of the node's stream connections now
            assert conn.transport_name == "tls"
            writer.close()

    run(scenario())


@pytest.mark.parametrize("alpn, route", [(["http/1.1"], "http_alpn"), (None, "http_sniffed")])
def test_http_reaches_hypercorn_as_https_from_the_client(run, tmp_path, alpn, route):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(alpn)
            local = writer.get_extra_info("sockname")
            seen = body_of(await http_get(reader, writer))
            assert seen == {"client": [local[0], local[1]], "scheme": "https", "version": "1.1"}
            assert edge.counts()["routes"][route] == 1
            writer.close()

    run(scenario())


def test_an_ipv6_edge_serves_both(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path, host="::1") as edge:
            reader, writer = await edge.open(None)
            local = writer.get_extra_info("sockname")
            assert mapped(await stun_exchange(reader, writer)) == ("::1", local[1])
            writer.close()
            reader, writer = await edge.open(["http/1.1"])
            local = writer.get_extra_info("sockname")
            assert body_of(await http_get(reader, writer))["client"] == ["::1", local[1]]
            writer.close()

    run(scenario())


def test_http2_by_alpn(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            async with httpx.AsyncClient(http2=True, verify=edge.client_tls(None)) as client:
                response = await client.get(f"https://127.0.0.1:{edge.port}/")
            assert response.http_version == "HTTP/2"
            assert response.json()["version"] == "2" and response.json()["scheme"] == "https"
            assert edge.counts()["routes"]["http_alpn"] == 1

    run(scenario())


def test_a_trusted_proxy_names_the_client_for_turn_and_http(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path, trusted=("127.0.0.1",)) as edge:
            header = b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 443\r\n"
            reader, writer = await edge.open(None, prefix=header)
            assert mapped(await stun_exchange(reader, writer)) == ("203.0.113.9", 4444)
            writer.close()
            header = b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 443\r\n"
            reader, writer = await edge.open(["http/1.1"], prefix=header)
            assert body_of(await http_get(reader, writer))["client"] == ["198.51.100.7", 5555]
            writer.close()

    run(scenario())


# ------------------------------------------------------------------ hostile clients


def test_a_client_silent_after_tls_is_closed_at_the_deadline(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(None)
            assert await closed_by_server(reader)
            assert edge.counts()["closed"]["first_bytes_timeout"] == 1
            assert sum(edge.counts()["routes"].values()) == 0
            writer.close()

    run(scenario())


def test_junk_after_tls_is_answered_400_by_hypercorn(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(None)
            writer.write(b"\x00\xff" * 40 + b"\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), WAIT_S)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
            assert edge.counts()["routes"]["http_sniffed"] == 1
            writer.close()

    run(scenario())


def test_a_few_bytes_then_silence_is_closed_at_the_deadline(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(None)
            writer.write(b"\x00\x01")  # could still become STUN: never routed
            await writer.drain()
            assert await closed_by_server(reader)
            assert edge.counts()["closed"]["first_bytes_timeout"] == 1
            writer.close()

    run(scenario())


def test_a_handshake_never_finished_is_closed_and_counted(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello that stops
            await writer.drain()
            assert await closed_by_server(reader)
            assert edge.counts()["closed"]["tls_handshake_failed"] == 1
            writer.close()

    run(scenario())


@pytest.mark.parametrize(
    "first", [b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", binding_request()[0], b"\x05\x01\x00" + bytes(13)]
)
def test_plain_text_on_the_tls_port_is_closed_and_counted(run, tmp_path, first):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(first)
            await writer.drain()
            assert await closed_by_server(reader)
            assert edge.counts()["closed"]["not_tls"] == 1
            writer.close()

    run(scenario())


def test_a_proxy_header_from_an_untrusted_peer_is_closed(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 443\r\n")
            await writer.drain()
            assert await closed_by_server(reader)
            assert edge.counts()["closed"]["proxy_untrusted"] == 1
            writer.close()

    run(scenario())


def test_a_failed_hand_off_costs_one_connection_not_the_listener(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path, start_node=False) as edge:  # adopt_stream raises
            reader, writer = await edge.open(["stun.turn"])
            assert await closed_by_server(reader)
            assert edge.counts()["closed"]["stream_error"] == 1
            writer.close()
            reader, writer = await edge.open(["http/1.1"])  # the edge still serves
            assert body_of(await http_get(reader, writer))["scheme"] == "https"
            writer.close()

    run(scenario())


def test_draining_closes_idle_http_and_refuses_new_connections(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(["http/1.1"])
            writer.write(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")  # keep-alive
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"}"), WAIT_S)
            assert edge.counts()["http_open"] == 1
            await edge.listener.begin_drain()
            assert await closed_by_server(reader)  # idle keep-alive: closed
            with pytest.raises(OSError):
                await edge.open(["http/1.1"])  # not accepting
            await asyncio.wait_for(edge.listener.stop(), WAIT_S)
            assert edge.counts()["http_open"] == 0
            writer.close()

    run(scenario())


def test_stopping_aborts_a_connection_that_never_answers_the_close(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(["http/1.1"])
            writer.write(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"}"), WAIT_S)
            writer.transport.pause_reading()  # deaf to the close_notify a TLS close waits for
            await asyncio.wait_for(edge.listener.stop(), WAIT_S)  # graceful, then aborted
            assert edge.counts()["http_open"] == 0
            writer.transport.abort()

    run(scenario())


def test_metrics_show_every_route_and_reason_from_the_start(run, tmp_path):
    async def scenario():
        async with running_edge(tmp_path) as edge:
            reader, writer = await edge.open(["stun.turn"])
            await stun_exchange(reader, writer)
            writer.close()
            collector = ApplianceCollector(relay_stats=None, edge_stats=edge.listener.stats)
            return render(metrics_registry(collector)).decode()

    text = run(scenario())
    assert 'appliance_edge_connections_total{route="turn_alpn"} 1.0' in text
    for route in ("turn_sniffed", "http_alpn", "http_sniffed"):
        assert f'appliance_edge_connections_total{{route="{route}"}} 0.0' in text
    for reason in (
        "not_tls",
        "tls_handshake_failed",
        "first_bytes_timeout",
        "sniff_timeout",
        "proxy_untrusted",
    ):
        assert f'appliance_edge_closed_total{{reason="{reason}"}} 0.0' in text
    assert "appliance_edge_http_connections 0.0" in text


def test_the_edge_certificate_is_tracked_for_sighup(tmp_path):
    cert, key, _ = ensure_dev_certificate(tmp_path / "certs")
    reloader = CertificateReloader()
    ctx = edge_tls_context(cert, key, reloader)
    assert ctx.verify_mode == ssl.CERT_NONE and reloader.reload() == []
    cert.write_text("not a certificate")
    assert reloader.reload() == ["edge"]  # SIGHUP tries it (and keeps the working one)


def test_a_port_in_use_names_edge_listen():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ListenerError) as failed:
            bind_edge_socket("edge.listen", HostPort("127.0.0.1", port))
    assert str(failed.value).startswith(f"edge.listen 127.0.0.1:{port}: address already in use")
