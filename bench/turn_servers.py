"""The servers the relay benchmarks compare, started and stopped here: coturn 4.x with
use-auth-secret (optionally with its TLS listener), and our appliance with a
configuration of the benchmark's choosing.  Loopback only; `Server.stop` ends the
process it started (and its workers).

`pinned_to(cpus)` is a preexec_fn: a server started with it runs, with every thread and
child process it starts, on those CPUs only, so the load generator can have the others.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proc_stats import cpu_seconds, process_tree  # noqa: E402

from turn import stun  # noqa: E402

REALM = "bench.local"
COTURN_RELAY_PORTS = (45000, 47999)
OUR_RELAY_PORTS = (48000, 49999)
LOG_TAIL_LINES = 8


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int  # STUN over UDP (how readiness is checked)
    relay_ports: tuple[int, int]
    log: Path | None = None

    def cpu_seconds(self) -> float:
        return cpu_seconds(process_tree(self.proc.pid))

    def log_tail(self) -> str:
        """The last lines of the server's log, for a failure message."""
        if self.log is None or not self.log.exists():
            return "(no log)"
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def in_relay_ranges(port: int) -> bool:
    return any(low <= port <= high for low, high in (COTURN_RELAY_PORTS, OUR_RELAY_PORTS))


def bound_socket(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a free port of `host` outside both servers' relay ranges.  The
    kernel's ephemeral ports overlap them: a client whose port a server then tries for a
    relay sends coturn into a bind-retry loop (errno 98, tens of thousands of log lines a
    second), so every load and listening socket of the benchmarks comes from here."""
    rejected = []
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_INET, kind)
            sock.bind((host, 0))
            if not in_relay_ranges(sock.getsockname()[1]):
                return sock
            rejected.append(sock)  # held until the end, so the kernel offers another
        raise OSError("no free port outside the relay ranges")
    finally:
        for sock in rejected:
            sock.close()


def free_port() -> int:
    with bound_socket(socket.SOCK_DGRAM) as s:
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with bound_socket(socket.SOCK_STREAM) as s:
        return s.getsockname()[1]


def pinned_to(cpus: Iterable[int] | None) -> Callable[[], None] | None:
    """A Popen preexec_fn running the child on `cpus` (None: wherever the kernel likes)."""
    if cpus is None:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def wait_for_stun(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        tid = os.urandom(12)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            try:
                s.sendto(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode(), ("127.0.0.1", port))
                if stun.parse(s.recv(2048)).transaction_id == tid:
                    return
            except (OSError, stun.StunParseError):
                pass
        time.sleep(0.1)
    raise RuntimeError("server did not answer STUN")


def stun_over_tls(port: int, ctx: ssl.SSLContext, timeout: float = 2.0) -> None:
    """One STUN Binding over TLS to `port`; raises OSError/ssl.SSLError/RuntimeError if it
    does not come back."""
    tid = os.urandom(12)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode())
            data = b""
            while len(data) < 20 or len(data) < 20 + int.from_bytes(data[2:4], "big"):
                chunk = tls.recv(4096)
                if not chunk:
                    raise RuntimeError("closed before the Binding answer")
                data += chunk
    if stun.parse(data).transaction_id != tid:
        raise RuntimeError("a Binding answer for another transaction")


def wait_for_stun_over_tls(server: Server, port: int, ctx: ssl.SSLContext, timeout: float = 15) -> None:
    """Until a STUN Binding over TLS to `port` is answered; RuntimeError naming the last
    failure (and the server's log) if it is not within `timeout`."""
    deadline = time.monotonic() + timeout
    last = "nothing tried"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            stun_over_tls(port, ctx)
            return
        except (OSError, ssl.SSLError, RuntimeError, stun.StunParseError) as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.2)
    raise RuntimeError(f"no STUN answer over TLS on port {port} within {timeout:.0f} s (last: {last})")


def start_coturn(
    workdir: Path,
    secret: str,
    relay_threads: int | None = None,
    tls: tuple[Path, Path, int] | None = None,
    cpus: Iterable[int] | None = None,
    tcp: bool = False,
) -> Server:
    """coturn as deployed; relay_threads pins its UDP relay threads (default: one per core);
    `tls` = (certificate, key, port) opens its TLS listener on that port; `tcp` its TCP
    listener on the UDP listener's port number."""
    port = free_port()
    cmd = [
        shutil.which("turnserver") or "turnserver",
        "-n",
        "--listening-ip",
        "127.0.0.1",
        "--listening-port",
        str(port),
        "--relay-ip",
        "127.0.0.1",
        "--min-port",
        str(COTURN_RELAY_PORTS[0]),
        "--max-port",
        str(COTURN_RELAY_PORTS[1]),
        "--use-auth-secret",
        "--static-auth-secret",
        secret,
        "--realm",
        REALM,
        "--allow-loopback-peers",
        "--no-cli",
        "--no-dtls",
        "--total-quota",
        "0",
        "--user-quota",
        "0",
        "--log-file",
        str(workdir / "coturn.log"),
        "--simple-log",
    ]
    name = "coturn"
    if not tcp:
        cmd.append("--no-tcp")
    if tls is None:
        cmd.append("--no-tls")
    else:
        cert, key, tls_port = tls
        cmd += ["--tls-listening-port", str(tls_port), "--cert", str(cert), "--pkey", str(key)]
        name = "coturn tls"
    if relay_threads is not None:
        cmd += ["--relay-threads", str(relay_threads)]
        name = f"coturn t{relay_threads}"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned_to(cpus)
    )
    server = Server(name, proc, port, COTURN_RELAY_PORTS, workdir / "coturn.log")
    try:
        wait_for_stun(port, proc)
    except RuntimeError as err:
        server.stop()
        raise RuntimeError(f"{name}: {err}:\n{server.log_tail()}") from None
    return server


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key (nested dicts merged, not replaced)."""
    out = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if nested else value
    return out


def start_ours(
    workdir: Path,
    secret: str,
    workers: int,
    name: str | None = None,
    overrides: dict | None = None,
    cpus: Iterable[int] | None = None,
) -> Server:
    """Our appliance relaying over UDP with `workers` relay processes, no signaling and no
    admin listener unless `overrides` (merged into the configuration) says otherwise."""
    port = free_port()
    name = name or f"ours x{workers}"
    tag = name.replace(" ", "-")
    ring = {
        "version": 1,
        "secrets": [{"id": "k-bench", "value": secret, "created": int(time.time()), "retired": None}],
    }
    secrets = workdir / f"secrets-{tag}.json"
    secrets.write_text(json.dumps(ring))
    os.chmod(secrets, 0o600)
    config = {
        "realm": REALM,
        "data_dir": str(workdir / "data"),
        "log_level": "warning",
        "turn": {
            "udp": f"127.0.0.1:{port}",
            "tcp": None,
            "tls": None,
            "relay_ip": "127.0.0.1",
            "relay_ip6": None,
            "relay_ports": f"{OUR_RELAY_PORTS[0]}-{OUR_RELAY_PORTS[1]}",
            "allow_peers": ["127.0.0.1"],
            "user_quota": 0,
            "total_quota": 0,
            "workers": workers,
        },
        "http": {"listen": None},
        "admin": {"listen": None},
        "credentials": {"secrets_file": str(secrets)},
    }
    config = merged(config, overrides or {})
    path = workdir / f"appliance-{tag}.yaml"
    path.write_text(json.dumps(config))
    log = workdir / f"appliance-{tag}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        preexec_fn=pinned_to(cpus),
    )
    server = Server(name, proc, port, OUR_RELAY_PORTS, log)
    try:
        wait_for_stun(port, proc)
    except RuntimeError as err:
        server.stop()
        raise RuntimeError(f"{name}: {err}:\n{server.log_tail()}") from None
    time.sleep(0.5 * workers)  # let the extra worker processes bind
    return server


def start_forwarder(
    name: str, command: list[str], port: int, log: Path, cpus: Iterable[int] | None = None
) -> Server:
    """A bare forwarder (bench/forwarder.c or bench/bare_forwarder.py) listening on `port`,
    once it prints "ready"; it has no relay port range of its own."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),
        preexec_fn=pinned_to(cpus),
    )
    server = Server(name, proc, port, (0, -1), log)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        server.stop()
        raise RuntimeError(f"{name} did not start:\n{server.log_tail()}")
    return server
