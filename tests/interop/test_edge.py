"""The edge listener against real peers, all through one port of one appliance process whose
standard TURN ports are closed (turn.udp, tcp and tls null): headless Chromium loads the
demo page over HTTPS from the edge and makes a relay-only call over TURN over TLS on that
same port; coturn's turnutils_uclient -t -S and aioice relay through it; stomp.py,
@stomp/stompjs and sockjs-client signal through it; the HTTP API answers there. And the
hostile clients: silent after TLS, junk after TLS, a handshake never finished, plain text.

What Chromium sends for TURN over TLS is recorded here (the edge's route counters): it
names no `stun.turn` ALPN protocol, so its connections are routed by their first bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import stomp

from appliance.tls.devcert import ensure_dev_certificate

from ..netports import distinct_port_pairs, free_port_pair
from .conftest import TOKENS, RunningRelay, start_appliance, stop_appliance, tcp_open
from .test_aioice import EchoPeer, open_endpoint, wait_for_count
from .test_browser_call import ARTIFACTS
from .test_credentials_admin import admin, metric_samples
from .test_js_clients import JS_DIR, node_with_browser, node_with_clients
from .test_stomp_py import Inbox, send_json, subscribe_all
from .test_uclient import CLIENTS, MESSAGES, run_uclient, totals

STARTUP_TIMEOUT_S = 15.0
# The edge's deadlines (TLS handshake, first bytes) follow stomp.connect_timeout_s: short
# here so the hostile clients are cut off quickly.
DEADLINE_S = 3


@dataclass
class EdgeAppliance:
    relay: RunningRelay  # host, secret, cert, admin_port...; port and tls_port are the edge's
    edge_port: int

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.edge_port}"


@pytest.fixture(scope="module")
def edge_appliance(tmp_path_factory):
    edge_port = free_port_pair()
    directory = tmp_path_factory.mktemp("edge")
    cert, key, _ = ensure_dev_certificate(directory / "certs")  # the pair start_appliance uses
    relay = start_appliance(
        directory,
        # The standard TURN ports closed: only the edge relays.
        extra_turn={"udp": None, "tcp": None, "tls": None, "relay_ports": "45000-47999"},
        stomp={"connect_timeout_s": DEADLINE_S},
        calls={"ring_timeout_s": 10, "grace_s": 1},
        edge={"listen": f"127.0.0.1:{edge_port}", "tls_cert": str(cert), "tls_key": str(key)},
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not tcp_open("127.0.0.1", edge_port):
        if relay.proc.poll() is not None or time.monotonic() > deadline:
            stop_appliance(relay)
            raise RuntimeError(f"the edge did not open:\n{relay.log()}")
        time.sleep(0.1)
    # Its own TURN ports are closed: the peers reach the relay through the edge.
    yield EdgeAppliance(dataclasses.replace(relay, port=edge_port, tls_port=edge_port), edge_port)
    code = stop_appliance(relay)
    assert code == 0, f"appliance exited with {code} on SIGTERM:\n{relay.log()}"
    assert "Traceback" not in relay.log(), relay.log()[-3000:]


def test_the_container_healthcheck_answers_through_the_edge_alone(edge_appliance):
    """`appliance healthcheck` (the Dockerfile's) asks the edge over TLS when no other TURN
    listener is on."""
    from appliance.cli import main

    assert main(["healthcheck", "--config", str(edge_appliance.relay.config_path)]) == 0


def edge_counts(app: EdgeAppliance) -> dict[str, float]:
    """{"route:turn_sniffed": n, "closed:not_tls": n, ...} from /metrics."""
    samples = metric_samples(admin(app.relay, "GET", "/metrics").text)
    families = {"appliance_edge_connections_total": "route", "appliance_edge_closed_total": "closed"}
    return {
        f"{families[name]}:{labels[0][1]}": value
        for (name, labels), value in samples.items()
        if name in families
    }


def counted(app: EdgeAppliance, key: str, at_least: float, timeout_s: float = 5.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = edge_counts(app).get(key, 0)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def client_tls(app: EdgeAppliance, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(app.relay.cert))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# ------------------------------------------------------------------ the HTTP API and iceServers


def test_the_http_api_answers_on_the_edge_with_the_edge_as_the_only_turn_url(edge_appliance):
    app = edge_appliance
    for http2 in (False, True):
        with httpx.Client(verify=client_tls(app), http2=http2) as client:
            r = client.get(f"{app.base}/imserver/turn/get-turn-credentials", headers={"ide": "tok-alice"})
        assert r.status_code == 200 and r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        (entry,) = r.json()["data"]["iceServers"]
        assert entry["urls"] == f"turns:127.0.0.1:{app.edge_port}?transport=tcp"
        assert entry["username"].endswith(":alice")


# ------------------------------------------------------------------ TURN clients


def test_uclient_over_tls_relays_through_the_edge_without_loss(edge_appliance, turn_peer):
    app = edge_appliance
    before = counted(app, "route:turn_alpn", 0)
    output = run_uclient(app.relay, turn_peer, ["-t", "-S"], "127.0.0.1", port=app.edge_port)
    sent, received, lost = totals(output)
    assert sent == MESSAGES * CLIENTS and received == sent and lost == 0, output[-2000:]
    # uclient names the RFC 7443 ALPN protocol: its connections were routed by it. (It also
    # tries TLS 1.0 and 1.1 contexts, which the edge refuses: counted as failed handshakes.)
    assert counted(app, "route:turn_alpn", before + CLIENTS) >= before + CLIENTS


async def test_aioice_over_tls_gets_a_relayed_candidate_through_the_edge(edge_appliance):
    app = edge_appliance
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(EchoPeer, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    username, password = app.relay.credentials("aioice-edge")
    turn, collector = await open_endpoint(app.relay, "tls", username, password)
    try:
        relayed = turn.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1" and 45000 <= relayed[1] <= 47999
        for i in range(10):
            turn.sendto(b"edge%02d" % i, peer_addr)
        await wait_for_count(collector, 10)
        assert sorted(d for d, _ in collector.received) == [b"echo:edge%02d" % i for i in range(10)]
        assert peer.count == 10
    finally:
        turn.close()
        peer_transport.close()


# ------------------------------------------------------------------ signaling clients


def stomp_over_edge(app: EdgeAppliance, user: str):
    conn = stomp.WSConnection(
        [("127.0.0.1", app.edge_port)], ws_path=f"/imserver/ws?userId={user}", heartbeats=(0, 0)
    )
    conn.set_ssl(
        for_hosts=[("127.0.0.1", app.edge_port), ("localhost", app.edge_port)], ca_certs=str(app.relay.cert)
    )
    inbox = Inbox()
    conn.set_listener("inbox", inbox)
    conn.connect(headers={"ide": TOKENS_BY_USER[user]}, wait=True, with_connect_command=True)
    return conn, inbox


TOKENS_BY_USER = {user: token for token, user in TOKENS.items()}


def test_stomp_py_over_wss_through_the_edge(edge_appliance):
    app = edge_appliance
    alice, alice_in = stomp_over_edge(app, "alice")
    subscribe_all(alice)
    send_json(alice, "/app/user/status", ["bob"])
    assert alice_in.next() == ("/topic/user/status", [{"userId": "bob", "status": "OFFLINE"}])
    bob, _ = stomp_over_edge(app, "bob")
    assert alice_in.next() == ("/topic/user/status", [{"userId": "bob", "status": "ONLINE"}])
    bob.disconnect()
    assert alice_in.next() == ("/topic/user/status", [{"userId": "bob", "status": "OFFLINE"}])
    alice.disconnect()


@pytest.mark.parametrize("mode", ["stompjs-ws", "stompjs-sockjs-websocket", "stompjs-sockjs-xhr-streaming"])
def test_js_clients_through_the_edge(edge_appliance, mode):
    node = node_with_clients()
    done = subprocess.run(
        [node, str(JS_DIR / "client.js"), mode, edge_appliance.base, "/imserver"],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(edge_appliance.relay.cert)},
    )
    steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and steps and steps[-1]["step"] == "ok", (
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


# ------------------------------------------------------------------ the browser


def client_hello_alpn(record: bytes) -> list[str] | None:
    """The ALPN protocols a TLS ClientHello offers (None: no ALPN extension), from its
    first record (RFC 8446 §4.1.2: the extensions follow the session id, the cipher
    suites and the compression methods)."""
    assert record[0] == 0x16 and record[5] == 0x01, "not a ClientHello"
    at = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
    at += 1 + record[at]  # legacy_session_id
    at += 2 + int.from_bytes(record[at : at + 2], "big")  # cipher_suites
    at += 1 + record[at]  # legacy_compression_methods
    end = at + 2 + int.from_bytes(record[at : at + 2], "big")
    at += 2
    while at < end:
        kind, size = (
            int.from_bytes(record[at : at + 2], "big"),
            int.from_bytes(record[at + 2 : at + 4], "big"),
        )
        if kind == 16:  # application_layer_protocol_negotiation (RFC 7301)
            names, pos = [], at + 6
            while pos < at + 4 + size:
                names.append(record[pos + 1 : pos + 1 + record[pos]].decode())
                pos += 1 + record[pos]
            return names
        at += 4 + size
    return None


@pytest.mark.parametrize("alpn", [None, ["stun.turn"], ["h2", "http/1.1"]])
def test_the_client_hello_reader_sees_the_alpn_offer_or_its_absence(alpn):
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="edge.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    assert client_hello_alpn(outgoing.read()) == alpn


class ClientHelloRecorder:
    """A TCP listener that keeps the first TLS record of the first connection (a ClientHello)
    and closes: where Chromium's TURN over TLS is pointed to see its ALPN offer."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.record = b""
        self.thread = threading.Thread(target=self._keep_one, daemon=True)
        self.thread.start()

    def _keep_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            self.record = data

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_chromium_calls_relay_only_over_turn_over_tls_on_the_edge(edge_appliance):
    app = edge_appliance
    node = node_with_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = edge_counts(app)
    recorder = ClientHelloRecorder()
    try:
        done = subprocess.run(
            [
                node,
                str(JS_DIR / "edge_call.js"),
                app.base,
                str(ARTIFACTS),
                "tok-alice",
                "tok-bob",
                str(recorder.port),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        recorder.close()
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    edge_url = f"turns:127.0.0.1:{app.edge_port}?transport=tcp"
    assert result["relayOnly"], result
    for side in ("alice", "bob"):
        stats = result[side]
        assert stats["iceServers"] == [edge_url], result  # the only TURN URL handed out
        assert stats["policy"] == "relay", result
        assert stats["iceConnectionState"] in ("connected", "completed"), result
        assert (stats["localType"], stats["remoteType"]) == ("relay", "relay"), result
        # The relayed candidate came through the edge port, over TLS.
        assert stats["relayProtocol"] == "tls" and stats["url"] == edge_url, result
        assert stats["framesDecoded"] > 0, result
    assert result["bobSawHangup"] == "Call ended: hung up by the other side"
    after = edge_counts(app)
    routes = {
        route: after.get(f"route:{route}", 0) - before.get(f"route:{route}", 0)
        for route in ("turn_alpn", "turn_sniffed", "http_alpn", "http_sniffed")
    }
    # What Chromium sends, recorded: its TURN over TLS offers no ALPN at all (so the edge
    # routes it by its STUN header), its page and WSS offer h2 and http/1.1.
    offered = client_hello_alpn(recorder.record)
    (ARTIFACTS / "edge-chromium.json").write_text(
        json.dumps({"chromium": result["browserVersion"], "routes": routes, "turn_tls_alpn": offered})
    )
    assert offered is None, offered
    assert routes["turn_sniffed"] >= 2 and routes["turn_alpn"] == 0, routes
    assert routes["http_alpn"] >= 2, routes


# ------------------------------------------------------------------ hostile clients


def test_a_client_silent_after_tls_is_closed_at_the_deadline_and_counted(edge_appliance):
    app = edge_appliance
    before = edge_counts(app).get("closed:first_bytes_timeout", 0)
    with socket.create_connection(("127.0.0.1", app.edge_port), timeout=DEADLINE_S + 5) as raw:
        with client_tls(app).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(100) == b""  # closed by the edge, not by our timeout
    assert counted(app, "closed:first_bytes_timeout", before + 1) == before + 1


def test_junk_after_tls_is_answered_400(edge_appliance):
    app = edge_appliance
    with socket.create_connection(("127.0.0.1", app.edge_port), timeout=DEADLINE_S + 5) as raw:
        with client_tls(app).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"\x00\xff" * 40 + b"\r\n\r\n")
            answer = tls.recv(100)
    assert answer.startswith(b"HTTP/1.1 400"), answer


def test_a_handshake_never_finished_is_closed_at_the_deadline_and_counted(edge_appliance):
    app = edge_appliance
    before = edge_counts(app).get("closed:tls_handshake_failed", 0)
    with socket.create_connection(("127.0.0.1", app.edge_port), timeout=DEADLINE_S + 5) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello that stops
        assert raw.recv(100) == b""
    assert counted(app, "closed:tls_handshake_failed", before + 1) == before + 1


def test_plain_http_on_the_edge_is_closed_and_counted(edge_appliance):
    app = edge_appliance
    before = edge_counts(app).get("closed:not_tls", 0)
    with socket.create_connection(("127.0.0.1", app.edge_port), timeout=DEADLINE_S + 5) as raw:
        raw.sendall(b"GET /imserver/demo/ HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        try:
            assert raw.recv(100) == b""
        except ConnectionResetError:
            pass  # closed with the request unread: a reset, as good as a FIN here
    assert counted(app, "closed:not_tls", before + 1) == before + 1


# ------------------------------------------------------------------ start


def test_an_edge_port_in_use_stops_the_start_naming_edge_listen(tmp_path):
    cert, key, _ = ensure_dev_certificate(tmp_path / "certs")
    http_port, admin_port = distinct_port_pairs(2)
    with socket.create_server(("127.0.0.1", 0)) as holder:
        edge = f"127.0.0.1:{holder.getsockname()[1]}"
        config = {
            "data_dir": str(tmp_path / "data"),
            "credentials": {"secrets_file": str(tmp_path / "secrets.json")},
            "turn": {"udp": None, "tcp": None, "tls": None},
            "edge": {"listen": edge, "tls_cert": str(cert), "tls_key": str(key)},
            "http": {"listen": f"127.0.0.1:{http_port}", "tls": False},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
        }
        (tmp_path / "appliance.yaml").write_text(json.dumps(config))
        done = subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--config", str(tmp_path / "appliance.yaml")],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert "Traceback" not in done.stderr and done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: edge.listen {edge}: address already in use (another server may hold it; "
        "set edge.listen or stop it)"
    ), done.stderr
