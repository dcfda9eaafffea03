"""Fixtures shared by unit and interop tests."""

import pytest

from appliance.credentials.store import FileRingStore, RedisRingStore

from .redis_server import private_redis, redis_prefix, redis_url  # noqa: F401  (pytest fixtures)


@pytest.fixture(params=["file", "redis"])
def store(request, tmp_path):
    """A secret-ring store of each kind: a file, and a key in the test Redis."""
    if request.param == "file":
        return FileRingStore(tmp_path / "secrets.json")
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return RedisRingStore(url, f"{prefix}secrets")
