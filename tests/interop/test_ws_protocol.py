"""The native WebSocket endpoint with a plain WebSocket client (websocket-client): subprotocol
echo, frames split over messages the way stomp-websocket 2.3 splits them, and the
protocol violations that end one connection (ERROR, then close) without touching another."""

from __future__ import annotations

import json
import socket
import time

import pytest
import websocket

CONNECT = "CONNECT\naccept-version:1.1,1.2\nide:{token}\nheart-beat:0,0\n\n\x00"


def open_ws(relay, user="alice", subprotocols=("v10.stomp", "v11.stomp", "v12.stomp")):
    return websocket.create_connection(
        f"ws://127.0.0.1:{relay.http_port}/imserver/ws?userId={user}",
        subprotocols=list(subprotocols),
        timeout=5,
    )


def connect(relay, user="alice", token="tok-alice"):
    ws = open_ws(relay, user)
    ws.send(CONNECT.format(token=token))
    assert ws.recv().startswith("CONNECTED\n")
    return ws


def frame_of(text: str) -> tuple[str, dict, str]:
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    return lines[0], dict(line.split(":", 1) for line in lines[1:]), body.rstrip("\x00")


def assert_error_then_close(ws, fragment: str) -> None:
    command, headers, _ = frame_of(ws.recv())
    assert command == "ERROR" and fragment in headers["message"], headers
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        for _ in range(3):
            if ws.recv() in ("", None):
                raise websocket.WebSocketConnectionClosedException()


@pytest.mark.parametrize("size", [6 * 65536 + 100, 18 * 65536], ids=["just-over", "three-times"])
def test_a_message_over_the_size_limit_then_a_binary_frame_ends_only_that_connection(relay, size):
    """A text message over the limit (6 x stomp.max_frame_bytes) gets 1009.  A binary frame
    right behind it made Hypercorn write bytes into the text message's buffer (TypeError):
    its connection task died with a traceback in the log, its task group cancelled the
    app, and Quart's handler lived on, waiting for a message that could never come -- the
    session stayed registered for good (found by the fuzz run).  Now Hypercorn's failure is
    one bounded warning line, the session ends with its connection, and everyone else is
    served as before."""
    from .test_credentials_admin import admin, metric_samples  # it imports this module

    def sessions() -> float:
        return metric_samples(admin(relay, "GET", "/metrics").text)[("appliance_signaling_sessions", ())]

    bystander = connect(relay, "bob", "tok-bob")
    before = sessions()
    ws = connect(relay)  # a session: it must end with its connection
    assert sessions() == before + 1
    big = websocket.ABNF.create_frame("x" * size, websocket.ABNF.OPCODE_TEXT)
    binary = websocket.ABNF.create_frame(b"y" * 300, websocket.ABNF.OPCODE_BINARY)
    close = websocket.ABNF.create_frame(b"\x03\xe8", websocket.ABNF.OPCODE_CLOSE)
    ws.sock.sendall(big.format() + binary.format() + binary.format() + close.format())
    opcode, payload = ws.recv_data(control_frame=True)
    assert (opcode, int.from_bytes(payload[:2], "big")) == (websocket.ABNF.OPCODE_CLOSE, 1009)
    ws.sock.close()
    bystander.send(
        "SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00"
        'SEND\ndestination:/app/user/status\ncontent-length:9\n\n["carol"]\x00'
    )
    assert frame_of(bystander.recv())[0] == "MESSAGE"
    deadline = time.monotonic() + 5
    while sessions() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions() == before
    bystander.close()
    assert "Traceback" not in relay.log()


def test_frames_sent_behind_connect_in_one_message_are_served_after_connected(relay):
    """CONNECT, SUBSCRIBE and SEND in one message (a client that does not wait for
    CONNECTED): the token is checked first, then the rest is read, as Spring reads it."""
    ws = open_ws(relay)
    ws.send(
        CONNECT.format(token="tok-alice")
        + "SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00"
        + 'SEND\ndestination:/app/user/status\ncontent-length:9\n\n["carol"]\x00'
    )
    assert ws.recv().startswith("CONNECTED\n")
    command, headers, body = frame_of(ws.recv())
    assert (command, headers["destination"]) == ("MESSAGE", "/topic/user/status"), headers
    assert json.loads(body) == [{"userId": "carol", "status": "OFFLINE"}]
    ws.close()


@pytest.mark.parametrize(
    "offered, chosen",
    [
        (["v10.stomp", "v12.stomp"], "v12.stomp"),
        (["v11.stomp", "v10.stomp"], "v11.stomp"),
        (["v10.stomp"], "v10.stomp"),
    ],
)
def test_subprotocol_echo_prefers_the_newest(relay, offered, chosen):
    ws = open_ws(relay, subprotocols=offered)
    assert ws.getsubprotocol() == chosen
    ws.close()


