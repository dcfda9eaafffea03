"""Relayed throughput over TLS (`python bench/relay.py --tls`): coturn's TLS listener, our
turn.tls listener and our edge port (edge.listen, TURN and HTTPS on one TLS port), the
same load through each, one run, and the ratios against coturn.

Each server gets K TURN-over-TLS clients (TLS 1.3, ALPN "stun.turn" as RFC 7443 asks of
TURN clients, one certificate for all three servers).  Each allocates a UDP relay and binds
a channel to coturn's turnutils_peer (a C echo peer on loopback), then ChannelData goes
client -> relay -> peer -> relay -> client, so relayed packets/s is twice the echo rate.
A ladder of offered rates gives two figures.  Loss-free: the highest step of the unbroken
run of steps where no echo went missing and the server took what was offered (TCP pushes
back instead of dropping, so a sender held under 97% of its offer means the server is
saturated).  Peak: the most any step relayed; the ladder climbs on past a loss until a
step loses more than PEAK_LOSS or the server stops taking the offer.  Per step it prints
where UDP datagrams were dropped: at the server's relay sockets (it did not read them in
time), at the echo peer's, anywhere on the host (other processes' included).

One sender and one receiver process carry the whole ladder on the connections set up
here: a TLS connection's state cannot be handed back from a child process, so a process
per step (as the UDP ladder has) would send with stale sequence numbers.  The sender
coalesces the frames due on one connection into one write (at most COALESCE).  With
two or more cores the servers run on the first core and the load (this process, its
children and the echo peer) on the others, so the generator's CPU is not the server's;
the load's CPU seconds are printed per step, to tell when the generator is the limit.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from proc_stats import cpu_seconds
from turn_servers import (
    REALM,
    Server,
    free_port,
    free_tcp_port,
    start_coturn,
    start_ours,
    wait_for_stun_over_tls,
)

from appliance.tls.devcert import ensure_dev_certificate
from turn import stun
from turn.client import ClientCredentials

CHANNEL = 0x4000
COALESCE = 8  # frames joined into one TLS write at most
PEAK_LOSS = 0.05  # past the first loss the ladder climbs on, for the peak, until this much
SENT_SHARE = 0.97  # a step whose sender got less than this of its offer out is saturated
DRAIN_S = 1.5  # after a step, echoes still in flight are counted this long
RATES = [2000, 5000, 10000, 15000, 20000, 25000, 30000, 40000, 50000, 60000, 80000]  # echoes/s offered
QUICK_RATES = [2000, 5000, 10000]
SEND_TIMEOUT_S = 10.0  # one write the server does not take in this long ends the run


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the servers' development certificate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["stun.turn"])
    return ctx


def frame_bytes(payload: int) -> bytes:
    """One ChannelData message as sent over a stream: padded to a multiple of 4 (RFC 8656
    section 12.5)."""
    return struct.pack("!HH", CHANNEL, payload) + b"x" * payload + b"\0" * (-payload % 4)


# ------------------------------------------------------------------ set-up, blocking


class TlsClient:
    """One TURN-over-TLS client with a UDP allocation and a channel to the echo peer."""

    def __init__(self, port: int, secret: str, user: str, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw)
        self.creds = ClientCredentials.rest(secret.encode(), f"{int(time.time()) + 3600}:{user}", REALM)
        self.buffer = b""

    def _read_stun(self) -> stun.Message:
        while True:
            while len(self.buffer) < 4:
                self._fill()
            if self.buffer[0] >> 6 == 1:  # ChannelData: skip it
                size = 4 + int.from_bytes(self.buffer[2:4], "big")
                size += -size % 4
            else:
                size = 20 + int.from_bytes(self.buffer[2:4], "big")
            while len(self.buffer) < size:
                self._fill()
            message, self.buffer = self.buffer[:size], self.buffer[size:]
            if message[0] >> 6 == 0:
                return stun.parse(message)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        self.buffer += chunk

    def request(self, method: int, attrs) -> stun.Message:
        for _ in range(3):
            tid = os.urandom(12)
            self.sock.sendall(self.creds.build(method, attrs, tid))
            reply = self._read_stun()
            while reply.transaction_id != tid:
                reply = self._read_stun()
            if self.creds.should_retry(reply):
                continue
            if reply.cls != stun.SUCCESS:
                raise RuntimeError(f"{method}: {stun.decode_error(reply.get(stun.ERROR_CODE))}")
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
        if self.buffer:
            raise RuntimeError("unexpected bytes after the set-up")


# ------------------------------------------------------------------ the load


def _sender(socks, frame: bytes, steps, results) -> None:
    """For each (rate, seconds) from `steps` (None ends): send `frame` at `rate` per second
    over `socks`, round robin; put the number of frames written in `results` (or the error
    that stopped it, as text)."""
    for sock in socks:
        sock.settimeout(SEND_TIMEOUT_S)  # blocking writes, with a bound
    n = len(socks)
    while (step := steps.get()) is not None:
        rate, seconds = step
        interval = 1.0 / rate
        count, turn = 0, 0
        start = time.perf_counter()
        end = start + seconds
        try:
            while (now := time.perf_counter()) < end:
                due = int((now - start) / interval)
                while count < due:
                    frames = min(COALESCE, due - count)
                    socks[turn % n].sendall(frame * frames)
                    turn += 1
                    count += frames
                time.sleep(interval * COALESCE / 2)
        except OSError as err:
            results.put(f"sending: {type(err).__name__}: {err}")
            return
        results.put(count)


def _receiver(socks, received, stop) -> None:
    """Count the bytes echoed on `socks` into `received` until `stop` is set."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    total = 0
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            sock = key.fileobj
            while True:
                try:
                    data = sock.recv(262144)
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    break
                total += len(data)
            received.value = total


