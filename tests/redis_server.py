"""A Redis for tests: the one on 127.0.0.1:6379 when it answers, else a `redis-server`
started on a free port (stopped at the end), else skip -- or fail under REQUIRE_INTEROP=1.
Every test gets its own key prefix, so tests never see each other's keys."""

from __future__ import annotations

import secrets
import subprocess
import time

import pytest

from .external import require_program
from .netports import free_port_pair

DEFAULT = "redis://127.0.0.1:6379/0"


def _answers(url: str) -> bool:
    import redis

    try:
        return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        return False


class PrivateRedis:
    """A redis-server of a test's own on a free port, which the test may stop and start
    again (an outage) on the same port.  Keeps nothing on disk."""

    def __init__(self) -> None:
        self.program = require_program("redis-server", "apt-get install redis-server")
        self.port = free_port_pair()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [
                self.program,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers(self.url):
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_url():
    if _answers(DEFAULT):
        yield DEFAULT
        return
    server = PrivateRedis().start()
    yield server.url
    server.stop()


@pytest.fixture
def private_redis():
    server = PrivateRedis().start()
    yield server
    server.stop()


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
