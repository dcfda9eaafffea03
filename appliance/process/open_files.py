"""The open-files limit: raised to what the system allows before anything is bound.

Every relay allocation, TCP/TLS client and signaling connection holds a descriptor, and
the usual soft limit (1,024) would cap a busy appliance far below what the machine can
do; the signaling's automatic connection cap (signaling/connections.py) is half of it.
Servers raise the soft limit to the hard one at start (coturn, nginx's
worker_rlimit_nofile); so do we, once, in the main process, and the relay workers
inherit it.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("appliance")

# With no hard limit, this many is plenty and keeps the kernel's per-process tables sane.
UNLIMITED_TARGET = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-files limit stays at %d (could not raise it to %d: %s)", soft, target, exc)
            return soft
        log.info("open-files limit raised from %d to %d", soft, target)
        return target
    return soft
