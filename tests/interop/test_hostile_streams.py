"""Hostile TCP/TLS clients that never read, against the real appliance.

A client that floods requests and never reads what comes back, or an
allocation whose client stops reading while its peer keeps sending, must not
grow the relay's memory without bound (VmRSS of the appliance process, which
runs the relay when `workers` is 1), and must not hold up anyone else.  Each
test starts its own appliance so one flood's memory cannot blur another's.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time

import pytest

from turn import stun
from turn.client import ClientCredentials

from .conftest import REALM
from .test_credentials_admin import admin, metric_samples

FLOOD_BINDINGS = 400_000
# Before the fix 200k Bindings left 11-16 MB more resident and a never-reading TCP
# allocation kept every relayed byte; with it, a connection holds at most its
# output budget plus one read.  The bound leaves room for allocator noise.
RSS_GROWTH_BUDGET_KIB = 5 * 1024
PEER_DATAGRAMS = 30_000
PEER_PAYLOAD = 1000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def peak_growth_kib(pid: int, before: int, watch_s: float = 1.0) -> int:
    """The largest RSS growth seen over `watch_s` (the relay works through what it has read
    meanwhile); returns early once it is over budget."""
    peak = 0
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline and peak <= RSS_GROWTH_BUDGET_KIB:
        peak = max(peak, rss_kib(pid) - before)
        time.sleep(0.1)
    return peak


def never_reading(sock: socket.socket) -> socket.socket:
    # A tiny receive window: what the relay sends stays in the relay, not in our kernel.
    # A small send buffer too, so our kernel stops taking the flood soon after the relay's does.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    return sock


def connect_tls(relay) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(relay.cert))
    raw = never_reading(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    raw.settimeout(5)
    raw.connect((relay.host, relay.tls_port))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def push(sock: socket.socket, payload: bytes, stall_s: float = 0.5, limit_s: float = 10.0) -> int:
    """Send `payload` without ever reading; stop when the relay stops taking it (no progress
    for `stall_s`).  Returns how many bytes went out."""
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    last_progress = time.monotonic()
    deadline = last_progress + limit_s
    while sent < len(payload) and time.monotonic() < min(deadline, last_progress + stall_s):
        try:
            n = sock.send(view[sent : sent + 16384])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            time.sleep(0.005)
            continue
        sent += n
        last_progress = time.monotonic()
    return sent


def binding_flood(count: int) -> bytes:
    # Distinct ids for realism, repeated in blocks so building the flood stays cheap.
    block = b"".join(
        stun.Builder(stun.BINDING, stun.REQUEST, os.urandom(12)).encode(fingerprint=True) for _ in range(1000)
    )
    return block * (count // 1000)


def udp_binding_answered(relay) -> bool:
    tid = os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode(), (relay.host, relay.port))
        try:
            return stun.parse(sock.recv(2048)).transaction_id == tid
        except TimeoutError:
            return False


def read_stun(sock: socket.socket) -> stun.Message:
    header = recv_exactly(sock, 20)
    return stun.parse(header + recv_exactly(sock, struct.unpack_from("!H", header, 2)[0]))


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def tcp_binding_answered(relay) -> bool:
    tid = os.urandom(12)
    with socket.create_connection((relay.host, relay.port), timeout=2) as sock:
        sock.sendall(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode())
        try:
            return read_stun(sock).transaction_id == tid
        except (TimeoutError, ConnectionError):
            return False


def stream_request(sock: socket.socket, creds: ClientCredentials, method: int, attrs) -> stun.Message:
    for _ in range(2):
        sock.sendall(creds.build(method, attrs))
        reply = read_stun(sock)
        if not creds.should_retry(reply):
            return reply
    return reply


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_client_that_floods_bindings_and_never_reads_is_held_to_a_budget(fresh_appliance, transport):
    pid = fresh_appliance.proc.pid
    before = rss_kib(pid)
    if transport == "tls":
        attacker = connect_tls(fresh_appliance)
    else:
        attacker = never_reading(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        attacker.connect((fresh_appliance.host, fresh_appliance.port))
    try:
        flood = binding_flood(FLOOD_BINDINGS)
        sent = push(attacker, flood)
        assert udp_binding_answered(fresh_appliance), "a UDP Binding went unanswered during the flood"
        assert tcp_binding_answered(fresh_appliance), "a TCP Binding went unanswered during the flood"
        grown = peak_growth_kib(pid, before)
        assert grown <= RSS_GROWTH_BUDGET_KIB, (
            f"RSS grew {grown} KiB (from {before} KiB) after {sent} of {len(flood)} bytes"
        )
        # The relay stopped reading: the kernel's window pushed back on the attacker.
        assert sent < len(flood)
    finally:
        attacker.close()
    assert "Traceback" not in fresh_appliance.log()


@pytest.mark.parametrize("framing", ["channel", "indication"])
def test_an_allocation_whose_client_never_reads_drops_relayed_data(fresh_appliance, framing):
    pid = fresh_appliance.proc.pid
    username, password = fresh_appliance.credentials("mallory")
    creds = ClientCredentials(username, REALM, stun.long_term_key(username, REALM, password))
    client = never_reading(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    client.settimeout(5)
    client.connect((fresh_appliance.host, fresh_appliance.port))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    try:
        reply = stream_request(
            client, creds, stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")]
        )
        assert reply.cls == stun.SUCCESS
        relayed = stun.xor_address(reply.get(stun.XOR_RELAYED_ADDRESS), reply.transaction_id)
        peer_attr = (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(peer.getsockname(), tid))
        if framing == "channel":
            reply = stream_request(
                client,
                creds,
                stun.CHANNEL_BIND,
                [(stun.CHANNEL_NUMBER, struct.pack("!HH", 0x4000, 0)), peer_attr],
            )
        else:
            reply = stream_request(client, creds, stun.CREATE_PERMISSION, [peer_attr])
        assert reply.cls == stun.SUCCESS
        before = rss_kib(pid)
        payload = b"m" * PEER_PAYLOAD
        for i in range(PEER_DATAGRAMS):
            peer.sendto(payload, relayed)
            if i % 64 == 63:
                time.sleep(0.0005)  # at a pace the relay keeps up with: little lost in the kernel
        assert udp_binding_answered(fresh_appliance)
        grown = peak_growth_kib(pid, before)
        assert grown <= RSS_GROWTH_BUDGET_KIB, (
            f"RSS grew {grown} KiB (from {before} KiB) for {PEER_DATAGRAMS * PEER_PAYLOAD} bytes offered"
        )
        samples = metric_samples(admin(fresh_appliance, "GET", "/metrics").text)
        assert samples[("appliance_relay_stream_output_dropped_total", ())] > 0
    finally:
        client.close()
        peer.close()
    assert "Traceback" not in fresh_appliance.log()
