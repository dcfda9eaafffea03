"""The main process of `appliance serve`: the supervisor.

It runs one event loop with a relay node of its own (unless every relay listener is off
and there is no edge), the signaling service (Hypercorn), the edge listener (edge.listen:
TURN over TLS and HTTPS/WSS on one port, process/edge/), the admin listener and a
RingWatcher.  `turn.workers: N` starts N-1 relay workers (relay_worker.py, through
worker_pool.py) that bind the same ports with SO_REUSEPORT, each with its own
RingWatcher, so a rotation reaches every process through the store alone; the nonce key
is handed to each worker at spawn so a nonce from one verifies in another.  The edge's
TURN connections join this process's relay node whatever `turn.workers` is (with no
relay listener there are no workers: the edge's node is the only one).

Signals (signals.py):
- SIGHUP: re-read the configuration file (config_reload.py: its live keys, TLS file
  paths included, take effect in this process and, down a pipe, in every relay worker; a
  file that does not validate changes nothing), then re-read the secret ring and reload
  TLS certificates (established connections keep theirs), in every process.
  POST /admin/reload reads the file the same way.
- SIGTERM/SIGINT: drain.  /readyz turns false, STOMP sessions get an ERROR
  frame and are closed (SockJS adds its close frame), Hypercorn stops
  accepting, the edge stops accepting (its HTTP connections close when idle or
  after their request), the relay refuses new allocations (508) and new TCP/TLS
  connections while live allocations keep relaying for up to `turn.drain_s`
  or until none is left; then everything stops and the exit code is 0.  A
  second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio import serve
from hypercorn.config import Config

from demux.proxy import TrustedProxies
from signaling.app import SignalingApp
from turn.ledger import LocalLedger, SharedLedger, user_slots

from ..config.schema import AppConfig, HostPort
from ..credentials.ice_servers import CredentialIssuer
from ..credentials.store import ring_store
from ..credentials.watcher import RingWatcher
from ..ops.admin import AdminContext, create_admin_app
from ..ops.metrics import ApplianceCollector, combine_stats, metrics_registry
from ..ops.next_steps import next_steps
from ..tls.files import TlsFiles, tls_files
from ..tls.reload import CertificateReloader, require_pair
from ..wiring.auth import token_verifier
from ..wiring.live import LiveIssuer, LiveVerifier
from ..wiring.signaling import HTTPS_CERTIFICATE, edge_hypercorn_config, hypercorn_config, signaling_app
from .bootstrap import configure_logging, install_uvloop, set_log_level
from .config_reload import ConfigReloader, ReloadOutcome
from .edge import EdgeListener, HypercornConnections, bind_edge_socket, edge_certificate, edge_tls_context
from .listeners import check_relay_unshared, hypercorn_bind
from .local_relay import LocalRelay, ledger_key, relay_enabled
from .open_files import raise_open_files_limit
from .signals import ProcessSignals
from .worker_pool import RelayWorkers

log = logging.getLogger("appliance")

CHILD_STOP_MARGIN_S = 5.0
HTTP_STOP_TIMEOUT_S = 10.0
LISTEN_WAIT_S = 10.0
EDGE_CERTIFICATE = "edge"  # what edge_tls_context tracks the edge's context as


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


class Supervisor:
    def __init__(
        self, config: AppConfig, files: TlsFiles, nonce_key: bytes, config_path: Path | None = None
    ) -> None:
        self.config = config
        self.reloader = ConfigReloader(config_path, config, self._apply_config)
        self.live_verifier: LiveVerifier | None = None  # with the signaling
        self.live_issuer: LiveIssuer | None = None
        self.files = files
        self.edge_pair: tuple[Path, Path] | None = None  # the edge's certificate, once it runs
        self.nonce_key = nonce_key
        self.certificates = CertificateReloader()
        self.watcher = RingWatcher(ring_store(config), config.credentials.grace_s())
        self.signals = ProcessSignals()
        self.ledger: LocalLedger | SharedLedger | None = None
        self.relay: LocalRelay | None = None
        self.workers: RelayWorkers | None = None
        self.draining = False
        self.signaling: SignalingApp | None = None
        self.edge: EdgeListener | None = None
        self._http_stop = asyncio.Event()
        self._admin_stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http_task: asyncio.Task | None = None
        self._admin_task: asyncio.Task | None = None
        self._edge_stop: asyncio.Task | None = None

    # ------------------------------------------------------------ start

    async def _start_relay(self) -> None:
        t = self.config.turn
        self.ledger = self._open_ledger()
        self.relay = LocalRelay(
            self.config, self.files, self.nonce_key, self.ledger, self.watcher, self.certificates
        )
        if t.workers > 1:
            check_relay_unshared(t)  # before any SO_REUSEPORT bind: see check_unshared
        await self.relay.start()

    def _open_ledger(self) -> LocalLedger | SharedLedger:
        """Quotas and relay ports in use, shared by every relay process of this node."""
        t = self.config.turn
        if t.workers == 1 or not relay_enabled(self.config):
            return LocalLedger()  # one relay process: no workers without relay listeners
        return SharedLedger.create(t.workers, user_slots(t.total_quota), ledger_key(self.nonce_key))

    async def _start_signaling(self, listen: HostPort) -> None:
        c, f = self.config, self.files
        bind = hypercorn_bind("http.listen", listen)
        self.live_issuer = LiveIssuer(CredentialIssuer.from_config(c, self.watcher.current_ring).issue)
        self.live_verifier = LiveVerifier(token_verifier(c))
        self.signaling = signaling_app(c, self.live_issuer.issue, self.live_verifier)
        hc = hypercorn_config(
            c, bind, f.http_cert or f.turn_cert, f.http_key or f.turn_key, self.certificates
        )
        self._http_task = asyncio.get_running_loop().create_task(
            serve(self.signaling.web, hc, shutdown_trigger=self._http_stop.wait)
        )
        await wait_listening(listen, self._http_task, "http")
        log.info(
            "signaling ready: %s://%s%s/ws", "https" if c.http.tls else "http", c.http.listen, c.http.prefix
        )

    def _start_edge(self, listen: HostPort) -> None:
        """The edge listener: bound here (a failure names edge.listen), TURN connections to
        this process's relay node, HTTP ones to the signaling app the http listener serves
        (the loader refuses an edge without http.listen)."""
        c = self.config
        assert self.relay is not None and self.signaling is not None, "started before the edge"
        sock = bind_edge_socket("edge.listen", listen)
        cert, key = edge_certificate(c, self.files)
        self.edge_pair = (cert, key)
        http = HypercornConnections(ASGIWrapper(self.signaling.web), edge_hypercorn_config(c))
        self.edge = EdgeListener(
            sock,
            edge_tls_context(cert, key, self.certificates),
            self.relay.node,
            http,
            TrustedProxies(c.trusted_proxies),
            # As the http listener's handshake: no longer than a client has for CONNECT.
            deadline_s=c.stomp.connect_timeout_s,
        )
        self.edge.start()
        log.info("edge ready: %s (TURN over TLS and HTTPS/WSS, certificate %s)", listen, cert)

    async def _start_admin(self, listen: HostPort) -> None:
        c = self.config
        bind = hypercorn_bind("admin.listen", listen)
        collector = ApplianceCollector(
            relay_stats=self.relay_stats if self.relay is not None else None,
            signaling=self.signaling,
            watcher=self.watcher,
            draining=lambda: self.draining,
            edge_stats=self.edge.stats if self.edge is not None else None,
            config_reloads=self.reloader,
        )
        app = create_admin_app(
            AdminContext(
                token=c.admin.token,
                watcher=self.watcher,
                store=self.watcher.store,
                grace_s=c.credentials.grace_s(),
                activation_s=c.credentials.activation_s,
                registry=metrics_registry(collector),
                readiness=self.readiness,
                secrets_changed=self.reload_secrets,
                allocations=self.allocation_rows if self.relay is not None else None,
                signaling=self.signaling.oversight if self.signaling is not None else None,
                reload_config=lambda: self.reload_config().as_json(),
            )
        )
        hc = Config()
        hc.bind = [bind]
        hc.accesslog = hc.errorlog = None
        hc.graceful_timeout = 1
        self._admin_task = asyncio.get_running_loop().create_task(
            serve(app, hc, shutdown_trigger=self._admin_stop.wait)
        )
        await wait_listening(listen, self._admin_task, "admin")
        log.info(
            "admin ready: http://%s (token %s)",
            c.admin.listen,
            "required" if c.admin.token else "not set: /admin/secrets disabled",
        )

    def _start_workers(self) -> None:
        """Workers only once every listener here is bound: one that cannot bind
        (ListenerError) stops the start before any worker exists, and workers join the
        relay's ports through SO_REUSEPORT, which the kernel grants this user once the
        supervisor holds them."""
        if self.relay is None or not isinstance(self.ledger, SharedLedger):
            return  # no relay here, turn.workers is 1, or only the edge's (no relay listener)
        self.workers = RelayWorkers(
            self.config.turn.workers - 1, self.config, self.files, self.nonce_key, self.ledger
        )
        self.workers.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self.workers.watch()))

    def relay_stats(self) -> dict:
        """This process's relay figures plus the workers' latest (ops.metrics.combine_stats)."""
        own = [self.relay.stats()] if self.relay is not None else []  # asked only when there is one
        workers = self.workers.snapshots() if self.workers is not None else []
        return combine_stats([*own, *workers])

    def allocation_rows(self) -> tuple[list[dict], bool]:
        """This node's live allocations: this process's now, each worker's as of its last
        report (a second at most); and whether any process had more than it listed."""
        own, truncated = self.relay.allocation_rows() if self.relay is not None else ([], False)
        if self.workers is None:
            return own, truncated
        theirs, theirs_truncated = self.workers.allocation_rows()
        return own + theirs, truncated or theirs_truncated

    def readiness(self) -> dict[str, bool]:
        checks = {"secret_ring": self.watcher.ring is not None, "accepting": not self.draining}
        if self._relay_wanted():
            checks["relay"] = self.relay is not None and self.relay.ready
        if self.config.edge.listen is not None:
            checks["edge"] = self.edge is not None
        if self.workers is not None:
            checks["relay_workers"] = self.workers.all_alive()
        if self._http_task is not None and self.signaling is not None:
            checks["signaling"] = not self._http_task.done()
            broker = self.signaling.broker
            if broker.node_bus is not None:
                checks["broker"] = broker.healthy  # Redis reachable
        return checks

    def _relay_wanted(self) -> bool:
        """A relay node here: for the relay listeners, or for the edge's TURN connections
        (with turn.udp, tcp and tls all null, "the standard TURN ports closed")."""
        return relay_enabled(self.config) or self.config.edge.listen is not None

    # ------------------------------------------------------------ reload

    def reload_config(self) -> ReloadOutcome:
        """Read the configuration file again and apply its live keys everywhere
        (config_reload.ConfigReloader); never raises."""
        return self.reloader.reload()

    def _apply_config(self, config: AppConfig) -> None:
        """Run with `config`'s live keys from now on, here and in every relay worker.  What
        can fail (a token key file, a peer range, a certificate that does not load) is built
        or loaded before anything changes; the relay's own (LocalRelay.apply) goes first."""
        verifier = token_verifier(config) if config.auth != self.config.auth else None
        issue = CredentialIssuer.from_config(config, self.watcher.current_ring).issue
        files = tls_files(config)
        retargets = self._certificate_changes(config, files)
        if self.relay is not None:
            self.relay.apply(config)
        for name, cert, key in retargets:
            self.certificates.retarget(name, cert, key)
            if name == EDGE_CERTIFICATE:
                self.edge_pair = (cert, key)
        if self.workers is not None:
            self.workers.apply(config, files)
        if self.live_verifier is not None and verifier is not None:
            self.live_verifier.replace(verifier)
        if self.live_issuer is not None:
            self.live_issuer.replace(issue)
        set_log_level(config.log_level)
        self.files = files
        self.config = config

    def _certificate_changes(self, config: AppConfig, files: TlsFiles) -> list[tuple[str, Path, Path]]:
        """The signaling's and the edge's listeners that `config` points at other files (the
        relay's are LocalRelay.apply's), each new pair loaded once: OSError if one does not
        (require_pair), and the reload is refused before anything changed."""
        wanted: list[tuple[str, Path, Path, tuple[Path | None, Path | None] | None]] = []
        if self.signaling is not None and files.http_cert is not None and files.http_key is not None:
            running = (self.files.http_cert, self.files.http_key)
            wanted.append((HTTPS_CERTIFICATE, files.http_cert, files.http_key, running))
        if self.edge is not None:
            cert, key = edge_certificate(config, files)
            wanted.append((EDGE_CERTIFICATE, cert, key, self.edge_pair))
        changes = [(name, cert, key) for name, cert, key, running in wanted if (cert, key) != running]
        for name, cert, key in changes:
            require_pair(name, cert, key)
        return changes

    # ------------------------------------------------------------ signals

    async def reload_secrets(self) -> None:
        """Read the ring again here now, and have every relay worker do the same."""
        await self.watcher.poll(force=True)
        if self.workers is not None:
            self.workers.signal_all(signal.SIGHUP)

    def _on_hup(self) -> None:
        log.info("SIGHUP: reloading the configuration, the secret ring and certificates")
        self.reload_config()
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload_secrets()))
        self.certificates.reload()

    # ------------------------------------------------------------ run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if not self.watcher.load(force=True) and self.watcher.ring is None:
            raise OSError(f"cannot start: the secret ring ({self.watcher.store.where}) did not load")
        self.signals.install(on_hup=self._on_hup)
        try:
            if self._relay_wanted():
                await self._start_relay()
            if self.config.http.listen is not None:
                await self._start_signaling(self.config.http.listen)
            if self.config.edge.listen is not None:
                self._start_edge(self.config.edge.listen)
            if self.config.admin.listen is not None:
                await self._start_admin(self.config.admin.listen)
            self._start_workers()
            log.info("%s", next_steps(self.config))  # every listener is up now
            self._tasks.append(loop.create_task(self.watcher.run()))
            await self.signals.stop.wait()
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
        if self.signaling is not None:
            self.signaling.service.shutdown()
            self._http_stop.set()
        self._stop_edge()  # its HTTP connections' graceful time runs alongside the relay's drain
        if self.relay is not None:
            await self.relay.drain(drain_s, self.signals.hurry)

    def _stop_edge(self) -> asyncio.Task | None:
        """The edge's stop (EdgeListener.stop), begun once: at the drain, or at the stop."""
        if self.edge is not None and self._edge_stop is None:
            self._edge_stop = asyncio.get_running_loop().create_task(self.edge.stop())
        return self._edge_stop

    async def _stop_everything(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._http_stop.set()
        edge_stopped = self._stop_edge()
        if edge_stopped is not None:
            try:
                await asyncio.wait_for(edge_stopped, HTTP_STOP_TIMEOUT_S)
            except (TimeoutError, Exception):
                log.warning("edge did not stop cleanly")
        if self._http_task is not None:
            try:
                await asyncio.wait_for(self._http_task, HTTP_STOP_TIMEOUT_S)
            except (TimeoutError, Exception):
                log.warning("signaling did not stop cleanly")
        if self.relay is not None:
            await self.relay.stop()
        if self.workers is not None:
            self.workers.begin_stop()
            await self.workers.join(self.config.turn.drain_s + CHILD_STOP_MARGIN_S)
        if isinstance(self.ledger, SharedLedger):
            self.ledger.remove()  # every worker is gone: nobody maps it any more
        self._admin_stop.set()
        if self._admin_task is not None:
            try:
                await asyncio.wait_for(self._admin_task, HTTP_STOP_TIMEOUT_S)
            except (TimeoutError, Exception):
                pass
        log.info("stopped")


def run(config: AppConfig, files: TlsFiles, config_path: str | os.PathLike | None) -> int:
    """`appliance serve`: the supervisor's event loop until it has stopped (exit code).
    `config_path` is the file `config` was loaded from, read again on SIGHUP and
    POST /admin/reload (None: the built-in defaults, nothing to reload)."""
    configure_logging(config.log_level)
    loop_kind = install_uvloop()
    log.info("event loop: %s", loop_kind)
    raise_open_files_limit()
    path = Path(config_path) if config_path is not None else None
    return asyncio.run(Supervisor(config, files, os.urandom(32), path).run())
