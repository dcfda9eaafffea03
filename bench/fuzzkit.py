"""What bench/fuzz_relay.py and bench/fuzz_signaling.py share: their common command-line
options, the appliance's /metrics as a dict, a watch on its log for tracebacks, the saved
reproducer cases, and the RSS verdict and closing line of a run.

Both fuzzers put the repository root on sys.path before importing this module (it reads
the admin token of tests/interop/conftest.py's appliance).
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.interop.conftest import ADMIN_TOKEN


def add_common_options(parser: argparse.ArgumentParser, rss_growth_mib: float) -> None:
    """The options both fuzzers take; `rss_growth_mib` is this fuzzer's default budget."""
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="batches before RSS must stay flat")
    parser.add_argument("--rss-growth-mib", type=float, default=rss_growth_mib)
    parser.add_argument("--out", default=None, help="where reproducer cases are saved")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--replay", default=None, help="send a saved case to a fresh appliance")


def run_or_replay(args: argparse.Namespace, run, replay) -> int:
    """`replay(args)` with --replay, else `run(args)`: a fuzz run of at least one batch."""
    args.batches = max(1, args.batches)
    if args.replay:
        return replay(args)
    return run(args)


def metrics(admin_port: int) -> dict:
    """The appliance's /metrics, one entry a sample: `name{label=value,...}` -> value."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d ")


class LogTail:
    """The appliance's log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> str:
        """The whole lines written since the last read (a line still being written waits
        for the next one)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        cut = chunk.rfind(b"\n") + 1
        self.offset += cut
        return chunk[:cut].decode(errors="replace")


class LogWatch(LogTail):
    """Counts the tracebacks, worker exits and fatal errors the appliance's log gains, and
    keeps an excerpt of each kind."""

    MARKERS = ("Traceback", "exited with", "Fatal error")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tracebacks = 0
        self.worker_exits = 0
        self.excerpts: dict[str, str] = {}  # the exception's last line -> the first block
        self.last_signature = ""

    def poll(self) -> int:
        """New traceback-like events since the last poll."""
        text = self.read_new()
        found = 0
        if any(m in text for m in self.MARKERS):
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if any(m in line for m in self.MARKERS):
                    found += 1
                    self.worker_exits += "relay worker" in line and "exited with" in line
                    end = i + 1
                    while end < len(lines) and not LOG_RECORD.match(lines[end]):
                        end += 1  # a traceback runs to the next log record
                    block = lines[max(0, i - 1) : end]
                    self.last_signature = block[-1].strip()
                    if len(self.excerpts) < 10:
                        self.excerpts.setdefault(self.last_signature, "\n".join(block))
        self.tracebacks += found
        return found


def write_case(out: Path, name: str, case: dict) -> Path:
    """Save a reproducer as `out`/`name`.json, the file --replay reads."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(case, indent=1))
    return path


def report_memory(rows: list, warmup: int, rss_growth_mib: float) -> bool:
    """Print the RSS and descriptor lines of the summary (each row has `rss_kib` and `fds`);
    True if RSS after the last batch is past the warm-up batch's x 1.10 + `rss_growth_mib`."""
    rss = [r.rss_kib for r in rows]
    warm_batch = min(warmup, len(rows))
    warm = rss[warm_batch - 1]
    limit = warm * 1.10 + rss_growth_mib * 1024
    print(
        f"RSS first {rss[0] / 1024:.1f} MiB, after warm-up (batch {warm_batch}) {warm / 1024:.1f} MiB, last "
        f"{rss[-1] / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB; limit {limit / 1024:.1f} MiB "
        f"(warm-up x1.10 + {rss_growth_mib:g} MiB)"
    )
    print(f"fds first {rows[0].fds}, last {rows[-1].fds}, max {max(r.fds for r in rows)}")
    return len(rows) > warmup and rss[-1] > limit


def verdict(failures: list[str]) -> int:
    """The run's last line, PASS or FAIL with each reason once; its exit status."""
    print("FAIL: " + "; ".join(dict.fromkeys(failures)) if failures else "PASS", flush=True)
    return 1 if failures else 0
