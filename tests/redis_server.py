"""A Redis for tests: the one on 127.0.0.1:6379 when it answers, else a `redis-server`
started on a free port (stopped at the end), else skip -- or fail under REQUIRE_INTEROP=1.
Every test gets its own key prefix, so tests never see each other's keys."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time

import pytest

from .netports import free_port_pair

DEFAULT = "redis://127.0.0.1:6379/0"


def _answers(url: str) -> bool:
    import redis
    try:
        return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_url():
    if _answers(DEFAULT):
        yield DEFAULT
        return
    program = shutil.which("redis-server")
    if program is None:
        message = "no Redis on 127.0.0.1:6379 and no redis-server: apt-get install redis-server"
        if os.environ.get("REQUIRE_INTEROP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port_pair()
    proc = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _answers(url):
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis
    prefix = f"test-{secrets.token_hex(4)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
