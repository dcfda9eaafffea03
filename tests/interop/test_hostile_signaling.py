"""Hostile STOMP and HTTP clients against the real appliance (issue 14): message-level limits.

A session that watches ever more userIds, JSON nested past any sane depth and
bodies that are not UTF-8, userIds and JWT `sub`s that carry a newline (into
the log, into the CONNECTED frame), and a client that floods SENDs while a
bystander asks for a status.  Each gets a 4xx (or an ERROR frame and a close),
never a traceback, and nobody else notices.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jwt
import pytest
import websocket
import websockets

from .conftest import start_appliance, stop_appliance

CONNECT = "CONNECT\naccept-version:1.1,1.2\nide:{token}\nheart-beat:0,0\n\n\x00"
SUBSCRIBE = (
    "SUBSCRIBE\nid:status\ndestination:/topic/user/status\n\n\x00"
    "SUBSCRIBE\nid:errors\ndestination:/user/queue/errors\n\n\x00"
)
JWT_KEY = "k" * 40
WAIT_S = 5.0
FLOOD_BATCH = 50  # SEND frames per WebSocket message
FLOOD_WINDOW = 500  # SENDs the flooder keeps unanswered


def send_frame(destination: str, body: bytes) -> bytes:
    return f"SEND\ndestination:{destination}\ncontent-length:{len(body)}\n\n".encode() + body + b"\x00"


def frame_of(text: str | bytes) -> tuple[str, dict, str]:
    if isinstance(text, bytes):
        text = text.decode()
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    return lines[0], dict(line.split(":", 1) for line in lines[1:]), body.rstrip("\x00")


def open_ws(port: int, user: str | None):
    query = "" if user is None else f"?userId={urllib.parse.quote(user, safe='')}"
    return websocket.create_connection(
        f"ws://127.0.0.1:{port}/imserver/ws{query}", subprotocols=["v12.stomp"], timeout=5
    )


def stomp_session(port: int, user: str = "alice", token: str = "tok-alice"):
    ws = open_ws(port, user)
    ws.send(CONNECT.format(token=token))
    command, headers, _ = frame_of(ws.recv())
    assert command == "CONNECTED", headers
    ws.send(SUBSCRIBE)
    return ws


def next_message(ws) -> tuple[str, object]:
    command, headers, body = frame_of(ws.recv())
    assert command == "MESSAGE", (command, headers, body)
    return headers["destination"], json.loads(body)


def status_query(ws, ids: list[str]) -> tuple[str, object]:
    ws.send(send_frame("/app/user/status", json.dumps(ids).encode()))
    return next_message(ws)


def refused_connect(port: int, user: str | None, token: str) -> str:
    """The ERROR frame's message a CONNECT earns; fails if the server said CONNECTED."""
    ws = open_ws(port, user)
    try:
        ws.send(CONNECT.format(token=token))
        command, headers, _ = frame_of(ws.recv())
        assert command == "ERROR", f"{command} {headers}"
        return headers["message"]
    finally:
        ws.close()


