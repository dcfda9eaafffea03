"""Message-level limits of the signaling (issue 14), without sockets: JSON bodies with size
and depth bounds, user ids refused at the door and escaped in logs, STOMP headers that
never carry a raw line break, the per-session SEND budget, the watch-list cap, and a
handler bug that answers 500 instead of killing the session."""

from __future__ import annotations

import json
import logging
import random
import time

import pytest

from signaling.app import create_app
from signaling.auth import StaticVerifier, UserIdChecked
from signaling.broker import MemoryBroker
from signaling.client_text import loggable, user_id_problem
from signaling.errors import SignalingError
from signaling.json_body import JsonBodyError, decode_json, within_depth
from signaling.service import SignalingService
from signaling.session import Session
from signaling.stomp import ConnectRequested, Limits, MessageSent, SendRefused
from signaling.stomp.connection import StompServerConnection, TokenBucket, WindowCount
from signaling.stomp.frames import Frame, FrameError, encode
from signaling.stomp_routes import install_stomp_routes

TOKENS = {"tok-a": "alice", "tok-b": "bob", "tok-nl": "eve\nuser-name:admin", "tok-long": "e" * 129}


# ---------------------------------------------------------------- JSON bodies


def reference_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


def random_json(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 40 or roll < 0.3:
        # Strings full of what a naive bracket count would trip on.
        return rng.choice([1, None, 'a["{\\', "]}\\\\", 'x\\"y[', "\u2028{", '\\\\"['])
    if roll < 0.65:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["k", "[", "}", '\\"']) + str(i): random_json(rng, depth + 1)
        for i in range(rng.randint(0, 3))
    }


def test_depth_check_agrees_with_the_parsed_value():
    rng = random.Random(14)
    for _ in range(2000):
        value = random_json(rng)
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        for bound in (1, 2, 5, 32):
            assert within_depth(text, bound) == (reference_depth(value) <= bound), (bound, text)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 30000 + b"]" * 30000, "nested deeper than 32"),
        (b'{"a":' * 10000 + b"1" + b"}" * 10000, "nested deeper than 32"),
        (b"[" * 33 + b"]" * 33, "nested deeper than 32"),
        (b'["\xff"]', "not valid UTF-8"),
        (b"[" * 40, "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b" " * 70000, "larger than 65536"),
    ],
)
def test_bad_bodies_are_one_error_type_with_a_message(body, message):
    with pytest.raises(JsonBodyError, match=message):
        decode_json(body, 65536, 32)


def test_good_bodies_parse():
    assert decode_json(b"[" * 32 + b"]" * 32, 65536, 32) is not None
    assert decode_json(b'{"a":"' + b"[" * 40 + b'"}', 100, 1) == {"a": "[" * 40}
    assert decode_json(b"  ", 100, 32) is None
    assert decode_json('["张三"]', 100, 32) == ["张三"]


@pytest.mark.parametrize(
    "body",
    [
        "[" * 32000 + "]" * 32000,
        '"' + '\\"' * 30000,
        '["' + "a[" * 30000,
        "[" + "[1]," * 16000 + "[1]]",
        '{"a":' * 10000 + "1" + "}" * 10000,
    ],
)
def test_hostile_bodies_cost_milliseconds(body):
    started = time.perf_counter()
    for _ in range(10):
        try:
            decode_json(body.encode(), 65536, 32)
        except JsonBodyError:
            pass
    assert time.perf_counter() - started < 2.0  # ~1 ms each; generous for a busy box


def test_a_sockjs_payload_nests_nothing():
    from signaling.sockjs.protocol import PayloadError, decode_payload

    assert decode_payload('["SEND\\n[[[[\\u0000"]') == ["SEND\n[[[[\x00"]
    for text in ("[" * 30000 + "]" * 30000, '[["x"]]', '{"a":"b"}'):
        with pytest.raises(PayloadError):
            decode_payload(text)


# ---------------------------------------------------------------- user ids and logs


