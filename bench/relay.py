"""Relay throughput, CPU and latency: coturn, our appliance, and two bare forwarders, under
the same C load, one run, over UDP, TCP and TLS.

    python bench/relay.py [--quick] [--transports udp,tcp,tls] [--servers coturn,ours,py,c]
                          [--seconds S] [--drain S] [--rates R,R,...] [--retries N]
                          [--payload BYTES] [--clients K] [--allocs N] [--no-pin]
    python bench/relay.py --tls      # --transports tls, with our edge port among the servers

The servers (--servers, in this order):
  coturn   coturn 4.x, use-auth-secret, --relay-threads 1
  coturn2  the same with --relay-threads 2
  ours     our appliance, turn.workers: 1
  ours2    turn.workers: 2
  edge     our edge port (edge.listen: TURN and HTTPS on one TLS port); TLS only
  py       bench/bare_forwarder.py: our hot path's shape (uvloop, add_reader, recvfrom_into)
           with no TURN at all
  c        bench/forwarder.c: recvmmsg/sendmmsg, no TURN at all
The bare forwarders do a relay's per-packet work (strip or add the 4-byte ChannelData
header, one lookup, one send) and nothing else: how far Python and the kernel go.

For each transport and server, Python opens K client connections (UDP, TCP, or TCP that
the load generator turns into TLS) and one UDP peer socket, all on ports outside both
servers' relay ranges (a client on a port coturn then tries for a relay sends it into a
bind-retry loop); allocates a UDP relay per client and binds channel 0x4000 to the peer
(TURN servers only; over TLS through the generator's plaintext bridge); then sends one
probe per client to learn its relayed address.  The load is bench/loadgen.c, compiled here
with `cc -O2` (bench/c_build.py; with OpenSSL for TLS), which inherits those sockets and,
per step, sends paced ChannelData from the clients to the peer (client -> peer) or UDP
from the peer to the relayed addresses (peer -> client), each direction on its own, 160
bytes a packet by default, stamped with CLOCK_MONOTONIC so the receiver measures the
one-way latency through the relay.  A ladder of offered rates runs per direction and
ends at its first failed step (tried --retries times more first, as the host may be
shared): LOSS, something sent did not arrive within the drain (over TCP and TLS, where
nothing is dropped between client and server, that is a backlog outlasting it);
PUSHBACK, the kernel or a full stream would not take a packet; GENERATOR BEHIND, the
generator sent under SENT_SHARE of its offer while the server took all of it (the
generator's limit, or its core taken by another process).  The step below is the
result.  With two or more cores the server (all its threads and processes) runs on the
first and the generator and this harness on the others (--no-pin: wherever the kernel
likes).

It prints each step (offered, sent, received, loss, p50/p99 latency, server and generator
CPU, UDP drops at the server's listener, its relay sockets, the peer, the clients and on
the whole host, and how busy each core was with anyone's work: on a shared host, what
else ran), then a table per transport: loss-free packets/s each direction, the server's
CPU seconds per million packets at those two steps, p50/p99 one-way latency at them, and
ratios to coturn.  The bare C forwarder's row is the generator's check: if it goes well
past the servers, the generator was not their ceiling; a step where the generator used
over LOAD_BOUND of its core is marked load-bound.  Under the UDP table: Allocate +
ChannelBind + delete handshakes per second for each TURN server (--allocs of them, from
100 source addresses, as each Allocate starts with a 401 the relay budgets per source).
`--tls` (the old TLS mode) is now `--transports tls` with the edge added to the servers.
Loopback only; every process it starts it stops.  Not a test: it asserts nothing and CI
does not run it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c_build import BuildError, build, has_tls
from relay_tls import client_context, edge_overrides, tls_overrides
from turn_servers import (
    REALM,
    Server,
    bound_socket,
    free_port,
    free_tcp_port,
    pinned_to,
    start_coturn,
    start_forwarder,
    start_ours,
    wait_for_stun_over_tls,
)

from appliance.tls.devcert import ensure_dev_certificate
from turn import stun
from turn.client import ClientCredentials

CHANNEL = 0x4000
TRANSPORTS = ("udp", "tcp", "tls")
SENT_SHARE = 0.97  # a step whose sender got less than this of its offer out is saturated
LOAD_BOUND = 0.9  # a step where the generator used this much of its core may be its limit
SOCKET_BUFFER = 4 << 20
SETTLED_CPU = 0.1  # a server using less of a core than this has no backlog left
RATES = [10000, 20000, 30000, 40000, 50000, 60000, 70000, 80000, 90000, 100000, 120000, 140000]
RATES += [160000, 200000, 250000, 300000, 400000, 500000]
QUICK_RATES = [10000, 25000, 50000, 75000, 100000, 150000, 200000, 300000]

# ------------------------------------------------------------------ TURN set-up


class SetupClient:
    """Blocking TURN set-up over one client connection: a connected UDP socket, or a
    stream (a TCP socket, or the plaintext bridge of a TLS connection the generator holds)."""

    def __init__(self, sock: socket.socket, stream: bool, secret: str, user: str) -> None:
        self.sock, self.stream = sock, stream
        self.sock.settimeout(3)
        self.creds = ClientCredentials.rest(secret.encode(), f"{int(time.time()) + 3600}:{user}", REALM)
        self.buffer = b""

    def _read_message(self) -> bytes:
        if not self.stream:
            return self.sock.recv(4096)
        while True:
            while len(self.buffer) < 4:
                self._fill()
            length = int.from_bytes(self.buffer[2:4], "big")
            size = (4 + length + 3) & ~3 if self.buffer[0] >> 6 == 1 else 20 + length
            while len(self.buffer) < size:
                self._fill()
            message, self.buffer = self.buffer[:size], self.buffer[size:]
            return message

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection during set-up")
        self.buffer += chunk

    def request(self, method: int, attrs) -> stun.Message:
        for _ in range(3):
            tid = os.urandom(12)
            self.sock.sendall(self.creds.build(method, attrs, tid))
            while True:
                message = self._read_message()
                if message[0] >> 6 != 0:
                    continue  # ChannelData still in flight
                try:
                    reply = stun.parse(message)
                except stun.StunParseError:
                    continue
                if reply.transaction_id == tid:
                    break
            if self.creds.should_retry(reply):
                continue
            if reply.cls != stun.SUCCESS:
                raise RuntimeError(f"{method}: {stun.decode_error(reply.get(stun.ERROR_CODE) or b'')}")
            return reply
        raise RuntimeError("authentication failed")

    def allocate_and_bind(self, peer: tuple[str, int]) -> None:
        self.request(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")])
        self.request(
            stun.CHANNEL_BIND,
            [
                (stun.CHANNEL_NUMBER, struct.pack("!HH", CHANNEL, 0)),
                (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(peer, tid)),
            ],
        )

    def delete(self) -> None:
        self.request(stun.REFRESH, [(stun.LIFETIME, b"\x00\x00\x00\x00")])

    def send_channel_data(self, payload: bytes) -> None:
        frame = struct.pack("!HH", CHANNEL, len(payload)) + payload
        self.sock.sendall(frame + b"\0" * (-len(frame) % 4) if self.stream else frame)


def probe_relays(setups: list[SetupClient], peer: socket.socket) -> list[tuple[str, int]]:
    """Each client's relayed address, as the peer sees it: one ChannelData from each (step 0
    in the stamp, so the generator never counts one that arrives late)."""
    peer.settimeout(1.0)
    relays = []
    for index, setup in enumerate(setups):
        probe = struct.pack("=II", 0, index) + b"probe".ljust(24, b".")
        for _ in range(3):
            setup.send_channel_data(probe)
            try:
                while True:
                    data, source = peer.recvfrom(4096)
                    if data == probe:
                        relays.append(source)
                        break
            except TimeoutError:
                continue
            break
        else:
            raise RuntimeError(f"no probe from client {index} reached the peer")
    return relays


ALLOCATION_SOURCES = 100


def allocation_rate(port: int, secret: str, count: int) -> float:
    """Allocate + ChannelBind + delete handshakes per second over UDP, from ALLOCATION_SOURCES
    source addresses: each Allocate starts with a 401, which the relay budgets per source."""
    done = []
    start = time.perf_counter()
    for i in range(count):
        sock = bound_socket(socket.SOCK_DGRAM, f"127.0.0.{2 + i % ALLOCATION_SOURCES}")
        sock.connect(("127.0.0.1", port))
        client = SetupClient(sock, False, secret, f"alloc{i}")
        client.allocate_and_bind(("127.0.0.1", 9))
        client.delete()
        done.append(sock)
    rate = count / (time.perf_counter() - start)
    for sock in done:  # closed only now: a reused port would meet coturn's deleted allocation (437)
        sock.close()
    return rate


# ------------------------------------------------------------------ the generator


class LoadGen:
    """bench/loadgen.c with the sockets it inherits; a command per line, a JSON line back."""

    def __init__(self, binary: Path, args, peer, clients, transport: str, bridges, cpus) -> None:
        fds = [peer.fileno(), *(c.fileno() for c in clients), *(b.fileno() for b in bridges)]
        cmd = [
            str(binary),
            "--payload",
            str(args.payload),
            "--peer",
            str(peer.fileno()),
            "--clients",
            ",".join(str(c.fileno()) for c in clients),
        ]
        if transport == "tcp":
            cmd.append("--stream")
        if transport == "tls":
            cmd += ["--tls", "--bridges", ",".join(str(b.fileno()) for b in bridges)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=fds,
            preexec_fn=pinned_to(cpus),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.pending = b""

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.stdout], [], [], max(0.0, left))
            chunk = os.read(self.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                why = "exited" if self.proc.poll() is not None else f"did not answer in {timeout:.0f} s"
                raise RuntimeError(f"the load generator {why}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def command(self, line: str, timeout: float) -> dict:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.write(b"quit\n")
            self.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ------------------------------------------------------------------ UDP drops


def udp_socket_drops(ports: set[int]) -> int:
    """Datagrams the kernel dropped for want of buffer on the IPv4 UDP sockets bound to
    `ports` (the `drops` column of /proc/net/udp)."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in ports:
                total += int(fields[-1])
    return total


