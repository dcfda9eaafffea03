"""An operator's appliance whose listener cannot bind: another server already holds the
port, the port is privileged, or the address is not one of this host's.  `appliance serve`
must name the listener by its configuration key and its address, leave nothing running
(no worker, no child of any kind) and exit 2, the code of a configuration error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.tls.devcert import ensure_dev_certificate

from ..external import require_program
from ..netports import distinct_port_pairs
from .conftest import ADMIN_TOKEN

EXIT_TIMEOUT_S = 20.0
LEFTOVER_WAIT_S = 5.0
NOT_THIS_HOST = "192.0.2.1"  # TEST-NET-1 (RFC 5737): no host has it
TURN_HOLDER = "another TURN server such as coturn.service may hold it"
OTHER_HOLDER = "another server may hold it"


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    cert, key, _ = ensure_dev_certificate(tmp_path_factory.mktemp("certs"))
    return cert, key


def free_listeners() -> dict[str, str]:
    """Every listener on a free loopback port, keyed by its configuration key."""
    port, tls_port, http_port, admin_port = distinct_port_pairs(4)
    return {
        "turn.udp": f"127.0.0.1:{port}",
        "turn.tcp": f"127.0.0.1:{port}",
        "turn.tls": f"127.0.0.1:{tls_port}",
        "http.listen": f"127.0.0.1:{http_port}",
        "admin.listen": f"127.0.0.1:{admin_port}",
    }


def marked_processes(mark: bytes) -> list[int]:
    """Processes whose environment carries `mark`: the appliance and anything it started."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return pids


def serve(
    directory: Path, tls_pair, listen: dict[str, str], workers: int = 1, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run `appliance serve` as an operator does, expecting it to give up on its own; fail
    if it keeps running, or if any process it started outlives it."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = tls_pair
    config = {
        "data_dir": str(directory / "data"),
        "credentials": {"secrets_file": str(directory / "secrets.json")},
        "turn": {
            "udp": listen["turn.udp"],
            "tcp": listen["turn.tcp"],
            "tls": listen["turn.tls"],
            "tls_cert": str(cert),
            "tls_key": str(key),
            "workers": workers,
            "drain_s": 1,
        },
        "http": {"listen": listen["http.listen"], "tls": False},
        "admin": {"listen": listen["admin.listen"], "token": ADMIN_TOKEN},  # off loopback too
    }
    config_path = directory / "appliance.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    run_id = uuid.uuid4().hex
    mark = f"APPLIANCE_TEST_RUN={run_id}".encode()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
        "APPLIANCE_TEST_RUN": run_id,
    }
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "appliance", "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in marked_processes(mark):  # its workers too: they hold its stderr open
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"appliance kept running although a listener could not bind:\n{err}")
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}\n{err}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_refused(done: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 2, the one error line last on stderr, and no traceback anywhere."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: {expected}", done.stderr


@contextmanager
def held(address: str, kind: socket.SocketKind, reuse_port: bool = False):
    """Another server on `address`: a UDP socket bound there, or a TCP one listening."""
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, kind) as sock:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield


def in_use(key: str, address: str) -> str:
    holder = TURN_HOLDER if key.startswith("turn.") else OTHER_HOLDER
    return f"{key} {address}: address already in use ({holder}; set {key} or stop it)"


# ------------------------------------------------------------------ address already in use


@pytest.mark.parametrize("key", ["turn.udp", "turn.tcp", "turn.tls", "http.listen", "admin.listen"])
def test_a_port_another_server_holds_is_named_with_its_key(tmp_path, tls_pair, key):
    listen = free_listeners()
    kind = socket.SOCK_DGRAM if key == "turn.udp" else socket.SOCK_STREAM
    with held(listen[key], kind):
        done = serve(tmp_path, tls_pair, listen)
    assert_refused(done, in_use(key, listen[key]))


@pytest.mark.parametrize("key, kind", [("turn.udp", socket.SOCK_DGRAM), ("turn.tcp", socket.SOCK_STREAM)])
def test_workers_do_not_join_a_port_another_process_shares_out(tmp_path, tls_pair, key, kind):
    """With turn.workers > 1 the relay binds with SO_REUSEPORT, which the kernel lets join
    any socket of the same user that set it too (a second appliance with workers, a coturn
    run as the same user): the two would silently split the clients between them."""
    listen = free_listeners()
    with held(listen[key], kind, reuse_port=True):
        done = serve(tmp_path, tls_pair, listen, workers=2)
    assert_refused(done, in_use(key, listen[key]))


def test_workers_are_not_left_running_when_the_signaling_cannot_bind(tmp_path, tls_pair):
    listen = free_listeners()
    with held(listen["http.listen"], socket.SOCK_STREAM):
        done = serve(tmp_path, tls_pair, listen, workers=2)
    assert_refused(done, in_use("http.listen", listen["http.listen"]))


# ------------------------------------------------------------------ not this host's address


@pytest.mark.parametrize("key", ["turn.tcp", "admin.listen"])
def test_an_address_of_another_host_is_named_with_its_key(tmp_path, tls_pair, key):
    listen = free_listeners()
    listen[key] = f"{NOT_THIS_HOST}:{listen[key].rsplit(':', 1)[1]}"
    done = serve(tmp_path, tls_pair, listen)
    assert_refused(
        done,
        f"{key} {listen[key]}: cannot assign requested address "
        f"({NOT_THIS_HOST} is not an address of this host; set {key} to one "
        "that is, or to 0.0.0.0)",
    )


# ------------------------------------------------------------------ privileged port


def unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def without_bind_privilege() -> tuple[str, ...]:
    """A command prefix that runs the appliance as an operator who may not bind ports below
    1024: as root, the capability that allows it is dropped (util-linux's setpriv)."""
    if os.geteuid() != 0:
        return ()
    setpriv = require_program("setpriv", "apt-get install util-linux")
    return (setpriv, "--bounding-set=-net_bind_service")


@pytest.mark.parametrize("key", ["turn.udp", "http.listen"])
def test_a_privileged_port_is_named_with_its_key(tmp_path, tls_pair, key):
    port = min(unprivileged_port_start(), 1024) - 1
    if port < 1:
        pytest.skip("net.ipv4.ip_unprivileged_port_start is 0: every port is unprivileged here")
    listen = free_listeners()
    # The kernel refuses a privileged port before it looks whether anyone holds it: the
    # fixed number cannot collide with another test's server.
    listen[key] = f"127.0.0.1:{port}"
    done = serve(tmp_path, tls_pair, listen, prefix=without_bind_privilege())
    assert_refused(
        done,
        f"{key} {listen[key]}: permission denied (ports below 1024 need root "
        f"or CAP_NET_BIND_SERVICE; set {key} to a higher port or grant the "
        "capability)",
    )
