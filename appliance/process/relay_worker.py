"""A relay worker: one of the `turn.workers - 1` processes the supervisor starts
(worker_pool.py), each running a relay node on the same ports as the supervisor's through
SO_REUSEPORT, and nothing else.

It follows the secret ring with a RingWatcher of its own, so a rotation reaches it through
the store alone; it verifies nonces with the key the supervisor handed it at spawn, so a
nonce from one process verifies in another; it counts quotas and relay ports in the
ledger shared with every relay process of the node; and it sends its relay figures up
`stats_pipe` every STATS_EVERY_S (a WorkerReport: the figures for the supervisor's /metrics
and its live allocations for /admin/allocations).  SIGHUP re-reads the ring
and reloads the certificate; a configuration the supervisor reloaded arrives down
`config_pipe` and its live keys take effect here (LocalRelay.apply); SIGTERM drains its
allocations as the supervisor does.

This module is what a spawned worker imports: it stays clear of the signaling, Quart and
Hypercorn, which the worker never runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from turn.ledger import SharedLedger

from ..config.schema import AppConfig
from ..credentials.store import ring_store
from ..credentials.watcher import RingWatcher
from ..tls.files import TlsFiles
from ..tls.reload import CertificateReloader
from .bootstrap import configure_logging, install_uvloop, set_log_level
from .local_relay import LocalRelay, ledger_key
from .signals import ProcessSignals

log = logging.getLogger("appliance")

STATS_EVERY_S = 1.0


@dataclass(frozen=True)
class WorkerReport:
    """What a relay worker sends up its pipe every STATS_EVERY_S."""

    stats: dict  # RelayNode.stats()
    allocations: list[dict] = field(default_factory=list)  # RelayNode.allocation_rows(), bounded
    truncated: bool = False  # the worker has more allocations than it listed


class RelayWorker:
    def __init__(
        self,
        config: AppConfig,
        files: TlsFiles,
        nonce_key: bytes,
        ledger_path: Path,
        process_index: int,
        stats_pipe: Connection,
        config_pipe: Connection | None = None,
    ) -> None:
        self.config = config
        self.config_pipe = config_pipe
        self.files = files
        self.nonce_key = nonce_key
        self.ledger_path = ledger_path
        self.process_index = process_index
        self.stats_pipe = stats_pipe
        self.certificates = CertificateReloader()
        self.watcher = RingWatcher(ring_store(config), config.credentials.grace_s())
        self.signals = ProcessSignals()
        self.relay: LocalRelay | None = None
        self.ledger: SharedLedger | None = None
        self._tasks: list[asyncio.Task] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if not self.watcher.load(force=True) and self.watcher.ring is None:
            raise OSError(f"cannot start: the secret ring ({self.watcher.store.where}) did not load")
        self.signals.install(on_hup=self._on_hup)
        try:
            self.ledger = SharedLedger(self.ledger_path, self.process_index, key=ledger_key(self.nonce_key))
            self.relay = LocalRelay(
                self.config, self.files, self.nonce_key, self.ledger, self.watcher, self.certificates
            )
            await self.relay.start()
            if self.config_pipe is not None:
                loop.add_reader(self.config_pipe.fileno(), self._on_config, self.config_pipe)
            self._tasks.append(loop.create_task(self._report_stats(self.relay)))
            self._tasks.append(loop.create_task(self.watcher.run()))
            await self.signals.stop.wait()
            log.info("stopping: draining for up to %d s", self.config.turn.drain_s)
            await self.relay.drain(self.config.turn.drain_s, self.signals.hurry)
        finally:
            await self._stop_everything()
        return 0

    async def _report_stats(self, relay: LocalRelay) -> None:
        """Send the relay's figures to the supervisor."""
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            try:
                rows, truncated = relay.allocation_rows()
                self.stats_pipe.send(WorkerReport(relay.stats(), rows, truncated))
            except (OSError, ValueError):
                return  # the supervisor is gone or stopping

    def _on_config(self, pipe: Connection) -> None:
        """A reloaded configuration from the supervisor, validated there: its live keys take
        effect here (the others are the running ones, config.live_keys)."""
        try:
            config = pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            return  # the supervisor is gone or stopping
        if not isinstance(config, AppConfig) or self.relay is None:
            return
        try:
            self.relay.apply(config)
        except (OSError, ValueError) as exc:
            log.error("reloaded configuration not applied in this relay worker: %s", exc)
            return
        set_log_level(config.log_level)
        self.config = config
        log.info("relay worker: reloaded configuration applied")

    def _on_hup(self) -> None:
        log.info("SIGHUP: reloading the secret ring and certificates")
        self._tasks.append(asyncio.get_running_loop().create_task(self.watcher.poll(force=True)))
        self.certificates.reload()

    async def _stop_everything(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.relay is not None:
            await self.relay.stop()
        if self.ledger is not None:
            self.ledger.close()
        log.info("stopped")


def worker_main(
    config: AppConfig,
    files: TlsFiles,
    nonce_key: bytes,
    ledger_path: Path,
    process_index: int,
    stats_pipe: Connection,
    config_pipe: Connection | None = None,
) -> None:
    """What a spawned relay worker runs (worker_pool.RelayWorkers starts it)."""
    configure_logging(config.log_level)
    install_uvloop()
    try:
        worker = RelayWorker(config, files, nonce_key, ledger_path, process_index, stats_pipe, config_pipe)
        asyncio.run(worker.run())
    except KeyboardInterrupt:
        pass
