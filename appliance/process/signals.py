"""The signals every process of `appliance serve` answers, the supervisor and each relay
worker alike: SIGTERM or SIGINT asks it to drain and stop, a second one cuts the drain
short; SIGHUP asks it to reload (the secret ring and the certificates)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger("appliance")


class ProcessSignals:
    def __init__(self) -> None:
        self.stop = asyncio.Event()  # drain, then stop
        self.hurry = asyncio.Event()  # a second stop signal: cut the drain short

    def install(self, on_hup: Callable[[], None]) -> None:
        """Answer the signals on the running loop from now on."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, on_hup)

    def _on_stop_signal(self) -> None:
        if self.stop.is_set():
            log.info("second stop signal: cutting the drain short")
            self.hurry.set()
        self.stop.set()