def http(relay_port: int, method: str, path: str, token: str, body: bytes | None = None):
    """(HTTP status, the envelope) of one request to the HTTP API."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{relay_port}/imserver{path}",
        data=body,
        headers={"ide": token, "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_no_traceback(relay) -> None:
    log = relay.log()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]


# ---------------------------------------------------------------- item 4: watch list


def test_watching_a_hundred_thousand_ids_is_refused_past_the_cap(relay):
    ws = stomp_session(relay.http_port)
    try:
        refused_at = None
        for q in range(500):  # 500 x 200 = 100,000 ids
            dest, body = status_query(ws, [f"watched-{q:03d}-{i:03d}" for i in range(200)])
            if dest == "/user/queue/errors":
                refused_at = q
                break
            assert len(body) == 200
        assert refused_at == 5, refused_at  # 1,000 watched, the 1,001st not
        assert body["code"] == 400 and "1000" in body["message"], body
        dest, body = status_query(ws, ["watched-000-000"])  # already watched: still answered
        assert dest == "/topic/user/status" and body[0]["userId"] == "watched-000-000"
        dest, body = status_query(ws, ["one-more"])
        assert dest == "/user/queue/errors" and body["code"] == 400
    finally:
        ws.close()


# ---------------------------------------------------------------- item 5: parse errors


NESTED = b"[" * 30000 + b"]" * 30000  # fits a 64 KiB frame
NESTED_CALL = (
    b'{"callId":"c1","callee":"bob","callerUserName":"a","calleeUserName":"b","x":'
    + b"[" * 20000
    + b"]" * 20000
    + b"}"
)
NOT_UTF8 = b'["\xff\xfe"]'
# Valid JSON, but "\ud800" decodes to a lone surrogate that no UTF-8 encoder takes: echoed
# in a status or an OFFER it raised UnicodeEncodeError (found by bench/fuzz_signaling.py).
LONE_SURROGATE = b'["\\ud800"]'
LONE_SURROGATE_CALL = b'{"callId":"c3","callee":"bob","callerUserName":"\\udcc0"}'


def test_nested_json_and_invalid_utf8_on_stomp_are_400_and_the_session_lives(relay):
    ws = stomp_session(relay.http_port)
    try:
        for destination, body in (
            ("/app/user/status", NESTED),
            ("/app/call/request", NESTED_CALL),
            ("/app/user/status", NOT_UTF8),
            ("/app/user/status", LONE_SURROGATE),
            ("/app/call/request", LONE_SURROGATE_CALL),
        ):
            ws.send_binary(send_frame(destination, body))
            dest, answer = next_message(ws)
            assert dest == "/user/queue/errors" and answer["code"] == 400, answer
        assert status_query(ws, ["bob"])[0] == "/topic/user/status"  # still served
    finally:
        ws.close()
    assert_no_traceback(relay)


def test_nested_json_inside_sockjs_xhr_send_is_400_not_500(relay):
    base = f"http://127.0.0.1:{relay.http_port}/imserver/ws/000/nest1"

    def post(transport: str, messages: list[str] | None = None):
        data = b"" if messages is None else json.dumps(messages).encode()
        req = urllib.request.Request(f"{base}/{transport}?userId=alice", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.read().decode()

    assert post("xhr") == (200, "o\n")
    assert post("xhr_send", [CONNECT.format(token="tok-alice"), SUBSCRIBE])[0] == 204
    assert "CONNECTED" in post("xhr")[1]
    status, _ = post("xhr_send", [send_frame("/app/user/status", NESTED).decode()])
    assert status == 204
    (message,) = json.loads(post("xhr")[1][1:])
    _, headers, body = frame_of(message)
    assert headers["destination"] == "/user/queue/errors" and json.loads(body)["code"] == 400
    # A nested envelope, or one whose string holds a lone surrogate (which became a str
    # that the STOMP layer could not encode), is SockJS's "Broken JSON encoding." (a 500
    # by that protocol), not a crash.
    for envelope in (NESTED, b'["SEND\\ndestination:/app/user/status\\n\\n[\\"\\udcc0\\"]\\u0000"]'):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                urllib.request.Request(f"{base}/xhr_send", data=envelope, method="POST"), timeout=5
            )
        assert refused.value.read() == b"Broken JSON encoding."
    assert_no_traceback(relay)


@pytest.mark.parametrize(
    "body",
    [NESTED_CALL, b'{"callId":"c2","callee":"\xff"}', LONE_SURROGATE_CALL],
    ids=["nested", "not-utf8", "lone-surrogate"],
)
def test_nested_json_and_invalid_utf8_over_http_are_400(relay, body):
    status, envelope = http(relay.http_port, "POST", "/call/request", "tok-alice", body)
    assert (status, envelope["code"]) == (400, 400), envelope
    assert_no_traceback(relay)


def test_an_oversized_http_body_is_refused(relay):
    body = json.dumps({"callId": "c3", "callee": "bob", "pad": "x" * 200_000}).encode()
    status, envelope = http(relay.http_port, "POST", "/call/request", "tok-alice", body)
    assert status == envelope["code"] == 413


def _upload(port: int, size: int, chunked: bool) -> bytes:
    """POST `size` bytes to the HTTP API as fast as the server takes them, then read what
    came back; a reset on the way fails."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    piece = b"x" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(
            f"POST /imserver/call/request HTTP/1.1\r\nHost: 127.0.0.1\r\nide: tok-alice\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n".encode()
        )
        for _ in range(size // len(piece)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\n}" not in answer and b'"}' not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_sending_on_after_its_413_reads_the_answer_without_a_reset(relay, chunked):
    """Hypercorn closes an HTTP/1.1 connection as soon as a response ends with the request's
    body unfinished: a client still uploading met a reset (BrokenPipeError) and never read
    its 413.  The answer now goes out first and the response ends with the body."""
    answer = _upload(relay.http_port, 16 << 20, chunked)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert json.loads(body) == {"code": 413, "msg": "request too large", "data": None}


# ---------------------------------------------------------------- item 6: injection


def test_a_user_id_with_a_newline_is_refused_and_forges_no_log_line(relay):
    forged = "x\nFORGED-LINE 2026-01-01 INFO signaling: session 1 of user admin connected"
    message = refused_connect(relay.http_port, forged, "tok-alice")
    assert "userId" in message, message
    message = refused_connect(relay.http_port, "a" * 129, "tok-alice")
    assert "userId" in message and "128" in message, message
    assert not any(line.startswith("FORGED-LINE") for line in relay.log().splitlines())


def test_a_jwt_sub_with_a_newline_or_too_long_is_refused(tmp_path):
    relay = start_appliance(tmp_path / "jwt", auth={"mode": "jwt", "jwt_key": JWT_KEY})
    try:

        def token(sub: str) -> str:
            return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, JWT_KEY, algorithm="HS256")

        for sub in ("eve\nuser-name:admin", "eve\r\nFORGED", "e" * 129, "eve\x00"):
            # No userId in the URL: only the token names the user.
            message = refused_connect(relay.http_port, None, token(sub))
            assert "user id" in message, message
            message = refused_connect(relay.http_port, sub, token(sub))
            assert "userId" in message or "user id" in message, message
            status, envelope = http(relay.http_port, "GET", "/turn/get-turn-credentials", token(sub))
            assert (status, envelope["code"]) == (400, 400), envelope
            status, envelope = http(relay.http_port, "POST", "/call/hangup", token(sub))
            assert (status, envelope["code"]) == (400, 400), envelope
        ws = stomp_session(relay.http_port, "eve", token("eve"))  # a plain one works
        ws.close()
        assert not any(line.startswith(("FORGED", "user-name")) for line in relay.log().splitlines())
    finally:
        assert stop_appliance(relay) == 0


