"""Logging that a flood cannot turn into a flood of log lines.

A hostile client can make the same failure happen thousands of times a second;
each line it causes costs the event loop that every other client shares, and
the disk.  `RateLimitedLog` lets `burst` lines through per `interval_s` and
counts the rest, saying how many it held back on the next line it lets through.
The clock is the caller's float `now`, so the sans-I/O core stays clock-free.
"""

from __future__ import annotations

import logging


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = 5, interval_s: float = 1.0) -> None:
        self._logger = logger
        self._burst = burst
        self._interval_s = interval_s
        self._window_start = float("-inf")
        self._in_window = 0
        self.suppressed = 0

    def exception(self, now: float, message: str, *args) -> bool:
        """Log `message` with the current exception's traceback, if the budget allows;
        True if it was logged."""
        return self._log(logging.ERROR, now, message, args, exc_info=True)

    def warning(self, now: float, message: str, *args) -> bool:
        """Log `message` at WARNING (no traceback), if the budget allows; True if it was logged."""
        return self._log(logging.WARNING, now, message, args, exc_info=False)

    def info(self, now: float, message: str, *args) -> bool:
        """Log `message` at INFO, if the budget allows; True if it was logged."""
        return self._log(logging.INFO, now, message, args, exc_info=False)

    def _log(self, level: int, now: float, message: str, args: tuple, exc_info: bool) -> bool:
        if not self._logger.isEnabledFor(level):
            return False
        if now - self._window_start >= self._interval_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self._burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        if self.suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._logger.log(level, message, *args, exc_info=exc_info)
        return True
