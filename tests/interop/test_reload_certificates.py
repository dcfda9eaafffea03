"""Issue 17, hot reload of the TLS file paths: a real appliance with two relay processes
(turn.workers: 2), TURN over TLS, HTTPS signaling and the edge (which serves the http
listener's pair).  The file points turn.tls_cert/tls_key and http.tls_cert/tls_key at a new
certificate and SIGHUP is sent: every new handshake, on whichever relay process the kernel
gives it, on the http listener and on the edge, sees the new certificate, while a TLS
connection made before keeps its certificate and still answers STUN, and a relay worker
restarted afterwards serves the new one too.  A file naming a pair
that does not load, or a file that does not exist, is refused whole (its valid changes
neither apply), and /metrics counts the reloads by result."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from appliance.tls.devcert import ensure_dev_certificate

from ..netports import distinct_port_pairs
from .conftest import ADMIN_TOKEN, start_appliance, stop_appliance
from .test_revoke import wait_for_both_processes

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HANDSHAKES = 16  # new TLS connections to the relay: over both processes (2**-15 to miss one)
BINDING_REQUEST = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)  # RFC 8489, no attributes


@pytest.fixture
def edge_port() -> int:
    return distinct_port_pairs(1)[0]


@pytest.fixture
def app(tmp_path, edge_port):
    running = start_appliance(
        tmp_path / "a", workers=2, http={"tls": True}, edge={"listen": f"127.0.0.1:{edge_port}"}
    )
    wait_for_both_processes(running)
    yield running
    assert stop_appliance(running) == 0, running.log()


def tls_connection(port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))


def served_certificate(port: int) -> bytes:
    """The certificate a new TLS handshake on `port` gets (DER)."""
    with tls_connection(port) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def rewrite(app, **sections: dict) -> None:
    config = json.loads(app.config_path.read_text())
    for name, values in sections.items():
        config[name].update(values)
    app.config_path.write_text(json.dumps(config))


def reload_over_http(app) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{app.admin_port}/admin/reload", headers=AUTH, timeout=5)


def wait_in_log(app, text: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while app.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not {count} time(s) in the log:\n{app.log()[-3000:]}"
        time.sleep(0.1)


def relay_worker_pid(app) -> int:
    """The appliance's relay worker: its child started by multiprocessing's spawn (the
    other one, if any, is multiprocessing's resource tracker)."""
    children = Path(f"/proc/{app.proc.pid}/task/{app.proc.pid}/children").read_text().split()
    workers = [
        int(pid)
        for pid in children
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 1, children
    return workers[0]


def reloads_on_metrics(app) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{app.admin_port}/metrics", headers=AUTH, timeout=5).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("appliance_config_reloads_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            counts[result] = float(line.rsplit(" ", 1)[1])
    return counts


def test_reloaded_tls_paths_serve_new_handshakes_and_keep_established_ones(app, edge_port, tmp_path):
    old = der_of(app.cert)
    held = tls_connection(app.tls_port)
    assert held.getpeercert(binary_form=True) == old
    assert served_certificate(app.http_port) == served_certificate(edge_port) == old
    new_cert, new_key, _ = ensure_dev_certificate(tmp_path / "new")
    new = der_of(new_cert)
    assert new != old

    pair = {"tls_cert": str(new_cert), "tls_key": str(new_key)}
    rewrite(app, turn=pair, http=pair)
    app.proc.send_signal(signal.SIGHUP)
    wait_in_log(app, "configuration reloaded: turn.tls_cert, turn.tls_key, http.tls_cert, http.tls_key", 1)
    wait_in_log(app, "relay worker: reloaded configuration applied", 1)
    assert [served_certificate(app.tls_port) for _ in range(HANDSHAKES)] == [new] * HANDSHAKES
    assert served_certificate(app.http_port) == new
    assert served_certificate(edge_port) == new  # the edge serves the http listener's pair

    # The connection made before keeps its certificate and still answers.
    held.sendall(BINDING_REQUEST)
    answer = held.recv(2048)
    assert answer[:2] == b"\x01\x01" and answer[8:20] == BINDING_REQUEST[8:20]
    assert held.getpeercert(binary_form=True) == old
    held.close()

    # A relay worker that dies is restarted with the reloaded configuration and files.
    before = app.log().count("relay ready:")
    os.kill(relay_worker_pid(app), signal.SIGKILL)
    wait_in_log(app, "relay ready:", before + 1)
    assert [served_certificate(app.tls_port) for _ in range(HANDSHAKES)] == [new] * HANDSHAKES

    # A pair that does not load refuses the whole file: the http change in it neither applies.
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    back = {"tls_cert": str(app.cert), "tls_key": str(app.cert.parent / "key.pem")}  # valid
    rewrite(app, turn={"tls_cert": str(garbage)}, http=back)
    refused = reload_over_http(app)
    assert refused.status_code == 422 and refused.json()["result"] == "refused", refused.text
    assert f"turn tls certificate {garbage} with key" in refused.json()["error"], refused.text
    rewrite(app, turn={"tls_cert": str(tmp_path / "missing.pem")}, http=pair)
    missing = reload_over_http(app)
    assert missing.status_code == 422 and "does not exist" in missing.json()["error"], missing.text
    assert [served_certificate(app.tls_port) for _ in range(HANDSHAKES)] == [new] * HANDSHAKES
    assert served_certificate(app.http_port) == served_certificate(edge_port) == new
    ready = httpx.get(f"http://127.0.0.1:{app.admin_port}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert reloads_on_metrics(app) == {"applied": 1, "unchanged": 0, "refused": 2}
