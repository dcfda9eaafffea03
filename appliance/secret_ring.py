"""The TURN REST shared-secret ring, kept in one JSON file.

The current secret signs new credentials; retired secrets stay accepted for
a grace period so credentials already handed out keep working across a
rotation.  The file is written atomically (temp file, fsync, rename) with mode
0600, so a reader in any process sees either the old ring or the new one.

    {"version": 1, "secrets": [{"id": "k-1a2b3c4d", "value": "...",
                                "created": 1732480000, "retired": null}]}
"""

from __future__ import annotations

import json
import os
import secrets as _random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1


class SecretRingError(Exception):
    """The ring file is missing, unreadable or malformed (the message names it)."""


@dataclass(frozen=True)
class Secret:
    id: str
    value: str = field(repr=False)      # never in logs or reprs
    created: int
    retired: int | None = None


@dataclass(frozen=True)
class SecretRing:
    secrets: tuple[Secret, ...]

    def current(self) -> Secret:
        live = [s for s in self.secrets if s.retired is None]
        if not live:
            raise SecretRingError("the ring has no current secret")
        return max(live, key=lambda s: s.created)

    def accepted(self, now: float, grace_s: float) -> tuple[bytes, ...]:
        """Keys to verify with: the current secret first, then retired ones in grace, newest first."""
        current = self.current()
        retired = sorted((s for s in self.secrets
                          if s is not current and (s.retired is None or s.retired + grace_s > now)),
                         key=lambda s: s.created, reverse=True)
        return tuple(s.value.encode() for s in (current, *retired))


def new_secret(now: float) -> Secret:
    return Secret(id=f"k-{_random.token_hex(4)}", value=_random.token_urlsafe(32), created=int(now))


def _parse(path: Path, text: str) -> SecretRing:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SecretRingError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise SecretRingError(f"{path}: expected {{\"version\": {FORMAT_VERSION}, \"secrets\": [...]}}")
    items = doc.get("secrets")
    if not isinstance(items, list) or not items:
        raise SecretRingError(f"{path}: \"secrets\" must be a non-empty list")
    ring = []
    for i, item in enumerate(items):
        try:
            sid, value, created, retired = item["id"], item["value"], item["created"], item.get("retired")
        except (KeyError, TypeError):
            raise SecretRingError(f"{path}: secrets[{i}] needs id, value and created") from None
        if not (isinstance(sid, str) and isinstance(value, str) and len(value) >= 16
                and isinstance(created, int) and (retired is None or isinstance(retired, int))):
            raise SecretRingError(f"{path}: secrets[{i}] is malformed (value must be at least 16 characters)")
        ring.append(Secret(sid, value, created, retired))
    if all(s.retired is not None for s in ring):
        raise SecretRingError(f"{path}: every secret is retired; the ring has no current secret")
    return SecretRing(tuple(ring))


def load_ring(path: str | os.PathLike) -> SecretRing:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SecretRingError(f"{path}: cannot read ({exc.strerror})") from None
    return _parse(path, text)


def save_ring(path: str | os.PathLike, ring: SecretRing) -> None:
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {"version": FORMAT_VERSION,
           "secrets": [{"id": s.id, "value": s.value, "created": s.created, "retired": s.retired}
                       for s in ring.secrets]}
    fd, tmp = tempfile.mkstemp(prefix=".secrets-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def ensure_ring(path: str | os.PathLike, now: float) -> tuple[SecretRing, bool]:
    """Load the ring, or create a one-secret ring if the file does not exist."""
    path = Path(path)
    if path.exists():
        return load_ring(path), False
    ring = SecretRing((new_secret(now),))
    save_ring(path, ring)
    return ring, True