def core_times() -> dict[int, tuple[int, int]]:
    """Per CPU, (busy, total) ticks so far from /proc/stat: how much of a core other
    processes (the other tenants of a shared host) took from the server or the load."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(x) for x in fields[:8]]
                times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))  # minus idle, iowait
    return times


def udp_receive_buffer_errors() -> int:
    """RcvbufErrors of the whole host (/proc/net/snmp): every UDP socket's drops."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


# ------------------------------------------------------------------ results


@dataclass
class Step:
    direction: str
    report: dict  # the generator's JSON line
    server_cpu: float
    wall: float
    drops: dict[str, int]  # UDP receive-buffer drops per socket group (DropWatch), and the host's
    core_busy: dict[int, float]  # per CPU, the share of the step it spent busy (anyone's work)

    @property
    def received(self) -> int:
        return self.report["received"]

    @property
    def pps(self) -> float:
        return self.report["received"] / self.report["seconds"]

    @property
    def loss(self) -> float:
        sent = self.report["sent"]
        return 1 - self.report["received"] / sent if sent else 1.0

    @property
    def load_share(self) -> float:
        return self.report["load_cpu_s"] / self.wall if self.wall else 0.0

    @property
    def failure(self) -> str | None:
        """Why this step ends the ladder, or None: loss; pushback (the kernel or a stream
        would not take a packet: the server is not reading fast enough); or the generator
        falling behind its offer with the server taking all it sent (its own limit, or its
        core taken by something else)."""
        r = self.report
        if r["received"] < r["sent"]:
            return "loss"
        if r["unsent"]:
            return "pushback"
        if r["sent"] < SENT_SHARE * r["offered"] * r["seconds"]:
            return "generator behind"
        return None

    @property
    def loss_free(self) -> bool:
        return self.failure is None