def udp_socket_drops(low: int, high: int) -> int:
    """Datagrams the kernel dropped for want of buffer on the IPv4 UDP sockets bound to a
    port from `low` to `high` (the `drops` column of /proc/net/udp)."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if low <= int(fields[1].rsplit(":", 1)[1], 16) <= high:
                total += int(fields[-1])
    return total


def udp_receive_buffer_errors() -> int:
    """RcvbufErrors of the whole host (/proc/net/snmp): every UDP socket's drops."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def drop_counts(server: Server, peer_port: int) -> tuple[int, int, int]:
    """(relay sockets', echo peer's, whole host's) UDP receive-buffer drops so far."""
    return (
        udp_socket_drops(*server.relay_ports),
        udp_socket_drops(peer_port, peer_port),
        udp_receive_buffer_errors(),
    )


@dataclass
class Step:
    offered: float
    sent: int
    echoed: int
    seconds: float
    server_cpu: float
    load_cpu: float
    relay_drops: int  # at the server's relay sockets: it did not read them in time
    peer_drops: int  # at the echo peer's socket
    host_drops: int  # at every UDP socket of the host (the two above among them)

    @property
    def loss(self) -> float:
        return 1 - self.echoed / self.sent if self.sent else 1.0

    @property
    def loss_free(self) -> bool:
        return self.echoed >= self.sent and self.sent >= SENT_SHARE * self.offered * self.seconds


@dataclass
class Result:
    name: str
    steps: list[Step] = field(default_factory=list)
    best: Step | None = None
    failed: str | None = None  # why this server has no figures

    def relayed_pps(self) -> float:
        """Relayed packets/s at the highest step of the unbroken loss-free run."""
        return 2 * self.best.echoed / self.best.seconds if self.best else 0.0

    def peak_pps(self) -> float:
        """The most relayed packets/s any step saw, loss or not (goodput at saturation)."""
        return max((2 * s.echoed / s.seconds for s in self.steps), default=0.0)

    def cpu_per_million(self) -> float:
        if not self.best or not self.best.echoed:
            return 0.0
        return self.best.server_cpu / (2 * self.best.echoed / 1e6)


