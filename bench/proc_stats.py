"""What a server under test costs, read from /proc: its process tree, and the RSS, CPU
seconds and open descriptors summed over a list of pids.

The sums skip a pid that is gone or unreadable (a worker that exited between listing and
reading counts as nothing, not as an error), so a caller lists the tree once and reads
what it needs from that list.
"""

from __future__ import annotations

import contextlib
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses):
    field 0 is the state, 1 the parent, 11 and 12 user and system time in ticks."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from every process's parent in /proc/*/stat (not every
    kernel has /proc/PID/task/*/children, and worker processes would go uncounted)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children.get(p, ()))
    return pids


def _summed(pids: list[int], read_one) -> int | float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += read_one(pid)
    return total


def _rss_kib_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def _cpu_seconds_of(pid: int) -> float:
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    """Resident set size (VmRSS) in KiB, summed."""
    return int(_summed(pids, _rss_kib_of))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds, summed."""
    return _summed(pids, _cpu_seconds_of)


def fd_count(pids: list[int]) -> int:
    """Open file descriptors, summed."""
    return int(_summed(pids, lambda pid: len(os.listdir(f"/proc/{pid}/fd"))))
