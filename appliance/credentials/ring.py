"""The TURN REST shared-secret ring, and the ring kept in one JSON file (store.py keeps the
same document in a Redis key for several nodes).

The current secret signs new credentials; retired secrets stay accepted for a
grace period so credentials already handed out keep working across a
rotation.  The file is written atomically (temp file in the same directory,
fsync, rename) with mode 0600, so a reader in any process sees either the
old ring or the new one, never half of one.

    {"version": 1, "secrets": [{"id": "k-1a2b3c4d", "value": "...",
                                "created": 1732480000, "retired": null}]}

Secret values never appear in reprs, errors or logs: only ids do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets as _random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
MIN_VALUE_CHARS = 16  # token_urlsafe(32) gives 43; anything this short was typed by hand


class SecretRingError(Exception):
    """The ring file is unreadable or malformed, or the ring has no current secret."""


@dataclass(frozen=True)
class Secret:
    """One shared secret.  The HMAC key is `value.encode()`; `value` is kept out of repr."""

    id: str
    value: str = field(repr=False)
    created: int
    retired: int | None = None


@dataclass(frozen=True)
class SecretRing:
    """Every secret the relay may verify with, in file order."""

    secrets: tuple[Secret, ...]

    def current(self) -> Secret:
        """The newest non-retired secret: the one new credentials are signed with."""
        live = [s for s in self.secrets if s.retired is None]
        if not live:
            raise SecretRingError("the ring has no current (non-retired) secret")
        return max(reversed(live), key=lambda s: s.created)  # a tie goes to the later entry

    def accepted(self, now: float, grace_s: float) -> tuple[bytes, ...]:
        """HMAC keys to verify with: the current secret first, then the others, newest first.

        A retired secret stays while `retired + grace_s > now` (grace is the
        credential lifetime, so nothing it signed is still valid after that).
        A non-retired secret older than the current one is not withdrawn yet and
        stays accepted.
        """
        current = self.current()
        others = sorted(
            (s for s in self.secrets if s is not current and self.still_accepted(s, now, grace_s)),
            key=lambda s: s.created,
            reverse=True,
        )
        return tuple(s.value.encode() for s in (current, *others))

    @staticmethod
    def still_accepted(s: Secret, now: float, grace_s: float) -> bool:
        return s.retired is None or s.retired + grace_s > now

    def signing(self, now: float, grace_s: float, activation_s: float) -> Secret:
        """The secret new credentials are signed with.

        The newest accepted secret that has been in the ring for activation_s;
        a younger one is accepted by the relays already but not yet used, so
        a credential is never handed out before every relay worker (and any
        external coturn) can verify it.  When none is that old (the very first
        start, or rotations in quick succession) the oldest accepted one signs:
        it has had the longest to spread.
        """
        # Newest first; of two created in the same second, the later in the file is newer.
        usable = [
            s
            for _, _, s in sorted(
                (
                    (s.created, i, s)
                    for i, s in enumerate(self.secrets)
                    if self.still_accepted(s, now, grace_s)
                ),
                key=lambda t: t[:2],
                reverse=True,
            )
        ]
        usable = usable or [self.current()]
        return next((s for s in usable if s.created + activation_s <= now), usable[-1])

    def rotated(self, new: Secret, now: float) -> SecretRing:
        """`new` becomes current; every secret that was live is retired at `now`."""
        kept = tuple(
            s if s.retired is not None else Secret(s.id, s.value, s.created, int(now)) for s in self.secrets
        )
        return SecretRing(kept + (new,))

    def pruned(self, now: float, grace_s: float) -> tuple[SecretRing, tuple[Secret, ...]]:
        """The ring without the secrets past their grace, and those secrets."""
        dropped = tuple(s for s in self.secrets if not self.still_accepted(s, now, grace_s))
        return SecretRing(tuple(s for s in self.secrets if s not in dropped)), dropped


def new_secret(now: float) -> Secret:
    """A fresh random secret created at `now`."""
    return Secret(id=f"k-{_random.token_hex(4)}", value=_random.token_urlsafe(32), created=int(now))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_secret(path: Path, i: int, item) -> Secret:
    where = f"{path}: secrets[{i}]"
    if not isinstance(item, dict) or not {"id", "value", "created"} <= item.keys():
        raise SecretRingError(f"{where} needs id, value and created")
    unknown = item.keys() - {"id", "value", "created", "retired"}
    if unknown:
        raise SecretRingError(f"{where} has unknown fields {sorted(unknown)}")
    sid, value, created, retired = item["id"], item["value"], item["created"], item.get("retired")
    if not isinstance(sid, str) or not sid:
        raise SecretRingError(f"{where}: id must be non-empty text")
    if not isinstance(value, str) or len(value) < MIN_VALUE_CHARS:
        raise SecretRingError(
            f"{where} ({sid}): value is malformed (text of at least {MIN_VALUE_CHARS} characters)"
        )
    if not _is_int(created) or not (retired is None or _is_int(retired)):
        raise SecretRingError(
            f"{where} ({sid}): created and retired are malformed (unix seconds; retired may be null)"
        )
    return Secret(sid, value, created, retired)


def parse_ring(path, raw: bytes | str) -> SecretRing:
    """Validate a ring document; `path` names where it came from in errors (a file, a Redis key).
    A str only as the Redis client's stubs allow: the client returns bytes."""
    try:
        doc = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError:
        raise SecretRingError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise SecretRingError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        found = doc.get("version") if isinstance(doc, dict) else type(doc).__name__
        raise SecretRingError(
            f'{path}: expected {{"version": {FORMAT_VERSION}, "secrets": [...]}}, found version {found!r}'
        )
    items = doc.get("secrets")
    if not isinstance(items, list) or not items:
        raise SecretRingError(f'{path}: "secrets" must be a non-empty list')
    ring = tuple(_parse_secret(path, i, item) for i, item in enumerate(items))
    ids = [s.id for s in ring]
    duplicate = next((sid for sid in ids if ids.count(sid) > 1), None)
    if duplicate:
        raise SecretRingError(f"{path}: secret id {duplicate!r} appears twice")
    if all(s.retired is not None for s in ring):
        raise SecretRingError(f"{path}: every secret is retired; the ring has no current secret")
    return SecretRing(ring)


