"""Bandwidth caps over the wire, against the running appliance: a client and a peer
that blast several times the cap through one allocation get about the cap each way
(cap x time + the 0.2 s burst, within 10%, and not far below it), a user's
allocations share the user's cap, and what is dropped shows in /metrics."""

from __future__ import annotations

import select
import socket
import struct
import time

from turn import stun

from .conftest import start_appliance, stop_appliance
from .test_credentials_admin import admin, metric_samples
from .test_relay_quotas import UdpTurnClient, code, peer, relayed

CAP_BPS = 1_000_000  # 125 000 bytes/s each way
CAP_BYTES_S = CAP_BPS / 8
BURST_BYTES = CAP_BYTES_S * 0.2  # turn/bandwidth.py BURST_S
OFFERED_X = 6  # the blast, in multiples of the cap
BLAST_S = 2.5
PAYLOAD = 1000


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    return sock


def bound_client(app, user: str, number: int, peer_sock: socket.socket):
    """A UDP allocation of `user` with channel `number` bound to the peer; its relayed address."""
    client = UdpTurnClient(app, user)
    reply = client.allocate()
    assert code(reply) == 0
    assert (
        code(
            client.request(
                stun.CHANNEL_BIND,
                (stun.CHANNEL_NUMBER, struct.pack("!HH", number, 0)),
                peer(peer_sock.getsockname()),
            )
        )
        == 0
    )
    client.sock.setblocking(False)
    return client, relayed(reply)


def blast(
    senders: list[tuple[socket.socket, bytes, tuple]],
    receivers: dict[str, tuple[socket.socket, int]],
    seconds: float,
    packets_per_s: float,
) -> tuple[dict[str, int], float]:
    """Each sender sends its datagram `packets_per_s` times a second for `seconds`, while
    every receiver (socket, header bytes to discount) is drained; payload bytes received
    per receiver, and the seconds from the first send to the last datagram received."""
    for sock, _, _ in senders:
        sock.setblocking(False)
    received = {name: 0 for name in receivers}
    by_fd = {sock.fileno(): (name, header) for name, (sock, header) in receivers.items()}
    sockets = [sock for sock, _ in receivers.values()]
    start = last = time.monotonic()
    sent = 0
    quiet_until = start + seconds + 0.5
    while (now := time.monotonic()) < quiet_until:
        due = int(min(now - start, seconds) * packets_per_s)
        while sent < due:
            for sock, data, destination in senders:
                try:
                    sock.sendto(data, destination)
                except BlockingIOError:
                    pass  # a full send buffer loses it, as the network would
            sent += 1
        readable, _, _ = select.select(sockets, [], [], 0.002)
        for sock in readable:
            name, header = by_fd[sock.fileno()]
            while True:
                try:
                    data = sock.recv(70000)
                except BlockingIOError:
                    break
                received[name] += len(data) - header
                last = time.monotonic()
    return received, max(last, start + seconds) - start


def assert_about_the_cap(received: int, elapsed: float) -> None:
    allowed = CAP_BYTES_S * elapsed + BURST_BYTES
    assert received <= 1.1 * allowed, f"{received} bytes in {elapsed:.2f} s, cap {allowed:.0f}"
    assert received >= 0.7 * CAP_BYTES_S * elapsed, f"{received} bytes in {elapsed:.2f} s"


def dropped(app) -> dict[str, float]:
    samples = metric_samples(admin(app, "GET", "/metrics").text)
    return {
        direction: samples.get(
            ("appliance_relay_bandwidth_dropped_packets_total", (("direction", direction),)), 0
        )
        for direction in ("to_peer", "to_client")
    }


def test_an_allocation_gets_its_cap_each_way_and_the_excess_is_dropped(tmp_path):
    app = start_appliance(tmp_path, {"max_bps": CAP_BPS, "allow_peers": ["127.0.0.0/8"]})
    peer_sock = udp_socket()
    client, relay_address = bound_client(app, "mallory", 0x4000, peer_sock)
    try:
        payload = bytes(PAYLOAD)
        received, elapsed = blast(
            [
                (client.sock, struct.pack("!HH", 0x4000, PAYLOAD) + payload, client.address),
                (peer_sock, payload, relay_address),
            ],
            {"peer": (peer_sock, 0), "client": (client.sock, 4)},
            BLAST_S,
            OFFERED_X * CAP_BYTES_S / PAYLOAD,
        )
        assert_about_the_cap(received["peer"], elapsed)
        assert_about_the_cap(received["client"], elapsed)
        counts = dropped(app)
        # Offered about 6x the cap: most of it was dropped, each way.
        offered = OFFERED_X * CAP_BYTES_S * BLAST_S / PAYLOAD
        assert counts["to_peer"] >= offered / 2 and counts["to_client"] >= offered / 2, counts
    finally:
        client.close()
        peer_sock.close()
        assert stop_appliance(app) == 0
    assert "Traceback" not in app.log()


def test_a_users_allocations_share_the_user_cap(tmp_path):
    app = start_appliance(tmp_path, {"user_max_bps": CAP_BPS, "allow_peers": ["127.0.0.0/8"]})
    peer_sock = udp_socket()
    clients = [bound_client(app, "mallory", 0x4000 + i, peer_sock) for i in range(2)]
    try:
        payload = bytes(PAYLOAD)
        senders, receivers = [], {"peer": (peer_sock, 0)}
        for i, (client, relay_address) in enumerate(clients):
            senders.append((client.sock, struct.pack("!HH", 0x4000 + i, PAYLOAD) + payload, client.address))
            senders.append((peer_sock, payload, relay_address))
            receivers[f"client{i}"] = (client.sock, 4)
        # Each allocation offers 3x the user's cap each way: 6x together.
        received, elapsed = blast(senders, receivers, BLAST_S, OFFERED_X / 2 * CAP_BYTES_S / PAYLOAD)
        assert_about_the_cap(received["peer"], elapsed)
        assert_about_the_cap(received["client0"] + received["client1"], elapsed)
        counts = dropped(app)
        assert counts["to_peer"] > 0 and counts["to_client"] > 0, counts
    finally:
        for client, _ in clients:
            client.close()
        peer_sock.close()
        assert stop_appliance(app) == 0
    assert "Traceback" not in app.log()
