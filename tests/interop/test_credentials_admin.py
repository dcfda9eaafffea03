"""Issue 6 end to end: TURN credentials handed out over STOMP (stomp.py) and HTTP verify
on our relay (aioice allocates with them) and on a real coturn configured from
`appliance coturn-config`; a secret rotation while a client holds an allocation;
the admin listener (token, readiness, Prometheus metrics that parse and move);
SIGTERM drains; SIGHUP reloads the TLS certificate without dropping connections."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest
from aioice import stun as aioice_stun
from aioice.turn import create_turn_endpoint
from prometheus_client.parser import text_string_to_metric_families

from appliance.credentials.ring import load_ring
from appliance.tls.devcert import ensure_dev_certificate
from turn.auth import rest_password

from ..netports import free_port_pair
from .conftest import ADMIN_TOKEN, require_program, start_appliance, stop_appliance
from .test_aioice import Collector, EchoPeer, wait_for_count
from .test_stomp_py import client, send_json
from .test_ws_protocol import CONNECT, sockjs_ws

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def appliance(tmp_path):
    started = []

    def start(**kw):
        running = start_appliance(tmp_path / f"a{len(started)}", **kw)
        started.append(running)
        return running

    yield start
    for running in started:
        assert stop_appliance(running) == 0, running.log()


def http_credentials(app, token: str = "tok-alice") -> dict:
    r = httpx.get(
        f"http://127.0.0.1:{app.http_port}/imserver/turn/get-turn-credentials",
        headers={"ide": token},
        timeout=5,
    )
    body = r.json()
    assert r.status_code == 200 and body["code"] == 200, body
    return body["data"]


def turn_entry(answer: dict, prefix: str) -> dict:
    return next(e for e in answer["iceServers"] if e["urls"].startswith(prefix))


def admin(app, method: str, path: str, headers=AUTH) -> httpx.Response:
    return httpx.request(method, f"http://127.0.0.1:{app.admin_port}{path}", headers=headers, timeout=5)


async def allocate(host: str, port: int, username: str, password: str):
    """aioice allocation over UDP; the TURN transport, or the STUN error code."""
    try:
        turn, _ = await create_turn_endpoint(Collector, (host, port), username, password)
    except aioice_stun.TransactionFailed as exc:
        return exc.response.attributes["ERROR-CODE"][0]
    return turn


async def refresh(turn, lifetime: int = 600) -> int:
    """One Refresh on the live allocation (aioice's own loop waits minutes); the LIFETIME granted."""
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.REFRESH, message_class=aioice_stun.Class.REQUEST
    )
    request.attributes["LIFETIME"] = lifetime
    response, _ = await turn._TurnTransport__inner_protocol.request_with_retry(request)
    return response.attributes["LIFETIME"]


async def allocation_works(host: str, port: int, username: str, password: str) -> bool:
    turn = await allocate(host, port, username, password)
    if isinstance(turn, int):
        assert turn == 401, f"expected 401, got {turn}"
        return False
    turn.close()
    await asyncio.sleep(0.05)
    return True


