"""Fixtures for interop tests: our appliance as a real process, and external programs.

The appliance runs exactly as an operator runs it (`python -m appliance serve
--config FILE`) on free loopback ports, with a secret ring and a certificate
made for the session.  It is stopped by its PID with SIGTERM, and the test
session checks it exits cleanly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.credentials.ring import SecretRing, new_secret, save_ring
from appliance.tls.devcert import ensure_dev_certificate

from .. import external
from ..netports import distinct_port_pairs, free_port_pair

REALM = "interop.test"
STARTUP_TIMEOUT_S = 15.0


def require_program(name: str, install: str = "apt-get install coturn") -> str:
    """The program's path; skip (or fail under REQUIRE_INTEROP=1) if it is missing."""
    return external.require_program(name, install)


def rest_credentials(secret: str, user: str, ttl_s: int = 3600, now: float | None = None):
    username = f"{int(now if now is not None else time.time()) + ttl_s}:{user}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


@dataclass
class RunningRelay:
    proc: subprocess.Popen
    host: str
    port: int  # UDP and TCP
    tls_port: int
    secret: str
    cert: Path
    log_path: Path
    http_port: int
    admin_port: int
    config_path: Path

    def credentials(self, user: str = "alice", ttl_s: int = 3600, now: float | None = None):
        return rest_credentials(self.secret, user, ttl_s, now)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stun_binding_ok(host: str, port: int) -> bool:
    from turn import stun

    tid = os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        try:
            s.sendto(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode(), (host, port))
            return stun.parse(s.recv(2048)).transaction_id == tid
        except (OSError, stun.StunParseError):
            return False


TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol"}
ADMIN_TOKEN = "interop-admin-token-0123456789"


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def start_appliance(
    directory: Path,
    extra_turn: dict | None = None,
    workers: int = 1,
    auth: dict | None = None,
    stomp: dict | None = None,
    calls: dict | None = None,
    credentials: dict | None = None,
    admin: dict | None = None,
    http: dict | None = None,
    broker: dict | None = None,
    open_files: tuple[int, int] | None = None,
    edge: dict | None = None,
) -> RunningRelay:
    """The appliance as an operator runs it; `open_files` (soft, hard) is its RLIMIT_NOFILE
    at exec, as a shell's ulimit would set it."""
    directory.mkdir(parents=True, exist_ok=True)
    secret = new_secret(time.time())
    save_ring(directory / "secrets.json", SecretRing((secret,)))
    cert, key, _ = ensure_dev_certificate(directory / "certs")
    port, tls_port, http_port, admin_port = distinct_port_pairs(4)
    turn = {
        "udp": f"127.0.0.1:{port}",
        "tcp": f"127.0.0.1:{port}",
        "tls": f"127.0.0.1:{tls_port}",
        "tls_cert": str(cert),
        "tls_key": str(key),
        "relay_ip": "127.0.0.1",
        "relay_ip6": "::1",
        "relay_ports": "40000-44999",
        # Interop peers live on loopback: allowed explicitly, as an operator would.
        "allow_peers": ["127.0.0.1", "::1"],
        "user_quota": 0,
        "workers": workers,
        "drain_s": 1,
    }
    turn.update(extra_turn or {})
    config = {
        "realm": REALM,
        "data_dir": str(directory / "data"),
        "turn": turn,
        "credentials": {"secrets_file": str(directory / "secrets.json"), **(credentials or {})},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN, **(admin or {})},
        "http": {"listen": f"127.0.0.1:{http_port}", "tls": False, **(http or {})},
        "auth": auth or {"mode": "static", "tokens": TOKENS},
        "stomp": stomp or {},
        "calls": calls or {"ring_timeout_s": 3, "grace_s": 1},
        "broker": broker or {},
        "edge": edge or {},
    }
    if config["http"]["tls"] and "tls_cert" not in config["http"]:
        config["http"].update(tls_cert=str(cert), tls_key=str(key))  # one pair for both
    config_path = directory / "appliance.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    log_path = directory / "appliance.log"
    log_file = open(log_path, "wb")
    limit = None if open_files is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        preexec_fn=limit,
    )
    log_file.close()
    relay = RunningRelay(
        proc, "127.0.0.1", port, tls_port, secret.value, cert, log_path, http_port, admin_port, config_path
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"appliance exited with {proc.returncode}:\n{relay.log()}")
        relay_up = turn["udp"] is None or stun_binding_ok("127.0.0.1", port)
        admin_up = config["admin"]["listen"] is None or tcp_open("127.0.0.1", admin_port)
        if relay_up and tcp_open("127.0.0.1", http_port) and admin_up:
            return relay
        time.sleep(0.1)
    stop_appliance(relay)
    raise RuntimeError(f"appliance did not answer STUN in {STARTUP_TIMEOUT_S}s:\n{relay.log()}")


def stop_appliance(relay: RunningRelay) -> int:
    if relay.proc.poll() is None:
        relay.proc.send_signal(signal.SIGTERM)
        try:
            relay.proc.wait(10)
        except subprocess.TimeoutExpired:
            relay.proc.kill()
            relay.proc.wait(5)
    return relay.proc.returncode


@pytest.fixture
def fresh_appliance(tmp_path):
    """An appliance of the test's own (the interop settings), for tests that strain it."""
    running = start_appliance(tmp_path / "relay")
    yield running
    code = stop_appliance(running)
    assert code == 0, f"appliance exited with {code} on SIGTERM:\n{running.log()}"


@pytest.fixture(scope="session")
def relay(tmp_path_factory):
    running = start_appliance(tmp_path_factory.mktemp("relay"))
    yield running
    code = stop_appliance(running)
    assert code == 0, f"appliance exited with {code} on SIGTERM:\n{running.log()}"


@pytest.fixture(scope="session")
def turn_peer():
    """coturn's turnutils_peer: a UDP echo peer on 127.0.0.1 and ::1."""
    program = require_program("turnutils_peer")
    port = free_port_pair()
    proc = subprocess.Popen(
        [program, "-L", "127.0.0.1", "-L", "::1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    yield port
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
