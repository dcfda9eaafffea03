"""How many SENDs one session may make: a token bucket, and a count of what it refused.

Sans-I/O like the rest of the package: every call takes the caller's `now`.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; a rate of 0 means no limit."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.rate <= 0:
            return True
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WindowCount:
    """Events counted in fixed windows of `window_s`: enough to tell a client that keeps
    pushing past its budget from one that overshot once."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._start = float("-inf")
        self.count = 0

    def add(self, now: float) -> int:
        """Count one event; how many the current window holds."""
        if now - self._start >= self.window_s:
            self._start, self.count = now, 0
        self.count += 1
        return self.count