def test_frames_split_into_16k_messages_are_reassembled(relay):
    ws = connect(relay)
    ws.send("SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00")
    ids = [f"user-{i:05d}-{'x' * 60}" for i in range(200)]  # ~17 KiB of JSON
    body = json.dumps(ids)
    frame = f"SEND\ndestination:/app/user/status\ncontent-length:{len(body)}\n\n{body}\x00"
    for i in range(0, len(frame), 16384):
        ws.send(frame[i : i + 16384])
    command, headers, payload = frame_of(ws.recv())
    assert command == "MESSAGE" and len(json.loads(payload)) == 200
    assert int(headers["content-length"]) == len(payload.encode())
    ws.close()


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("SEND\ndestination:/app/x\n\n\x00", "before CONNECT"),
        ("\x01\x02garbage\n\n\x00", "unknown command"),
        ("CONNECT\naccept-version:9.9\n\n\x00", "Supported protocol versions"),
    ],
)
def test_protocol_violations_get_error_then_close(relay, data, fragment):
    bystander = connect(relay, "bob", "tok-bob")
    ws = open_ws(relay)
    ws.send(data)
    assert_error_then_close(ws, fragment)
    bystander.send(
        "SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00"
        'SEND\ndestination:/app/user/status\n\n["bob"]\x00'
    )
    assert json.loads(frame_of(bystander.recv())[2]) == [{"userId": "bob", "status": "ONLINE"}]
    bystander.close()


def test_oversized_frame_is_error_then_close(relay):
    ws = connect(relay)
    ws.send("SEND\ndestination:/app/user/status\n\n" + "x" * 70000)
    assert_error_then_close(ws, "larger than 65536")


async def test_permessage_deflate_is_declined(relay):
    import websockets

    async with websockets.connect(
        f"ws://127.0.0.1:{relay.http_port}/imserver/ws?userId=alice",
        subprotocols=["v12.stomp"],
        compression="deflate",
    ) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send(CONNECT.format(token="tok-alice"))
        assert (await ws.recv()).startswith("CONNECTED\n")


def test_a_client_that_stops_reading_is_cut_off_and_nobody_else_notices(tmp_path):
    from .conftest import start_appliance, stop_appliance

    relay = start_appliance(tmp_path / "slow", stomp={"max_outbox": 16})
    try:
        bystander = connect(relay, "bob", "tok-bob")
        bystander.send("SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00")
        slow = connect(relay)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.send("SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00")
        body = json.dumps([f"someone-with-a-long-user-id-{i:04d}" for i in range(200)])
        query = f"SEND\ndestination:/app/user/status\ncontent-length:{len(body)}\n\n{body}\x00"
        for _ in range(600):  # ~5 MB of answers it never reads
            try:
                slow.send(query)
            except (websocket.WebSocketException, OSError):
                break  # the server already hung up
        for _ in range(100):
            if "stopped reading" in relay.log():
                break
            time.sleep(0.05)
        assert "stopped reading" in relay.log()
        bystander.send('SEND\ndestination:/app/user/status\n\n["alice"]\x00')
        assert json.loads(frame_of(bystander.recv())[2]) == [{"userId": "alice", "status": "OFFLINE"}]
        bystander.close()
    finally:
        assert stop_appliance(relay) == 0


def sockjs_ws(relay, session: str):
    return websocket.create_connection(
        f"ws://127.0.0.1:{relay.http_port}/imserver/ws/000/{session}/websocket?userId=alice", timeout=5
    )


def test_sockjs_websocket_framing(relay):
    ws = sockjs_ws(relay, "raw1")
    assert ws.recv() == "o"
    ws.send(json.dumps([CONNECT.format(token="tok-alice")]))
    frame = ws.recv()
    assert frame.startswith("a[") and json.loads(frame[1:])[0].startswith("CONNECTED\n")
    ws.send(json.dumps("SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00"))  # a bare string
    ws.send(json.dumps(['SEND\ndestination:/app/user/status\n\n["张三"]\x00']))
    (message,) = json.loads(ws.recv()[1:])
    assert message.endswith('[{"userId":"张三","status":"OFFLINE"}]\x00')
    ws.send(json.dumps(["DISCONNECT\nreceipt:r\n\n\x00"]))
    assert json.loads(ws.recv()[1:])[0].startswith("RECEIPT\nreceipt-id:r\n")
    assert ws.recv() == 'c[3000,"Go away!"]'
    ws.close()


def test_sockjs_websocket_broken_json_closes(relay):
    ws = sockjs_ws(relay, "raw2")
    assert ws.recv() == "o"
    ws.send("[not json")
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        for _ in range(3):
            if ws.recv() in ("", None):
                raise websocket.WebSocketConnectionClosedException()
