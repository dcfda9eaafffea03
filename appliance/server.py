"""The process model of `appliance serve`.

The main process runs one event loop with a relay node (and, once the
signaling lands, the HTTP service).  `turn.workers: N` starts N-1 more relay
processes that bind the same ports with SO_REUSEPORT.  Every process reads
the secret ring itself, on start, on SIGHUP and when the file changes, so a
rotation reaches all of them without any channel between them; the nonce key
is handed to each worker at spawn so a nonce from one verifies in another.

Signals: SIGTERM/SIGINT stop (children first), SIGHUP reloads the ring.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

from turn.node import RelayNode

from .config import AppConfig
from .relay_wiring import node_settings, peer_policy, tls_context
from .secret_ring import SecretRingError, load_ring

log = logging.getLogger("appliance")

RING_POLL_S = 2.0
CHILD_POLL_S = 1.0
CHILD_STOP_TIMEOUT_S = 5.0


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


class RingWatcher:
    """Keeps the relay's accepted secrets in step with the secrets file.

    A corrupt or unreadable file is refused and logged; the last good ring
    stays in force, so a botched edit never locks every client out.
    """

    def __init__(self, path: Path, grace_s: float, apply) -> None:
        self.path = path
        self.grace_s = grace_s
        self.apply = apply
        self._stamp: tuple | None = None

    def _file_stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, force: bool = False) -> bool:
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return False
        try:
            ring = load_ring(self.path)
        except SecretRingError as exc:
            log.error("secret ring not reloaded, keeping the last good one: %s", exc)
            self._stamp = stamp
            return False
        self._stamp = stamp
        secrets = ring.accepted(time.time(), self.grace_s)
        self.apply(secrets)
        log.info("secret ring loaded: %d secret(s) accepted, current %s", len(secrets),
                 ring.current().id)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RING_POLL_S)
            self.load()


async def _serve_relay(config: AppConfig, tls_cert: Path | None, tls_key: Path | None,
                       nonce_key: bytes, on_stop=None, on_reload=None) -> int:
    loop = asyncio.get_running_loop()
    ring = load_ring(config.secrets_path())
    grace = config.credentials.ttl_s
    ctx = tls_context(tls_cert, tls_key) if (config.turn.tls and tls_cert and tls_key) else None
    node = RelayNode(node_settings(config), ring.accepted(time.time(), grace), nonce_key,
                     peer_policy(config), ctx)
    watcher = RingWatcher(config.secrets_path(), grace, node.set_secrets)
    watcher.load(force=True)
    await node.start()
    stop = asyncio.Event()

    def reload() -> None:
        watcher.load(force=True)
        if on_reload:
            on_reload()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    tasks = [loop.create_task(watcher.run())]
    t = config.turn
    log.info("relay ready: udp=%s tcp=%s tls=%s", t.udp, t.tcp, t.tls)
    await stop.wait()
    for task in tasks:
        task.cancel()
    if on_stop:
        on_stop()
    await node.stop()
    log.info("relay stopped")
    return 0


def _worker_main(config: AppConfig, tls_cert, tls_key, nonce_key: bytes) -> None:
    configure_logging(config.log_level)
    install_uvloop()
    try:
        asyncio.run(_serve_relay(config, tls_cert, tls_key, nonce_key))
    except KeyboardInterrupt:
        pass


class Workers:
    """The extra relay processes: started, watched (restarted if one dies), stopped."""

    def __init__(self, count: int, args: tuple) -> None:
        self.count = count
        self.args = args
        self.procs: list[multiprocessing.Process] = []
        self.stopping = False
        self._ctx = multiprocessing.get_context("spawn")

    def _spawn(self) -> multiprocessing.Process:
        proc = self._ctx.Process(target=_worker_main, args=self.args, daemon=True)
        proc.start()
        return proc

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]

    async def watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(CHILD_POLL_S)
            for i, proc in enumerate(self.procs):
                if not proc.is_alive() and not self.stopping:
                    log.error("relay worker %s exited with %s; restarting", proc.pid, proc.exitcode)
                    self.procs[i] = self._spawn()

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signum)

    def stop(self) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1)


async def _start_signaling(config: AppConfig, cert, key, stopped: asyncio.Event):
    """Hypercorn serving the signaling app on this loop, until `stopped` is set."""
    from hypercorn.asyncio import serve

    from .signaling_wiring import hypercorn_config, signaling_app

    app = signaling_app(config)
    task = asyncio.get_running_loop().create_task(
        serve(app, hypercorn_config(config, cert, key), shutdown_trigger=stopped.wait))
    log.info("signaling ready: %s://%s%s/ws", "https" if config.http.tls else "http",
             config.http.listen, config.http.prefix)
    return task


async def _main(config: AppConfig, tls_cert, tls_key, http_cert=None, http_key=None) -> int:
    nonce_key = os.urandom(32)
    workers = Workers(config.turn.workers - 1, (config, tls_cert, tls_key, nonce_key))
    workers.start()
    watch = asyncio.get_running_loop().create_task(workers.watch())
    stopped = asyncio.Event()
    signaling = None
    if config.http.listen is not None:
        signaling = await _start_signaling(config, http_cert or tls_cert, http_key or tls_key, stopped)

    def on_stop() -> None:
        stopped.set()
        watch.cancel()
        workers.stop()

    log.info("starting %d relay process(es)", config.turn.workers)
    code = await _serve_relay(config, tls_cert, tls_key, nonce_key, on_stop=on_stop,
                              on_reload=lambda: workers.signal_all(signal.SIGHUP))
    if signaling is not None:
        await asyncio.wait_for(signaling, 10)
    return code


def run(config: AppConfig, tls_cert: Path | None, tls_key: Path | None,
        http_cert: Path | None = None, http_key: Path | None = None) -> int:
    configure_logging(config.log_level)
    loop_kind = install_uvloop()
    log.info("event loop: %s", loop_kind)
    return asyncio.run(_main(config, tls_cert, tls_key, http_cert, http_key))
