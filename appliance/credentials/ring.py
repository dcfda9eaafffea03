"""The TURN REST shared-secret ring, and the ring kept in one JSON file (store.py keeps the
same document in a Redis key for several nodes).

The current secret signs new credentials; retired secrets stay accepted for a
grace period so credentials already handed out keep working across a
rotation.  The file is written atomically (temp file in the same directory,
fsync, rename) with mode 0600, so a reader in any process sees either the
old ring or the new one, never half of one.

    {"version": 1, "secrets": [{"id": "k-1a2b3c4d", "value": "...",
                                "created": 1732480000, "retired": null}],
     "revocations": [{"user": "alice", "issued_at": 1732481000.25, "until": 1732484600}]}

Revocations (`appliance revoke`, the admin API) travel with the ring, so every relay
process that follows the ring learns them: a user's allocations made before
`issued_at` end, and its credentials are refused while `until` is ahead.  The list
is bounded (MAX_REVOCATIONS), user ids are length-bounded text, and a record is
pruned once it no longer matters (see Revocation.kept).

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

from turn.auth import Revocation

FORMAT_VERSION = 1
MIN_VALUE_CHARS = 16  # token_urlsafe(32) gives 43; anything this short was typed by hand
MAX_REVOCATIONS = 1000  # the ring is read by every relay process at every change
MAX_USER_CHARS = 256  # a TURN username is at most 513 bytes, with the expiry in front
# A record that ends live allocations only (until == issued_at) stays this long, so that
# every process polling the store (RING_POLL_S) has seen it before it is pruned.
REVOCATION_SPREAD_S = 60.0


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
    revocations: tuple[Revocation, ...] = ()

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
        return SecretRing(kept + (new,), self.revocations)

    def pruned(self, now: float, grace_s: float) -> tuple[SecretRing, tuple[Secret, ...]]:
        """The ring without the secrets past their grace, and those secrets."""
        dropped = tuple(s for s in self.secrets if not self.still_accepted(s, now, grace_s))
        return SecretRing(tuple(s for s in self.secrets if s not in dropped), self.revocations), dropped

    def in_force(self, now: float) -> tuple[Revocation, ...]:
        """The revocations still kept at `now` (the relay ends and refuses by these)."""
        return tuple(r for r in self.revocations if revocation_kept(r, now))

    def revoked(self, revocation: Revocation, now: float) -> SecretRing:
        """The ring with `revocation` in place of any earlier one for the same user, and
        without the records past their time.  SecretRingError if the list is full."""
        check_user(revocation.user)
        kept = tuple(r for r in self.in_force(now) if r.user != revocation.user)
        if len(kept) >= MAX_REVOCATIONS:
            raise SecretRingError(
                f"{MAX_REVOCATIONS} revocations are in force already; rotate the secret instead"
            )
        return SecretRing(self.secrets, kept + (revocation,))


def revocation_kept(r: Revocation, now: float) -> bool:
    """A record stays while it refuses (until ahead), and at least REVOCATION_SPREAD_S after
    it was issued, so every relay process sees it and ends what it names."""
    return now < max(r.until, r.issued_at + REVOCATION_SPREAD_S)


def check_user(user) -> str:
    """`user` if it is a user id a revocation may name, else SecretRingError (which quotes it
    with repr, bounded: the id may come from a hostile client)."""
    if not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS or not user.isprintable():
        shown = repr(user)[:80] if isinstance(user, str) else type(user).__name__
        raise SecretRingError(
            f"a revoked user id is printable text of 1 to {MAX_USER_CHARS} characters, not {shown}"
        )
    return user


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


def _is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 2**40


def _parse_revocations(path, items) -> tuple[Revocation, ...]:
    if items is None:
        return ()
    if not isinstance(items, list) or len(items) > MAX_REVOCATIONS:
        raise SecretRingError(f'{path}: "revocations" must be a list of at most {MAX_REVOCATIONS}')
    parsed = []
    for i, item in enumerate(items):
        where = f"{path}: revocations[{i}]"
        if not isinstance(item, dict) or item.keys() != {"user", "issued_at", "until"}:
            raise SecretRingError(f"{where} needs user, issued_at and until (and nothing else)")
        try:
            user = check_user(item["user"])
        except SecretRingError as exc:
            raise SecretRingError(f"{where}: {exc}") from None
        issued_at, until = item["issued_at"], item["until"]
        if not _is_time(issued_at) or not _is_time(until) or until < issued_at:
            raise SecretRingError(
                f"{where}: issued_at and until are unix seconds, until not before issued_at"
            )
        parsed.append(Revocation(user, float(issued_at), float(until)))
    return tuple(parsed)


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
    return SecretRing(ring, _parse_revocations(path, doc.get("revocations")))


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
    if ring.revocations:  # absent otherwise: the document stays what older versions wrote
        doc["revocations"] = [
            {"user": r.user, "issued_at": r.issued_at, "until": r.until} for r in ring.revocations
        ]
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


def revoke(update, user: str, now: float, until: float | None) -> Revocation:
    """Through `update(change)`: end `user`'s allocations made before `now` on every relay
    process, and refuse its credentials until `until`.  With `until` None (end what is
    live only) a refusal already in force for the user is kept, not lifted.  Returns the
    record written."""
    check_user(user)
    written: list[Revocation] = []

    def change(ring: SecretRing) -> SecretRing:
        refuse_until = now if until is None else max(now, until)
        if until is None:
            earlier = [r.until for r in ring.in_force(now) if r.user == user]
            refuse_until = max([refuse_until, *earlier])
        record = Revocation(user, round(now, 3), round(refuse_until, 3))
        written[:] = [record]
        return ring.revoked(record, now)

    update(change)
    return written[0]


def rotate_ring(path: str | os.PathLike, now: float) -> tuple[SecretRing, Secret]:
    """Add a new current secret to the ring file, retiring the live ones; returns both."""
    return rotate(lambda change: update_ring(path, change), now)


def prune_ring(path: str | os.PathLike, now: float, grace_s: float) -> tuple[Secret, ...]:
    """Drop the secrets past their grace from the ring file; returns what was dropped."""
    return prune(lambda change: update_ring(path, change), now, grace_s)