@dataclass
class Result:
    name: str
    transport: str
    best: dict[str, Step] = field(default_factory=dict)  # per direction, the loss-free step
    ceiling: dict[str, Step] = field(default_factory=dict)  # per direction, the first lossy step
    alloc_per_s: float = 0.0
    failed: str | None = None

    def pps(self, direction: str) -> float:
        step = self.best.get(direction)
        return step.pps if step else 0.0

    def pps_text(self, direction: str) -> str:
        """The loss-free rate, marked when what ended the ladder was not the server: *
        the generator fell behind, + the ladder's top was reached."""
        stop = self.ceiling.get(direction)
        mark = "+" if stop is None else "*" if stop.failure == "generator behind" else ""
        return f"{self.pps(direction):.0f}{mark}"

    def cpu_per_million(self) -> float:
        steps = list(self.best.values())
        packets = sum(s.received for s in steps)
        return sum(s.server_cpu for s in steps) / (packets / 1e6) if packets else 0.0

    def latency(self, direction: str) -> str:
        step = self.best.get(direction)
        return f"{step.report['p50_us']}/{step.report['p99_us']}" if step else "-"


# ------------------------------------------------------------------ the servers


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    secret: str
    cert: Path
    key: Path
    server_cpus: set[int] | None
    load_cpus: set[int] | None
    loadgen: Path
    forwarder: Path | None


