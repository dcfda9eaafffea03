"""What the relay processes of one node share: allocation counts and the relay ports in use.

`turn.user_quota` and `turn.total_quota` are limits for the node, not for
one process: with `workers: N`, the kernel spreads one user's clients over
N processes, and each process counting on its own would let the user hold N
times the quota.  Equally, the peer policy lets one allocation reach another
on the relay's own address only on a port a live allocation holds (so a plain
local socket whose port happens to lie in the relay range is not a target),
and any process may hold that port.

`LocalLedger` serves a node with one relay process.  `SharedLedger` is one
small file mapped into every process of the node (in /dev/shm when it
exists): counts kept per process, so the main process can forget a worker
that died without knowing what it held, and changed under `flock`, which the
kernel releases if a holder dies mid-update (a process-shared semaphore
would stay taken).  An Allocate costs two `flock` calls and a few slot reads:
microseconds, against the ~500 us an Allocate costs anyway.

Port marks are single bytes, written without the lock by the one process
that holds the port and read by any; a reader racing a writer sees the port
either held or not, both of which were true an instant apart.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Protocol

from .stun import FAMILY_IPV4

USER_QUOTA_EXCEEDED = 486
NODE_QUOTA_EXCEEDED = 508
PORTS = 65536


class Ledger(Protocol):
    def admit(self, user_id: str, count: int, user_quota: int, total_quota: int) -> int:
        """Count `count` more allocations (or reservations) for `user_id` if the quotas
        (0 = none) allow: 0 if so, else the STUN error code to answer (486 or 508)."""

    def release(self, user_id: str, count: int = 1) -> None:
        """Forget `count` of `user_id`'s allocations."""

    def mark_port(self, family: int, port: int, held: bool) -> None:
        """A live allocation of this process now holds (or no longer holds) `port`."""

    def holds_port(self, family: int, port: int) -> bool:
        """Does a live allocation of any process of the node hold `port`?"""


class LocalLedger:
    """The ledger of a node with one relay process: plain counters."""

    def __init__(self) -> None:
        self.per_user: Counter[str] = Counter()
        self.total = 0
        self._ports: set[tuple[int, int]] = set()

    def admit(self, user_id: str, count: int, user_quota: int, total_quota: int) -> int:
        if user_quota and self.per_user[user_id] + count > user_quota:
            return USER_QUOTA_EXCEEDED
        if total_quota and self.total + count > total_quota:
            return NODE_QUOTA_EXCEEDED
        self.per_user[user_id] += count
        self.total += count
        return 0

    def release(self, user_id: str, count: int = 1) -> None:
        left = self.per_user[user_id] - count
        if left > 0:
            self.per_user[user_id] = left
        else:
            del self.per_user[user_id]
        self.total = max(0, self.total - count)

    def mark_port(self, family: int, port: int, held: bool) -> None:
        if held:
            self._ports.add((family, port))
        else:
            self._ports.discard((family, port))

    def holds_port(self, family: int, port: int) -> bool:
        return (family, port) in self._ports


# File layout: header, then per-process totals (int32 x processes), then the port
# owners (one byte per port and family: 0 = free, else the owner's index + 1), then
# the user table: `slots` entries of (u64 key, int32 count x processes).
_HEADER = struct.Struct("<4sII")
_MAGIC = b"TLG1"
# A lookup gives up after this many slots: a full neighbourhood means the table is
# full, and the Allocate is refused (508) rather than searched for at length.
MAX_PROBES = 64