@pytest.mark.parametrize(
    "user, problem",
    [
        ("alice", None),
        ("张三", None),
        ("a" * 128, None),
        ("", "is empty"),
        ("a" * 129, "longer than 128"),
        ("x\ny", "control character"),
        ("x\ry", "control character"),
        ("x\x00", "control character"),
        ("x\x1b[31m", "control character"),
        ("x\u2028y", "control"),
        ("x\x85y", "control character"),
    ],
)
def test_user_id_problems(user, problem):
    found = user_id_problem(user, 128)
    assert (found is None) if problem is None else (problem in found)


def test_loggable_is_one_line_and_bounded():
    for text in ("x\nFORGED line", "a\r\n", "\x1b[2J", "x\u2028y", "\x85"):
        shown = loggable(text)
        assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
        assert "\u2028" not in shown and "\x85" not in shown
    assert loggable("alice") == "'alice'"
    assert len(loggable("x" * 10000)) < 200
    assert loggable(None) == "-"


async def test_the_verifier_wrapper_refuses_unusable_ids_with_400():
    verifier = UserIdChecked(StaticVerifier(TOKENS), max_chars=128)
    assert await verifier.verify("tok-a") == "alice"
    assert await verifier.verify("nope") is None
    for token in ("tok-nl", "tok-long"):
        with pytest.raises(SignalingError) as info:
            await verifier.verify(token)
        assert info.value.code == 400 and "user id" in info.value.message


# ---------------------------------------------------------------- STOMP frames


def test_connected_never_carries_a_raw_line_break():
    for value in ("eve\nuser-name:admin", "eve\r", "eve\x00"):
        with pytest.raises(FrameError):
            encode(Frame("CONNECTED", {"version": "1.2", "user-name": value}), "1.2")
    # Escaped frames escape instead (1.2: \n, \r; 1.1: \n); 1.1 cannot write a CR: refused.
    assert b"receipt-id:a\\nb\\rc\n" in encode(Frame("RECEIPT", {"receipt-id": "a\nb\rc"}), "1.2")
    with pytest.raises(FrameError):
        encode(Frame("RECEIPT", {"receipt-id": "a\rb"}), "1.1")


def connected(limits: Limits | None = None, now: float = 0.0, version: str = "1.2"):
    conn = StompServerConnection(limits or Limits(), now=now)
    (event,) = conn.receive_data(f"CONNECT\naccept-version:{version}\nide:t\n\n\x00".encode(), now)
    assert isinstance(event, ConnectRequested)
    conn.accept(now, session="s1")
    conn.data_to_send()
    return conn


@pytest.mark.parametrize(
    "raw", ["SUBSCRIBE\nid:a\x00b\ndestination:/x\n\n\x00", "SEND\ndestination:/app/x\nreceipt:a\rb\n\n\x00"]
)
def test_nul_and_bare_cr_in_headers_are_protocol_errors(raw):
    conn = connected()
    conn.receive_data(raw.encode(), 0.0)
    assert conn.closed


def test_token_bucket_and_window():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.1) and not bucket.take(0.1)
    assert TokenBucket(rate=0, burst=1, now=0.0).take(0.0)  # 0: no budget
    window = WindowCount(10.0)
    assert [window.add(t) for t in (0.0, 1.0, 9.9, 10.0)] == [1, 2, 3, 1]


def sends(n: int, destination: str = "/app/user/status", receipt: bool = False) -> bytes:
    header = "receipt:r\n" if receipt else ""
    return f"SEND\ndestination:{destination}\n{header}content-length:2\n\n[]\x00".encode() * n


