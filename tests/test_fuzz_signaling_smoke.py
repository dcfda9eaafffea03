"""bench/fuzz_signaling.py keeps working: a --quick run against the real appliance (a few
thousand mutated STOMP frames over native WebSocket, SockJS's websocket and SockJS
xhr_send) writes its frames over all three, reports RSS, descriptors, CLOSE-WAIT and the
bystander's latencies, and ends with a verdict.

The verdict must be PASS: a traceback, a SEND answered 500, a bystander round trip missed,
CLOSE-WAIT left after the grace, RSS past its limit, a session left registered after its
connections ended, an unclean stop each fail it.  The case the fuzzer saved for the one
path that leaked sessions (fixed) replays clean.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "fuzz_signaling.py"
# A CONNECT split over six WebSocket messages, SENDs, then the client's close: the reader
# registered a session after the transport had finished its endpoint, and the session
# stayed registered (its user ONLINE) for good.  It leaked on every replay before the fix.
SESSION_LEAK_CASE = Path(__file__).resolve().parent / "cases" / "fuzz_signaling_session_leak.json"


def test_quick_fuzz_run_reports_and_nothing_unknown_fails(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--seed", "7", "--locate-s", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    report = run.stdout + run.stderr
    verdict = run.stdout.rstrip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode in (0, 1) and verdict.startswith(("PASS", "FAIL: ")), report[-3000:]

    written = re.search(
        r"frames written: (\d+) \(native WebSocket (\d+), SockJS websocket (\d+), "
        r"SockJS xhr_send (\d+)\)",
        report,
    )
    assert written, report[-3000:]
    total, *transports = map(int, written.groups())
    assert total >= 3000 and all(n > 0 for n in transports), written.group(0)

    assert re.search(r"bystander round trips: idle \d+ ok; during the fuzz [1-9]\d* ok, 0 failed", report), (
        report[-3000:]
    )
    assert re.search(r"CLOSE-WAIT right after a batch: max \d+; after the grace \([\d.]+ s\): max 0;", report)
    assert "exit code on SIGTERM: 0" in report
    assert "harness faults" not in report, report[-3000:]

    assert "tracebacks in the log: 0;" in report, report[-3000:]
    assert verdict == "PASS", report[-3000:]


def test_the_saved_session_leak_case_replays_clean():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--replay", str(SESSION_LEAK_CASE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.stdout.rstrip().endswith("tracebacks: 0; sessions left: 0"), (run.stdout + run.stderr)[-3000:]
