"""Hostile STUN over the wire to the running appliance: bytes crafted to hit an uncaught
exception must be answered (or dropped) like any bad request, leave no traceback in the
log, and never hold up another client's Binding."""

from __future__ import annotations

import os
import socket

from turn import stun

from .test_credentials_admin import admin, metric_samples

FLOOD = 2000


def request(method: int, *attributes: tuple[int, bytes], key: bytes | None = None) -> bytes:
    builder = stun.Builder(method, stun.REQUEST, os.urandom(12))
    for attr, value in attributes:
        builder.add(attr, value)
    return builder.encode(key)


def ask(sock: socket.socket, data: bytes, address) -> stun.Message | None:
    sock.sendto(data, address)
    try:
        return stun.parse(sock.recv(2048))
    except socket.timeout:
        return None


def test_a_crafted_username_expiry_is_a_401_not_a_crash(relay):
    address = (relay.host, relay.port)
    transport = (stun.REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bystander:
        attacker.settimeout(2)
        bystander.settimeout(2)
        challenge = ask(attacker, request(stun.ALLOCATE, transport), address)
        nonce, realm = challenge.get(stun.NONCE), challenge.get(stun.REALM)
        # "²" passes str.isdigit() but not int(): no valid credential is needed to send it.
        crafted = [(stun.USERNAME, "²:x".encode()), (stun.REALM, realm), (stun.NONCE, nonce), transport]
        key = stun.long_term_key("²:x", realm.decode(), "guess")
        answer = ask(attacker, request(stun.ALLOCATE, *crafted, key=key), address)
        assert answer is not None and answer.cls == stun.ERROR, "the crafted Allocate went unanswered"
        assert stun.decode_error(answer.get(stun.ERROR_CODE))[0] == 401
        for _ in range(FLOOD):
            attacker.sendto(request(stun.ALLOCATE, *crafted, key=key), address)
        binding = ask(bystander, request(stun.BINDING), address)
        assert binding is not None and binding.cls == stun.SUCCESS
    assert "Traceback" not in relay.log()
    samples = metric_samples(admin(relay, "GET", "/metrics").text)
    assert samples[("appliance_relay_internal_errors_total", ())] == 0    # not even a caught bug
