"""bench/relay.py's C load generator and bare C forwarder build with the system compiler and
carry packets through each other both ways over UDP, TCP and TLS (a short, low-rate run:
what it checks is that every packet sent arrives, not how fast).  Skipped without a C
compiler; TLS only when OpenSSL's headers are there."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("bench_c_build", BENCH / "c_build.py")
assert _spec is not None and _spec.loader is not None
c_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(c_build)

pytestmark = pytest.mark.skipif(c_build.compiler() is None, reason="no C compiler")


def test_generator_and_forwarder_carry_every_packet_both_ways():
    transports = ["udp", "tcp"] + (["tls"] if c_build.has_tls(c_build.build("loadgen")) else [])
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "relay.py"),
            "--servers",
            "c",
            "--transports",
            ",".join(transports),
            "--rates",
            "1000",
            "--seconds",
            "0.2",
            "--drain",
            "5",
            "--clients",
            "3",
            "--retries",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    for transport in transports:
        for arrow in ("client->peer", "peer->client"):
            steps = re.findall(rf"bare C forwarder +{transport} {arrow} .*", report)
            assert len(steps) == 1, report
            sent, received = re.search(r"sent +(\d+)/s +received +(\d+)/s", steps[0]).groups()
            assert int(sent) > 0 and received == sent, steps[0]