class SharedLedger:
    """The node's ledger in a file every relay process maps (see the module docstring).

    The main process `create`s it before starting workers and `forget_process`es
    a worker that died before starting its replacement; each worker `attach`es to
    the path with its own index (0 is the main process).
    """

    def __init__(self, path: Path, index: int, *, key: bytes) -> None:
        self.path = path
        self.index = index
        self._key = key
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(self._fd, 0)
        except BaseException:
            os.close(self._fd)
            raise
        self.processes: int
        self.slots: int
        magic, self.processes, self.slots = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or not 0 <= index < self.processes:
            self._map.close()
            os.close(self._fd)
            raise ValueError(f"{path} is not a relay ledger for process {index}")
        self._totals = _HEADER.size
        self._ports = self._totals + 4 * self.processes
        self._users = self._ports + 2 * PORTS
        self._stride = 8 + 4 * self.processes
        self._counts = struct.Struct(f"<{self.processes}i")
        self._view = memoryview(self._map)
        self._totals_view = self._view[self._totals : self._ports].cast("i")
        self._ports_view = self._view[self._ports : self._users]

    @classmethod
    def create(cls, processes: int, slots: int, key: bytes, directory: Path | None = None) -> SharedLedger:
        """A new, empty ledger file for `processes` processes, attached as process 0."""
        if directory is None:
            shm = Path("/dev/shm")
            directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
        fd, name = tempfile.mkstemp(prefix="appliance-ledger-", dir=directory)
        try:
            size = _HEADER.size + 4 * processes + 2 * PORTS + slots * (8 + 4 * processes)
            os.ftruncate(fd, size)  # zero-filled: every count 0, every slot empty
            os.pwrite(fd, _HEADER.pack(_MAGIC, processes, slots), 0)
        finally:
            os.close(fd)
        return cls(Path(name), 0, key=key)

    def close(self) -> None:
        for view in (self._totals_view, self._ports_view, self._view):
            view.release()  # the map cannot close while views of it exist
        self._map.close()
        os.close(self._fd)

    def remove(self) -> None:
        """Close and delete the file (the main process, at the end)."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ quotas

    def admit(self, user_id: str, count: int, user_quota: int, total_quota: int) -> int:
        key = self._user_key(user_id)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if total_quota and sum(self._totals_view) + count > total_quota:
                return NODE_QUOTA_EXCEEDED
            slot = self._find(key, insert=True)
            if slot < 0:
                return NODE_QUOTA_EXCEEDED  # the table is full: as good as no room
            counts = self._counts.unpack_from(self._map, slot + 8)
            if user_quota and sum(counts) + count > user_quota:
                return USER_QUOTA_EXCEEDED
            self._map[slot : slot + 8] = key.to_bytes(8, "little")
            self._add(slot, count)
            return 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self, user_id: str, count: int = 1) -> None:
        key = self._user_key(user_id)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            slot = self._find(key, insert=False)
            if slot >= 0:
                self._add(slot, -count)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _add(self, slot: int, count: int) -> None:
        offset = slot + 8 + 4 * self.index
        mine = int.from_bytes(self._map[offset : offset + 4], "little", signed=True)
        change = max(count, -mine)  # never below zero, whatever the caller says
        self._map[offset : offset + 4] = (mine + change).to_bytes(4, "little", signed=True)
        self._totals_view[self.index] = max(0, self._totals_view[self.index] + change)

    def _user_key(self, user_id: str) -> int:
        # Keyed, so user ids (which the REST secret's holder chooses) cannot be picked
        # to collide; 0 marks an empty slot.
        digest = hashlib.blake2b(
            user_id.encode("utf-8", "surrogateescape"), digest_size=8, key=self._key
        ).digest()
        return int.from_bytes(digest, "little") or 1

    def _find(self, key: int, insert: bool) -> int:
        """The byte offset of `key`'s slot; with `insert`, else of a slot it may take
        (empty, or one whose user holds nothing any more); -1 if neither is near."""
        mask = self.slots - 1
        start = key & mask
        reusable = -1
        for probe in range(min(MAX_PROBES, self.slots)):
            slot = self._users + ((start + probe) & mask) * self._stride
            held = int.from_bytes(self._map[slot : slot + 8], "little")
            if held == key:
                return slot
            if held == 0:
                return slot if insert and reusable < 0 else reusable if insert else -1
            if insert and reusable < 0 and not any(self._counts.unpack_from(self._map, slot + 8)):
                # A user with no allocations is the same as no entry: the slot can be
                # reused, and lookups that pass it keep probing as before.
                reusable = slot
        return reusable if insert else -1

    def forget_process(self, index: int) -> None:
        """A process died: drop everything it held (called before its replacement starts)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._totals_view[index] = 0
            zero = (0).to_bytes(4, "little")
            for n in range(self.slots):
                offset = self._users + n * self._stride + 8 + 4 * index
                self._map[offset : offset + 4] = zero
            owner = index + 1
            ports = self._ports_view
            for i in range(len(ports)):
                if ports[i] == owner:
                    ports[i] = 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------ relay ports

    def mark_port(self, family: int, port: int, held: bool) -> None:
        self._ports_view[(0 if family == FAMILY_IPV4 else PORTS) + port] = self.index + 1 if held else 0

    def holds_port(self, family: int, port: int) -> bool:
        return self._ports_view[(0 if family == FAMILY_IPV4 else PORTS) + port] != 0


def user_slots(total_quota: int) -> int:
    """Table size for a node: a power of two, at least twice the users that can hold an
    allocation at once (one per allocation at most), between 1,024 and 131,072."""
    users = total_quota or 65536
    size = 1024
    while size < 2 * users and size < 131072:
        size *= 2
    return size
