"""Memory under churn and garbage: does the relay give back what it takes?

    python bench/soak.py [--cycles N] [--garbage N]

Starts the appliance on loopback, then runs Allocate + ChannelBind + delete
cycles (each from a new client port) and throws random datagrams and
STUN-looking garbage at the listener, printing the relay's RSS after a
warm-up and after the run.  A relay that keeps state for deleted allocations
or for garbage grows here.  Not a test: it prints, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proc_stats import rss_kib  # noqa: E402

from turn import stun  # noqa: E402
from turn.client import ClientCredentials  # noqa: E402

REALM = "soak.local"


def allocation_cycles(port: int, secret: str, count: int) -> None:
    steps = [
        (stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")]),
        (
            stun.CHANNEL_BIND,
            [
                (stun.CHANNEL_NUMBER, b"\x40\0\0\0"),
                (stun.XOR_PEER_ADDRESS, lambda t: stun.encode_xor_address(("8.8.8.8", 9), t)),
            ],
        ),
        (stun.REFRESH, [(stun.LIFETIME, b"\0\0\0\0")]),
    ]
    for i in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("127.0.0.1", port))
            sock.settimeout(2)
            creds = ClientCredentials.rest(secret.encode(), f"{int(time.time()) + 600}:soak{i}", REALM)
            for method, attrs in steps:
                for _ in range(2):
                    sock.send(creds.build(method, attrs))
                    reply = stun.parse(sock.recv(2048))
                    if not creds.should_retry(reply):
                        break
                if reply.cls != stun.SUCCESS:
                    raise RuntimeError(f"cycle {i}: {stun.decode_error(reply.get(stun.ERROR_CODE))}")


def garbage(port: int, count: int) -> None:
    rng = random.Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        for i in range(count):
            if i % 2:
                sock.send(rng.randbytes(rng.randint(0, 300)))
            else:  # a valid-looking STUN header over random attributes
                body = rng.randbytes(rng.randint(0, 50) * 4)
                sock.send(
                    b"\x00\x03"
                    + len(body).to_bytes(2, "big")
                    + stun.MAGIC_COOKIE_BYTES
                    + rng.randbytes(12)
                    + body
                )
            if i % 500 == 0:
                time.sleep(0.005)  # stay under the socket buffer: count what the relay parses


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--garbage", type=int, default=200000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    secret = os.urandom(16).hex()
    (work / "secrets.json").write_text(
        json.dumps(
            {
                "version": 1,
                "secrets": [{"id": "k-soak", "value": secret, "created": int(time.time()), "retired": None}],
            }
        )
    )
    os.chmod(work / "secrets.json", 0o600)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "appliance.yaml").write_text(
        json.dumps(
            {
                "realm": REALM,
                "data_dir": str(work),
                "log_level": "warning",
                "turn": {
                    "udp": f"127.0.0.1:{port}",
                    "tcp": None,
                    "tls": None,
                    "relay_ip6": None,
                    "relay_ports": "55000-59999",
                    "user_quota": 0,
                    # One source (127.0.0.1) sends all the cycles and garbage: no reply budget.
                    "unauth_replies_per_s": 0,
                },
                "credentials": {"secrets_file": str(work / "secrets.json")},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(work / "appliance.yaml")],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2)
        print(f"start            RSS {rss_kib([proc.pid]):7d} KiB")
        allocation_cycles(port, secret, args.cycles // 4)
        garbage(port, args.garbage // 4)
        warm = rss_kib([proc.pid])
        print(f"after warm-up    RSS {warm:7d} KiB")
        started = time.perf_counter()
        allocation_cycles(port, secret, args.cycles)
        garbage(port, args.garbage)
        time.sleep(1)
        end = rss_kib([proc.pid])
        print(
            f"after {args.cycles} allocation cycles and {args.garbage} garbage datagrams "
            f"({time.perf_counter() - started:.1f} s): RSS {end:7d} KiB, growth {end - warm:+d} KiB"
        )
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
