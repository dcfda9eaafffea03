"""Where the secret ring lives: a file (one machine) or a Redis key (several nodes).

Both stores hold the same JSON document (ring.ring_document) and offer
the same four operations: a cheap `stamp` that changes whenever the ring does
(the watchers poll it), `load`, `ensure` (create a one-secret ring if there is
none, never replacing a broken one) and `update(change)`, an atomic
read-change-write: the file under an flock, Redis under WATCH/MULTI, so two
rotations on two nodes never lose each other's secret.

With `credentials.store: redis`, `appliance secret rotate` on any node reaches
every node and relay worker at their next poll (watcher.RING_POLL_S); so does
`appliance revoke`, whose records the ring document carries.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from ..config.schema import AppConfig
from .ring import (
    SecretRing,
    SecretRingError,
    ensure_ring,
    load_ring,
    new_secret,
    parse_ring,
    ring_document,
    update_ring,
)

Change = Callable[[SecretRing], SecretRing]

REDIS_TIMEOUT_S = 2.0
UPDATE_RETRIES = 20


class FileRingStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)

    def stamp(self):
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> SecretRing:
        return load_ring(self.path)

    def ensure(self, now: float) -> tuple[SecretRing, bool]:
        return ensure_ring(self.path, now)

    def update(self, change: Change) -> SecretRing:
        return update_ring(self.path, change)


class RedisRingStore:
    """The ring as one Redis string key.  Redis keeps it in memory: give the Redis
    persistence (AOF or RDB), or a restart of Redis loses every credential's secret."""

    def __init__(self, url: str, key: str) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        self._watch_error = redis.WatchError
        self.client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self.key = key
        self.where = f"{safe_url(url)} key {key}"

    def _get(self) -> bytes | str | None:  # bytes: the client does not decode
        try:
            return self.client.get(self.key)
        except self._redis_errors as exc:
            raise SecretRingError(f"{self.where}: Redis unavailable ({exc})") from None

    def stamp(self):
        raw = self._get()
        return None if raw is None else hashlib.sha256(raw).digest()

    def exists(self) -> bool:
        return self._get() is not None

    def load(self) -> SecretRing:
        raw = self._get()
        if raw is None:
            raise SecretRingError(f"{self.where}: no secret ring yet; `appliance serve` creates it")
        return parse_ring(self.where, raw)

    def ensure(self, now: float) -> tuple[SecretRing, bool]:
        ring = SecretRing((new_secret(now),))
        try:
            created = self.client.set(self.key, ring_document(ring), nx=True)
        except self._redis_errors as exc:
            raise SecretRingError(f"{self.where}: Redis unavailable ({exc})") from None
        return (ring, True) if created else (self.load(), False)

    def update(self, change: Change) -> SecretRing:
        for _ in range(UPDATE_RETRIES):
            try:
                with self.client.pipeline() as pipe:
                    pipe.watch(self.key)
                    raw = pipe.get(self.key)
                    if raw is None:
                        raise SecretRingError(f"{self.where}: no secret ring to change")
                    ring = parse_ring(self.where, raw)
                    new = change(ring)
                    if new == ring:
                        return ring
                    pipe.multi()
                    pipe.set(self.key, ring_document(new))
                    pipe.execute()
                    return new
            except self._watch_error:
                time.sleep(0.01)  # another node changed it between WATCH and EXEC: again
            except self._redis_errors as exc:
                raise SecretRingError(f"{self.where}: Redis unavailable ({exc})") from None
        raise SecretRingError(f"{self.where}: the ring kept changing under us; try again")


def safe_url(url: str) -> str:
    """The URL without a password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def ring_store(config: AppConfig):
    c = config.credentials
    if c.store == "redis":
        return RedisRingStore(config.ring_redis_url(), c.redis_key)
    return FileRingStore(config.secrets_path())
