"""UdpRelayOpener out of file descriptors: None (the core answers 508), counted, nothing leaked.

The open-files limit is lowered in this process for the one call, to exactly
one descriptor more than are open, so an EVEN-PORT Allocate with the R bit
(two sockets) gets its first socket and not the second.
"""

from __future__ import annotations

import resource
import socket

from turn import stun
from turn.udp import UdpRelayOpener

from .turn_fakes import make_core


class NoLoop:
    def add_reader(self, fd, callback) -> None:
        pass

    def remove_reader(self, fd) -> None:
        pass


def lowest_free_fd() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return probe.fileno()


def test_an_opener_out_of_descriptors_gives_up_at_once_and_leaks_nothing():
    core, _ = make_core()
    opener = UdpRelayOpener(NoLoop(), lambda: core, {stun.FAMILY_IPV4: "127.0.0.1"}, (56000, 56999))
    free = lowest_free_fd()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free + 1, hard))
    try:
        opened = opener.open(stun.FAMILY_IPV4, True, True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert opened is None
    assert core.counters["relay_fd_exhausted"] == 1
    assert opener.in_use == set()
    assert lowest_free_fd() == free  # the first socket was closed
    opened = opener.open(stun.FAMILY_IPV4, True, True)
    assert opened is not None  # and the opener works once descriptors are back
    for port in opened:
        port.close()
