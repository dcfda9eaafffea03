"""Hostile web pages and SockJS clients against the real appliance (issue 14, item 7).

- A page of another origin: its WebSocket handshake (native and SockJS) is refused with 403
  before it is accepted, its SockJS requests get 403 and no CORS headers; the appliance's own
  origin and the listed ones are served (their origin echoed, never "*"); programs that send
  no Origin are served as before.
- Someone who learnt a SockJS session's URL, from another address: refused (404), counted,
  and the session's owner still gets its messages.
- An xhr_send body of 16 MB: answered 413 while it is being sent, read to its end without a
  reset, and never held in memory (the server's RSS barely moves).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import websocket

from .conftest import start_appliance, stop_appliance
from .test_credentials_admin import admin, metric_samples
from .test_hostile_connections import rss_mb

CONNECT = "CONNECT\naccept-version:1.1,1.2\nide:{token}\nheart-beat:0,0\n\n\x00"
STATUS_SUBSCRIBE = "SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00"
EVIL = "https://evil.example"
APP = "https://app.example.com"


# ---------------------------------------------------------------- raw clients


def http(
    relay, method: str, path: str, headers: dict | None = None, body: bytes = b"", source: str = "127.0.0.1"
) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request from `source`: (status, headers in lower case, body)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{relay.http_port}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection(
        ("127.0.0.1", relay.http_port), timeout=10, source_address=(source, 0)
    ) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def ws_status(relay, path: str, origin: str | None):
    """101 and the open WebSocket, or the status of the refused handshake."""
    options = {"suppress_origin": True} if origin is None else {"origin": origin}
    try:
        return 101, websocket.create_connection(
            f"ws://127.0.0.1:{relay.http_port}{path}", timeout=5, **options
        )
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code, None


def status_query(user: str) -> str:
    body = json.dumps([user])
    return f"SEND\ndestination:/app/user/status\ncontent-length:{len(body)}\n\n{body}\x00"


def refused(relay, reason: str) -> float:
    samples = metric_samples(admin(relay, "GET", "/metrics").text)
    return samples.get(("appliance_signaling_refused_total", (("reason", reason),)), 0)


class SockJSSession:
    """An xhr-polling SockJS client from `source`."""

    def __init__(self, relay, name: str, user: str = "alice", source: str = "127.0.0.1"):
        self.relay, self.user, self.source = relay, user, source
        self.base = f"/imserver/ws/000/{name}"

    def post(
        self,
        transport: str,
        messages: list[str] | None = None,
        source: str | None = None,
        headers: dict | None = None,
    ) -> tuple[int, dict, bytes]:
        body = b"" if messages is None else json.dumps(messages).encode()
        return http(
            self.relay,
            "POST",
            f"{self.base}/{transport}?userId={self.user}",
            headers,
            body,
            source or self.source,
        )

    def post_raw(self, body: bytes) -> tuple[int, dict, bytes]:
        return http(self.relay, "POST", f"{self.base}/xhr_send", None, body, self.source)

    def open(self, token: str = "tok-alice") -> None:
        assert self.post("xhr")[2] == b"o\n"
        assert self.post("xhr_send", [CONNECT.format(token=token), STATUS_SUBSCRIBE])[0] == 204
        assert b"CONNECTED" in self.post("xhr")[2]


# ---------------------------------------------------------------- origins


def test_a_page_of_another_origin_is_refused_and_the_own_origin_and_programs_are_served(relay):
    before = refused(relay, "origin")
    own = f"http://127.0.0.1:{relay.http_port}"
    for path in ("/imserver/ws?userId=alice", "/imserver/ws/000/wsorigin/websocket?userId=alice"):
        assert ws_status(relay, path, EVIL)[0] == 403, path
        assert ws_status(relay, path, "null")[0] == 403, path
        for origin in (own, None):  # the appliance's own pages, and programs
            status, ws = ws_status(relay, path, origin)
            assert status == 101, (path, origin)
            ws.close()
    # SockJS over HTTP: refused outright, no CORS headers, nothing done.
    for method, path in (
        ("GET", "/imserver/ws/info"),
        ("OPTIONS", "/imserver/ws/info"),
        ("POST", "/imserver/ws/000/evil1/xhr"),
        ("OPTIONS", "/imserver/ws/000/evil1/xhr_send"),
        ("POST", "/imserver/ws/000/evil1/xhr_send"),
        ("GET", "/imserver/ws/000/evil2/eventsource"),
    ):
        for origin in (EVIL, "null"):
            status, headers, _ = http(relay, method, path, {"Origin": origin})
            assert status == 403, (method, path, origin)
            assert "access-control-allow-origin" not in headers, (method, path, headers)
    status, headers, _ = http(relay, "GET", "/imserver/ws/info", {"Origin": own})
    assert status == 200 and headers["access-control-allow-origin"] == own
    assert headers["access-control-allow-credentials"] == "true"
    status, headers, _ = http(relay, "GET", "/imserver/ws/info")
    assert status == 200 and "access-control-allow-origin" not in headers  # no "*" any more
    assert refused(relay, "origin") - before == 4 + 12


def test_listed_origins_are_served_and_echoed(tmp_path):
    relay = start_appliance(tmp_path / "a", http={"allowed_origins": [APP]})
    try:
        status, ws = ws_status(relay, "/imserver/ws?userId=alice", APP)
        assert status == 101
        ws.send(CONNECT.format(token="tok-alice"))
        assert ws.recv().startswith("CONNECTED")
        ws.close()
        assert ws_status(relay, "/imserver/ws?userId=alice", EVIL)[0] == 403
        session = SockJSSession(relay, "listed1")
        status, headers, body = session.post("xhr", headers={"Origin": APP})
        assert (status, body) == (200, b"o\n")
        assert headers["access-control-allow-origin"] == APP
        status, headers, _ = session.post(
            "xhr_send", [CONNECT.format(token="tok-alice")], headers={"Origin": APP}
        )
        assert status == 204 and headers["access-control-allow-origin"] == APP
        status, headers, _ = http(
            relay,
            "OPTIONS",
            session.base + "/xhr_send",
            {"Origin": APP, "Access-Control-Request-Headers": "content-type"},
        )
        assert status == 204 and headers["access-control-allow-origin"] == APP
        assert headers["access-control-allow-headers"] == "content-type"
        assert session.post("xhr_send", [STATUS_SUBSCRIBE], headers={"Origin": EVIL})[0] == 403
    finally:
        assert stop_appliance(relay) == 0


# ---------------------------------------------------------------- sessions bound to their opener


def test_a_sockjs_session_serves_only_the_address_that_opened_it(relay):
    before = refused(relay, "sockjs_other_address")
    session = SockJSSession(relay, "bound1")
    session.open()
    # From 127.0.0.2, with the session's URL: no sending as alice, no reading her queue.
    status, _, _ = session.post("xhr_send", [status_query("bob")], source="127.0.0.2")
    assert status == 404
    assert session.post("xhr", source="127.0.0.2")[0] == 404
    assert session.post("xhr_streaming", source="127.0.0.2")[0] == 404
    status, _, _ = http(relay, "GET", session.base + "/eventsource", source="127.0.0.2")
    assert status == 404
    assert refused(relay, "sockjs_other_address") - before == 4
    # The owner is still served, and nothing was sent in its name.
    assert session.post("xhr_send", [status_query("carol")])[0] == 204
    status, _, frame = session.post("xhr")
    assert status == 200 and b"carol" in frame and b"bob" not in frame, frame


# ---------------------------------------------------------------- oversized xhr_send bodies


def send_big_body(relay, path: str, size: int, chunked: bool) -> tuple[int, dict, bytes]:
    """POST `size` bytes (a SockJS payload that would decode) as fast as the server takes
    them, then read the answer; a reset on the way fails the test."""
    sock = socket.create_connection(("127.0.0.1", relay.http_port), timeout=20)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{relay.http_port}\r\n"
        f"Content-Type: text/plain\r\n{framing}\r\n\r\n".encode()
    )
    piece = 256 * 1024
    filler = b"A" * piece
    with sock:
        for offset in range(0, size, piece):
            data = filler[: min(piece, size - offset)]
            if offset == 0:
                data = b'["' + data[2:]
            if offset + len(data) >= size:
                data = data[:-2] + b'"]'
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        return read_response(sock)


def status_query_of_size(size: int) -> bytes:
    """An xhr_send payload of exactly `size` bytes: one status query for carol, its JSON body
    padded with spaces."""

    def payload(pad: int) -> bytes:
        body = '["carol"' + " " * pad + "]"
        frame = f"SEND\ndestination:/app/user/status\ncontent-length:{len(body)}\n\n{body}\x00"
        return json.dumps([frame]).encode()

    pad = size - len(payload(0))
    while len(payload(pad)) > size:  # the content-length header grew with the pad
        pad -= len(payload(pad)) - size
    data = payload(pad)
    assert len(data) == size
    return data


def test_an_oversized_xhr_send_body_gets_413_without_being_kept_or_reset(relay):
    before = refused(relay, "sockjs_body_too_large")
    session = SockJSSession(relay, "big1")
    session.open()
    pid = relay.proc.pid
    # A receiver stays attached, so the session lives through the uploads.
    polled = []
    poller = threading.Thread(target=lambda: polled.append(session.post("xhr")), daemon=True)
    poller.start()
    peak = start = rss_mb(pid)
    sampling = threading.Event()

    def sample():
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, rss_mb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for chunked in (False, True):
            status, headers, body = send_big_body(relay, session.base + "/xhr_send", 16 << 20, chunked)
            assert status == 413, (status, body)
            assert body == b"Payload too large (more than 65536 bytes)."
            assert headers["content-type"].startswith("text/plain")
        # One byte over stomp.max_frame_bytes is too large as well.
        assert send_big_body(relay, session.base + "/xhr_send", 65537, False)[0] == 413
        # Somebody else's session, or none: 404 at once, and still no reset.
        assert send_big_body(relay, "/imserver/ws/000/nosuch/xhr_send", 16 << 20, False)[0] == 404
    finally:
        sampling.set()
        sampler.join(5)
    print(f"\nxhr_send of 16 MB: RSS {start:.1f} MB before, {peak:.1f} MB at the peak")
    assert peak - start < 8, (start, peak)  # it was +64 MB when the body was read whole
    assert refused(relay, "sockjs_body_too_large") - before == 3
    # A payload of exactly stomp.max_frame_bytes is served, and the session went on.
    assert session.post_raw(status_query_of_size(65536))[0] == 204
    poller.join(10)
    assert polled and polled[0][0] == 200 and b"carol" in polled[0][2], polled


# ---------------------------------------------------------------- a session closed by its timer


def test_a_heartbeat_timeout_reaches_an_attached_sockjs_receiver_at_once(tmp_path):
    """A SockJS client that promised heart-beats and went silent, with an xhr_streaming
    receiver attached: the STOMP session times out without output, and nothing woke the
    receiver, which sent its next frame (and learnt the session was over) only at its 25 s
    heart-beat -- the session stayed registered that long after it had ended (found by the
    fuzz run).  Now the receiver gets the close frame within a tick, and the session is gone
    the SockJS disconnect delay after that."""
    relay = start_appliance(tmp_path / "relay", stomp={"heartbeat_ms": "1000,1000"})
    try:
        session = SockJSSession(relay, "silent1")
        assert session.post("xhr")[2] == b"o\n"
        connect = CONNECT.format(token="tok-alice").replace("heart-beat:0,0", "heart-beat:1000,0")
        assert session.post("xhr_send", [connect])[0] == 204
        with socket.create_connection(("127.0.0.1", relay.http_port), timeout=20) as sock:
            sock.sendall(
                f"POST {session.base}/xhr_streaming?userId=alice HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()
            )
            started, received = time.monotonic(), b""
            while b"c[" not in received:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            waited = time.monotonic() - started
        assert b"CONNECTED" in received and b"c[" in received, received[-300:]
        print(f"\nclose frame {waited:.1f} s after the receiver attached (heart-beat timeout at 2 s)")
        assert waited < 8, waited  # 25 s (the receiver's heart-beat) before
        deadline = time.monotonic() + 10
        while (
            metric_samples(admin(relay, "GET", "/metrics").text)[("appliance_signaling_sessions", ())] > 0
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert metric_samples(admin(relay, "GET", "/metrics").text)[("appliance_signaling_sessions", ())] == 0
        assert "heart-beat timeout" in relay.log()
    finally:
        assert stop_appliance(relay) == 0
