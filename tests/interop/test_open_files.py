"""`appliance serve` raises its soft open-files limit to the hard limit at start, so the
usual soft 1,024 does not cap allocations and signaling connections on a machine that
allows more."""

from __future__ import annotations

from .conftest import start_appliance, stop_appliance

SOFT, HARD = 512, 4096


def soft_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-files line in /proc/PID/limits")


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(tmp_path):
    app = start_appliance(tmp_path, open_files=(SOFT, HARD))
    try:
        assert soft_limit(app.proc.pid) == HARD
        assert f"open-files limit raised from {SOFT} to {HARD}" in app.log()
    finally:
        assert stop_appliance(app) == 0
