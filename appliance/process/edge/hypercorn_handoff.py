"""Edge connections routed to HTTP become Hypercorn connections of the signaling app.

Hypercorn serves connections it accepted itself; an edge connection arrives with its TLS
handshake done and maybe a few decrypted bytes already read. Hypercorn's connection
class (`TCPServer`, here the signaling's `GuardedTCPServer`) only needs a StreamReader
and a StreamWriter, so those are built around the edge's transport: the reader is fed
the bytes already read, and the writer reports the client the edge accepted (a PROXY
header's source, else the TCP peer) where Hypercorn and the guard look for it -- the
"socket" and "peername" extra infos -- so the ASGI scope's client and the per-address
caps name the real client. The TLS object comes from the transport, so the scheme is
https/wss and the ALPN protocol (h2 or http/1.1) picks Hypercorn's protocol.

The app is the one the http listener serves (its lifespan runs there), and the
connections go through the same ClientGuard: one set of caps, timeouts and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.typing import AppWrapper

from ratelog import RateLimitedLog
from signaling.hypercorn_guard import GuardedTCPServer, describe_failure

log = logging.getLogger("appliance.edge")

ABORTED_END_S = 1.0  # for a connection's task to end once its transport is aborted
_failures = RateLimitedLog(log, burst=3, interval_s=10.0)


@dataclass(frozen=True)
class ClientSocket:
    """What Hypercorn reads from a connection's socket (family, peer and local address),
    with the peer being the client the edge accepted rather than the TCP peer."""

    family: socket.AddressFamily
    peer: tuple[str, int]
    local: tuple[str, int]

    @classmethod
    def of(cls, client: tuple[str, int], local: tuple[str, int]) -> ClientSocket:
        family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
        return cls(family, (client[0], client[1]), (local[0], local[1]))

    def getpeername(self) -> tuple[str, int]:
        return self.peer

    def getsockname(self) -> tuple[str, int]:
        return self.local


class ClientReportingWriter(asyncio.StreamWriter):
    """A StreamWriter whose "socket" and "peername" are the edge's client (ClientSocket)."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: asyncio.StreamReaderProtocol,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
        client: ClientSocket,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self.client = client

    def get_extra_info(self, name: str, default=None):
        if name == "socket":
            return self.client
        if name == "peername":
            return self.client.getpeername()
        return super().get_extra_info(name, default)


class HypercornConnections:
    """The edge's HTTP connections: each a GuardedTCPServer task of the signaling app."""

    def __init__(self, app: AppWrapper, config: Config) -> None:
        self.app = app
        self.config = config
        # Hypercorn's per-worker state: `terminated` tells idle keep-alive connections to
        # close and answered requests to say "Connection: close" while the edge drains.
        self.context = WorkerContext(None)
        # Each connection's task and its transport, which stop() aborts if it outlives the
        # graceful timeout (a TLS close waits for the client's close_notify otherwise).
        self.connections: dict[asyncio.Task[None], asyncio.Transport] = {}

    def serve(self, transport: asyncio.Transport, initial: bytes, client: tuple[str, int]) -> None:
        """Serve `transport` (TLS done; `initial` is what was read from it already)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if initial:
            reader.feed_data(initial)
        local = transport.get_extra_info("sockname") or ("", 0)
        writer = ClientReportingWriter(transport, protocol, reader, loop, ClientSocket.of(client, local))
        server = GuardedTCPServer(self.app, loop, self.config, self.context, {}, reader, writer)
        task = loop.create_task(self._run(server, transport, client))
        self.connections[task] = transport
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.connections.pop(task, None)

    async def _run(self, server: GuardedTCPServer, transport: asyncio.Transport, client) -> None:
        try:
            await server.run()
        except Exception as exc:  # GuardedTCPServer catches Hypercorn's; this is the rest
            _failures.warning(
                asyncio.get_running_loop().time(),
                "edge HTTP connection from %r ended by an error: %s",
                client,
                describe_failure(exc),
            )
            transport.abort()

    async def begin_drain(self) -> None:
        """Close idle connections and end the others after their current request."""
        await self.context.terminated.set()

    async def stop(self, graceful_s: float) -> None:
        """Give the connections `graceful_s` to finish, then abort what is left (and cancel
        a task that still does not end: Hypercorn's close waits in a `finally`)."""
        if self.connections:
            await asyncio.wait(set(self.connections), timeout=graceful_s)
        left = dict(self.connections)
        for transport in left.values():
            transport.abort()
        if left:
            await asyncio.wait(set(left), timeout=ABORTED_END_S)
        for task in set(self.connections):
            task.cancel()