def test_sends_past_the_budget_are_refused_then_the_session_is_ended():
    limits = Limits(send_rate=10, send_burst=5, send_refusals_to_close=3)
    conn = connected(limits)
    events = conn.receive_data(sends(5), 0.0)
    assert all(isinstance(e, MessageSent) for e in events) and len(events) == 5
    (refused,) = conn.receive_data(sends(1, receipt=True), 0.0)
    assert isinstance(refused, SendRefused) and refused.close_message is None
    assert "10 SEND frames a second" in refused.message
    assert conn.data_to_send()  # the receipt still comes
    assert len(conn.receive_data(sends(1), 0.1)) == 1  # refilled: one passes
    assert isinstance(conn.receive_data(sends(1), 0.1)[0], SendRefused)
    last, *rest = conn.receive_data(sends(10), 0.1)  # the third refusal
    assert isinstance(last, SendRefused) and "too many SEND frames" in last.close_message
    assert rest == [] and conn.receive_data(sends(1), 5.0) == []  # nothing more is read
    assert not conn.closed  # the application ends it


def test_refusals_far_apart_do_not_end_the_session():
    conn = connected(Limits(send_rate=1, send_burst=1, send_refusals_to_close=2))
    for t in (0.0, 11.0, 22.0):
        conn.receive_data(sends(1), t)  # spends the token
        (refused,) = conn.receive_data(sends(1), t)
        assert isinstance(refused, SendRefused) and refused.close_message is None


# ---------------------------------------------------------------- the service


def service(limits: Limits | None = None) -> SignalingService:
    svc = SignalingService(MemoryBroker(), UserIdChecked(StaticVerifier(TOKENS)), limits)
    install_stomp_routes(svc)
    return svc


def open_session(svc: SignalingService, user: str, sid: str) -> Session:
    conn = connected(svc.limits)
    session = Session(sid, user, conn)
    svc.connected(session)
    send(
        svc,
        session,
        "SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00"
        "SUBSCRIBE\nid:e\ndestination:/user/queue/errors\n\n\x00",
    )
    session.outbox.clear()
    return session


def send(svc, session, raw: str | bytes, now: float = 0.0) -> None:
    for event in session.conn.receive_data(raw.encode() if isinstance(raw, str) else raw, now):
        svc.handle(session, event)
    session.flush()


def messages(session) -> list[tuple[str, object]]:
    out = []
    while session.outbox:
        head, _, rest = session.outbox.popleft().partition(b"\n\n")
        lines = head.decode().split("\n")
        if lines[0] == "MESSAGE":
            headers = dict(line.split(":", 1) for line in lines[1:])
            out.append((headers["destination"], json.loads(rest[:-1].decode())))
        else:
            out.append((lines[0], None))
    return out


def query(ids) -> bytes:
    body = json.dumps(ids).encode()
    return f"SEND\ndestination:/app/user/status\ncontent-length:{len(body)}\n\n".encode() + body + b"\x00"


def test_the_watch_list_is_capped_per_session():
    svc = service(Limits(max_watched=300))
    s = open_session(svc, "alice", "a1")
    send(svc, s, query([f"u{i}" for i in range(200)]))
    send(svc, s, query([f"u{i}" for i in range(100, 300)]))  # 100 new: 300 watched
    assert [len(body) for _, body in messages(s)] == [200, 200]
    send(svc, s, query(["u0", "new-one"]))
    ((dest, body),) = messages(s)
    assert dest == "/user/queue/errors" and body["code"] == 400 and "at most 300" in body["message"]
    send(svc, s, query(["u0", "u299"]))  # already watched: answered
    assert messages(s)[0][0] == "/topic/user/status"
    assert svc.presence.watched_count() == 300
    other = open_session(svc, "bob", "b1")  # the cap is per session
    send(svc, other, query(["new-one"]))
    assert messages(other)[0][0] == "/topic/user/status"


@pytest.mark.parametrize(
    "body", [b"[" * 30000 + b"]" * 30000, b'["\xff"]', b'{"callId":"c","x":' + b"[" * 40 + b"]" * 40 + b"}"]
)
def test_bad_bodies_are_400_and_the_session_stays(body):
    svc = service()
    s = open_session(svc, "alice", "a1")
    send(svc, s, b"SEND\ndestination:/app/user/status\ncontent-length:%d\n\n" % len(body) + body + b"\x00")
    ((dest, answer),) = messages(s)
    assert dest == "/user/queue/errors" and answer["code"] == 400
    assert not s.closed


