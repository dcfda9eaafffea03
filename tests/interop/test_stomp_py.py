"""stomp.py (a STOMP client none of us wrote) over a native WebSocket against our
signaling: connect with the `ide` token, subscribe, query online status, see
ONLINE/OFFLINE pushes, get errors on /user/queue/errors, disconnect with a receipt;
and the refusals: no token, wrong token, another user's token."""

from __future__ import annotations

import json
import queue
import threading

import pytest
import stomp
from stomp.exception import ConnectFailedException

WAIT_S = 5


class Inbox(stomp.ConnectionListener):
    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.receipts: set[str] = set()
        self.receipt_seen = threading.Event()

    def on_message(self, frame) -> None:
        self.messages.put((frame.headers["destination"], json.loads(frame.body)))

    def on_error(self, frame) -> None:
        self.errors.append(frame.headers.get("message", ""))

    def on_receipt(self, frame) -> None:
        self.receipts.add(frame.headers["receipt-id"])
        self.receipt_seen.set()

    def next(self):
        return self.messages.get(timeout=WAIT_S)

    def nothing(self, wait: float = 0.3) -> bool:
        try:
            self.messages.get(timeout=wait)
        except queue.Empty:
            return True
        return False


def client(relay, user: str, token: str | None):
    conn = stomp.WSConnection(
        [("127.0.0.1", relay.http_port)], ws_path=f"/imserver/ws?userId={user}", heartbeats=(0, 0)
    )
    inbox = Inbox()
    conn.set_listener("inbox", inbox)
    headers = {"ide": token} if token else {}
    conn.connect(headers=headers, wait=True, with_connect_command=True)
    return conn, inbox


def subscribe_all(conn) -> None:
    conn.subscribe("/topic/user/status", id="status")
    conn.subscribe("/user/queue/errors", id="errors")


def send_json(conn, destination: str, payload) -> None:
    conn.send(destination, json.dumps(payload), content_type="application/json")


def test_status_query_pushes_and_disconnect_receipt(relay):
    alice, alice_in = client(relay, "alice", "tok-alice")
    subscribe_all(alice)
    send_json(alice, "/app/user/status", ["bob", "carol"])
    assert alice_in.next() == (
        "/topic/user/status",
        [{"userId": "bob", "status": "OFFLINE"}, {"userId": "carol", "status": "OFFLINE"}],
    )
    bob, bob_in = client(relay, "bob", "tok-bob")
    subscribe_all(bob)
    assert alice_in.next() == ("/topic/user/status", [{"userId": "bob", "status": "ONLINE"}])
    assert bob_in.nothing()  # bob asked about nobody
    bob.disconnect(receipt="bye-bob")
    assert "bye-bob" in bob_in.receipts
    assert alice_in.next() == ("/topic/user/status", [{"userId": "bob", "status": "OFFLINE"}])
    alice.disconnect()


def test_errors_reach_only_the_sender_and_the_connection_stays(relay):
    alice, alice_in = client(relay, "alice", "tok-alice")
    carol, carol_in = client(relay, "carol", "tok-carol")
    subscribe_all(alice)
    subscribe_all(carol)
    send_json(alice, "/app/user/status", {"not": "a list"})
    dest, body = alice_in.next()
    assert dest == "/user/queue/errors" and body["code"] == 400
    send_json(alice, "/topic/user/status", [])
    assert alice_in.next()[1]["code"] == 403
    send_json(alice, "/app/user/status", [f"u{i}" for i in range(201)])
    assert alice_in.next()[1]["code"] == 400
    send_json(alice, "/app/user/status", ["carol"])  # still connected and served
    assert alice_in.next() == ("/topic/user/status", [{"userId": "carol", "status": "ONLINE"}])
    assert carol_in.nothing()
    alice.disconnect()
    carol.disconnect()


@pytest.mark.parametrize(
    "user, token, message",
    [("alice", None, "unauthorized"), ("alice", "wrong", "unauthorized"), ("alice", "tok-bob", "forbidden")],
)
def test_refused_connects_get_an_error_frame(relay, user, token, message):
    conn = stomp.WSConnection(
        [("127.0.0.1", relay.http_port)],
        ws_path=f"/imserver/ws?userId={user}",
        heartbeats=(0, 0),
        reconnect_attempts_max=1,
    )
    inbox = Inbox()
    conn.set_listener("inbox", inbox)
    with pytest.raises(ConnectFailedException):
        conn.connect(headers={"ide": token} if token else {}, wait=True)
    assert any(message in e for e in inbox.errors), inbox.errors