# ---------------------------------------------------------------- item 8: SEND flood


async def _ws_session(port: int, user: str, token: str):
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/imserver/ws?userId={user}",
        subprotocols=["v12.stomp"],
        max_queue=None,
        ping_interval=None,
    )
    await ws.send(CONNECT.format(token=token))
    assert (await ws.recv()).startswith("CONNECTED")
    await ws.send(SUBSCRIBE)
    return ws


async def _round_trip(ws) -> float:
    started = time.perf_counter()
    await asyncio.wait_for(ws.send(send_frame("/app/user/status", b'["carol"]').decode()), WAIT_S)
    command, headers, _ = frame_of(await asyncio.wait_for(ws.recv(), WAIT_S))
    assert command == "MESSAGE" and headers["destination"] == "/topic/user/status"
    return time.perf_counter() - started


async def _flood_once(port: int, deadline: float) -> dict:
    """One flooding session: SENDs as fast as the server answers them, keeping a window of
    FLOOD_WINDOW in flight, until the server closes the session or the deadline passes."""
    ws = await _ws_session(port, "alice", "tok-alice")
    seen = {"sent": 0, "answers": 0, "429": 0, "error": None}
    batch = send_frame("/app/user/status", b'["bob"]').decode() * FLOOD_BATCH
    answered = asyncio.Event()

    async def read() -> None:
        try:
            async for message in ws:
                command, headers, body = frame_of(message)
                if command == "ERROR":
                    seen["error"] = headers.get("message")
                elif headers.get("destination") == "/user/queue/errors" and json.loads(body)["code"] == 429:
                    seen["429"] += 1
                else:
                    seen["answers"] += 1
                answered.set()
        finally:
            answered.set()  # the sender must not wait for a closed connection

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while time.monotonic() < deadline and not reader.done():
            if seen["sent"] - seen["answers"] - seen["429"] < FLOOD_WINDOW:
                await asyncio.wait_for(ws.send(batch), WAIT_S)
                seen["sent"] += FLOOD_BATCH
            else:
                answered.clear()
                await asyncio.wait_for(answered.wait(), max(0.01, deadline - time.monotonic()))
        await asyncio.wait_for(reader, 1.0)
    except (websockets.ConnectionClosed, TimeoutError):
        pass
    finally:
        reader.cancel()
        ws.transport.abort()  # no closing handshake behind a queue of answers
    return seen


async def flood(port: int, seconds: float, sessions_per_s: float) -> list[dict]:
    """An attacker that floods, and opens a new session as soon as one is cut off, for
    `seconds` -- at most `sessions_per_s` new sessions a second, the pace the per-address
    session caps hold an address outside stomp.per_ip_exempt to (loopback is exempt)."""
    deadline = time.monotonic() + seconds
    sessions: list[dict] = []
    next_start = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(max(0.0, next_start - time.monotonic()))
        next_start = time.monotonic() + 1 / sessions_per_s
        try:
            sessions.append(await _flood_once(port, deadline))
        except websockets.InvalidStatus as refused:  # the per-address session caps
            sessions.append({"refused": refused.response.status_code})
    return sessions