@dataclass
class Contender:
    label: str
    turn: bool  # speaks TURN (set-up and allocation rate) rather than bare forwarding
    transports: tuple[str, ...]
    start: Callable[[Bench, str, int], tuple[Server, int]]  # (bench, transport, peer port)


def _coturn(relay_threads: int) -> Callable[[Bench, str, int], tuple[Server, int]]:
    def start(bench: Bench, transport: str, _peer: int) -> tuple[Server, int]:
        tls_port = free_tcp_port() if transport == "tls" else None
        server = start_coturn(
            bench.workdir,
            bench.secret,
            relay_threads=relay_threads,
            tls=(bench.cert, bench.key, tls_port) if tls_port else None,
            cpus=bench.server_cpus,
            tcp=transport == "tcp",
        )
        if tls_port:
            _ready_over_tls(server, tls_port)
        return server, tls_port or server.port

    return start


def _ours(workers: int, edge: bool = False) -> Callable[[Bench, str, int], tuple[Server, int]]:
    def start(bench: Bench, transport: str, _peer: int) -> tuple[Server, int]:
        port = free_tcp_port()
        overrides: dict = {}
        if transport == "tcp":
            overrides = {"turn": {"tcp": f"127.0.0.1:{port}"}}
        elif edge:
            overrides = edge_overrides(bench.cert, bench.key, port)
        elif transport == "tls":
            overrides = tls_overrides(bench.cert, bench.key, port)
        name = f"ours {'edge' if edge else transport} x{workers}"
        server = start_ours(bench.workdir, bench.secret, workers, name, overrides, bench.server_cpus)
        if transport == "tls":
            _ready_over_tls(server, port)
        return server, port if transport != "udp" else server.port

    return start


def _ready_over_tls(server: Server, port: int) -> None:
    try:
        wait_for_stun_over_tls(server, port, client_context())
    except RuntimeError:
        server.stop()
        raise


def _bare(python: bool) -> Callable[[Bench, str, int], tuple[Server, int]]:
    def start(bench: Bench, transport: str, peer_port: int) -> tuple[Server, int]:
        port = free_tcp_port() if transport != "udp" else free_port()
        if python:
            program = [sys.executable, str(Path(__file__).with_name("bare_forwarder.py"))]
        elif bench.forwarder is not None:
            program = [str(bench.forwarder)]
        else:
            raise RuntimeError("bench/forwarder.c did not build")
        command = program + [
            "--transport",
            transport,
            "--port",
            str(port),
            "--relays",
            str(bench.args.clients),
            "--peer",
            str(peer_port),
        ]
        if transport == "tls":
            command += ["--cert", str(bench.cert), "--key", str(bench.key)]
        name = f"bare {'py' if python else 'c'} {transport}"
        log = bench.workdir / f"{name.replace(' ', '-')}.log"
        return start_forwarder(name, command, port, log, bench.server_cpus), port

    return start