def metric_samples(text: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# ------------------------------------------------------------------ credentials


async def test_stomp_and_http_credentials_allocate_on_our_relay(appliance):
    app = appliance()
    conn, inbox = client(app, "alice", "tok-alice")
    conn.subscribe("/user/queue/turn/get-turn-credentials", id="turn")
    conn.subscribe("/user/queue/errors", id="errors")
    send_json(conn, "/app/turn/get-turn-credentials", {})
    destination, over_stomp = inbox.next()
    assert destination == "/user/queue/turn/get-turn-credentials"
    send_json(conn, "/app/turn/get-turn-credentials", [1])
    assert inbox.next() == ("/user/queue/errors", {"code": 400, "message": "body must be a JSON object ({})"})
    conn.disconnect()
    over_http = http_credentials(app)
    for answer in (over_stomp, over_http):
        assert answer["ttl"] == 86400
        urls = [e["urls"] for e in answer["iceServers"]]
        assert urls == [
            f"stun:127.0.0.1:{app.port}",
            f"turn:127.0.0.1:{app.port}?transport=udp",
            f"turn:127.0.0.1:{app.port}?transport=tcp",
            f"turns:127.0.0.1:{app.tls_port}?transport=tcp",
        ]
        entry = turn_entry(answer, "turn:")
        assert entry["username"].endswith(":alice") and entry["url"] == entry["urls"]
        assert await allocation_works("127.0.0.1", app.port, entry["username"], entry["credential"])
    refused = httpx.get(f"http://127.0.0.1:{app.http_port}/imserver/turn/get-turn-credentials", timeout=5)
    assert refused.status_code == 401 and refused.json()["code"] == 401


def start_coturn(directory, conf_lines: list[str], port: int) -> subprocess.Popen:
    program = require_program("turnserver")
    conf = directory / "turnserver.conf"
    conf.write_text(
        "\n".join(
            conf_lines
            + [
                f"listening-port={port}",
                "listening-ip=127.0.0.1",
                "relay-ip=127.0.0.1",
                "min-port=46000",
                "max-port=46999",
                "no-cli",
                "no-tls",
                "no-dtls",
                "no-tcp",
                f"log-file={directory / 'coturn.log'}",
                "simple-log",
                f"pidfile={directory / 'coturn.pid'}",
            ]
        )
        + "\n"
    )
    os.chmod(conf, 0o600)
    proc = subprocess.Popen([program, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    from .conftest import stun_binding_ok

    while not stun_binding_ok("127.0.0.1", port):
        assert proc.poll() is None and time.monotonic() < deadline, "coturn did not start"
        time.sleep(0.1)
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def coturn_config(app) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "coturn-config", "--config", str(app.config_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


async def test_credentials_for_an_external_coturn_configured_by_coturn_config(appliance, tmp_path):
    coturn_port = free_port_pair()
    url = f"turn:127.0.0.1:{coturn_port}?transport=udp"
    app = appliance(
        extra_turn={"udp": None, "tcp": None, "tls": None}, credentials={"external": [url], "activation_s": 0}
    )
    answer = http_credentials(app)
    assert [e["urls"] for e in answer["iceServers"]] == [url]  # signaling-only: coturn alone
    entry = answer["iceServers"][0]
    coturn = start_coturn(tmp_path, coturn_config(app), coturn_port)
    try:
        assert await allocation_works("127.0.0.1", coturn_port, entry["username"], entry["credential"])
        assert not await allocation_works("127.0.0.1", coturn_port, entry["username"], "wrong")
        # Rotate: coturn restarted on the new output accepts old and new credentials alike.
        assert admin(app, "POST", "/admin/secrets/rotate").status_code == 200
        await asyncio.sleep(2.5)
        newer = http_credentials(app)["iceServers"][0]
        assert newer["credential"] != entry["credential"]
        stop_process(coturn)
        lines = coturn_config(app)
        assert sum(line.startswith("static-auth-secret=") for line in lines) == 2
        coturn = start_coturn(tmp_path, lines, coturn_port)
        for e in (entry, newer):
            assert await allocation_works("127.0.0.1", coturn_port, e["username"], e["credential"])
    finally:
        stop_process(coturn)


async def test_rotation_while_an_allocation_is_live(appliance):
    grace_s = 6
    app = appliance(credentials={"secret_grace_s": grace_s, "activation_s": 1})
    ring_path = app.config_path.parent / "secrets.json"
    first = load_ring(ring_path).current()
    old = turn_entry(http_credentials(app), "turn:")
    assert old["credential"] == rest_password(first.value.encode(), old["username"])
    turn, _ = await create_turn_endpoint(
        Collector, ("127.0.0.1", app.port), old["username"], old["credential"]
    )
    try:
        rotated = admin(app, "POST", "/admin/secrets/rotate")
        assert rotated.status_code == 200
        rotated_at = time.monotonic()
        body = rotated.json()
        new_id = body["current"]
        assert body["signing"] == first.id  # still activating
        assert all("value" not in row for row in body["secrets"])
        await asyncio.sleep(1.5)
        new = turn_entry(http_credentials(app), "turn:")
        new_secret = next(s for s in load_ring(ring_path).secrets if s.id == new_id)
        assert new["credential"] == rest_password(new_secret.value.encode(), new["username"])
        assert await allocation_works("127.0.0.1", app.port, new["username"], new["credential"])
        # The live allocation keeps refreshing under the old credentials during grace.
        assert await refresh(turn) == 600
        assert await allocation_works("127.0.0.1", app.port, old["username"], old["credential"])
        # After grace the old credentials are refused; the new ones still work.
        await asyncio.sleep(max(0.0, rotated_at + grace_s + 2.5 - time.monotonic()))
        assert not await allocation_works("127.0.0.1", app.port, old["username"], old["credential"])
        assert await allocation_works("127.0.0.1", app.port, new["username"], new["credential"])
    finally:
        turn.close()


# ------------------------------------------------------------------ admin and metrics


async def test_admin_endpoints_need_the_token_and_metrics_move(appliance):
    app = appliance()
    assert admin(app, "GET", "/healthz", headers={}).json() == {"status": "ok"}
    ready = admin(app, "GET", "/readyz", headers={})
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.json()
    for path, method in (("/metrics", "GET"), ("/admin/secrets", "GET"), ("/admin/secrets/rotate", "POST")):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-xxxxxxxxxxxxxxx"},
            {"Authorization": ADMIN_TOKEN},
        ):
            r = admin(app, method, path, headers=headers)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(load_ring(app.config_path.parent / "secrets.json").secrets) == 1  # nothing rotated
    listed = admin(app, "GET", "/admin/secrets").json()
    assert app.secret not in json.dumps(listed) and listed["secrets"][0]["state"] == "current"

    before = metric_samples(admin(app, "GET", "/metrics").text)
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(EchoPeer, local_addr=("127.0.0.1", 0))
    entry = turn_entry(http_credentials(app), "turn:")
    turn, collector = await create_turn_endpoint(
        Collector, ("127.0.0.1", app.port), entry["username"], entry["credential"]
    )
    conn, _ = client(app, "bob", "tok-bob")
    try:
        peer_addr = peer_transport.get_extra_info("sockname")
        for _ in range(20):
            turn.sendto(b"x" * 100, peer_addr)
        await wait_for_count(collector, 20)
        assert not await allocation_works("127.0.0.1", app.port, entry["username"], "bad")
        after = metric_samples(admin(app, "GET", "/metrics").text)
    finally:
        conn.disconnect()
        turn.close()
        peer_transport.close()

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert after[("appliance_relay_allocations", ())] >= 1
    assert moved("appliance_relay_allocations_created_total") >= 1
    assert moved("appliance_relay_packets_total", direction="to_peer") >= 20
    assert moved("appliance_relay_packets_total", direction="to_client") >= 20
    assert moved("appliance_relay_bytes_total", direction="to_peer") >= 2000
    assert moved("appliance_relay_auth_failures_total", reason="bad_credentials") >= 1
    assert moved("appliance_turn_credentials_issued_total", transport="http") == 1
    assert after[("appliance_signaling_sessions", ())] >= 1
    assert after[("appliance_secret_ring_size", ())] == 1
    assert ("appliance_calls_total", (("outcome", "accepted"),)) in after
    # No per-user label anywhere.
    bounded_labels = {"reason", "code", "outcome", "direction", "transport", "path", "result", "route", "le"}
    assert not any(dict(labels).keys() - bounded_labels for _, labels in after)


# ------------------------------------------------------------------ SIGTERM drain


async def test_sigterm_closes_sessions_cleanly_and_drains_allocations(appliance):
    drain_s = 3
    app = appliance(extra_turn={"drain_s": drain_s})
    conn, inbox = client(app, "alice", "tok-alice")
    sockjs = sockjs_ws(app, "drain1")
    assert sockjs.recv() == "o"
    sockjs.send(json.dumps([CONNECT.format(token="tok-alice")]))
    assert json.loads(sockjs.recv()[1:])[0].startswith("CONNECTED\n")
    entry = turn_entry(http_credentials(app), "turn:")
    turn, _ = await create_turn_endpoint(
        Collector, ("127.0.0.1", app.port), entry["username"], entry["credential"]
    )
    try:
        started = time.monotonic()
        app.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not inbox.errors and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert inbox.errors == ["server shutting down"]
        (error,) = json.loads(sockjs.recv()[1:])
        assert error.startswith("ERROR\nmessage:server shutting down\n")
        assert sockjs.recv() == 'c[3000,"Go away!"]'
        await asyncio.sleep(0.3)
        # Draining: not ready, new allocations refused with 508, the live one still answers.
        assert admin(app, "GET", "/readyz", headers={}).status_code == 503
        assert await allocate("127.0.0.1", app.port, entry["username"], entry["credential"]) == 508
        assert await refresh(turn) == 600
        code = await asyncio.get_running_loop().run_in_executor(None, app.proc.wait, drain_s + 10)
        took = time.monotonic() - started
    finally:
        turn.close()
    assert code == 0, app.log()
    assert drain_s - 0.5 <= took <= drain_s + 4, took
    assert "drain over: closing 1 allocation(s)" in app.log()


def test_sigterm_without_live_allocations_exits_at_once(appliance):
    app = appliance(extra_turn={"drain_s": 30})
    started = time.monotonic()
    assert stop_appliance(app) == 0
    assert time.monotonic() - started < 8


# ------------------------------------------------------------------ SIGHUP certificate reload


def tls_peer_certificate(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        with ctx.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def stun_over(tls_sock) -> bool:
    from turn import stun

    tid = os.urandom(12)
    tls_sock.sendall(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode())
    return stun.parse(tls_sock.recv(2048)).transaction_id == tid


def test_sighup_reloads_the_tls_certificates_and_keeps_connections(appliance, tmp_path):
    edge_port = free_port_pair()
    app = appliance(http={"tls": True}, edge={"listen": f"127.0.0.1:{edge_port}"})
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    established = ctx.wrap_socket(socket.create_connection(("127.0.0.1", app.tls_port), timeout=3))
    try:
        before = established.getpeercert(binary_form=True)
        new_cert, new_key, _ = ensure_dev_certificate(tmp_path / "new-certs")
        app.cert.write_bytes(new_cert.read_bytes())
        key_path = app.cert.with_name(app.cert.name.replace("cert", "key"))
        assert key_path.exists(), key_path
        key_path.write_bytes(new_key.read_bytes())
        app.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while tls_peer_certificate(app.tls_port) == before:
            assert time.monotonic() < deadline, "certificate not reloaded"
            time.sleep(0.1)
        new_der = ssl.PEM_cert_to_DER_cert(new_cert.read_text())
        assert tls_peer_certificate(app.tls_port) == new_der
        assert tls_peer_certificate(app.http_port) == new_der  # HTTPS too
        assert tls_peer_certificate(edge_port) == new_der  # and the edge (http's pair)
        assert stun_over(established)  # the old connection lives on
        # A broken pair is refused and the current certificate stays.
        key_path.write_text("not a key")
        app.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert tls_peer_certificate(app.tls_port) == new_der
        assert tls_peer_certificate(edge_port) == new_der
        assert "certificate not reloaded" in app.log()
    finally:
        established.close()


async def test_metrics_sum_every_relay_worker(appliance):
    app = appliance(workers=2)
    entry = turn_entry(http_credentials(app), "turn:")
    held = []
    try:
        for _ in range(6):  # distinct source ports: the kernel spreads them over the workers
            turn, _ = await create_turn_endpoint(
                Collector, ("127.0.0.1", app.port), entry["username"], entry["credential"]
            )
            held.append(turn)
        await asyncio.sleep(2.5)  # a worker reports every second
        samples = metric_samples(admin(app, "GET", "/metrics").text)
        assert samples[("appliance_relay_processes", ())] == 2
        assert samples[("appliance_relay_allocations", ())] == 6
        assert samples[("appliance_relay_allocations_created_total", ())] == 6
    finally:
        for turn in held:
            turn.close()
