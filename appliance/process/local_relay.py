"""The relay node of one process, the supervisor's or a relay worker's: built from the
configuration, fed the accepted secrets by the process's RingWatcher, with its TLS context
reloadable on SIGHUP, its live settings replaced by a configuration reload (apply), and
drained on the way out."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path

from turn.ledger import LocalLedger, SharedLedger
from turn.node import ListenerBindError, RelayNode

from ..config.schema import AppConfig
from ..credentials.watcher import RingWatcher
from ..tls.files import TlsFiles, listener_files
from ..tls.reload import CertificateReloader
from ..wiring.relay import needs_turn_certificate, node_settings, peer_policy, tls_context
from .listeners import ListenerError

log = logging.getLogger("appliance")

TURN_CERTIFICATE = "turn tls"  # its name in the process's CertificateReloader


def relay_enabled(config: AppConfig) -> bool:
    t = config.turn
    return any((t.udp, t.tcp, t.tls))


def ledger_key(nonce_key: bytes) -> bytes:
    """The key of the ledger shared by the relay processes of one node (turn.ledger): from
    the nonce key every process is handed, so only they can open it."""
    return hashlib.blake2b(nonce_key, digest_size=32, person=b"relay-ledger").digest()


class LocalRelay:
    def __init__(
        self,
        config: AppConfig,
        files: TlsFiles,
        nonce_key: bytes,
        ledger: LocalLedger | SharedLedger,
        watcher: RingWatcher,
        certificates: CertificateReloader,
    ) -> None:
        self.config = config
        self.watcher = watcher
        self.ledger = ledger
        self.certificates = certificates
        f = files
        ctx = None
        # The pair the TLS listeners serve; a reload naming other files retargets them.
        self.turn_pair: tuple[Path, Path] | None = None
        if needs_turn_certificate(config) and f.turn_cert and f.turn_key:
            ctx = certificates.track(
                TURN_CERTIFICATE, tls_context(f.turn_cert, f.turn_key), f.turn_cert, f.turn_key
            )
            self.turn_pair = (f.turn_cert, f.turn_key)
        ring = watcher.current_ring()
        self.node = RelayNode(
            node_settings(config),
            ring.accepted(time.time(), watcher.grace_s),
            nonce_key,
            peer_policy(config, ledger),
            ctx,
            ledger=ledger,
        )

    async def start(self) -> None:
        """Bind the relay's listeners; ListenerError names the one that cannot bind."""
        self.watcher.deliver_to(self.node.set_secrets)
        self.watcher.deliver_revocations_to(self.node.set_revocations)
        t = self.config.turn
        try:
            await self.node.start()
        except ListenerBindError as exc:
            listeners = {"udp": t.udp, "tcp": t.tcp, "tls": t.tls}
            address = listeners[exc.transport]
            assert address is not None, "the node binds only configured listeners"
            raise ListenerError(f"turn.{exc.transport}", address, exc) from exc
        log.info("relay ready: udp=%s tcp=%s tls=%s", t.udp, t.tcp, t.tls)

    def apply(self, config: AppConfig) -> None:
        """Run with the live keys of `config` from now on (a configuration reload; the keys
        that need a restart are the running ones, config.live_keys): new settings and a new
        peer policy, whole, for the next request, and the TLS files it names for the next
        handshake; live allocations and established connections stay as they are.  Raises
        (ValueError, OSError) before anything changed if a part does not build or load."""
        relay, policy = node_settings(config).relay, peer_policy(config, self.ledger)
        if self.turn_pair is not None:
            cert, key = listener_files(config, "turn")
            if cert is not None and key is not None and (cert, key) != self.turn_pair:
                self.certificates.retarget(TURN_CERTIFICATE, cert, key)
                self.turn_pair = (cert, key)
        self.node.apply(relay, policy)
        self.config = config

    @property
    def ready(self) -> bool:
        return self.node.core is not None

    def stats(self) -> dict:
        return self.node.stats()

    def allocation_rows(self) -> tuple[list[dict], bool]:
        """This process's live allocations (RelayNode.allocation_rows) and whether more exist."""
        return self.node.allocation_rows()

    async def drain(self, drain_s: float, hurry: asyncio.Event) -> None:
        """Refuse new allocations and connections; return once none is left, after
        `drain_s`, or when `hurry` is set, whichever comes first."""
        self.node.begin_drain()
        loop = asyncio.get_running_loop()
        drained = loop.create_task(self.node.drained(drain_s))
        hurried = loop.create_task(hurry.wait())
        await asyncio.wait((drained, hurried), return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not drained.done():
            drained.cancel()
        left = len(self.node.core.table) if self.node.core else 0
        log.info("relay drained" if not left else f"drain over: closing {left} allocation(s)")

    async def stop(self) -> None:
        await self.node.stop()
