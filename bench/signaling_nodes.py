"""Signaling on one node vs two nodes sharing Redis, in one run, as ratios.

    python bench/signaling_nodes.py [--users N] [--seconds S] [--redis URL]

Three set-ups, one after the other on the same machine:
  1 node, memory   the default broker (the baseline)
  1 node, redis    the same node on broker.url: what Redis costs
  2 nodes, redis   users spread over two nodes; every call's caller and callee
                   sit on different nodes, so every message crosses Redis
For each: N users connect over WebSocket (connects/s, server RSS per session,
summed over the nodes), then N/2 pairs run calls back to back for S seconds
(request -> accept -> offer -> answer -> hangup; calls/s and p50/p99 per hop).
The client is Python on the same 2 cores as the nodes and Redis, so a second
node cannot add cores here: the figures show what crossing nodes costs, and
that nothing is lost, more than how far it scales on a bigger machine.
Not a test: it prints, it does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calls import add_load_options, connect_users, run_calls  # noqa: E402
from proc_stats import rss_kib  # noqa: E402
from stomp_sessions import p50_p99_ms, start_appliance  # noqa: E402


async def run_setup(name: str, nodes: int, redis: str | None, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    prefix = f"bench-{secrets.token_hex(4)}:"
    extra = {"broker": {"url": redis, "prefix": prefix}} if redis else {}
    started = [start_appliance(work / f"node{n}", args.users, extra) for n in range(nodes)]
    procs, ports = [p for p, _ in started], [port for _, port in started]
    try:
        await asyncio.sleep(1.5)
        base = rss_kib([p.pid for p in procs])
        t0 = time.perf_counter()
        sockets = await connect_users(ports, args.users)
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(1.5)  # presence settles on every node
        loaded = rss_kib([p.pid for p in procs])
        calls, hops = await run_calls(sockets, args.seconds)
        await asyncio.gather(*(ws.close() for ws in sockets))
        result = {
            "name": name,
            "connects": args.users / connect_s,
            "kib": (loaded - base) / args.users,
            "calls": calls / args.seconds,
            "hops": {h: p50_p99_ms(v) for h, v in hops.items()},
        }
        print(
            f"{name:16} {result['connects']:7.0f} connects/s  {result['kib']:5.1f} KiB/session  "
            f"{result['calls']:6.0f} calls/s",
            flush=True,
        )
        return result
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        if redis:
            forget_keys(redis, prefix)


def forget_keys(url: str, prefix: str) -> None:
    """The run's keys (used callIds outlive the nodes by a day) leave with it."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


async def bench(args) -> None:
    print(
        f"{args.users} users, {args.users // 2} pairs calling for {args.seconds:.0f} s each set-up",
        flush=True,
    )
    rows = [
        await run_setup("1 node, memory", 1, None, args),
        await run_setup("1 node, redis", 1, args.redis, args),
        await run_setup("2 nodes, redis", 2, args.redis, args),
    ]
    base = rows[0]
    print("\nratios to 1 node, memory (higher is better; per-hop latency p50/p99 in ms)")
    for row in rows:
        latency = "  ".join(f"{h} {p50:.0f}/{p99:.0f}" for h, (p50, p99) in row["hops"].items())
        print(
            f"{row['name']:16} connects x{row['connects'] / base['connects']:.2f}  "
            f"calls x{row['calls'] / base['calls']:.2f}   {latency}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_load_options(parser)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    args.users -= args.users % 2
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
