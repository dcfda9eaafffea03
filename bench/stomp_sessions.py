"""Signaling capacity: many STOMP sessions over WebSocket on one appliance.

    python bench/signaling.py [--sessions N] [--active M] [--seconds S]

Starts the appliance (signaling only, plain HTTP on loopback, static tokens),
then:
  1. ramps N sessions (connect + CONNECT/CONNECTED + SUBSCRIBE), reporting the
     connect rate and the server's RSS per idle session;
  2. has M of them send /app/user/status queries, each keeping a window of
     queries in flight, for S seconds, reporting answers/s and the p50/p99
     latency from SEND to the MESSAGE on the asking session;
  3. disconnects everything and reports the RSS left behind.
The client is Python (the `websockets` library) on the same 2 cores, so the
figures are a floor.  Not a test: it prints, it does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets
from proc_stats import rss_kib

ROOT = Path(__file__).resolve().parent.parent
CONNECT_CONCURRENCY = 100
WINDOW = 4
STATUS_TOPIC = ["/topic/user/status"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_appliance(work: Path, users: int, extra: dict | None = None) -> tuple[subprocess.Popen, int]:
    """A signaling-only appliance with tokens tok-0.. for user0..; `extra` adds config."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "data_dir": str(work),
        "log_level": os.environ.get("BENCH_LOG", "warning"),
        "turn": {"udp": None, "tcp": None, "tls": None},
        # signaling only: some ICE server must be named, or start-up refuses
        "credentials": {"ice_servers": ["stun:127.0.0.1:3478"]},
        "http": {"listen": f"127.0.0.1:{port}", "tls": False},
        "admin": {"listen": None},
        "auth": {"mode": "static", "tokens": {f"tok-{i}": f"user{i}" for i in range(users)}},
        # send_rate 0: the load sessions query as fast as answers come back, which is
        # what this measures; the per-session SEND budget would measure itself.
        "stomp": {"heartbeat_ms": "0,0", "send_rate": 0},
        **(extra or {}),
    }
    path = work / "appliance.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "log", "wb"),
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("appliance did not start")


@contextlib.contextmanager
def appliance_running(prefix: str, users: int):
    """start_appliance in a fresh temporary directory (named `prefix`...): (proc, port) for
    the body of the `with`, the appliance terminated after it."""
    proc, port = start_appliance(Path(tempfile.mkdtemp(prefix=prefix)), users)
    try:
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(15)


def p50_p99_ms(latencies: list[float]) -> tuple[float, float]:
    """The median and 99th percentile of latencies in seconds, in milliseconds."""
    ms = sorted(x * 1000 for x in latencies)
    return statistics.median(ms), ms[int(len(ms) * 0.99)]


async def open_session(port: int, i: int, destinations: list[str]):
    """user{i} over WebSocket, CONNECTed with its token and subscribed to `destinations`."""
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/imserver/ws?userId=user{i}",
        subprotocols=["v12.stomp"],
        max_queue=None,
        ping_interval=None,
    )
    await ws.send(f"CONNECT\naccept-version:1.2\nide:tok-{i}\nheart-beat:0,0\n\n\x00")
    reply = await ws.recv()
    if not reply.startswith("CONNECTED"):
        raise RuntimeError(reply[:200])
    for n, destination in enumerate(destinations):
        await ws.send(f"SUBSCRIBE\nid:{n}\ndestination:{destination}\n\n\x00")
    return ws


async def ramp(n: int, open_one) -> list:
    """`await open_one(i)` for i in 0..n-1, CONNECT_CONCURRENCY at a time; the results in order."""
    sessions: list = [None] * n
    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> None:
        async with semaphore:
            sessions[i] = await open_one(i)

    await asyncio.gather(*(one(i) for i in range(n)))
    return sessions


async def query_load(sessions: list, seconds: float) -> list[float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def run(i: int, ws) -> None:
        body = json.dumps([f"user{(i + k) % 1000}" for k in range(5)])
        frame = f"SEND\ndestination:/app/user/status\ncontent-length:{len(body)}\n\n{body}\x00"
        in_flight: list[float] = []
        while time.perf_counter() < end:
            while len(in_flight) < WINDOW:
                in_flight.append(time.perf_counter())
                await ws.send(frame)
            await ws.recv()
            latencies.append(time.perf_counter() - in_flight.pop(0))
        for _ in in_flight:
            await ws.recv()

    await asyncio.gather(*(run(i, ws) for i, ws in enumerate(sessions)))
    return latencies


async def bench(args) -> None:
    with appliance_running("bench-signaling-", args.sessions) as (proc, port):
        await asyncio.sleep(1)
        base = rss_kib([proc.pid])
        started = time.perf_counter()
        sessions = await ramp(args.sessions, lambda i: open_session(port, i, STATUS_TOPIC))
        ramp_s = time.perf_counter() - started
        await asyncio.sleep(1)
        loaded = rss_kib([proc.pid])
        print(
            f"sessions {args.sessions}: connected in {ramp_s:.1f} s = "
            f"{args.sessions / ramp_s:.0f} connects/s; server RSS {base} -> {loaded} KiB = "
            f"{(loaded - base) / args.sessions:.1f} KiB per idle session",
            flush=True,
        )
        latencies = await query_load(sessions[: args.active], args.seconds)
        p50, p99 = p50_p99_ms(latencies)
        print(
            f"status queries from {args.active} sessions (window {WINDOW}): "
            f"{len(latencies) / args.seconds:.0f} answers/s, latency p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms",
            flush=True,
        )
        await asyncio.gather(*(ws.close() for ws in sessions))
        await asyncio.sleep(2)
        print(f"after disconnecting all: server RSS {rss_kib([proc.pid])} KiB", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--active", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    args.active = min(args.active, args.sessions)
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
