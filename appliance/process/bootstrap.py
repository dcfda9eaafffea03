"""What every process of `appliance serve` sets up before its event loop runs: the log
format (with the process id, since the supervisor and its relay workers share one log) and
uvloop as the event loop when it is installed."""

from __future__ import annotations

import asyncio
import logging

try:
    import uvloop
except ImportError:  # an optional dependency (not on Windows): plain asyncio then
    uvloop = None  # type: ignore[assignment]  # the module, or None when not installed

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def set_log_level(level: str) -> None:
    """A new log level for this process (a configuration reload)."""
    logging.getLogger().setLevel(level.upper())


def install_uvloop() -> str:
    """Make asyncio.run use uvloop if it is installed; returns the event loop's name."""
    if uvloop is None:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
