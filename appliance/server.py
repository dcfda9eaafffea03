"""The process model of `appliance serve`.

The main process runs one event loop with a relay node (unless every relay
listener is off), the signaling service (Hypercorn), the admin listener and
a RingWatcher.  `turn.workers: N` starts N-1 more relay processes that bind
the same ports with SO_REUSEPORT, each with its own RingWatcher, so a
rotation reaches every process through the file alone; the nonce key is
handed to each worker at spawn so a nonce from one verifies in another.

Signals:
- SIGHUP: re-read the secret ring and reload TLS certificates (established
  connections keep theirs), in every process.
- SIGTERM/SIGINT: drain.  /readyz turns false, STOMP sessions get an ERROR
  frame and are closed (SockJS adds its close frame), Hypercorn stops
  accepting, the relay refuses new allocations (508) and new TCP/TLS
  connections while live allocations keep relaying for up to `turn.drain_s`
  or until none is left; then everything stops and the exit code is 0.  A
  second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from turn.ledger import LocalLedger, SharedLedger, user_slots
from turn.node import ListenerBindError, RelayNode

from .config import AppConfig, HostPort
from .listeners import ListenerError, check_unshared, hypercorn_bind
from .metrics import combine_stats, retired_part
from .next_steps import next_steps
from .open_files import raise_open_files_limit
from .ring_watcher import RingWatcher
from .tls_reload import CertificateReloader

log = logging.getLogger("appliance")

CHILD_POLL_S = 1.0
STATS_EVERY_S = 1.0
CHILD_STOP_MARGIN_S = 5.0
LISTEN_WAIT_S = 10.0
HTTP_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TlsFiles:
    turn_cert: Path | None = None
    turn_key: Path | None = None
    http_cert: Path | None = None
    http_key: Path | None = None


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def relay_enabled(config: AppConfig) -> bool:
    t = config.turn
    return any((t.udp, t.tcp, t.tls))


async def wait_listening(listener: HostPort, task: asyncio.Task, name: str) -> None:
    """Return once `listener` accepts TCP connections; raise if its server task ended."""
    host = listener.local_host()
    deadline = time.monotonic() + LISTEN_WAIT_S
    while time.monotonic() < deadline:
        if task.done():
            exc = task.exception()
            raise OSError(f"{name} listener {listener} did not start: {exc}")
        try:
            _, writer = await asyncio.open_connection(host, listener.port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise OSError(f"{name} listener {listener} is not accepting connections")


class Workers:
    """The extra relay processes: started, watched (restarted if one dies), stopped.

    Each worker sends a stats snapshot up its pipe every STATS_EVERY_S, so the
    main process's /metrics covers every relay process; a worker that exits
    leaves its monotonic totals behind (metrics.retired_part).
    """

    def __init__(self, count: int, args: tuple, ledger: SharedLedger | None) -> None:
        self.count = count
        self.args = args
        self.ledger = ledger
        self.procs: list[multiprocessing.Process] = []
        self.pipes: list = []
        self.latest: list[dict] = []
        self.retired: list[dict] = []
        self.stopping = False
        self._ctx = multiprocessing.get_context("spawn")

    def _spawn(self, index: int) -> multiprocessing.Process:
        receiver, sender = self._ctx.Pipe(duplex=False)
        # Process index 0 is the main process; worker i is index i + 1 in the ledger.
        proc = self._ctx.Process(target=_worker_main, args=(*self.args, index + 1, sender),
                                 daemon=True)
        proc.start()
        sender.close()
        loop = asyncio.get_running_loop()
        loop.add_reader(receiver.fileno(), self._on_stats, index, receiver)
        if index < len(self.procs):
            self.procs[index], self.pipes[index] = proc, receiver
        else:
            self.procs.append(proc)
            self.pipes.append(receiver)
            self.latest.append({})
        return proc

    def _on_stats(self, index: int, receiver) -> None:
        try:
            self.latest[index] = receiver.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(receiver.fileno())
            receiver.close()
            self.retired.append(retired_part(self.latest[index]))
            self.latest[index] = {}

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
                    if self.ledger is not None:
                        self.ledger.forget_process(i + 1)     # what it held died with it
                    self._spawn(i)

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


class ApplianceProcess:
    """One process: the relay node, and in the main process everything else."""

    def __init__(self, config: AppConfig, files: TlsFiles, nonce_key: bytes, main: bool,
                 stats_pipe=None, ledger_path: Path | None = None, process_index: int = 0
                 ) -> None:
        self.config = config
        self.ledger_path = ledger_path
        self.process_index = process_index
        self.ledger: LocalLedger | SharedLedger | None = None
        self.stats_pipe = stats_pipe
        self.files = files
        self.nonce_key = nonce_key
        self.main = main
        self.certificates = CertificateReloader()
        from .ring_store import ring_store
        self.watcher = RingWatcher(ring_store(config), config.credentials.grace_s())
        self.node: RelayNode | None = None
        self.workers: Workers | None = None
        self.draining = False
        self.signaling_app = None
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._http_stop = asyncio.Event()
        self._admin_stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http_task: asyncio.Task | None = None
        self._admin_task: asyncio.Task | None = None

    # ------------------------------------------------------------ start

    async def _start_relay(self) -> None:
        from .relay_wiring import node_settings, peer_policy, tls_context

        c, f = self.config, self.files
        ctx = None
        if c.turn.tls and f.turn_cert and f.turn_key:
            ctx = self.certificates.track("turn tls", tls_context(f.turn_cert, f.turn_key),
                                          f.turn_cert, f.turn_key)
        ring = self.watcher.current_ring()
        self.ledger = self._open_ledger()
        self.node = RelayNode(node_settings(c), ring.accepted(time.time(), self.watcher.grace_s),
                              self.nonce_key, peer_policy(c, self.ledger), ctx,
                              ledger=self.ledger)
        self.watcher.apply = self.node.set_secrets
        self.watcher.refresh()
        t = c.turn
        listeners = {"udp": t.udp, "tcp": t.tcp, "tls": t.tls}
        if self.main and t.workers > 1:       # see check_unshared: before any SO_REUSEPORT bind
            for transport, kind in (("udp", socket.SOCK_DGRAM), ("tcp", socket.SOCK_STREAM),
                                    ("tls", socket.SOCK_STREAM)):
                if listeners[transport] is not None:
                    check_unshared(f"turn.{transport}", listeners[transport], kind)
        try:
            await self.node.start()
        except ListenerBindError as exc:
            raise ListenerError(f"turn.{exc.transport}", listeners[exc.transport], exc) from exc
        log.info("relay ready: udp=%s tcp=%s tls=%s", t.udp, t.tcp, t.tls)

    def _open_ledger(self) -> LocalLedger | SharedLedger:
        """Quotas and relay ports in use, shared by every relay process of this node."""
        t = self.config.turn
        if t.workers == 1:
            return LocalLedger()
        key = hashlib.blake2b(self.nonce_key, digest_size=32, person=b"relay-ledger").digest()
        if self.main:
            return SharedLedger.create(t.workers, user_slots(t.total_quota), key)
        return SharedLedger(self.ledger_path, self.process_index, key=key)

    async def _start_signaling(self) -> None:
        from hypercorn.asyncio import serve

        from .ice_servers import CredentialIssuer
        from .signaling_wiring import hypercorn_config, signaling_app

        c, f = self.config, self.files
        bind = hypercorn_bind("http.listen", c.http.listen)
        issuer = CredentialIssuer.from_config(c, self.watcher.current_ring)
        self.signaling_app = signaling_app(c, issuer.issue)
        hc = hypercorn_config(c, bind, f.http_cert or f.turn_cert, f.http_key or f.turn_key,
                              self.certificates)
        self._http_task = asyncio.get_running_loop().create_task(
            serve(self.signaling_app, hc, shutdown_trigger=self._http_stop.wait))
        await wait_listening(c.http.listen, self._http_task, "http")
        log.info("signaling ready: %s://%s%s/ws", "https" if c.http.tls else "http",
                 c.http.listen, c.http.prefix)

    async def _start_admin(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        from .admin import AdminContext, create_admin_app
        from .metrics import ApplianceCollector, metrics_registry

        c = self.config
        bind = hypercorn_bind("admin.listen", c.admin.listen)
        ext = self.signaling_app.extensions if self.signaling_app is not None else {}
        collector = ApplianceCollector(
            relay_stats=self.relay_stats if self.node is not None else None,
            signaling=ext.get("signaling"), calls=ext.get("calls"),
            credentials=ext.get("turn_credentials"), watcher=self.watcher,
            draining=lambda: self.draining)
        app = create_admin_app(AdminContext(
            token=c.admin.token, watcher=self.watcher, store=self.watcher.store,
            grace_s=c.credentials.grace_s(),
            activation_s=c.credentials.activation_s, registry=metrics_registry(collector),
            readiness=self.readiness, secrets_changed=self.reload_secrets))
        hc = Config()
        hc.bind = [bind]
        hc.accesslog = hc.errorlog = None
        hc.graceful_timeout = 1
        self._admin_task = asyncio.get_running_loop().create_task(
            serve(app, hc, shutdown_trigger=self._admin_stop.wait))
        await wait_listening(c.admin.listen, self._admin_task, "admin")
        log.info("admin ready: http://%s (token %s)", c.admin.listen,
                 "required" if c.admin.token else "not set: /admin/secrets disabled")

    def relay_stats(self) -> dict:
        """This process's relay figures plus the workers' latest (metrics.combine_stats)."""
        workers = self.workers.snapshots() if self.workers is not None else []
        return combine_stats([self.node.stats(), *workers])

    async def _report_stats(self) -> None:
        """In a worker: send the relay's figures to the main process."""
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            try:
                self.stats_pipe.send(self.node.stats())
            except (OSError, ValueError):
                return           # the main process is gone or stopping

    def readiness(self) -> dict[str, bool]:
        checks = {"secret_ring": self.watcher.ring is not None, "accepting": not self.draining}
        if relay_enabled(self.config):
            checks["relay"] = self.node is not None and self.node.core is not None
        if self.workers is not None and self.workers.count:
            checks["relay_workers"] = self.workers.all_alive()
        if self._http_task is not None:
            checks["signaling"] = not self._http_task.done()
            broker = self.signaling_app.extensions["signaling"].broker
            if hasattr(broker, "healthy"):
                checks["broker"] = broker.healthy          # Redis reachable
        return checks

    # ------------------------------------------------------------ signals

    async def reload_secrets(self) -> None:
        """Read the ring again here now, and have every relay worker do the same."""
        await self.watcher.poll(force=True)
        if self.workers is not None:
            self.workers.signal_all(signal.SIGHUP)

    def _on_hup(self) -> None:
        log.info("SIGHUP: reloading the secret ring and certificates")
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload_secrets()))
        self.certificates.reload()

    def _on_stop_signal(self) -> None:
        if self._stop.is_set():
            log.info("second stop signal: cutting the drain short")
            self._hurry.set()
        self._stop.set()

    # ------------------------------------------------------------ run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if not self.watcher.load(force=True) and self.watcher.ring is None:
            raise OSError(f"cannot start: the secret ring ({self.watcher.store.where}) did not load")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            if relay_enabled(self.config):
                await self._start_relay()
            if self.main:
                if self.config.http.listen is not None:
                    await self._start_signaling()
                if self.config.admin.listen is not None:
                    await self._start_admin()
                # Workers only once every listener here is bound: one that cannot bind
                # (ListenerError) stops the start before any worker exists, and workers
                # join the relay's ports through SO_REUSEPORT, which the kernel grants
                # this user once the main process holds them.
                shared = self.ledger if isinstance(self.ledger, SharedLedger) else None
                self.workers = Workers(self.config.turn.workers - 1 if self.node else 0,
                                       (self.config, self.files, self.nonce_key,
                                        shared.path if shared else None), shared)
                self.workers.start()
                self._tasks.append(loop.create_task(self.workers.watch()))
                log.info("%s", next_steps(self.config))      # every listener is up now
            elif self.stats_pipe is not None and self.node is not None:
                self._tasks.append(loop.create_task(self._report_stats()))
            self._tasks.append(loop.create_task(self.watcher.run()))
            await self._stop.wait()
            await self._drain()
        finally:
            await self._stop_everything()
        return 0

    async def _drain(self) -> None:
        self.draining = True
        drain_s = self.config.turn.drain_s
        log.info("stopping: draining for up to %d s", drain_s)
        if self.workers is not None:
            self.workers.begin_stop()
        if self.signaling_app is not None:
            self.signaling_app.extensions["signaling"].shutdown()
            self._http_stop.set()
        if self.node is not None:
            self.node.begin_drain()
            drained = asyncio.get_running_loop().create_task(self.node.drained(drain_s))
            hurry = asyncio.get_running_loop().create_task(self._hurry.wait())
            await asyncio.wait((drained, hurry), return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if not drained.done():
                drained.cancel()
            left = len(self.node.core.table) if self.node.core else 0
            log.info("relay drained" if not left else f"drain over: closing {left} allocation(s)")

    async def _stop_everything(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._http_stop.set()
        if self._http_task is not None:
            try:
                await asyncio.wait_for(self._http_task, HTTP_STOP_TIMEOUT_S)
            except (asyncio.TimeoutError, Exception):
                log.warning("signaling did not stop cleanly")
        if self.node is not None:
            await self.node.stop()
        if self.workers is not None:
            self.workers.begin_stop()
            await self.workers.join(self.config.turn.drain_s + CHILD_STOP_MARGIN_S)
        if isinstance(self.ledger, SharedLedger):
            if self.main:
                self.ledger.remove()       # every worker is gone: nobody maps it any more
            else:
                self.ledger.close()
        self._admin_stop.set()
        if self._admin_task is not None:
            try:
                await asyncio.wait_for(self._admin_task, HTTP_STOP_TIMEOUT_S)
            except (asyncio.TimeoutError, Exception):
                pass
        log.info("stopped")


def _worker_main(config: AppConfig, files: TlsFiles, nonce_key: bytes, ledger_path: Path | None,
                 process_index: int, stats_pipe) -> None:
    configure_logging(config.log_level)
    install_uvloop()
    try:
        asyncio.run(ApplianceProcess(config, files, nonce_key, main=False, stats_pipe=stats_pipe,
                                     ledger_path=ledger_path, process_index=process_index).run())
    except KeyboardInterrupt:
        pass


def run(config: AppConfig, files: TlsFiles) -> int:
    configure_logging(config.log_level)
    loop_kind = install_uvloop()
    log.info("event loop: %s", loop_kind)
    raise_open_files_limit()
    return asyncio.run(ApplianceProcess(config, files, os.urandom(32), main=True).run())