FLOODER = (
    "import asyncio, json, sys\n"
    "from tests.interop.test_hostile_signaling import flood\n"
    "print(json.dumps(asyncio.run(flood(int(sys.argv[1]), float(sys.argv[2]), "
    "float(sys.argv[3])))))\n"
)


async def test_a_send_flood_gets_429_then_a_disconnect_and_a_bystander_keeps_its_pace(relay):
    bystander = await _ws_session(relay.http_port, "bob", "tok-bob")
    try:
        idle = [await _round_trip(bystander) for _ in range(50)]
        # The flooder is its own process, so its work does not slow the bystander's client.
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLOODER,
            str(relay.http_port),
            "2.0",
            "10",
            cwd=str(Path(__file__).resolve().parents[2]),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            loaded: list[float] = []
            await asyncio.sleep(0.7)  # the child starts and begins to flood
            while flooder.returncode is None and len(loaded) < 200:
                loaded.append(await _round_trip(bystander))
                await asyncio.sleep(0.005)
            out, _ = await asyncio.wait_for(flooder.communicate(), 15)
        finally:
            if flooder.returncode is None:
                flooder.kill()
                await flooder.wait()
        floods = json.loads(out)
    finally:
        await bystander.close()
    idle_ms, loaded_ms = statistics.median(idle) * 1000, statistics.median(loaded) * 1000
    print(
        f"\nbystander status round trip: idle median {idle_ms:.2f} ms; under flood median "
        f"{loaded_ms:.2f} ms, p90 {sorted(loaded)[len(loaded) * 9 // 10] * 1000:.2f} ms, max "
        f"{max(loaded) * 1000:.1f} ms ({len(loaded)} samples); {len(floods)} flood session(s), "
        f"first: {floods[:2]}"
    )
    assert floods and floods[0]["429"] > 0, floods
    assert floods[0]["error"] and "SEND" in floods[0]["error"], floods
    assert all(f.get("answers", 0) <= 400 for f in floods), floods  # burst + what refilled
    # The issue asks for 2x the idle figure (measured: about 1.8x); the machine is shared,
    # so the bound is generous.
    assert loaded_ms <= max(5 * idle_ms, 5.0), (idle_ms, loaded_ms)
    assert_no_traceback(relay)


# ---------------------------------------------------------------- one huge message


def _send_envelope(port: int, name: str, elements: int) -> tuple[str, object]:
    """A SockJS websocket client that sends one message: an envelope of `elements` one-byte
    strings (a SEND's head and then "x" after "x").  What came back: ("close", code) or
    ("frame", the first STOMP frame)."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/imserver/ws/000/{name}/websocket", timeout=10)
    try:
        assert ws.recv() == "o"
        ws.send('["SEND\\ndestination:/app/user/status\\n\\n",' + '"x",' * (elements - 1) + '"x"]')
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return "close", int.from_bytes(data[:2], "big")
            text = data.decode()
            if text.startswith("a["):
                return "frame", json.loads(text[1:])[0]
    finally:
        ws.close()


async def test_a_huge_sockjs_websocket_envelope_never_holds_the_loop(relay):
    """One SockJS websocket message of 200,000 one-byte elements (800 KB) used to be fed to the
    STOMP parser element by element, each rescanning the frame so far: everyone waited about
    3 s.  Now a message over 6 x max_frame_bytes is refused by Hypercorn (1009) before it is
    buffered, and one just under that is fed in one piece and refused as one frame too large."""
    bystander = await _ws_session(relay.http_port, "bob", "tok-bob")
    try:
        idle = [await _round_trip(bystander) for _ in range(20)]
        loop = asyncio.get_running_loop()
        attacks = [
            loop.run_in_executor(None, _send_envelope, relay.http_port, "huge1", 200_000),
            loop.run_in_executor(None, _send_envelope, relay.http_port, "huge2", 97_000),
        ]
        loaded = []
        while not all(a.done() for a in attacks):
            loaded.append(await _round_trip(bystander))
            await asyncio.sleep(0.002)
        too_big, just_under = [await a for a in attacks]
    finally:
        await bystander.close()
    print(
        f"\nbystander status round trip: idle max {max(idle) * 1000:.1f} ms; during the huge "
        f"envelopes max {max(loaded) * 1000:.1f} ms ({len(loaded)} samples)"
    )
    assert too_big == ("close", 1009), too_big
    assert just_under[0] == "frame" and just_under[1].startswith("ERROR\n"), just_under
    assert "frame larger than 65536 bytes" in just_under[1], just_under
    # Before the fix the bystander waited 3.3 s; now the work is a few milliseconds.
    assert max(loaded) < 1.0, loaded
    assert_no_traceback(relay)
