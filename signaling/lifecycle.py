"""What runs for as long as the signaling serves, around the sessions: the broker (joined
before the first session, left after the last) and the calls' timers (ring timeouts,
grace periods), which fire whether or not any client speaks.

The Quart app calls `start` before serving and `stop` after (app.py); a test that
builds the parts itself can run them the same way.
"""

from __future__ import annotations

import asyncio
import logging

from ratelog import RateLimitedLog

from .broker import Broker
from .calls.service import CallService

log = logging.getLogger("signaling.calls")

TIMER_MAX_WAIT_S = 1.0  # a timer the registry adds while we sleep is seen within this


async def run_call_timers(calls: CallService) -> None:
    """Serve the calls' timers until cancelled, on the call service's clock.  A bug that one
    call's timer hits is logged (at a bounded rate) and the loop goes on: if it ended, no
    call on this node would ever time out again."""
    failures = RateLimitedLog(log)
    while True:
        when = calls.next_timer()
        wait = TIMER_MAX_WAIT_S if when is None else min(max(when - calls.clock(), 0.0), TIMER_MAX_WAIT_S)
        await asyncio.sleep(wait)
        try:
            calls.handle_timer()
        except Exception:
            failures.exception(calls.clock(), "a call timer failed")


class SignalingLifecycle:
    def __init__(self, broker: Broker, calls: CallService) -> None:
        self.broker = broker
        self.calls = calls
        self._timers: asyncio.Task | None = None

    async def start(self) -> None:
        await self.broker.start()
        self._timers = asyncio.get_running_loop().create_task(run_call_timers(self.calls))

    async def stop(self) -> None:
        if self._timers is not None:
            self._timers.cancel()
            self._timers = None
        await self.calls.stop()  # across nodes: its calls end while the bus still works
        await self.broker.stop()