def run_ladder(server: Server, tls_port: int, secret: str, peer_port: int, args, rates) -> Result:
    result = Result(server.name)
    ctx = client_context()
    clients = []
    try:
        for i in range(args.clients):
            client = TlsClient(tls_port, secret, f"tls{i}", ctx)
            client.allocate_and_bind(("127.0.0.1", peer_port))
            clients.append(client)
        socks = [c.sock for c in clients]
        frame = frame_bytes(args.payload)
        mp = multiprocessing.get_context("fork")
        steps, results = mp.Queue(), mp.Queue()
        received, stop = mp.Value("q", 0, lock=False), mp.Event()
        rx = mp.Process(target=_receiver, args=(socks, received, stop), daemon=True)
        tx = mp.Process(target=_sender, args=(socks, frame, steps, results), daemon=True)
        rx.start()
        tx.start()
        load = [rx.pid, tx.pid]
        clean = True
        try:
            for rate in rates:
                before, server0, load0 = received.value, server.cpu_seconds(), cpu_seconds(load)
                drops0 = drop_counts(server, peer_port)
                steps.put((rate, args.seconds))
                try:
                    sent = results.get(timeout=args.seconds + SEND_TIMEOUT_S + 30)
                except queue.Empty:
                    raise RuntimeError("the sender process did not report") from None
                if isinstance(sent, str):
                    raise RuntimeError(sent)
                time.sleep(DRAIN_S)
                echoed = (received.value - before) // len(frame)
                step = Step(
                    rate,
                    sent,
                    echoed,
                    args.seconds,
                    server.cpu_seconds() - server0,
                    cpu_seconds(load) - load0,
                    *(now - then for now, then in zip(drop_counts(server, peer_port), drops0, strict=True)),
                )
                result.steps.append(step)
                print(
                    f"  {server.name:12} offered {rate:7.0f}/s  sent {sent / args.seconds:7.0f}/s  "
                    f"echoed {echoed / args.seconds:7.0f}/s  loss {step.loss * 100:6.2f}%  "
                    f"server cpu {step.server_cpu:5.2f}s  load cpu {step.load_cpu:5.2f}s  "
                    f"udp drops: relay {step.relay_drops} peer {step.peer_drops} host {step.host_drops}",
                    flush=True,
                )
                clean = clean and step.loss_free
                if clean:
                    result.best = step  # the loss-free figure: every step up to here clean
                if step.loss > PEAK_LOSS or step.sent < SENT_SHARE * step.offered * step.seconds:
                    break  # saturated: the peak is behind us
        finally:
            steps.put(None)
            stop.set()
            for proc in (tx, rx):
                proc.join(args.seconds + 15)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
    finally:
        for client in clients:
            client.sock.close()
        server.stop()
    return result


# ------------------------------------------------------------------ the servers


def tls_overrides(cert: Path, key: Path, tls_port: int) -> dict:
    return {"turn": {"tls": f"127.0.0.1:{tls_port}", "tls_cert": str(cert), "tls_key": str(key)}}


def edge_overrides(cert: Path, key: Path, edge_port: int) -> dict:
    """The edge with the signaling it hands HTTP to, and no other TURN stream listener."""
    files = {"tls_cert": str(cert), "tls_key": str(key)}
    return {
        "http": {"listen": f"127.0.0.1:{free_tcp_port()}", "tls": True, **files},
        "edge": {"listen": f"127.0.0.1:{edge_port}", **files},
    }


def cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(the servers' CPUs, the load's), or (None, None) unpinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def run_tls(args) -> int:
    """The --tls mode of bench/relay.py; returns the exit status."""
    for program in ("turnserver", "turnutils_peer"):
        if shutil.which(program) is None:
            print(f"{program} not found: apt-get install coturn", file=sys.stderr)
            return 2
    seconds = args.seconds or (1.5 if args.quick else 3.0)
    args.seconds = seconds
    rates = QUICK_RATES if args.quick else RATES
    server_cpus, load_cpus = cpu_split(args.pin)
    if load_cpus is not None:
        os.sched_setaffinity(0, load_cpus)  # this process, its children and the echo peer
    secret = os.urandom(16).hex()
    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-tls-"))
    cert, key, _ = ensure_dev_certificate(workdir / "certs")
    peer_port = free_port()
    peer = subprocess.Popen(
        [shutil.which("turnutils_peer"), "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    where = (
        f"servers on CPU {sorted(server_cpus)}, load on CPU {sorted(load_cpus)}"
        if server_cpus
        else "unpinned"
    )
    print(
        f"TURN over TLS: payload {args.payload} B, {args.clients} allocations, {seconds:.1f} s per step, "
        f"{os.cpu_count()} cores, {where}; work files in {workdir}",
        flush=True,
    )
    ctx = client_context()
    contenders = [
        ("coturn tls", lambda port: start_coturn(workdir, secret, tls=(cert, key, port), cpus=server_cpus)),
        (
            "ours tls",
            lambda port: start_ours(
                workdir, secret, 1, "ours tls", tls_overrides(cert, key, port), server_cpus
            ),
        ),
        (
            "ours edge",
            lambda port: start_ours(
                workdir, secret, 1, "ours edge", edge_overrides(cert, key, port), server_cpus
            ),
        ),
    ]
    results = []
    try:
        time.sleep(0.3)
        for name, start in contenders:
            port = free_tcp_port()
            try:
                server = start(port)
            except RuntimeError as err:
                why = f"did not start: {err}"
                if name == "ours edge":
                    why = f"the edge cannot be served by this build or configuration (edge.listen): {why}"
                results.append(Result(name, failed=why))
                print(f"  {name:12} {why}", flush=True)
                continue
            try:
                wait_for_stun_over_tls(server, port, ctx)
            except RuntimeError as err:
                server.stop()
                why = f"no TURN over TLS on its port: {err}"
                if name == "ours edge":
                    why = f"the edge cannot be served by this build or configuration (edge.listen): {err}"
                results.append(Result(name, failed=why))
                print(f"  {name:12} {why}", flush=True)
                continue
            try:
                results.append(run_ladder(server, port, secret, peer_port, args, rates))
            except (OSError, RuntimeError, ssl.SSLError) as err:
                results.append(Result(name, failed=f"failed under load: {type(err).__name__}: {err}"))
                print(f"  {name:12} failed under load: {err}\n{server.log_tail()}", flush=True)
    finally:
        peer.terminate()
        peer.wait(5)
    print_table(results, args.payload)
    return 0 if all(r.failed is None for r in results) else 1


def print_table(results: list[Result], payload: int) -> None:
    coturn = results[0]

    def ratio(ours: float, theirs: float) -> float:
        return ours / theirs if theirs else float("nan")

    print()
    print(
        f"{'server':12} {'loss-free offered/s':>20} {'relayed pkt/s':>14} {'payload Mbit/s':>15} "
        f"{'CPU s / M pkts':>15} {'peak pkt/s':>11} {'ratio pkt/s':>12} {'ratio peak':>11}"
    )
    for r in results:
        if r.failed is not None:
            print(f"{r.name:12} -- {r.failed.splitlines()[0]}")
            continue
        offered = r.best.offered if r.best else 0.0
        print(
            f"{r.name:12} {offered:20.0f} {r.relayed_pps():14.0f} "
            f"{r.relayed_pps() * payload * 8 / 1e6:15.1f} {r.cpu_per_million():15.2f} "
            f"{r.peak_pps():11.0f} {ratio(r.relayed_pps(), coturn.relayed_pps()):12.2f} "
            f"{ratio(r.peak_pps(), coturn.peak_pps()):11.2f}"
        )
    print(
        "relayed = both directions (client -> peer and back); payload Mbit/s at the loss-free step; "
        "peak: the most any step relayed, loss or not"
    )
