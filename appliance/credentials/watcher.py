"""Keeps a process's view of the secret ring in step with its store (file or Redis).

Every relay process and the signaling each run one.  The ring is re-read when
it changes (polled) and on SIGHUP; the accepted set is also re-evaluated on
every poll, because a retired secret's grace ends without the ring changing; so are the
revocations in force, handed to the relay when that set changes.
A corrupt or unreadable ring (or an unreachable Redis) is refused and logged,
and the last good ring stays in force, so a botched edit never locks every
client out.  Polls read the store in a thread: a slow Redis never stalls the
relay's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from turn.auth import Revocation

from .ring import SecretRing, SecretRingError

log = logging.getLogger("appliance")

# A poll is a stat() of the file or one small Redis GET; twice a second, a revocation
# ends a user's allocations on every relay process within a second.
RING_POLL_S = 0.5

Apply = Callable[[tuple[bytes, ...]], None]
ApplyRevocations = Callable[[tuple[Revocation, ...]], None]


class RingWatcher:
    def __init__(
        self, store, grace_s: float, apply: Apply | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.grace_s = grace_s
        self.apply = apply
        self.clock = clock
        self.ring: SecretRing | None = None
        self.failures = 0
        self._stamp = None
        self._accepted: tuple[bytes, ...] | None = None
        self.apply_revocations: ApplyRevocations | None = None
        self._revocations: tuple[Revocation, ...] | None = None
        self._last_error: str | None = None

    def current_ring(self) -> SecretRing:
        if self.ring is None:
            raise SecretRingError(f"{self.store.where}: no ring loaded yet")
        return self.ring

    def _fetch(self, force: bool) -> SecretRing | SecretRingError | None:
        """The store's ring if it changed (or `force`); the error if it cannot be read.
        Touches no shared state but the stamp, so it may run in a thread."""
        try:
            stamp = self.store.stamp()
        except SecretRingError as exc:
            return exc  # not stamped: asked again at the next poll
        if not force and stamp == self._stamp:
            return None
        self._stamp = stamp  # a broken ring is not re-read until it changes
        try:
            return self.store.load()
        except SecretRingError as exc:
            return exc

    def _install(self, fetched: SecretRing | SecretRingError | None) -> bool:
        if fetched is None:
            self.refresh()
            return False
        if isinstance(fetched, SecretRingError):
            self.failures += 1
            if str(fetched) != self._last_error:  # one line per distinct problem
                log.error("secret ring not reloaded, keeping the last good one: %s", fetched)
            self._last_error = str(fetched)
            return False
        self._last_error = None
        changed = fetched != self.ring
        self.ring = fetched
        self.refresh()
        if changed:
            log.info(
                "secret ring loaded: %d secret(s), %d accepted, current %s",
                len(fetched.secrets),
                len(self._accepted or ()),
                fetched.current().id,
            )
        return changed

    def load(self, force: bool = False) -> bool:
        """Re-read the store now, on this thread; True if a new ring is in force."""
        return self._install(self._fetch(force))

    async def poll(self, force: bool = False) -> bool:
        """Re-read the store in a thread, then install the result on the loop."""
        return self._install(await asyncio.to_thread(self._fetch, force))

    def deliver_to(self, apply: Apply) -> None:
        """From now on hand `apply` (the relay node's set_secrets) the accepted secrets
        whenever that set changes; the node was built with the set in force now."""
        self.apply = apply
        self.refresh()

    def deliver_revocations_to(self, apply: ApplyRevocations) -> None:
        """From now on hand `apply` (the relay node's set_revocations) the revocations in
        force whenever that set changes, starting with the set in force now."""
        self.apply_revocations = apply
        self._revocations = None
        self.refresh()

    def refresh(self) -> None:
        """Hand the relay the secrets accepted now and the revocations in force, when
        either set changed."""
        if self.ring is None:
            return
        now = self.clock()
        accepted = self.ring.accepted(now, self.grace_s)
        if accepted != self._accepted:
            self._accepted = accepted
            if self.apply is not None:
                self.apply(accepted)
        revocations = self.ring.in_force(now)
        if revocations != self._revocations:
            self._revocations = revocations
            if self.apply_revocations is not None:
                self.apply_revocations(revocations)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RING_POLL_S)
            await self.poll()