CONTENDERS = {
    "coturn": Contender("coturn (1 relay thread)", True, TRANSPORTS, _coturn(1)),
    "coturn2": Contender("coturn (2 relay threads)", True, TRANSPORTS, _coturn(2)),
    "ours": Contender("ours (turn.workers: 1)", True, TRANSPORTS, _ours(1)),
    "ours2": Contender("ours (turn.workers: 2)", True, TRANSPORTS, _ours(2)),
    "edge": Contender("ours edge (edge.listen)", True, ("tls",), _ours(1, edge=True)),
    "py": Contender("bare Python forwarder", False, TRANSPORTS, _bare(python=True)),
    "c": Contender("bare C forwarder", False, TRANSPORTS, _bare(python=False)),
}

# ------------------------------------------------------------------ one server, one transport


def client_sockets(transport: str, port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        sock = bound_socket(kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def run_one(bench: Bench, key: str, transport: str) -> Result:
    contender = CONTENDERS[key]
    args = bench.args
    result = Result(contender.label, transport)
    peer = bound_socket(socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    peer_addr = peer.getsockname()
    closing: list[socket.socket] = [peer]
    loadgen: LoadGen | None = None
    try:
        server, port = contender.start(bench, transport, peer_addr[1])
    except RuntimeError as err:
        peer.close()
        result.failed = f"did not start: {str(err).splitlines()[0]}"
        return result
    try:
        clients = client_sockets(transport, port, args.clients)
        closing += clients
        bridges: list[socket.socket] = []
        if transport == "tls":
            pairs = [socket.socketpair() for _ in clients]
            closing += [s for pair in pairs for s in pair]
            bridges = [theirs for _, theirs in pairs]
            loadgen = LoadGen(bench.loadgen, args, peer, clients, transport, bridges, bench.load_cpus)
            loadgen.read(30)  # the handshakes are done
            channels = [ours for ours, _ in pairs]
        else:
            channels = clients
        setups = [
            SetupClient(c, transport != "udp", bench.secret, f"bench{i}") for i, c in enumerate(channels)
        ]
        if contender.turn:
            for setup in setups:
                setup.allocate_and_bind(peer_addr)
        relays = probe_relays(setups, peer)
        if loadgen is None:
            loadgen = LoadGen(bench.loadgen, args, peer, clients, transport, bridges, bench.load_cpus)
        loadgen.command("relays " + " ".join(f"{h}:{p}" for h, p in relays), 10)
        # where UDP is dropped: the server's listener, its relay sockets, the peer, the clients
        watched = {"relays": {p for _, p in relays}, "peer": {peer_addr[1]}}
        if transport == "udp":
            watched = {"listener": {port}, **watched, "clients": {c.getsockname()[1] for c in clients}}
        for direction in ("c2p", "p2c"):
            for rate in args.rates:
                for _ in range(1 + args.retries):  # a failed step is tried again: the host is shared
                    step = run_step(loadgen, server, direction, rate, args, watched)
                    print(step_line(result.name, transport, step), flush=True)
                    if step.loss_free:
                        break
                    settle(server)
                if not step.loss_free:
                    result.ceiling[direction] = step
                    break
                result.best[direction] = step
            settle(server)
        if contender.turn and transport == "udp" and args.allocs:
            result.alloc_per_s = allocation_rate(server.port, bench.secret, args.allocs)
    except (OSError, RuntimeError, ValueError) as err:
        result.failed = f"{type(err).__name__}: {err}"
        print(f"  {result.name} over {transport}: {result.failed}\n{server.log_tail()}", flush=True)
    finally:
        if loadgen is not None:
            loadgen.close()
        for sock in closing:
            sock.close()
        server.stop()
    return result


def settle(server: Server, limit: float = 10.0) -> None:
    """Until the server is idle (under SETTLED_CPU of a core), at most `limit` seconds: after
    a saturated step a stream server may still be forwarding its backlog, and the next step
    would pay for it."""
    deadline = time.monotonic() + limit
    before = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = server.cpu_seconds()
        if now - before < SETTLED_CPU * 0.25:
            return
        before = now


def run_step(loadgen: LoadGen, server: Server, direction, rate, args, watched: dict[str, set[int]]) -> Step:
    def drops() -> dict[str, int]:
        counts = {name: udp_socket_drops(ports) for name, ports in watched.items()}
        counts["host"] = udp_receive_buffer_errors()
        return counts

    cpu0, drops0, wall0, cores0 = server.cpu_seconds(), drops(), time.monotonic(), core_times()
    report = loadgen.command(
        f"step {direction} {rate} {args.seconds} {args.drain}", args.seconds + args.drain + 30
    )
    wall = time.monotonic() - wall0
    delta = {name: count - drops0[name] for name, count in drops().items()}
    cores = core_times()
    busy = {
        cpu: (cores[cpu][0] - cores0[cpu][0]) / max(1, cores[cpu][1] - cores0[cpu][1])
        for cpu in cores
        if cpu in cores0
    }
    return Step(direction, report, server.cpu_seconds() - cpu0, wall, delta, busy)  # type: ignore[arg-type]


def step_line(name: str, transport: str, step: Step) -> str:
    r = step.report
    arrow = "client->peer" if step.direction == "c2p" else "peer->client"
    flags = f"  {step.failure.upper()}" if step.failure else ""
    busy = " ".join(f"{share * 100:.0f}%" for _, share in sorted(step.core_busy.items()))
    if step.load_share >= LOAD_BOUND:
        flags += "  load-bound"
    return (
        f"  {name:26} {transport} {arrow}  offered {r['offered']:7.0f}/s"
        f"  sent {r['sent'] / r['seconds']:7.0f}/s  received {step.pps:7.0f}/s"
        f"  loss {step.loss * 100:6.2f}%  unsent {r['unsent']}"
        f"  p50/p99 {r['p50_us']}/{r['p99_us']} us  server cpu {step.server_cpu:5.2f}s"
        f"  load cpu {r['load_cpu_s']:5.2f}s  udp drops {' '.join(f'{k} {v}' for k, v in step.drops.items())}"
        f"  cores busy {busy}"
        f"{flags}"
    )


# ------------------------------------------------------------------ the table


def print_table(transport: str, results: list[Result]) -> None:
    coturn = next((r for r in results if r.name.startswith("coturn") and not r.failed), None)

    def ratio(r: Result, direction: str) -> str:
        theirs = coturn.pps(direction) if coturn else 0.0
        return f"{r.pps(direction) / theirs:.2f}" if theirs else "-"

    print()
    print(f"{transport.upper()}: loss-free packets/s per direction, at those steps CPU and one-way latency")
    print(
        f"{'server':26} {'client->peer':>12} {'peer->client':>12} {'CPU s/M pkt':>11} "
        f"{'c->p p50/p99 us':>16} {'p->c p50/p99 us':>16} {'ratio c->p':>10} {'ratio p->c':>10}"
    )
    for r in results:
        if r.failed:
            print(f"{r.name:26} -- {r.failed.splitlines()[0]}")
            continue
        print(
            f"{r.name:26} {r.pps_text('c2p'):>12} {r.pps_text('p2c'):>12} {r.cpu_per_million():11.2f} "
            f"{r.latency('c2p'):>16} {r.latency('p2c'):>16} {ratio(r, 'c2p'):>10} {ratio(r, 'p2c'):>10}"
        )
    allocs = [r for r in results if r.alloc_per_s]
    if allocs:
        print(
            "allocation handshakes/s (Allocate + ChannelBind + delete): "
            + ", ".join(f"{r.name} {r.alloc_per_s:.0f}" for r in allocs)
        )
    bare_c = next((r for r in results if r.name == CONTENDERS["c"].label and not r.failed), None)
    if bare_c is not None:
        print(
            f"generator check: through the bare C forwarder the load reached {bare_c.pps_text('c2p')} "
            f"client->peer and {bare_c.pps_text('p2c')} peer->client pkt/s"
        )
    print("* the generator fell behind its offer (the server took all it sent); + the top of the ladder")


# ------------------------------------------------------------------ main


def cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(the servers' CPUs, the load's), or (None, None) unpinned or on one core."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short steps, coarse ladder")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per step")
    parser.add_argument(
        "--drain", type=float, default=None, help="seconds to wait for stragglers after a step"
    )
    parser.add_argument("--payload", type=int, default=160, help="bytes per packet (audio-sized)")
    parser.add_argument("--clients", type=int, default=8, help="allocations (channels)")
    parser.add_argument("--transports", default="udp,tcp,tls", help="comma-separated: udp,tcp,tls")
    parser.add_argument(
        "--servers", default="coturn,ours,py,c", help=f"comma-separated: {','.join(CONTENDERS)}"
    )
    parser.add_argument("--rates", default=None, help="comma-separated offered packets/s, the ladder")
    parser.add_argument(
        "--allocs", type=int, default=None, help="allocation handshakes timed per TURN server (UDP)"
    )
    parser.add_argument(
        "--retries", type=int, default=1, help="times a failed step is tried again before the ladder stops"
    )
    parser.add_argument(
        "--tls", action="store_true", help="--transports tls, with the edge among the servers"
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="servers on the first CPU, the load on the others (default: on)",
    )
    args = parser.parse_args()
    if args.tls:
        args.transports = "tls"
        if "edge" not in args.servers:
            args.servers = args.servers.replace("ours", "ours,edge", 1)
    args.transports = [t for t in args.transports.split(",") if t]
    args.servers = [s for s in args.servers.split(",") if s]
    for name in args.servers:
        if name not in CONTENDERS:
            parser.error(f"unknown server {name!r}: choose from {', '.join(CONTENDERS)}")
    for name in args.transports:
        if name not in TRANSPORTS:
            parser.error(f"unknown transport {name!r}: choose from {', '.join(TRANSPORTS)}")
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.drain = args.drain if args.drain is not None else (0.5 if args.quick else 1.0)
    args.rates = (
        [float(r) for r in args.rates.split(",")] if args.rates else (QUICK_RATES if args.quick else RATES)
    )
    args.allocs = args.allocs if args.allocs is not None else (100 if args.quick else 300)
    return args


def main() -> int:
    args = parse_args()
    if any(CONTENDERS[s].turn and not s.startswith("ours") and s != "edge" for s in args.servers):
        if shutil.which("turnserver") is None:
            print("turnserver not found: apt-get install coturn", file=sys.stderr)
            return 2
    try:
        loadgen = build("loadgen")
    except BuildError as err:
        print(err, file=sys.stderr)
        return 2
    forwarder = None
    with contextlib.suppress(BuildError):
        forwarder = build("forwarder")
    if "tls" in args.transports and not has_tls(loadgen):
        print("TLS skipped: bench/loadgen.c built without OpenSSL (apt-get install libssl-dev)", flush=True)
        args.transports.remove("tls")
    server_cpus, load_cpus = cpu_split(args.pin)
    if load_cpus is not None:
        os.sched_setaffinity(0, load_cpus)  # this harness (the set-up) with the load
    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    cert, key, _ = ensure_dev_certificate(workdir / "certs")
    bench = Bench(args, workdir, os.urandom(16).hex(), cert, key, server_cpus, load_cpus, loadgen, forwarder)
    where = (
        f"servers on CPU {sorted(server_cpus)}, load on CPU {sorted(load_cpus)}"
        if server_cpus and load_cpus
        else "unpinned"
    )
    print(
        f"payload {args.payload} B, {args.clients} allocations, {args.seconds:.1f} s per step, "
        f"{os.cpu_count()} cores, {where}",
        flush=True,
    )
    tables = []
    for transport in args.transports:
        results = [
            run_one(bench, name, transport)
            for name in args.servers
            if transport in CONTENDERS[name].transports
        ]
        tables.append((transport, results))
    for transport, results in tables:
        print_table(transport, results)
    print(
        "\nloss-free: the highest step of an unbroken run with nothing lost and the offer taken; "
        "CPU s/M pkt: the server's CPU seconds per million packets at those two steps; "
        "latency: one-way through the relay, at those steps"
    )
    if any(r.failed for _, results in tables for r in results):
        print(f"work files (servers' logs) kept in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
