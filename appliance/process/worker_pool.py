"""The supervisor's relay workers: started, watched (restarted if one dies), stopped.

Each worker (relay_worker.py) sends a WorkerReport up its pipe every second, so the
supervisor's /metrics and /admin/allocations cover every relay process, and takes a
reloaded configuration down a pipe of its own (apply); a worker that
exits leaves its monotonic totals behind (ops.metrics.retired_part), and its allocations,
which ended with it, leave the listing.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from turn.ledger import SharedLedger

from ..config.schema import AppConfig
from ..ops.metrics import retired_part
from ..tls.files import TlsFiles
from .relay_worker import WorkerReport, worker_main

log = logging.getLogger("appliance")

CHILD_POLL_S = 1.0


class RelayWorkers:
    def __init__(
        self, count: int, config: AppConfig, files: TlsFiles, nonce_key: bytes, ledger: SharedLedger
    ) -> None:
        self.count = count
        self.args = (config, files, nonce_key, ledger.path)
        self.ledger = ledger
        self.procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        self.config_pipes: list[Connection] = []  # each worker's: a reloaded configuration down
        self.latest: list[dict] = []
        self.listed: list[WorkerReport] = []  # the latest report of each worker, for its rows
        self.retired: list[dict] = []
        self.stopping = False
        self._ctx = multiprocessing.get_context("spawn")

    def _spawn(self, index: int) -> BaseProcess:
        receiver, sender = self._ctx.Pipe(duplex=False)
        config_receiver, config_sender = self._ctx.Pipe(duplex=False)
        # Process index 0 is the supervisor; worker i is index i + 1 in the ledger.
        proc = self._ctx.Process(
            target=worker_main, args=(*self.args, index + 1, sender, config_receiver), daemon=True
        )
        proc.start()
        sender.close()
        config_receiver.close()
        loop = asyncio.get_running_loop()
        loop.add_reader(receiver.fileno(), self._on_stats, index, receiver)
        if index < len(self.procs):
            self.config_pipes[index].close()
            self.procs[index], self.pipes[index] = proc, receiver
            self.config_pipes[index] = config_sender
        else:
            self.procs.append(proc)
            self.pipes.append(receiver)
            self.config_pipes.append(config_sender)
            self.latest.append({})
            self.listed.append(WorkerReport({}))
        return proc

    def _on_stats(self, index: int, receiver: Connection) -> None:
        try:
            report = receiver.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(receiver.fileno())
            receiver.close()
            self.retired.append(retired_part(self.latest[index]))
            self.latest[index] = {}
            self.listed[index] = WorkerReport({})
            return
        self.latest[index] = report.stats
        self.listed[index] = report

    def allocation_rows(self) -> tuple[list[dict], bool]:
        """Every worker's latest allocation rows (at most a second old), and whether any
        worker had more than it listed."""
        rows = [row for report in self.listed for row in report.allocations]
        return rows, any(report.truncated for report in self.listed)

    def snapshots(self) -> list[dict]:
        return self.latest + self.retired

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def all_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    async def watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(CHILD_POLL_S)
            for i, proc in enumerate(self.procs):
                if not proc.is_alive() and not self.stopping:
                    log.error("relay worker %s exited with %s; restarting", proc.pid, proc.exitcode)
                    self.ledger.forget_process(i + 1)  # what it held died with it
                    self._spawn(i)

    def apply(self, config: AppConfig, files: TlsFiles) -> None:
        """Send a reloaded configuration to every worker (each applies its live keys,
        relay_worker.RelayWorker), and start any worker restarted from now on with it and
        the TLS files it names (`files`, as the supervisor resolved them)."""
        self.args = (config, files, *self.args[2:])
        for proc, pipe in zip(self.procs, self.config_pipes, strict=True):
            if not proc.is_alive():
                continue  # restarted by watch() with the new configuration
            try:
                pipe.send(config)  # a few kB: within the pipe's buffer, never blocks long
            except OSError as exc:
                log.warning("relay worker %s did not take the reloaded configuration: %s", proc.pid, exc)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signum)

    def begin_stop(self) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    async def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            while proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.is_alive():
                log.warning("relay worker %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(1)
