"""The sans-I/O STOMP server connection, on a float clock: negotiation, subscriptions,
receipts, limits, ERROR-then-close, heart-beats and their timeout without sleeping."""

from __future__ import annotations

import pytest

from signaling.stomp import (
    ConnectionFailed,
    ConnectRequested,
    DisconnectRequested,
    Limits,
    LocalProtocolError,
    MessageSent,
    StompServerConnection,
    Subscribed,
    Unsubscribed,
)
from signaling.stomp.connection import State, negotiate_heartbeat, negotiate_version


def frames(conn):
    """(command, headers, body) of each frame the server queued, one frame per chunk."""
    return [server_frame(chunk) for chunk in conn.data_to_send()]


def server_frame(chunk: bytes):
    head, _, rest = chunk.partition(b"\n\n")
    lines = head.decode().split("\n")
    headers = dict(line.split(":", 1) for line in lines[1:])
    assert rest.endswith(b"\x00")
    body = rest[:-1]
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body)
    return lines[0], headers, body


def connected(version="1.2", heart_beat="0,0", limits=Limits(), now=0.0):
    conn = StompServerConnection(limits, now=now)
    (event,) = conn.receive_data(
        f"CONNECT\naccept-version:{version}\nheart-beat:{heart_beat}\nide:t\n\n\x00", now
    )
    assert isinstance(event, ConnectRequested) and event.frame.get("ide") == "t"
    conn.accept(now, session="s1")
    return conn


def test_connect_negotiates_and_answers_connected():
    conn = connected(version="1.0,1.1,1.2", heart_beat="5000,20000")
    ((command, headers, _),) = frames(conn)
    assert command == "CONNECTED"
    assert headers["version"] == "1.2"
    assert headers["heart-beat"] == "20000,10000"
    assert headers["server"] == "appliance" and headers["session"] == "s1"
    assert conn.state is State.CONNECTED


@pytest.mark.parametrize(
    "accept, version",
    [(None, "1.0"), ("1.0", "1.0"), ("1.1", "1.1"), ("1.1,1.2", "1.2"), ("1.2,2.0", "1.2"), ("2.0", None)],
)
def test_version_negotiation(accept, version):
    assert negotiate_version(accept) == version


@pytest.mark.parametrize(
    "client, ours, result",
    [
        (None, (10000, 10000), (0, 0)),
        ("0,0", (10000, 10000), (0, 0)),
        ("5000,20000", (10000, 10000), (20000, 10000)),
        ("30000,0", (10000, 10000), (0, 30000)),
        ("1000,1000", (0, 0), (0, 0)),
    ],
)
def test_heartbeat_negotiation(client, ours, result):
    assert negotiate_heartbeat(client, ours) == result


def test_unsupported_version_is_error_then_closed():
    conn = StompServerConnection()
    (event,) = conn.receive_data(b"CONNECT\naccept-version:2.0\n\n\x00", 0.0)
    assert isinstance(event, ConnectionFailed)
    ((command, headers, body),) = frames(conn)
    assert command == "ERROR" and "1.0,1.1,1.2" in headers["message"] and body
    assert conn.closed
    assert conn.receive_data(b"SEND\ndestination:/app/x\n\n\x00", 1.0) == []


def test_send_before_connect_is_error_then_closed():
    conn = StompServerConnection()
    (event,) = conn.receive_data(b"SEND\ndestination:/app/x\n\n\x00", 0.0)
    assert isinstance(event, ConnectionFailed) and "before CONNECT" in event.message
    assert frames(conn)[0][0] == "ERROR" and conn.closed


PIPELINED = (
    b"CONNECT\naccept-version:1.2\n\n\x00SUBSCRIBE\nid:1\ndestination:/x\n\n\x00"
    b"SEND\ndestination:/app/x\n\n{}\x00"
)


def test_frames_behind_a_connect_wait_for_the_application_s_answer():
    # As a server that checks the token before reading on would see them (Spring does).
    conn = StompServerConnection()
    (event,) = conn.receive_data(PIPELINED, 0)
    assert isinstance(event, ConnectRequested)
    assert conn.receive_data(b"", 0) == [] and conn.state is State.CONNECTING
    conn.accept(0)
    subscribed, sent = conn.receive_data(b"", 0)
    assert isinstance(subscribed, Subscribed) and isinstance(sent, MessageSent)
    assert [f[0] for f in frames(conn)] == ["CONNECTED"]


