"""Keeps a process's view of the secret ring in step with the secrets file.

Every relay process and the signaling each run one.  The file is re-read when
it changes (polled) and on SIGHUP; the accepted set is also re-evaluated on
every poll, because a retired secret's grace ends without the file changing.
A corrupt or unreadable file is refused and logged, and the last good ring
stays in force, so a botched edit never locks every client out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

from .secret_ring import SecretRing, SecretRingError, load_ring

log = logging.getLogger("appliance")

RING_POLL_S = 2.0

Apply = Callable[[tuple[bytes, ...]], None]


class RingWatcher:
    def __init__(self, path: Path, grace_s: float, apply: Apply | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.grace_s = grace_s
        self.apply = apply
        self.clock = clock
        self.ring: SecretRing | None = None
        self.failures = 0
        self._stamp: tuple | None = None
        self._accepted: tuple[bytes, ...] | None = None

    def current_ring(self) -> SecretRing:
        if self.ring is None:
            raise SecretRingError(f"{self.path}: no ring loaded yet")
        return self.ring

    def _file_stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or `force`); True if a new ring is in force."""
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            ring = load_ring(self.path)
        except SecretRingError as exc:
            self.failures += 1
            log.error("secret ring not reloaded, keeping the last good one: %s", exc)
            return False
        changed = ring != self.ring
        self.ring = ring
        self.refresh()
        if changed:
            log.info("secret ring loaded: %d secret(s), %d accepted, current %s",
                     len(ring.secrets), len(self._accepted or ()), ring.current().id)
        return changed

    def refresh(self) -> None:
        """Hand the relay the secrets accepted now, when that set changed."""
        if self.ring is None:
            return
        accepted = self.ring.accepted(self.clock(), self.grace_s)
        if accepted != self._accepted:
            self._accepted = accepted
            if self.apply is not None:
                self.apply(accepted)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RING_POLL_S)
            if not self.load():
                self.refresh()
