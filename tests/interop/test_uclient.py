"""coturn's turnutils_uclient (with -W: the TURN REST secret) against our relay,
relaying to coturn's turnutils_peer on loopback: zero loss and every packet counted."""

from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import require_program

MESSAGES = 60
CLIENTS = 2

CASES = {
    # id: (uclient flags, peer address, client sessions per -m)
    "udp-channels": ([], "127.0.0.1", 1),
    "udp-send-indications": (["-s"], "127.0.0.1", 1),
    "udp-ipv6-relay": (["-x"], "::1", 1),
    "udp-dont-fragment": (["-g"], "127.0.0.1", 1),
    "udp-client-to-client": (["-y"], "127.0.0.1", 2),
    "tcp-channels": (["-t"], "127.0.0.1", 1),
    "tcp-padded-channels": (["-t", "-D"], "127.0.0.1", 1),
    "tcp-send-indications": (["-t", "-s"], "127.0.0.1", 1),
    "tls-channels": (["-t", "-S"], "127.0.0.1", 1),
}


def run_uclient(
    relay,
    peer_port: int,
    flags: list[str],
    peer_ip: str,
    port: int | None = None,
    secret: str | None = None,
    messages: int = MESSAGES,
    user: str | None = "interop",
) -> str:
    program = require_program("turnutils_uclient")
    tls = "-S" in flags
    cmd = [
        program,
        *flags,
        "-W",
        secret or relay.secret,
        *(["-u", user] if user else []),
        "-p",
        str(port or (relay.tls_port if tls else relay.port)),
        "-e",
        peer_ip,
        "-r",
        str(peer_port),
        "-n",
        str(messages),
        "-m",
        str(CLIENTS),
        "-l",
        "180",
        "-z",
        "5",
        relay.host,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def totals(output: str) -> tuple[int, int, int]:
    sent_recv = re.findall(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    lost = re.findall(r"Total lost packets (\d+)", output)
    assert sent_recv and lost, f"uclient did not finish:\n{output[-2000:]}"
    return int(sent_recv[-1][0]), int(sent_recv[-1][1]), int(lost[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_uclient_relays_without_loss(relay, turn_peer, case):
    flags, peer_ip, sessions = CASES[case]
    output = run_uclient(relay, turn_peer, flags, peer_ip)
    sent, received, lost = totals(output)
    assert sent == MESSAGES * CLIENTS * sessions, output[-2000:]
    assert received == sent and lost == 0, output[-2000:]


def test_uclient_with_wrong_secret_is_refused(relay, turn_peer):
    output = run_uclient(relay, turn_peer, [], "127.0.0.1", secret="not-the-secret-at-all", messages=5)
    assert "Cannot complete Allocation" in output
    assert "credentials do not verify" in relay.log()


def test_uclient_to_denied_peer_is_refused(relay, turn_peer):
    # 192.0.2.1 (TEST-NET-1) is on the recommended deny list and not allowed.
    output = run_uclient(relay, turn_peer, [], "192.0.2.1", messages=5)
    assert "403" in output


def test_uclient_without_a_user_relays_with_a_bare_expiry_username(relay, turn_peer):
    # No -u: uclient's username is just "<expiry>", which coturn accepts under the REST scheme.
    output = run_uclient(relay, turn_peer, [], "127.0.0.1", user=None)
    sent, received, lost = totals(output)
    assert sent == MESSAGES * CLIENTS and received == sent and lost == 0, output[-2000:]
