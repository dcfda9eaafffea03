"""Hostile STUN over the wire to the running appliance: bytes crafted to hit an uncaught
exception must be answered (or dropped) like any bad request, leave no traceback in the
log, and never hold up another client's Binding."""

from __future__ import annotations

import os
import socket
import time

from turn import stun
from turn.client import ClientCredentials

from .conftest import REALM
from .test_credentials_admin import admin, metric_samples

FLOOD = 2000
# Each flood comes from its own loopback address: the relay's error replies are budgeted
# per source, and the session's `relay` is shared by every test speaking from 127.0.0.1.
CRAFTED_EXPIRY_SOURCE = "127.0.0.66"
UNAUTH_FLOOD_SOURCE = "127.0.0.77"
# The appliance's defaults (turn.unauth_replies_per_s, turn.unauth_reply_burst).
UNAUTH_REPLIES_PER_S = 20
UNAUTH_REPLY_BURST = 100
ALLOCATE_UDP = (stun.REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))


def request(method: int, *attributes: tuple[int, bytes], key: bytes | None = None) -> bytes:
    builder = stun.Builder(method, stun.REQUEST, os.urandom(12))
    for attr, value in attributes:
        builder.add(attr, value)
    return builder.encode(key)


def ask(sock: socket.socket, data: bytes, address) -> stun.Message | None:
    sock.sendto(data, address)
    try:
        return stun.parse(sock.recv(2048))
    except TimeoutError:
        return None


def test_a_crafted_username_expiry_is_a_401_not_a_crash(relay):
    address = (relay.host, relay.port)
    transport = (stun.REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bystander,
    ):
        attacker.bind((CRAFTED_EXPIRY_SOURCE, 0))
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
    assert samples[("appliance_relay_internal_errors_total", ())] == 0  # not even a caught bug


def drain(sock: socket.socket) -> list[stun.Message]:
    """Every datagram already queued on `sock`, parsed."""
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(stun.parse(sock.recv(2048)))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return got


def suppressed(relay) -> float:
    samples = metric_samples(admin(relay, "GET", "/metrics").text)
    return samples[("appliance_relay_unauth_replies_suppressed_total", ())]


def test_unauthenticated_allocates_from_one_source_get_a_bounded_number_of_401s(relay):
    # Each 28-byte Allocate would earn a ~100-byte 401: from a forged source, a reflector.
    address = (relay.host, relay.port)
    before = suppressed(relay)
    replies: list[stun.Message] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.bind((UNAUTH_FLOOD_SOURCE, 0))
        attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        attacker.settimeout(2)
        started = time.monotonic()
        for i in range(FLOOD):
            attacker.sendto(request(stun.ALLOCATE, ALLOCATE_UDP), address)
            if i % 20 == 19:
                time.sleep(0.001)  # paced: the relay's socket buffer drops nothing
                replies += drain(attacker)
        # A Binding is answered in order after the flood (success is never budgeted): when
        # it is back, the relay has handled every Allocate.
        sync = request(stun.BINDING)
        attacker.sendto(sync, address)
        while True:
            msg = stun.parse(attacker.recv(2048))
            if msg.cls == stun.SUCCESS and msg.transaction_id == stun.parse(sync).transaction_id:
                break
            replies.append(msg)
        elapsed = time.monotonic() - started
        replies += drain(attacker)
    assert all(stun.decode_error(m.get(stun.ERROR_CODE))[0] == 401 for m in replies)
    allowed = UNAUTH_REPLY_BURST + UNAUTH_REPLIES_PER_S * elapsed
    assert UNAUTH_REPLY_BURST <= len(replies) <= allowed + 2, (
        f"{len(replies)} 401s in {elapsed:.2f}s to one source"
    )
    assert suppressed(relay) - before == FLOOD - len(replies)

    # Another source is untouched: its Allocate is challenged, then succeeds.
    username, password = relay.credentials("legit")
    creds = ClientCredentials(username, REALM, stun.long_term_key(username, REALM, password))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as legit:
        legit.bind(("127.0.0.1", 0))
        legit.settimeout(2)
        challenge = ask(legit, creds.build(stun.ALLOCATE, [ALLOCATE_UDP]), address)
        assert challenge is not None and stun.decode_error(challenge.get(stun.ERROR_CODE))[0] == 401
        assert creds.should_retry(challenge)
        allocated = ask(legit, creds.build(stun.ALLOCATE, [ALLOCATE_UDP]), address)
        assert allocated is not None and allocated.cls == stun.SUCCESS
        deleted = ask(legit, creds.build(stun.REFRESH, [(stun.LIFETIME, bytes(4))]), address)
        assert deleted is not None and deleted.cls == stun.SUCCESS
