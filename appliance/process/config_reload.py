"""Reloading the configuration file while the appliance runs (SIGHUP, POST /admin/reload).

The file is read and validated whole, as at the start (environment overrides included);
one that does not validate is refused whole: logged, counted, and nothing changes (the
readiness of the appliance neither).  Otherwise the live keys take their new values in
every process (config.live_keys), and keys that need a restart are logged and reported
as such and keep their running values.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config.live_keys import plan_reload
from ..config.loader import check_whole, load_config
from ..config.schema import AppConfig, ConfigError

log = logging.getLogger("appliance")

RESULTS = ("applied", "unchanged", "refused")  # of one reload; every one counted from zero


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload did: `result` is applied, unchanged or refused."""

    result: str
    applied: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    error: str | None = None

    def as_json(self) -> dict:
        return {
            "result": self.result,
            "applied": list(self.applied),
            "needsRestart": list(self.needs_restart),
            "error": self.error,
        }


class ConfigReloader:
    """Reads `path` again on demand and hands a new configuration to `apply`.

    `apply(config)` must build everything it needs before it changes anything, and raise
    (ValueError, OSError, ssl.SSLError among them) if it cannot: then the reload is refused
    and nothing changed.  `counts` (by result) and `last_success` (the wall time the file
    last read and validated, at first the start) are for /metrics."""

    def __init__(
        self,
        path: Path | None,
        running: AppConfig,
        apply: Callable[[AppConfig], None],
        load: Callable[[Path], AppConfig] = load_config,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.running = running
        self.apply = apply
        self.load = load
        self.clock = clock
        self.counts: Counter[str] = Counter(dict.fromkeys(RESULTS, 0))  # by result
        self.last_success = clock()  # the running configuration was read at the start
        self.last_refused = False  # the latest reload was refused

    def reload(self) -> ReloadOutcome:
        """Read, validate and apply the file now; never raises."""
        outcome = self._reload()
        self.counts[outcome.result] += 1
        self.last_refused = outcome.result == "refused"
        if not self.last_refused:
            self.last_success = self.clock()
        return outcome

    def _reload(self) -> ReloadOutcome:
        if self.path is None:
            log.error("configuration reload refused: started with the built-in defaults, no file to read")
            return ReloadOutcome("refused", error="no configuration file: started with the built-in defaults")
        try:
            plan = plan_reload(self.running, self.load(self.path))
            check_whole(plan.config)
        except ConfigError as exc:
            log.error("configuration reload refused, nothing changed: %s", exc)
            return ReloadOutcome("refused", error=str(exc))
        if plan.needs_restart:
            log.warning(
                "configuration reload: %s changed but need(s) a restart; running with the old value(s)",
                ", ".join(plan.needs_restart),
            )
        if not plan.changes_anything:
            log.info("configuration reload: no live key changed")
            return ReloadOutcome("unchanged", needs_restart=plan.needs_restart)
        try:
            self.apply(plan.config)
        except (OSError, ValueError) as exc:
            log.error("configuration reload refused, nothing changed: %s", exc)
            return ReloadOutcome("refused", needs_restart=plan.needs_restart, error=str(exc))
        self.running = plan.config
        log.info("configuration reloaded: %s", ", ".join(plan.applied))
        return ReloadOutcome("applied", plan.applied, plan.needs_restart)
