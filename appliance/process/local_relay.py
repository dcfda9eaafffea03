"""The relay node of one process, the supervisor's or a relay worker's: built from the
configuration, fed the accepted secrets by the process's RingWatcher, with its TLS context
reloadable on SIGHUP, and drained on the way out."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from turn.ledger import LocalLedger, SharedLedger
from turn.node import ListenerBindError, RelayNode

from ..config.schema import AppConfig
from ..credentials.watcher import RingWatcher
from ..tls.files import TlsFiles
from ..tls.reload import CertificateReloader
from ..wiring.relay import needs_turn_certificate, node_settings, peer_policy, tls_context
from .listeners import ListenerError

log = logging.getLogger("appliance")


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
        f = files
        ctx = None
        if needs_turn_certificate(config) and f.turn_cert and f.turn_key:
            ctx = certificates.track(
                "turn tls", tls_context(f.turn_cert, f.turn_key), f.turn_cert, f.turn_key
            )
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