def load_ring(path: str | os.PathLike) -> SecretRing:
    """Read and validate the ring; SecretRingError names the file and the reason."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SecretRingError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_ring(path, raw)


def _write_private(path: Path, ring: SecretRing, replace: bool) -> bool:
    """Write `ring` to `path` atomically with mode 0600.

    replace=False creates the file only if it does not exist yet (os.link
    fails rather than overwrite), so two processes starting together agree on
    one ring.  Returns False when the file already existed.
    """
    text = ring_document(ring)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".secrets-", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            written = True
        else:
            written = _link_if_absent(tmp, path)
    finally:
        try:
            os.unlink(tmp)  # still there after os.link or a failure, gone after os.replace
        except FileNotFoundError:
            pass
    if written:
        _fsync_directory(path.parent)
    return written


def ring_document(ring: SecretRing) -> str:
    """The ring as its JSON document; refuses a ring that parse_ring would refuse."""
    ring.current()
    doc = {
        "version": FORMAT_VERSION,
        "secrets": [
            {"id": s.id, "value": s.value, "created": s.created, "retired": s.retired} for s in ring.secrets
        ],
    }
    return json.dumps(doc, indent=2) + "\n"


def _link_if_absent(tmp: str, path: Path) -> bool:
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # No hard links on this filesystem (some network mounts): check, then rename.
        if path.exists():
            return False
        os.replace(tmp, path)
        return True


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(dfd)


def save_ring(path: str | os.PathLike, ring: SecretRing) -> None:
    """Replace the ring file atomically (0600; parent directory created 0700)."""
    _write_private(Path(path), ring, replace=True)


def ensure_ring(path: str | os.PathLike, now: float) -> tuple[SecretRing, bool]:
    """Load the ring, or create a fresh one-secret ring if the file does not exist.

    Returns (ring, created).  A file that exists but is broken is an error,
    never silently replaced: that would lock out every credential handed out.
    """
    path = Path(path)
    if not path.exists():
        ring = SecretRing((new_secret(now),))
        if _write_private(path, ring, replace=False):
            return ring, True
    return load_ring(path), False


@contextlib.contextmanager
def _ring_lock(path: Path):
    """An exclusive lock beside the ring, so two rotations (CLI and admin API) never
    read the same ring and both write it: the second would drop the first's secret."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_ring(path: str | os.PathLike, change) -> SecretRing:
    """Apply `change(ring) -> ring` to the ring file under the lock; returns the new ring
    (unchanged rings are not rewritten)."""
    path = Path(path)
    with _ring_lock(path):
        ring = load_ring(path)
        new = change(ring)
        if new != ring:
            save_ring(path, new)
    return new


def rotate(update, now: float) -> tuple[SecretRing, Secret]:
    """Through `update(change)` (a store's atomic read-change-write): a new current secret,
    the live ones retired.  Returns the new ring and the new secret."""
    secret = new_secret(now)
    return update(lambda ring: ring.rotated(secret, now)), secret


def prune(update, now: float, grace_s: float) -> tuple[Secret, ...]:
    """Through `update(change)`: drop the secrets past their grace; returns them."""
    dropped: list[Secret] = []

    def change(ring: SecretRing) -> SecretRing:
        kept, gone = ring.pruned(now, grace_s)
        dropped[:] = gone
        return kept

    update(change)
    return tuple(dropped)


def rotate_ring(path: str | os.PathLike, now: float) -> tuple[SecretRing, Secret]:
    """Add a new current secret to the ring file, retiring the live ones; returns both."""
    return rotate(lambda change: update_ring(path, change), now)


def prune_ring(path: str | os.PathLike, now: float, grace_s: float) -> tuple[Secret, ...]:
    """Drop the secrets past their grace from the ring file; returns what was dropped."""
    return prune(lambda change: update_ring(path, change), now, grace_s)