def test_frames_behind_a_rejected_connect_are_dropped():
    conn = StompServerConnection()
    conn.receive_data(PIPELINED, 0)
    conn.reject("forbidden")
    assert conn.receive_data(b"", 0) == [] and [f[0] for f in frames(conn)] == ["ERROR"]


def test_what_waits_behind_a_connect_is_bounded():
    conn = StompServerConnection(Limits(max_frame_bytes=1024))
    conn.receive_data(b"CONNECT\naccept-version:1.2\n\n\x00", 0)
    assert conn.receive_data(b"SEND\ndestination:/app/x\n\n{}\x00" * 30, 0) == []
    (event,) = conn.receive_data(b"SEND\ndestination:/app/x\n\n{}\x00" * 10, 0)
    assert isinstance(event, ConnectionFailed) and "before CONNECTED" in event.message and conn.closed


def test_reject_sends_error_and_closes():
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\n\n\x00", 0)
    conn.reject("forbidden")
    ((command, headers, _),) = frames(conn)
    assert (command, headers["message"]) == ("ERROR", "forbidden") and conn.closed


def test_subscribe_send_unsubscribe_and_receipts():
    conn = connected()
    conn.data_to_send()
    events = conn.receive_data(
        b"SUBSCRIBE\nid:sub-0\ndestination:/topic/user/status\nreceipt:r1\n\n\x00"
        b'SEND\ndestination:/app/user/status\ncontent-length:6\n\n["u1"]\x00'
        b"UNSUBSCRIBE\nid:sub-0\nreceipt:r2\n\n\x00",
        1.0,
    )
    assert isinstance(events[0], Subscribed) and events[0].destination == "/topic/user/status"
    assert isinstance(events[1], MessageSent) and events[1].frame.body == b'["u1"]'
    assert isinstance(events[2], Unsubscribed) and events[2].id == "sub-0"
    assert [(c, h["receipt-id"]) for c, h, _ in frames(conn)] == [("RECEIPT", "r1"), ("RECEIPT", "r2")]
    assert conn.subscriptions == {}


def test_subscribe_needs_id_and_destination_and_unique_ids():
    conn = connected()
    (event,) = conn.receive_data(b"SUBSCRIBE\ndestination:/x\n\n\x00", 0)
    assert isinstance(event, ConnectionFailed) and "without id" in event.message
    conn = connected()
    conn.receive_data(b"SUBSCRIBE\nid:1\ndestination:/x\n\n\x00", 0)
    (event,) = conn.receive_data(b"SUBSCRIBE\nid:1\ndestination:/y\n\n\x00", 0)
    assert isinstance(event, ConnectionFailed) and "already in use" in event.message
    conn = connected()
    (event,) = conn.receive_data(b"SEND\n\nbody\x00", 0)
    assert isinstance(event, ConnectionFailed) and "without destination" in event.message


def test_stomp_10_subscription_ids_default_to_the_destination():
    conn = connected(version="1.0")
    (event,) = conn.receive_data(b"SUBSCRIBE\ndestination:/topic/a\n\n\x00", 0)
    assert event.id == "/topic/a"
    (event,) = conn.receive_data(b"UNSUBSCRIBE\ndestination:/topic/a\n\n\x00", 0)
    assert isinstance(event, Unsubscribed)


def test_subscription_cap():
    conn = connected(limits=Limits(max_subscriptions=2))
    for i in range(2):
        conn.receive_data(f"SUBSCRIBE\nid:{i}\ndestination:/d{i}\n\n\x00", 0)
    (event,) = conn.receive_data(b"SUBSCRIBE\nid:9\ndestination:/d9\n\n\x00", 0)
    assert isinstance(event, ConnectionFailed) and conn.closed


def test_oversized_frame_is_error_then_closed():
    conn = connected(limits=Limits(max_frame_bytes=1024))
    conn.data_to_send()
    (event,) = conn.receive_data(b"SEND\ndestination:/app/x\n\n" + b"x" * 2000, 0)
    assert isinstance(event, ConnectionFailed) and "larger than 1024" in event.message
    assert frames(conn)[0][0] == "ERROR"


