"""bench/fuzz_relay.py keeps working: a --quick run against the real appliance (a few
thousand mutated datagrams, a few hundred stream frames) ends with PASS, no traceback
in the appliance's log and every legitimate round trip through the relay done."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "fuzz_relay.py"


def test_quick_fuzz_run_passes(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--seed", "7", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert report.rstrip().endswith("PASS"), report
    assert "tracebacks in the log: 0" in report
    assert "legit checks passed: 6/6" in report
    assert "datagrams sent to the listener: 3000 " in report
    assert "generator faults" not in report, report
