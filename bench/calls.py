"""Call set-up throughput and per-hop latency through the signaling.

    python bench/calls.py [--users N] [--seconds S]

Starts the appliance (signaling only, loopback, static tokens), connects N
users over WebSocket (N/2 caller/callee pairs), and has every pair run calls
back to back for S seconds: request -> accept -> offer -> answer -> hangup.
Prints completed call set-ups per second and the p50/p99 latency of each hop,
measured from the SEND to the MESSAGE at the other party.  The client is Python
on the same 2 cores, so the figures are a floor.  Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stomp_sessions import rss_kib, start_appliance  # noqa: E402

HOPS = ["request", "accept", "offer", "answer", "hangup"]
call_ids = itertools.count()


def send_frame(destination: str, body: dict) -> str:
    data = json.dumps(body)
    return f"SEND\ndestination:{destination}\ncontent-length:{len(data.encode())}\n\n{data}\x00"


async def connect(port: int, i: int):
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/imserver/ws?userId=user{i}",
                                  subprotocols=["v12.stomp"], max_queue=None, ping_interval=None)
    await ws.send(f"CONNECT\naccept-version:1.2\nide:tok-{i}\nheart-beat:0,0\n\n\x00")
    assert (await ws.recv()).startswith("CONNECTED")
    for n, d in enumerate(["/user/queue/call/request", "/user/queue/call/response",
                           "/user/queue/call/hangup", "/user/queue/rtc/signaling"]):
        await ws.send(f"SUBSCRIBE\nid:{n}\ndestination:{d}\n\n\x00")
    return ws


async def expect(ws, destination: str) -> None:
    while True:
        frame = await ws.recv()
        if f"destination:{destination}\n" in frame:
            return


async def pair_loop(caller, callee, callee_id: int, end: float, hops: dict[str, list[float]]) -> int:
    done = 0
    sdp = "v=0\r\n" + "a=candidate:1 1 udp 2122260223 192.0.2.1 40000 typ host\r\n" * 10
    while time.perf_counter() < end:
        call_id = f"bench-{next(call_ids)}"
        steps = [
            ("request", caller, callee, "/app/call/request", "/user/queue/call/request",
             {"callId": call_id, "type": "AUDIO", "callee": f"user{callee_id}",
              "callerUserName": "a", "calleeUserName": "b"}),
            ("accept", callee, caller, "/app/call/response", "/user/queue/call/response",
             {"callId": call_id, "type": "ACCEPT"}),
            ("offer", caller, callee, "/app/rtc/signaling", "/user/queue/rtc/signaling",
             {"callId": call_id, "type": "OFFER", "payload": sdp}),
            ("answer", callee, caller, "/app/rtc/signaling", "/user/queue/rtc/signaling",
             {"callId": call_id, "type": "ANSWER", "payload": sdp}),
            ("hangup", caller, callee, "/app/call/hangup", "/user/queue/call/hangup", {"callId": call_id}),
        ]
        for hop, sender, receiver, destination, delivered_to, body in steps:
            started = time.perf_counter()
            await sender.send(send_frame(destination, body))
            await expect(receiver, delivered_to)
            hops[hop].append(time.perf_counter() - started)
        done += 1
    return done


async def bench(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    proc, port = start_appliance(work, args.users)
    try:
        await asyncio.sleep(1)
        sockets = []
        for start in range(0, args.users, 100):
            sockets += await asyncio.gather(*(connect(port, i) for i in range(start, min(args.users, start + 100))))
        print(f"{args.users} users connected; server RSS {rss_kib(proc.pid)} KiB", flush=True)
        hops: dict[str, list[float]] = {h: [] for h in HOPS}
        end = time.perf_counter() + args.seconds
        counts = await asyncio.gather(*(pair_loop(sockets[i], sockets[i + 1], i + 1, end, hops)
                                        for i in range(0, args.users - 1, 2)))
        total = sum(counts)
        print(f"{total} calls set up and hung up in {args.seconds:.0f} s by {args.users // 2} pairs: "
              f"{total / args.seconds:.0f} calls/s", flush=True)
        for hop in HOPS:
            ms = sorted(x * 1000 for x in hops[hop])
            print(f"  {hop:8} p50 {statistics.median(ms):6.1f} ms   p99 {ms[int(len(ms) * 0.99)]:6.1f} ms",
                  flush=True)
        await asyncio.gather(*(ws.close() for ws in sockets))
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
