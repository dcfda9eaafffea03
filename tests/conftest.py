"""Fixtures shared by unit and interop tests."""

from .redis_server import private_redis, redis_prefix, redis_url  # noqa: F401  (pytest fixtures)
