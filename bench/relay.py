"""Relay throughput and allocation rate: our appliance against coturn, same load, one run.

    python bench/relay.py [--quick] [--seconds S] [--payload BYTES] [--clients K]
    python bench/relay.py --tls [--no-pin] [same options]

For each server (coturn 4.x started here with use-auth-secret, once with its
default relay threads and once with --relay-threads 2; ours with turn.workers
1 and 2) it sets up K allocations over UDP, binds a channel from
each to coturn's turnutils_peer (a C echo peer on loopback), and offers a
ladder of packet rates, stopping at the first step with any loss.  Each echoed
packet crosses the relay twice (client -> peer as ChannelData, peer -> client as
ChannelData), so relayed packets/s is twice the echo rate.  It prints, per server:
the highest offered rate with zero loss, relayed packets/s there, the server's CPU seconds per million
relayed packets, and Allocate+ChannelBind+delete handshakes per second; then
the ratios ours/coturn.  Loopback only; every process it starts it stops.

--tls measures relayed throughput over TURN-over-TLS instead: coturn's TLS listener, our
turn.tls listener and our edge port (edge.listen), the same load through each, and the
ratios against coturn; see relay_tls.py.  The servers (and their threads and workers)
run on the first CPU and the load on the others, unless --no-pin.

Not a test: it asserts nothing and is not run by CI.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from turn_servers import REALM, Server, free_port, start_coturn, start_ours

from turn import stun
from turn.client import ClientCredentials

# ------------------------------------------------------------------ client side


class Client:
    """A blocking TURN client for set-up (the load itself is raw ChannelData)."""

    def __init__(self, port: int, secret: str, user: str, source: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(2)
        self.creds = ClientCredentials.rest(secret.encode(), f"{int(time.time()) + 3600}:{user}", REALM)

    def request(self, method: int, attrs) -> stun.Message:
        for _ in range(3):
            tid = os.urandom(12)
            self.sock.send(self.creds.build(method, attrs, tid))
            while True:  # skip echoes still queued from a load run
                try:
                    reply = stun.parse(self.sock.recv(4096))
                except stun.StunParseError:
                    continue
                if reply.transaction_id == tid:
                    break
            if self.creds.should_retry(reply):
                continue
            if reply.cls != stun.SUCCESS:
                raise RuntimeError(f"{method}: {stun.decode_error(reply.get(stun.ERROR_CODE))}")
            return reply
        raise RuntimeError("authentication failed")

    def allocate(self) -> None:
        self.request(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")])

    def bind(self, number: int, peer) -> None:
        self.request(
            stun.CHANNEL_BIND,
            [
                (stun.CHANNEL_NUMBER, struct.pack("!HH", number, 0)),
                (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(peer, tid)),
            ],
        )

    def delete(self) -> None:
        self.request(stun.REFRESH, [(stun.LIFETIME, b"\x00\x00\x00\x00")])


def _sender(socks, packet: bytes, rate: float, seconds: float, sent) -> None:
    interval = 1.0 / rate
    batch = max(1, int(rate / 2000))  # pace in ~0.5 ms batches
    count = 0
    start = time.perf_counter()
    end = start + seconds
    n = len(socks)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = int((now - start) / interval)
        while count < due:
            for _ in range(batch):
                try:
                    socks[count % n].send(packet)
                except BlockingIOError:
                    pass
                count += 1
        time.sleep(interval * batch / 2)
    sent.value = count


def _receiver(socks, seconds: float, received) -> None:
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    count = 0
    end = time.monotonic() + seconds
    buf = bytearray(2048)
    while time.monotonic() < end:
        for key, _ in sel.select(0.1):
            sock = key.fileobj
            while True:
                try:
                    sock.recv_into(buf)
                except BlockingIOError:
                    break
                count += 1
    received.value = count


def measure_rate(clients, payload: int, rate: float, seconds: float):
    ctx = multiprocessing.get_context("fork")
    socks = [c.sock for c in clients]
    packet = struct.pack("!HH", 0x4000, payload) + b"x" * payload
    sent, received = ctx.Value("q", 0), ctx.Value("q", 0)
    rx = ctx.Process(target=_receiver, args=(socks, seconds + 1.5, received))
    rx.start()
    time.sleep(0.2)
    tx = ctx.Process(target=_sender, args=(socks, packet, rate, seconds, sent))
    tx.start()
    tx.join()
    rx.join()
    return sent.value, received.value


ALLOCATION_SOURCES = 100


def allocation_rate(port: int, secret: str, count: int) -> float:
    peer = ("127.0.0.1", 9)
    done = []
    start = time.perf_counter()
    for i in range(count):
        # Spread over ALLOCATION_SOURCES addresses: each Allocate starts with a 401, and
        # the relay budgets those per source (turn.unauth_replies_per_s, left on its
        # default here); many real clients, not one, make an allocation rate.
        c = Client(port, secret, f"alloc{i}", f"127.0.0.{2 + i % ALLOCATION_SOURCES}")
        c.allocate()
        c.bind(0x4000, peer)
        c.delete()
        done.append(c)
    rate = count / (time.perf_counter() - start)
    # Closed only now: a reused client port would meet coturn's lingering
    # deleted allocation and get 437.
    for c in done:
        c.sock.close()
    return rate


@dataclass
class Result:
    name: str
    best_rate: float = 0.0
    relayed_pps: float = 0.0
    cpu_per_million: float = 0.0
    alloc_per_s: float = 0.0
    ladder: list = None


def run_server(
    server: Server,
    secret: str,
    peer_port: int,
    rates,
    seconds: float,
    payload: int,
    clients_n: int,
    allocs: int,
) -> Result:
    result = Result(server.name, ladder=[])
    clients = []
    try:
        for i in range(clients_n):
            c = Client(server.port, secret, f"bench{i}")
            c.allocate()
            c.bind(0x4000, ("127.0.0.1", peer_port))
            clients.append(c)
        for rate in rates:
            cpu0 = server.cpu_seconds()
            sent, received = measure_rate(clients, payload, rate, seconds)
            cpu = server.cpu_seconds() - cpu0
            loss = 1 - received / sent if sent else 1.0
            relayed = 2 * received
            result.ladder.append((rate, sent / seconds, received / seconds, loss, cpu))
            print(
                f"  {server.name:10} offered {rate:8.0f}/s  sent {sent / seconds:8.0f}/s  "
                f"echoed {received / seconds:8.0f}/s  loss {loss * 100:6.2f}%  "
                f"cpu {cpu:5.2f}s",
                flush=True,
            )
            if loss > 0.0:
                break  # the ladder stops at its first loss: the rate below is the result
            result.best_rate = sent / seconds
            result.relayed_pps = 2 * received / seconds
            result.cpu_per_million = cpu / (relayed / 1e6) if relayed else 0.0
        time.sleep(0.5)
        for c in clients:
            c.sock.setblocking(True)
            c.sock.settimeout(2)
            c.delete()
            c.sock.close()
        result.alloc_per_s = allocation_rate(server.port, secret, allocs)
    finally:
        server.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short ladder, short runs")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--payload", type=int, default=160, help="bytes per packet (audio-sized)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="relayed throughput over TLS: coturn's TLS listener, our turn.tls and our edge port",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--tls: servers on the first CPU, the load on the others (default: on)",
    )
    args = parser.parse_args()
    if args.tls:
        from relay_tls import run_tls

        return run_tls(args)
    for program in ("turnserver", "turnutils_peer"):
        if shutil.which(program) is None:
            print(f"{program} not found: apt-get install coturn", file=sys.stderr)
            return 2
    seconds = args.seconds or (1.5 if args.quick else 3.0)
    rates = (
        [10000, 30000, 50000]
        if args.quick
        else [10000, 20000, 30000, 40000, 50000, 60000, 70000, 80000, 100000]
    )
    allocs = 100 if args.quick else 300
    secret = os.urandom(16).hex()
    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    peer_port = free_port()
    peer = subprocess.Popen(
        [shutil.which("turnutils_peer"), "-L", "127.0.0.1", "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = []
    try:
        time.sleep(0.3)
        print(
            f"payload {args.payload} B, {args.clients} allocations, {seconds:.1f} s per step, "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        for start in (
            lambda: start_coturn(workdir, secret),
            lambda: start_coturn(workdir, secret, relay_threads=2),
            lambda: start_ours(workdir, secret, 1),
            lambda: start_ours(workdir, secret, 2),
        ):
            server = start()
            results.append(
                run_server(server, secret, peer_port, rates, seconds, args.payload, args.clients, allocs)
            )
    finally:
        peer.terminate()
        peer.wait(5)
    coturn = results[0]
    print()
    print(
        f"{'server':10} {'loss-free offered/s':>20} {'relayed pkt/s':>14} "
        f"{'CPU s / M pkts':>15} {'allocs/s':>9} {'ratio pkt/s':>12} {'ratio allocs':>13}"
    )
    for r in results:
        ratio = r.relayed_pps / coturn.relayed_pps if coturn.relayed_pps else float("nan")
        aratio = r.alloc_per_s / coturn.alloc_per_s if coturn.alloc_per_s else float("nan")
        print(
            f"{r.name:10} {r.best_rate:20.0f} {r.relayed_pps:14.0f} {r.cpu_per_million:15.2f} "
            f"{r.alloc_per_s:9.0f} {ratio:12.2f} {aratio:13.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
