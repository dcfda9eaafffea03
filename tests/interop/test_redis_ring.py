"""Two appliance nodes sharing one secret ring in Redis (credentials.store: redis): the
credentials either node hands out allocate on the other's relay, and `appliance secret
rotate` run against one node reaches both within seconds -- new credentials from both
are signed with the new secret, and the old ones keep working in grace."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from appliance.credentials.store import RedisRingStore
from turn.auth import rest_password

from .conftest import start_appliance, stop_appliance
from .test_credentials_admin import allocation_works, http_credentials, turn_entry


@pytest.fixture
def two_nodes(tmp_path, redis_url, redis_prefix):
    shared = {"store": "redis", "redis_url": redis_url, "redis_key": f"{redis_prefix}ring", "activation_s": 1}
    nodes = [start_appliance(tmp_path / f"node{i}", credentials=shared) for i in (1, 2)]
    yield nodes, RedisRingStore(redis_url, shared["redis_key"])
    for node in nodes:
        assert stop_appliance(node) == 0, node.log()


async def test_nodes_share_and_rotate_one_ring(two_nodes):
    (one, two), store = two_nodes
    first = store.load().current()
    from_one = turn_entry(http_credentials(one), "turn:")
    from_two = turn_entry(http_credentials(two), "turn:")
    for entry in (from_one, from_two):
        assert entry["credential"] == rest_password(first.value.encode(), entry["username"])
    # Each node's credentials work on the other node's relay.
    assert await allocation_works("127.0.0.1", two.port, from_one["username"], from_one["credential"])
    assert await allocation_works("127.0.0.1", one.port, from_two["username"], from_two["credential"])

    done = subprocess.run(
        [sys.executable, "-m", "appliance", "secret", "rotate", "--config", str(one.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    new = store.load().current()
    assert new.id != first.id and new.id in done.stdout

    deadline = time.monotonic() + 8  # a 0.5 s poll plus the 1 s activation, with room
    while True:
        entry = turn_entry(http_credentials(two), "turn:")
        if entry["credential"] == rest_password(new.value.encode(), entry["username"]):
            break
        assert time.monotonic() < deadline, "node 2 never signed with the rotated secret"
        await asyncio.sleep(0.3)
    assert await allocation_works("127.0.0.1", one.port, entry["username"], entry["credential"])
    # The old credentials are still in grace on both relays.
    for node in (one, two):
        assert await allocation_works("127.0.0.1", node.port, from_one["username"], from_one["credential"])
