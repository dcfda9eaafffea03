"""Current rates of totals that only grow, for gauges such as relayed bits per second.

The relay counts bytes and packets as plain totals (batch-added on its hot paths, see
turn.core.Traffic); turning them into a rate is done here, where /metrics is rendered,
so nothing is added on a relayed packet's path.  `RateWindow` keeps the totals it was
shown with the instants it saw them, a few seconds' worth, and answers the rate since
the oldest sample of that window: "the last few seconds" when /metrics is read often
(the operator page polls every second or two), the average since the previous read when
it is read seldom (a Prometheus scraping every 15 s gets the rate over those 15 s).

Sans-I/O: the caller passes a float `now` (a monotonic clock: a wall clock that steps
would make a rate up).  Bounded: at most one sample per `min_gap_s` is kept, and none
older than the window, however often it is asked.
"""

from __future__ import annotations

from collections import deque

DEFAULT_WINDOW_S = 5.0
DEFAULT_MIN_SPAN_S = 1.0
DEFAULT_MIN_GAP_S = 0.25


class RateWindow:
    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        min_span_s: float = DEFAULT_MIN_SPAN_S,
        min_gap_s: float = DEFAULT_MIN_GAP_S,
    ) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.min_gap_s = min_gap_s
        # (instant, totals), oldest first; one kept from before the window as the baseline
        # of a read that comes after a long pause.
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=int(window_s / min_gap_s) + 2)
        self._last_rates: dict[str, float] = {}

    def rates(self, now: float, totals: dict[str, float]) -> dict[str, float]:
        """Per-second rates of `totals` (name -> a total that only grows) over the last
        `window_s`, or since the previous read if that is older; 0 until a sample at least
        `min_span_s` old exists.  A total that fell (a restarted counter) counts as 0."""
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()  # the second oldest is already old enough to be the baseline
        baseline = self._samples[0] if self._samples else None
        if baseline is not None and now - baseline[0] >= self.min_span_s:
            span = now - baseline[0]
            then = baseline[1]
            self._last_rates = {
                name: max(0.0, value - then.get(name, value)) / span for name, value in totals.items()
            }
        elif not self._last_rates:
            self._last_rates = dict.fromkeys(totals, 0.0)
        if not self._samples or now - self._samples[-1][0] >= self.min_gap_s:
            self._samples.append((now, dict(totals)))
        return dict(self._last_rates)
