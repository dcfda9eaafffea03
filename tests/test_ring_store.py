"""The secret ring in Redis (credentials.store: redis) against a real Redis: create once,
atomic rotations from many clients at once (WATCH/MULTI), a corrupt value refused with
the key named, an unreachable Redis refused without hanging, and the watcher keeping its
last good ring through an outage."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.credentials.ring import SecretRingError, prune, rotate
from appliance.credentials.store import RedisRingStore, safe_url
from appliance.credentials.watcher import RingWatcher

NOW = 1_900_000_000.0


def test_ensure_creates_once(store):
    assert not store.exists()
    ring, created = store.ensure(NOW)
    again, created_again = store.ensure(NOW + 1)
    assert created and not created_again and again == ring == store.load()


def test_concurrent_rotations_on_one_store_keep_every_secret(store):
    store.ensure(NOW)
    threads = [threading.Thread(target=rotate, args=(store.update, NOW + i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ring = store.load()
    assert len(ring.secrets) == 9 and sum(s.retired is None for s in ring.secrets) == 1


def test_prune_through_the_store(store):
    first, _ = store.ensure(NOW - 1000)
    rotate(store.update, NOW - 500)
    assert [s.id for s in prune(store.update, NOW, grace_s=100)] == [first.current().id]
    assert len(store.load().secrets) == 1


def test_a_corrupt_redis_value_is_refused_with_the_key(redis_url, redis_prefix):
    import redis

    store = RedisRingStore(redis_url, f"{redis_prefix}secrets")
    redis.Redis.from_url(redis_url).set(f"{redis_prefix}secrets", b"{nope")
    with pytest.raises(SecretRingError, match=f"key {redis_prefix}secrets: not valid JSON"):
        store.load()
    with pytest.raises(SecretRingError):
        rotate(store.update, NOW)


def test_an_unreachable_redis_is_an_error_not_a_hang():
    from tests.netports import free_port_pair

    store = RedisRingStore(f"redis://:hunter2@127.0.0.1:{free_port_pair()}/0", "k")
    started = time.monotonic()
    with pytest.raises(SecretRingError, match="Redis unavailable") as info:
        store.load()
    assert time.monotonic() - started < 5
    assert "hunter2" not in str(info.value)
    watcher = RingWatcher(store, grace_s=10)
    assert not watcher.load(force=True) and watcher.failures == 1


def test_passwords_never_reach_messages():
    assert safe_url("redis://:s3cret@host:6379/0") == "redis://***@host:6379/0"
    assert safe_url("redis://host:6379") == "redis://host:6379"


async def test_watcher_follows_a_rotation_made_elsewhere_and_survives_an_outage(redis_url, redis_prefix):
    key = f"{redis_prefix}secrets"
    node_a = RedisRingStore(redis_url, key)
    node_a.ensure(NOW)
    applied = []
    watcher = RingWatcher(RedisRingStore(redis_url, key), grace_s=10**9, apply=applied.append)
    assert await watcher.poll(force=True)
    _, secret = rotate(node_a.update, time.time())
    assert await watcher.poll()
    assert watcher.ring.current().id == secret.id and len(applied[-1]) == 2
    watcher.store.client.connection_pool.disconnect()
    watcher.store.client = type(watcher.store.client).from_url(
        "redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )  # an outage
    assert not await watcher.poll()
    assert watcher.ring.current().id == secret.id and watcher.failures == 1
