"""Binding the appliance's listeners, and what the operator reads when one cannot bind.

A listener that cannot bind stops the start like a configuration error (exit 2), naming
its configuration key and address: the operator then knows which line to change or which
other server to stop, where a bare "Address already in use" says neither.
"""

from __future__ import annotations

import errno
import socket

from ..config.schema import HostPort, TurnConfig


def _family(address: HostPort) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address.host else socket.AF_INET


def _reason(key: str, address: HostPort, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        holder = "another TURN server such as coturn.service" if key.startswith("turn.") else "another server"
        return f"address already in use ({holder} may hold it; set {key} or stop it)"
    if exc.errno == errno.EACCES:
        return (
            f"permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE; "
            f"set {key} to a higher port or grant the capability)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        wildcard = "::" if _family(address) == socket.AF_INET6 else "0.0.0.0"
        return (
            f"cannot assign requested address ({address.host} is not an address of this "
            f"host; set {key} to one that is, or to {wildcard})"
        )
    return exc.strerror or str(exc)


class ListenerError(Exception):
    """The listener configured at `key` could not bind `address`."""

    def __init__(self, key: str, address: HostPort, exc: OSError) -> None:
        super().__init__(f"{key} {address}: {_reason(key, address, exc)}")
        self.key = key
        self.address = address


def _bound(key: str, address: HostPort, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(_family(address), kind)
    try:
        if kind == socket.SOCK_STREAM:
            # As every TCP listener of ours: a connection of an earlier run in TIME_WAIT
            # holds nothing.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise ListenerError(key, address, exc) from exc
    return sock


def check_unshared(key: str, address: HostPort, kind: socket.SocketKind) -> None:
    """Raise ListenerError if any socket already holds `address`.

    With turn.workers > 1 the relay binds with SO_REUSEPORT, and the kernel lets such a
    bind join a socket of another process of the same user that set it too (a second
    appliance with workers, a coturn run as the same user): the two would silently share
    the clients.  A bind without SO_REUSEPORT is refused then, so the main process tries
    one before the relay's own.
    """
    _bound(key, address, kind).close()


def check_relay_unshared(turn: TurnConfig) -> None:
    """check_unshared for every relay listener: what the supervisor does before its relay
    binds, when relay workers will join the ports."""
    for transport, address, kind in (
        ("udp", turn.udp, socket.SOCK_DGRAM),
        ("tcp", turn.tcp, socket.SOCK_STREAM),
        ("tls", turn.tls, socket.SOCK_STREAM),
    ):
        if address is not None:
            check_unshared(f"turn.{transport}", address, kind)


def hypercorn_bind(key: str, address: HostPort) -> str:
    """Bind `address` for Hypercorn and return the `bind` entry that hands it the socket.

    Hypercorn binds only once its serving task runs, and its failure then comes back
    without saying which listener; worse, a server already listening there would answer
    the readiness check (supervisor.wait_listening) in its place.  Binding here fails at
    once, with the key.
    """
    sock = _bound(key, address, socket.SOCK_STREAM)
    return f"fd://{sock.detach()}"  # Hypercorn owns the descriptor from here on
