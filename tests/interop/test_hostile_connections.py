"""Hostile clients against the signaling's connection lifecycle (issue 14, items 1-3), over
the wire to the real appliance.

- Clients whose session the server ended (a refused CONNECT, a protocol error) and that
  keep sending: every such connection is closed, none stays in CLOSE-WAIT.
- WebSockets and SockJS sessions that never send CONNECT: closed at the deadline.
- One address opening too many connections, sessions, or sessions too fast: 429, counted;
  past the total cap 503, while TURN allocations and the admin listener keep working.
- A session that stops reading while another user floods it with large OFFERs: cut off
  within the send timeout (or at its outbox's byte budget), its memory given back.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
import urllib.request

import websocket

from turn import stun
from turn.client import ClientCredentials

from .conftest import REALM, start_appliance, stop_appliance
from .test_credentials_admin import admin, metric_samples

CONNECT = "CONNECT\naccept-version:1.1,1.2\nide:{token}\nheart-beat:0,0\n\n\x00"
TCP_CLOSE_WAIT = "08"
# Caps off for loopback is the default (a local reverse proxy); these tests are the
# clients themselves, on 127.0.0.x.
NO_EXEMPTION = {"per_ip_exempt": []}


# ---------------------------------------------------------------- observing the appliance


def server_sockets(port: int) -> list[tuple[str, str]]:
    """(state, remote address) of every TCP socket whose local port is `port` (the
    appliance's side of its signaling connections), from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == port:
                    found.append((state, remote))
    return found


def close_wait_count(port: int) -> int:
    return sum(1 for state, _ in server_sockets(port) if state == TCP_CLOSE_WAIT)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_until(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def metrics(relay) -> dict:
    response = admin(relay, "GET", "/metrics")
    assert response.status_code == 200
    return metric_samples(response.text)


def refused(samples: dict, reason: str) -> float:
    return samples.get(("appliance_signaling_refused_total", (("reason", reason),)), 0)


# ---------------------------------------------------------------- hostile clients


def raw_ws(
    relay,
    path: str = "/imserver/ws?userId=alice",
    source: str = "127.0.0.1",
    rcvbuf: int | None = None,
    timeout: float = 5,
):
    """A WebSocket from `source` (any 127.0.0.x), optionally with a tiny receive buffer;
    STOMP's subprotocol on the native endpoint, none on SockJS's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", relay.http_port))
    subprotocols = None if "/websocket" in path else ["v12.stomp"]
    return websocket.create_connection(
        f"ws://127.0.0.1:{relay.http_port}{path}", socket=sock, subprotocols=subprotocols, timeout=timeout
    )


def handshake_status(relay, path: str = "/imserver/ws?userId=alice", source: str = "127.0.0.1"):
    """101 if the WebSocket handshake succeeds (the socket then stays open, returned), else
    the HTTP status of the refusal."""
    try:
        return 101, raw_ws(relay, path, source)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code, None


def http_status(relay, method: str, path: str, source: str = "127.0.0.1") -> int:
    """Status of one HTTP request made from `source` (raw socket, Connection: close)."""
    with socket.create_connection(
        ("127.0.0.1", relay.http_port), timeout=5, source_address=(source, 0)
    ) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def drain_and_close(ws) -> None:
    """Read whatever the server sent, then close with a FIN (unread data would make it an
    RST, which frees the server's socket whatever the server does)."""
    sock = ws.sock
    sock.settimeout(0.2)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()


def ended_but_still_sending(relay, index: int) -> None:
    """A session the server ends (a refused CONNECT, or garbage): the client reads the
    ERROR, sends 60 more messages, then closes its side."""
    ws = raw_ws(relay)
    ws.send(CONNECT.format(token="not-a-token") if index % 2 else "GARBAGE\n\n\x00")
    assert ws.recv().startswith("ERROR\n")
    try:
        for _ in range(60):
            ws.send('SEND\ndestination:/app/user/status\n\n["bob"]\x00')
    except (websocket.WebSocketException, OSError):
        pass  # the server may already have hung up
    drain_and_close(ws)


# ---------------------------------------------------------------- item 1: CLOSE-WAIT


def test_sessions_ended_by_the_server_while_the_client_keeps_sending_leave_no_close_wait(tmp_path):
    relay = start_appliance(tmp_path / "a")
    try:
        baseline = open_fds(relay.proc.pid)
        for i in range(20):
            ended_but_still_sending(relay, i)
        settled = wait_until(
            lambda: close_wait_count(relay.http_port) == 0 and open_fds(relay.proc.pid) <= baseline + 2,
            timeout=15,
        )
        assert settled, (
            f"{close_wait_count(relay.http_port)} connections in CLOSE-WAIT, "
            f"{open_fds(relay.proc.pid) - baseline} descriptors more than before"
        )
        # The server still serves.
        ws = raw_ws(relay)
        ws.send(CONNECT.format(token="tok-alice"))
        assert ws.recv().startswith("CONNECTED\n")
        ws.close()
    finally:
        assert stop_appliance(relay) == 0
    assert "stuck" not in relay.log() and "Traceback" not in relay.log(), relay.log()[-3000:]


# ---------------------------------------------------------------- item 2: no CONNECT, caps


def expect_error_then_close(ws, fragment: str) -> None:
    message = ws.recv()
    assert message.startswith("ERROR\n") and fragment in message, message
    for _ in range(3):
        try:
            if ws.recv() in ("", None):
                return
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return
    raise AssertionError("the connection stayed open after the ERROR")


def open_server_sockets(port: int) -> int:
    """The appliance's signaling connections it has not closed: ESTABLISHED or CLOSE-WAIT
    (a FIN-WAIT or TIME-WAIT socket is closed on its side: it holds no descriptor)."""
    return sum(1 for state, _ in server_sockets(port) if state in ("01", TCP_CLOSE_WAIT))


def test_websockets_and_sockjs_sessions_that_never_connect_are_closed_at_the_deadline(tmp_path):
    relay = start_appliance(tmp_path / "a", stomp={"connect_timeout_s": 1})
    try:
        baseline = open_fds(relay.proc.pid)
        started = time.monotonic()
        idle = [raw_ws(relay, timeout=8) for _ in range(50)]
        sockjs_ws = raw_ws(relay, "/imserver/ws/000/idle1/websocket?userId=alice", timeout=8)
        assert sockjs_ws.recv() == "o"
        xhr = f"http://127.0.0.1:{relay.http_port}/imserver/ws/000/idle2/xhr?userId=alice"

        def poll() -> str:
            with urllib.request.urlopen(
                urllib.request.Request(xhr, data=b"", method="POST"), timeout=8
            ) as response:
                return response.read().decode()

        assert poll() == "o\n"
        for ws in idle:
            expect_error_then_close(ws, "no CONNECT within 1 s")
        frame = sockjs_ws.recv()
        assert frame.startswith('a["ERROR') and "no CONNECT" in frame, frame
        assert sockjs_ws.recv() == 'c[3000,"Go away!"]'
        frame = poll()  # the polling session got the same, in order
        assert frame.startswith('a["ERROR') and "no CONNECT" in frame, frame
        assert poll() == 'c[3000,"Go away!"]\n'
        elapsed = time.monotonic() - started
        assert wait_until(
            lambda: open_server_sockets(relay.http_port) == 0 and open_fds(relay.proc.pid) <= baseline + 2,
            timeout=10,
        ), (server_sockets(relay.http_port), open_fds(relay.proc.pid) - baseline)
        assert metrics(relay)[("appliance_signaling_connect_timeouts_total", ())] >= 52
    finally:
        assert stop_appliance(relay) == 0
    print(f"\n52 sessions without CONNECT (deadline 1 s) closed within {elapsed:.1f} s")


CAPPED = {
    **NO_EXEMPTION,
    "connect_timeout_s": 30,
    "max_connections_per_ip": 6,
    "max_sessions_per_ip": 3,
    "new_sessions_per_ip_per_s": 100,
    "new_session_burst": 100,
}


def test_per_address_caps_on_sessions_and_connections_answer_429_and_are_counted(tmp_path):
    relay = start_appliance(tmp_path / "a", stomp=CAPPED)
    held = []
    try:
        # Sessions, from 127.0.0.2: three WebSockets; a fourth, and a new SockJS session, 429.
        for _ in range(3):
            status, ws = handshake_status(relay, source="127.0.0.2")
            assert status == 101
            held.append(ws)
        assert handshake_status(relay, source="127.0.0.2")[0] == 429
        assert http_status(relay, "POST", "/imserver/ws/000/capped1/xhr", "127.0.0.2") == 429
        assert handshake_status(relay, "/imserver/ws/000/capped2/websocket", source="127.0.0.2")[0] == 429
        # Another address is not affected.
        status, other = handshake_status(relay, source="127.0.0.3")
        assert status == 101
        held.append(other)
        # One session of 127.0.0.2 ends: it may open one again.
        held.pop(0).close()
        assert wait_until(lambda: _opened(relay, "127.0.0.2", held), timeout=5)

        # Connections, from 127.0.0.4: six idle ones held, the seventh answered 429 at once.
        idle = [
            socket.create_connection(
                ("127.0.0.1", relay.http_port), timeout=5, source_address=("127.0.0.4", 0)
            )
            for _ in range(6)
        ]
        held.extend(idle)
        assert http_status(relay, "GET", "/imserver/ws/info", "127.0.0.4") == 429
        assert http_status(relay, "GET", "/imserver/ws/info", "127.0.0.5") == 200
        samples = metrics(relay)
        assert refused(samples, "sessions_per_ip") == 3
        assert refused(samples, "connections_per_ip") == 1
    finally:
        for item in held:
            item.close()
        assert stop_appliance(relay) == 0


def _opened(relay, source: str, held: list) -> bool:
    status, ws = handshake_status(relay, source=source)
    if ws is not None:
        held.append(ws)
    return status == 101


def test_new_sessions_per_second_from_one_address_are_capped_at_the_burst(tmp_path):
    relay = start_appliance(
        tmp_path / "a", stomp={**NO_EXEMPTION, "new_sessions_per_ip_per_s": 1, "new_session_burst": 5}
    )
    held = []
    try:
        statuses = []
        for i in range(8):  # SockJS and WebSocket sessions draw on one bucket
            if i % 2:
                statuses.append(http_status(relay, "POST", f"/imserver/ws/000/rate{i}/xhr", "127.0.0.6"))
            else:
                status, ws = handshake_status(relay, source="127.0.0.6")
                statuses.append(200 if status == 101 else status)
                if ws is not None:
                    held.append(ws)
        assert statuses.count(429) >= 2 and statuses[:5] == [200] * 5, statuses
        time.sleep(1.2)  # a second refills one
        assert handshake_status(relay, source="127.0.0.6")[0] == 101
        assert refused(metrics(relay), "session_rate") == statuses.count(429)
    finally:
        for ws in held:
            ws.close()
        assert stop_appliance(relay) == 0


def allocate(relay, user: str) -> int | None:
    """A TURN Allocate over UDP: 200, the error code, or None if unanswered."""
    username, password = relay.credentials(user)
    creds = ClientCredentials(username, REALM, stun.long_term_key(username, REALM, password))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for _ in range(2):
            sock.sendto(
                creds.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")]),
                (relay.host, relay.port),
            )
            try:
                reply = stun.parse(sock.recv(2048))
            except TimeoutError:
                return None
            if not creds.should_retry(reply):
                break
    if reply.cls == stun.SUCCESS:
        return 200
    return stun.decode_error(reply.get(stun.ERROR_CODE))[0]


def test_past_the_total_cap_connections_get_503_and_the_relay_and_admin_keep_working(tmp_path):
    relay = start_appliance(tmp_path / "a", stomp={"connect_timeout_s": 60})
    pid = relay.proc.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # 300 descriptors: the signaling may hold 300 // 2 - 64 = 86 connections, the rest is the
    # relay's and the admin listener's.  Loopback is exempt from the per-address caps (the
    # default), so only the total stands in the way.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (300, hard))
    held, statuses = [], []
    try:
        for _ in range(300):  # without the cap: descriptors run out
            try:
                status, ws = handshake_status(relay)
            except (websocket.WebSocketException, OSError) as exc:
                raise AssertionError(f"handshake {len(held) + 1} failed: {exc!r}") from None
            statuses.append(status)
            if ws is None:
                break
            held.append(ws)
        assert statuses[-1] == 503, f"{len(held)} WebSockets and no refusal"
        assert 60 <= len(held) <= 86, len(held)
        assert http_status(relay, "GET", "/imserver/ws/info") == 503
        for i in range(20):  # the relay keeps its descriptors
            assert allocate(relay, f"user{i}") == 200, f"Allocate {i} refused or unanswered"
        assert admin(relay, "GET", "/healthz").status_code == 200
        assert refused(metrics(relay), "connections") >= 2
        held.pop().close()  # room again for one
        assert wait_until(lambda: _opened(relay, "127.0.0.1", held), timeout=5)
    finally:
        for ws in held:
            ws.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        assert stop_appliance(relay) == 0
    print(f"\nRLIMIT_NOFILE 300: {len(held)} WebSockets held, then 503; relay and admin served")


# ---------------------------------------------------------------- item 3: slow consumers


def stomp_send(destination: str, body: dict) -> str:
    text = json.dumps(body)
    return f"SEND\ndestination:{destination}\ncontent-length:{len(text.encode())}\n\n{text}\x00"


def stomp_client(relay, user: str, subscriptions: list[str], rcvbuf: int | None = None):
    ws = raw_ws(relay, f"/imserver/ws?userId={user}", rcvbuf=rcvbuf)
    ws.send(CONNECT.format(token=f"tok-{user}"))
    assert ws.recv().startswith("CONNECTED\n")
    for i, destination in enumerate(subscriptions):
        ws.send(f"SUBSCRIBE\nid:s{i}\ndestination:{destination}\n\n\x00")
    return ws


def peer_port_hex(ws) -> str:
    return f"{ws.sock.getsockname()[1]:04X}"


def connection_open(relay, ws) -> bool:
    """The appliance still holds its side of `ws` (not closed, or not yet)."""
    port = peer_port_hex(ws)
    return any(
        remote.endswith(":" + port) and state in ("01", TCP_CLOSE_WAIT)
        for state, remote in server_sockets(relay.http_port)
    )


def silent_callee_under_an_offer_flood(
    relay, offers: int, payload_bytes: int, senders: int = 4, call_id: str = "flood"
) -> dict:
    """Bob answers a call from one session, then stops reading it (a 4 KiB receive buffer);
    Alice sends `offers` OFFERs of `payload_bytes` each, spread over `senders` sessions (each
    within its own SEND budget).  Returns the appliance's RSS (MB) before, at its peak and
    after the flood, and how long after the flood's end Bob's connection was closed (None:
    not within 20 s)."""
    pid = relay.proc.pid
    bob = stomp_client(relay, "bob", ["/user/queue/call/request", "/user/queue/rtc/signaling"], rcvbuf=4096)
    alices = [stomp_client(relay, "alice", ["/user/queue/call/response"]) for _ in range(senders)]
    figures = {}
    try:
        alices[0].send(
            stomp_send(
                "/app/call/request",
                {
                    "callId": call_id,
                    "type": "VIDEO",
                    "callee": "bob",
                    "callerUserName": "A",
                    "calleeUserName": "B",
                },
            )
        )
        assert "call/request" in bob.recv()
        bob.send(stomp_send("/app/call/response", {"callId": call_id, "type": "ACCEPT"}))
        assert "ACCEPT" in alices[0].recv()
        figures["before"] = rss_mb(pid)
        offer = stomp_send(
            "/app/rtc/signaling", {"callId": call_id, "type": "OFFER", "payload": "v" * payload_bytes}
        )
        peak = [figures["before"]]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak.append(rss_mb(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for i in range(offers):
                alices[i % senders].send(offer)
        finally:
            flood_end = time.monotonic()
            closed = wait_until(lambda: not connection_open(relay, bob), timeout=20, step=0.05)
            figures["closed_after_s"] = time.monotonic() - flood_end if closed else None
            time.sleep(1.0)
            sampling.set()
            sampler.join()
        figures["peak"] = max(peak)
        figures["after"] = rss_mb(pid)
        return figures
    finally:
        bob.sock.close()
        for alice in alices:
            alice.close()


def test_a_callee_that_stops_reading_under_an_offer_flood_is_cut_off_at_its_outbox_budget(tmp_path):
    # Defaults: a 1 MiB outbox.  600 OFFERs of 60 KB (36 MB) for a session that reads nothing.
    relay = start_appliance(tmp_path / "a")
    try:
        figures = silent_callee_under_an_offer_flood(relay, offers=600, payload_bytes=60000)
        samples = metrics(relay)
    finally:
        assert stop_appliance(relay) == 0
    print(
        f"\noutbox budget: RSS {figures['before']:.1f} MB before, {figures['peak']:.1f} MB at "
        f"the peak, {figures['after']:.1f} MB after; closed {figures['closed_after_s']} s "
        f"after the flood"
    )
    assert figures["closed_after_s"] is not None, "the silent session was never closed"
    assert figures["closed_after_s"] < 10  # within stomp.send_timeout_s
    assert figures["peak"] - figures["before"] < 20, figures  # the flood was 36 MB
    assert figures["after"] - figures["before"] < 12, figures
    assert samples[("appliance_signaling_slow_consumers_total", ())] == 1
    assert samples[("appliance_signaling_connections_aborted_total", (("reason", "overflow"),))] == 1


def test_a_send_stalled_past_the_send_timeout_aborts_the_connection_and_frees_its_output(tmp_path):
    # An outbox budget too large to matter: the send timeout alone cuts the session off.
    relay = start_appliance(
        tmp_path / "a",
        stomp={"send_timeout_s": 2, "max_outbox": 100000, "max_outbox_bytes": 64 * 1024 * 1024},
    )
    rounds = []
    try:
        for i in range(2):
            figures = silent_callee_under_an_offer_flood(
                relay, offers=400, payload_bytes=60000, call_id=f"stall{i}"
            )
            rounds.append(figures)
            assert figures["closed_after_s"] is not None, "the stalled session was never closed"
            assert figures["closed_after_s"] < 2 + 5, figures
        samples = metrics(relay)
    finally:
        assert stop_appliance(relay) == 0
    print(f"\nsend timeout 2 s: {rounds}")
    # What the first session held was given back: the second flood reuses it.
    assert rounds[1]["after"] - rounds[0]["after"] < 10, rounds
    assert samples[("appliance_signaling_connections_aborted_total", (("reason", "send_timeout"),))] == 2


def test_a_sockjs_session_that_stops_polling_under_a_flood_is_cut_off_at_its_budget(tmp_path):
    relay = start_appliance(tmp_path / "a")
    base = f"http://127.0.0.1:{relay.http_port}/imserver/ws/000/quiet1"

    def post(transport: str, messages: list[str] | None = None) -> str:
        data = b"" if messages is None else json.dumps(messages).encode()
        request = urllib.request.Request(f"{base}/{transport}?userId=bob", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=8) as response:
            return response.read().decode()

    alices = []
    try:
        assert post("xhr") == "o\n"
        post(
            "xhr_send",
            [
                CONNECT.format(token="tok-bob"),
                "SUBSCRIBE\nid:r\ndestination:/user/queue/call/request\n\n\x00",
                "SUBSCRIBE\nid:s\ndestination:/user/queue/rtc/signaling\n\n\x00",
            ],
        )
        assert "CONNECTED" in post("xhr")
        alices = [stomp_client(relay, "alice", ["/user/queue/call/response"]) for _ in range(4)]
        alices[0].send(
            stomp_send(
                "/app/call/request",
                {
                    "callId": "quiet",
                    "type": "VIDEO",
                    "callee": "bob",
                    "callerUserName": "A",
                    "calleeUserName": "B",
                },
            )
        )
        assert "call/request" in post("xhr")
        post("xhr_send", [stomp_send("/app/call/response", {"callId": "quiet", "type": "ACCEPT"})])
        assert "ACCEPT" in alices[0].recv()
        before = peak = rss_mb(relay.proc.pid)
        offer = stomp_send("/app/rtc/signaling", {"callId": "quiet", "type": "OFFER", "payload": "v" * 60000})
        for i in range(600):  # 36 MB for a session nobody polls
            alices[i % 4].send(offer)
            if i % 50 == 0:
                peak = max(peak, rss_mb(relay.proc.pid))
        peak = max(peak, rss_mb(relay.proc.pid))
        frame = post("xhr")  # the next poll: the ERROR, then the close
        assert frame.startswith('a["ERROR') and "slow consumer" in frame, frame[:200]
        assert post("xhr") == 'c[3000,"Go away!"]\n'
    finally:
        for alice in alices:
            alice.close()
        assert stop_appliance(relay) == 0
    print(f"\nSockJS session not polled: RSS {before:.1f} MB before, {peak:.1f} MB at the peak")
    assert peak - before < 20, (before, peak)
