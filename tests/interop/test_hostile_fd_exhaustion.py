"""Allocations until the relay runs out of file descriptors, against the real appliance.

The appliance's open-files limit is lowered (prlimit on its PID) to a few
descriptors above what it holds at idle; each UDP allocation takes one.  The
Allocate that finds no descriptor must be answered 508 (try another server),
counted apart from a full port range, and the relay must keep serving.
"""

from __future__ import annotations

import os
import resource
import socket

from turn import stun
from turn.client import ClientCredentials

from .conftest import REALM
from .test_credentials_admin import admin, metric_samples
from .test_hostile_stun import ask

SPARE_FDS = 4
MAX_ATTEMPTS = SPARE_FDS + 40


def request(sock, creds: ClientCredentials, address, method: int, attrs) -> stun.Message | None:
    reply = None
    for _ in range(2):
        reply = ask(sock, creds.build(method, attrs), address)
        if reply is None or not creds.should_retry(reply):
            return reply
    return reply


def error_code(reply: stun.Message) -> int | None:
    raw = reply.get(stun.ERROR_CODE)
    return None if raw is None else stun.decode_error(raw)[0]


def test_an_allocate_past_the_open_files_limit_is_answered_508(fresh_appliance):
    pid = fresh_appliance.proc.pid
    address = (fresh_appliance.host, fresh_appliance.port)
    highest_fd = max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (highest_fd + 1 + SPARE_FDS, hard))
    username, password = fresh_appliance.credentials("mallory")
    clients: list[tuple[socket.socket, ClientCredentials]] = []
    refused = None
    try:
        for _ in range(MAX_ATTEMPTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(2)
            creds = ClientCredentials(username, REALM, stun.long_term_key(username, REALM, password))
            clients.append((sock, creds))
            reply = request(
                sock, creds, address, stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")]
            )
            assert reply is not None, "an Allocate went unanswered"
            if reply.cls == stun.ERROR:
                refused = reply
                break
        assert refused is not None, f"{MAX_ATTEMPTS} allocations and no descriptor ran out"
        assert error_code(refused) == 508, f"answered {error_code(refused)}, not 508"
        assert len(clients) > 1  # the limit left room for some, as measured
        binding = ask(
            clients[0][0], stun.Builder(stun.BINDING, stun.REQUEST, os.urandom(12)).encode(), address
        )
        assert binding is not None and binding.cls == stun.SUCCESS
        # Give descriptors back, so the admin listener can take our /metrics connection.
        for sock, creds in clients[:-1]:
            reply = request(sock, creds, address, stun.REFRESH, [(stun.LIFETIME, b"\x00\x00\x00\x00")])
            assert reply is not None and reply.cls == stun.SUCCESS
        samples = metric_samples(admin(fresh_appliance, "GET", "/metrics").text)
    finally:
        for sock, _ in clients:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    assert samples[("appliance_relay_fd_exhausted_total", ())] == 1
    assert samples[("appliance_relay_ports_exhausted_total", ())] == 1
    assert samples[("appliance_relay_internal_errors_total", ())] == 0
    assert "Traceback" not in fresh_appliance.log()