def test_disconnect_with_receipt():
    conn = connected()
    conn.data_to_send()
    (event,) = conn.receive_data(b"DISCONNECT\nreceipt:bye\n\n\x00", 0)
    assert isinstance(event, DisconnectRequested) and event.receipt == "bye"
    assert frames(conn) == [("RECEIPT", {"receipt-id": "bye"}, b"")]
    assert conn.closed


def test_ack_and_transactions_only_earn_receipts():
    conn = connected()
    conn.data_to_send()
    assert conn.receive_data(b"BEGIN\ntransaction:t\nreceipt:1\n\n\x00ACK\nid:x\n\n\x00", 0) == []
    assert [h["receipt-id"] for _, h, _ in frames(conn)] == ["1"]


def test_message_frames_carry_subscription_and_utf8_body():
    conn = connected()
    conn.data_to_send()
    conn.receive_data(b"SUBSCRIBE\nid:sub-7\ndestination:/user/queue/errors\n\n\x00", 0)
    conn.send_message("/user/queue/errors", "sub-7", '{"code":400,"message":"参数错误"}'.encode())
    ((command, headers, body),) = frames(conn)
    assert command == "MESSAGE" and headers["subscription"] == "sub-7"
    assert body.decode() == '{"code":400,"message":"参数错误"}'


def test_heartbeats_are_sent_and_silence_times_out():
    conn = connected(heart_beat="10000,10000", now=100.0)
    conn.data_to_send()
    assert conn.get_timer() == 110.0
    conn.handle_timer(105.0)
    assert conn.data_to_send() == []
    conn.handle_timer(110.0)
    assert conn.data_to_send() == [b"\n"]
    conn.receive_data(b"\n", 115.0)  # the client's heart-beat
    assert conn.get_timer() == 120.0
    assert conn.handle_timer(134.9) == []
    (event,) = conn.handle_timer(135.0)  # 2 intervals of silence after 115
    assert isinstance(event, ConnectionFailed) and event.message == "heart-beat timeout"
    assert conn.closed and conn.get_timer() is None


def test_no_heartbeats_when_the_client_asks_for_none():
    conn = connected(heart_beat="0,0")
    assert conn.get_timer() is None


# ---------------------------------------------------------------- the application's calls, by state


def awaiting_connect():
    return StompServerConnection()


def connecting():
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\n\n\x00", 0)
    return conn


def closed_by_the_client():
    conn = connected()
    conn.receive_data(b"DISCONNECT\n\n\x00", 0)
    return conn


def closed_by_the_server():
    conn = connecting()
    conn.close_with_error("no CONNECT within 10 s")  # the deadline won the race
    return conn


def accepting(conn):
    conn.accept(0)


def rejecting(conn):
    conn.reject("unauthorized")


def messaging(conn):
    conn.send_message("/user/queue/errors", "sub-0", b"{}")


@pytest.mark.parametrize(
    "make, call",
    [
        (awaiting_connect, accepting),  # nothing to accept yet
        (connected, accepting),  # accepting twice
        (closed_by_the_server, accepting),  # the caller did not check `closed` after its await
        (awaiting_connect, rejecting),  # no CONNECT pending
        (connected, rejecting),  # ending a session is close_with_error's
        (awaiting_connect, messaging),  # no subscription can exist before CONNECTED
        (connecting, messaging),
    ],
)
def test_a_call_the_state_does_not_allow_is_the_application_s_bug(make, call):
    conn = make()
    state, queued = conn.state, conn.has_output
    with pytest.raises(LocalProtocolError):
        call(conn)
    assert conn.state is state and conn.has_output == queued  # nothing changed


@pytest.mark.parametrize("make", [closed_by_the_client, closed_by_the_server])
def test_what_may_race_with_a_close_is_a_silent_no_op(make):
    conn = make()
    conn.data_to_send()
    messaging(conn)  # a MESSAGE for a session that has just gone
    conn.close_with_error("server shutting down")
    assert conn.receive_data(b"SEND\ndestination:/app/x\n\n{}\x00", 1) == []
    assert conn.handle_timer(1000) == [] and conn.get_timer() is None
    assert conn.data_to_send() == [] and conn.closed


def test_a_reject_after_the_deadline_closed_the_connection_is_a_no_op():
    conn = closed_by_the_server()
    assert [f[0] for f in frames(conn)] == ["ERROR"]
    rejecting(conn)  # the token check ended after the deadline
    assert conn.data_to_send() == [] and conn.closed
