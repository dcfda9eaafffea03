"""Quotas and the own-relay exception over the wire, against the running appliance: a
user's quota holds over every relay process of the node and counts reserved ports; a
local socket that merely uses a port of the relay range is no peer."""

from __future__ import annotations

import os
import socket
import struct
import time

from turn import stun
from turn.client import ClientCredentials

from .conftest import REALM, start_appliance, stop_appliance
from .test_credentials_admin import admin, metric_samples

UDP = (stun.REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))
RESERVE_NEXT = (stun.EVEN_PORT, b"\x80")


class UdpTurnClient:
    """One client 5-tuple speaking TURN to the appliance with raw datagrams."""

    def __init__(self, relay, user: str, ttl_s: int = 3600) -> None:
        self.address = (relay.host, relay.port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2)
        username, password = relay.credentials(user, ttl_s)
        self.creds = ClientCredentials(username, REALM, stun.long_term_key(username, REALM, password))

    def request(self, method: int, *attrs) -> stun.Message:
        for _ in range(3):
            self.sock.sendto(self.creds.build(method, attrs), self.address)
            reply = stun.parse(self.sock.recv(2048))
            if not self.creds.should_retry(reply):
                return reply
        return reply

    def allocate(self, *extra) -> stun.Message:
        return self.request(stun.ALLOCATE, UDP, *extra)

    def close(self) -> None:
        self.sock.close()


def code(reply: stun.Message) -> int:
    raw = reply.get(stun.ERROR_CODE)
    return 0 if raw is None else stun.decode_error(raw)[0]


def peer(address):
    return (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(address, tid))


def relayed(reply: stun.Message):
    return stun.xor_address(reply.get(stun.XOR_RELAYED_ADDRESS), reply.transaction_id)


def wait_for_relay_processes(app, count: int, timeout_s: float = 15.0) -> None:
    """Until every relay process reports (a worker does once its listeners are bound)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = metric_samples(admin(app, "GET", "/metrics").text)
        if samples.get(("appliance_relay_processes", ())) == count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} relay processes did not report in {timeout_s} s")


def test_the_user_quota_holds_over_two_relay_processes_and_counts_reservations(tmp_path):
    app = start_appliance(tmp_path, {"user_quota": 10}, workers=2)
    wait_for_relay_processes(app, 2)
    clients = [UdpTurnClient(app, "mallory") for _ in range(16)]
    try:
        # Five allocations that each reserve the next port as well: ten counted.
        codes = [code(c.allocate(RESERVE_NEXT)) for c in clients[:5]]
        assert codes == [0] * 5
        # Counting per process, each of the two would have room for ten more; the node has none.
        # Sixteen source ports make it all but certain both processes were asked.
        assert [code(c.allocate()) for c in clients[5:]] == [486] * 11
        assert code(UdpTurnClient(app, "someone-else").allocate()) == 0
        # Deleting two allocations gives their room back, wherever they lived.
        for c in clients[:2]:
            assert code(c.request(stun.REFRESH, (stun.LIFETIME, struct.pack("!I", 0)))) == 0
        assert [code(c.allocate()) for c in clients[5:8]] == [0, 0, 486]
    finally:
        for c in clients:
            c.close()
        assert stop_appliance(app) == 0


def test_a_local_socket_in_the_relay_range_receives_nothing(tmp_path):
    # No allow_peers: loopback is denied, and reachable only as this relay's own address.
    app = start_appliance(tmp_path, {"allow_peers": [], "relay_ports": "40000-44999"})
    bystander = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    alice, bob = UdpTurnClient(app, "alice"), UdpTurnClient(app, "bob")
    try:
        for port in range(44999, 40000, -1):  # a port of the range nobody holds
            try:
                bystander.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        bystander.settimeout(0.5)
        target = bystander.getsockname()
        alice_relay = relayed(alice.allocate())
        bob_relay = relayed(bob.allocate())
        assert code(alice.request(stun.CREATE_PERMISSION, peer(target))) == 0  # the relay's IP
        assert code(bob.request(stun.CREATE_PERMISSION, peer(alice_relay))) == 0
        # The bystander's port is refused; bob's live relay port is a peer.
        assert (
            code(alice.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, b"\x40\x00\x00\x00"), peer(target)))
            == 403
        )
        assert (
            code(
                alice.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, b"\x40\x01\x00\x00"), peer(bob_relay))
            )
            == 0
        )
        for destination in (target, bob_relay):
            tid = os.urandom(12)
            send = stun.Builder(stun.SEND, stun.INDICATION, tid)
            send.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(destination, tid))
            send.add(stun.DATA_ATTR, b"through the relay")
            alice.sock.sendto(send.encode(), alice.address)
        data = stun.parse(bob.sock.recv(2048))
        assert data.method == stun.DATA and data.get(stun.DATA_ATTR) == b"through the relay"
        try:
            leaked = bystander.recv(2048)
        except TimeoutError:
            leaked = None
        assert leaked is None
    finally:
        for c in (alice, bob):
            c.close()
        bystander.close()
        assert stop_appliance(app) == 0