def test_a_send_flood_gets_429_then_an_error_frame(caplog):
    svc = service(Limits(send_rate=10, send_burst=20, send_refusals_to_close=5))
    s = open_session(svc, "alice", "a1")
    with caplog.at_level(logging.INFO, logger="signaling"):
        send(svc, s, query(["bob"]) * 40)
    out = messages(s)
    assert [d for d, _ in out[:20]] == ["/topic/user/status"] * 20
    assert [body["code"] for _, body in out[20:25]] == [429] * 5
    assert out[25][0] == "ERROR" and len(out) == 26 and s.closed
    assert svc.counters["error_429"] == 5 and svc.counters["send_floods"] == 1
    assert "too many SEND frames" in caplog.text


def test_a_handler_bug_is_500_for_the_sender_and_nothing_else():
    svc = service()

    def broken(_session, _payload):
        raise RuntimeError("a bug")

    svc.route("/app/broken", broken, needs_broker=False)
    s = open_session(svc, "alice", "a1")
    send(svc, s, "SEND\ndestination:/app/broken\ncontent-length:2\n\n{}\x00")
    ((dest, body),) = messages(s)
    assert dest == "/user/queue/errors" and body == {"code": 500, "message": "internal error"}
    assert not s.closed and svc.counters["internal_errors"] == 1


async def connect_event(token: str) -> ConnectRequested:
    conn = StompServerConnection()
    (event,) = conn.receive_data(f"CONNECT\naccept-version:1.2\nide:{token}\n\n\x00".encode(), 0)
    return event


async def test_connect_refuses_unusable_user_ids_and_logs_them_escaped(caplog):
    svc = service()
    with caplog.at_level(logging.INFO, logger="signaling"):
        for token, claimed, where in (
            ("tok-a", "x\nFORGED line", "userId"),
            ("tok-a", "a" * 129, "userId"),
            ("tok-nl", None, "user id"),
            ("tok-long", None, "user id"),
        ):
            with pytest.raises(SignalingError) as info:
                await svc.authenticate(await connect_event(token), claimed)
            assert info.value.code == 400 and where in info.value.message
        with pytest.raises(SignalingError):
            await svc.authenticate(await connect_event("tok-b"), "alice\x1b[2J")
    assert svc.counters["auth_bad_user_id"] == 5
    assert all("\n" not in r.getMessage() and "\x1b" not in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- HTTP


def http_app(max_frame_bytes: int = 65536):
    return create_app(
        "/imserver",
        StaticVerifier(TOKENS),
        Limits(max_frame_bytes=max_frame_bytes),
        64,
        issue_credentials=lambda user: {"iceServers": []},
    )


@pytest.mark.parametrize(
    "body, status",
    [
        (b'{"callId":"c","callee":"bob","x":' + b"[" * 20000 + b"]" * 20000 + b"}", 400),
        (b'{"callId":"c","callee":"\xff"}', 400),
        (b"null", 400),
        (json.dumps({"callId": "c", "pad": "x" * 70000}).encode(), 413),
    ],
)
async def test_http_bodies_are_bounded(body, status, caplog):
    client = http_app().web.test_client()
    with caplog.at_level(logging.ERROR):
        response = await client.post("/imserver/call/request", data=body, headers={"ide": "tok-a"})
    assert response.status_code == status and (await response.get_json())["code"] == status
    assert not caplog.records  # no traceback


async def test_http_refuses_tokens_naming_unusable_ids():
    client = http_app().web.test_client()
    for token in ("tok-nl", "tok-long"):
        response = await client.get("/imserver/turn/get-turn-credentials", headers={"ide": token})
        assert response.status_code == 400 and (await response.get_json())["code"] == 400
    response = await client.get("/imserver/turn/get-turn-credentials", headers={"ide": "tok-a"})
    assert response.status_code == 200
    response = await client.post("/imserver/call/hangup", headers={"ide": "tok-a"})  # empty body
    assert (await response.get_json())["code"] == 200
