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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_stats import rss_kib  # noqa: E402
from stomp_sessions import appliance_running, open_session, p50_p99_ms, ramp  # noqa: E402

HOPS = ["request", "accept", "offer", "answer", "hangup"]
CALL_QUEUES = [
    "/user/queue/call/request",
    "/user/queue/call/response",
    "/user/queue/call/hangup",
    "/user/queue/rtc/signaling",
]
call_ids = itertools.count()


def send_frame(destination: str, body: dict) -> str:
    data = json.dumps(body)
    return f"SEND\ndestination:{destination}\ncontent-length:{len(data.encode())}\n\n{data}\x00"


async def connect_users(ports: list[int], users: int) -> list:
    """user0..user{users-1} connected, user i to ports[i % len(ports)] (so with two nodes
    each pair's caller and callee sit on different ones), subscribed to the call queues."""
    return await ramp(users, lambda i: open_session(ports[i % len(ports)], i, CALL_QUEUES))


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
            (
                "request",
                caller,
                callee,
                "/app/call/request",
                "/user/queue/call/request",
                {
                    "callId": call_id,
                    "type": "AUDIO",
                    "callee": f"user{callee_id}",
                    "callerUserName": "a",
                    "calleeUserName": "b",
                },
            ),
            (
                "accept",
                callee,
                caller,
                "/app/call/response",
                "/user/queue/call/response",
                {"callId": call_id, "type": "ACCEPT"},
            ),
            (
                "offer",
                caller,
                callee,
                "/app/rtc/signaling",
                "/user/queue/rtc/signaling",
                {"callId": call_id, "type": "OFFER", "payload": sdp},
            ),
            (
                "answer",
                callee,
                caller,
                "/app/rtc/signaling",
                "/user/queue/rtc/signaling",
                {"callId": call_id, "type": "ANSWER", "payload": sdp},
            ),
            ("hangup", caller, callee, "/app/call/hangup", "/user/queue/call/hangup", {"callId": call_id}),
        ]
        for hop, sender, receiver, destination, delivered_to, body in steps:
            started = time.perf_counter()
            await sender.send(send_frame(destination, body))
            await expect(receiver, delivered_to)
            hops[hop].append(time.perf_counter() - started)
        done += 1
    return done


async def run_calls(sockets: list, seconds: float) -> tuple[int, dict[str, list[float]]]:
    """Pairs (user 2k calling user 2k+1) calling back to back for `seconds`: the calls
    completed, and each hop's latencies in seconds."""
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    end = time.perf_counter() + seconds
    counts = await asyncio.gather(
        *(pair_loop(sockets[i], sockets[i + 1], i + 1, end, hops) for i in range(0, len(sockets) - 1, 2))
    )
    return sum(counts), hops


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The size of the call load (bench/signaling_nodes.py runs the same load on each set-up)."""
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)


async def bench(args) -> None:
    with appliance_running("bench-calls-", args.users) as (proc, port):
        await asyncio.sleep(1)
        sockets = await connect_users([port], args.users)
        print(f"{args.users} users connected; server RSS {rss_kib([proc.pid])} KiB", flush=True)
        # A SUBSCRIBE is sent without waiting for a receipt: a call request to a callee
        # whose SUBSCRIBEs are still on the wire is delivered to no one, and its pair hangs.
        await asyncio.sleep(1)
        total, hops = await run_calls(sockets, args.seconds)
        print(
            f"{total} calls set up and hung up in {args.seconds:.0f} s by {args.users // 2} pairs: "
            f"{total / args.seconds:.0f} calls/s",
            flush=True,
        )
        for hop in HOPS:
            p50, p99 = p50_p99_ms(hops[hop])
            print(f"  {hop:8} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms", flush=True)
        await asyncio.gather(*(ws.close() for ws in sockets))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_load_options(parser)
    args = parser.parse_args()
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
