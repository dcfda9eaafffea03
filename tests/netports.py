"""Loopback ports for test servers.

Chosen below Linux's ephemeral range (32768-60999), so an outgoing connection
of another test cannot be holding the port between the check and the bind,
and free for both UDP and TCP (the relay listens on both at one number).
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32000


def free_port_pair() -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(LOW, HIGH)
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            ):
                udp.bind(("127.0.0.1", port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair below the ephemeral range")


def distinct_port_pairs(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port_pair()
        if port not in ports:
            ports.append(port)
    return ports
