"""Operators and real STOMP clients (stomp.py over a native WebSocket): `appliance sessions`
lists them from the admin listener of a running appliance, and DELETE /admin/sessions
disconnects alice with an ERROR frame while she is in a call with bob, who then hears the
normal hangup (calls.grace_s is 1 s in the interop settings)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import urllib.request
import uuid

import stomp

from .conftest import ADMIN_TOKEN

WAIT_S = 5
TOKENS = {"alice": "tok-alice", "bob": "tok-bob"}
DESTINATIONS = ("/user/queue/call/request", "/user/queue/call/response", "/user/queue/call/hangup")


class Client(stomp.ConnectionListener):
    def __init__(self, relay, user: str) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.gone = threading.Event()
        self.conn = stomp.WSConnection(
            [("127.0.0.1", relay.http_port)],
            ws_path=f"/imserver/ws?userId={user}",
            heartbeats=(0, 0),
            reconnect_attempts_max=1,
        )
        self.conn.set_listener("client", self)
        self.conn.connect(headers={"ide": TOKENS[user]}, wait=True)
        for i, destination in enumerate(DESTINATIONS):
            self.conn.subscribe(destination, id=f"s{i}")
        self.conn.subscribe("/topic/user/status", id="status")  # a round trip: subscribed
        self.send("/app/user/status", [user])
        assert self.next()[0] == "/topic/user/status"

    def on_message(self, frame) -> None:
        self.inbox.put((frame.headers["destination"], json.loads(frame.body)))

    def on_error(self, frame) -> None:
        self.errors.append(frame.headers.get("message", ""))

    def on_disconnected(self) -> None:
        self.gone.set()

    def send(self, destination: str, body) -> None:
        self.conn.send(destination, json.dumps(body), content_type="application/json")

    def next(self):
        return self.inbox.get(timeout=WAIT_S)

    def close(self) -> None:
        if self.conn.is_connected():
            self.conn.disconnect()


def admin(relay, method: str, path: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{relay.admin_port}{path}",
        method=method,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        return json.load(response)


def test_delete_disconnects_a_real_client_and_its_call_partner_hears_the_hangup(relay):
    alice, bob = Client(relay, "alice"), Client(relay, "bob")
    call_id = f"op-{uuid.uuid4().hex[:8]}"
    try:
        alice.send(
            "/app/call/request",
            {"callId": call_id, "callee": "bob", "callerUserName": "A", "calleeUserName": "B"},
        )
        assert bob.next()[0] == "/user/queue/call/request"
        bob.send("/app/call/response", {"callId": call_id, "type": "ACCEPT"})
        assert alice.next() == ("/user/queue/call/response", {"callId": call_id, "type": "ACCEPT"})

        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                "sessions",
                "--user",
                "alice",
                "--config",
                str(relay.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.returncode == 0, listed.stderr
        (row,) = [line.split() for line in listed.stdout.splitlines() if " alice " in line]
        assert row[2] == "websocket" and row[3].startswith("127.0.0.1:") and row[-1] == call_id
        calls = admin(relay, "GET", "/admin/calls")["calls"]
        assert [(c["caller"], c["callee"], c["state"]) for c in calls if c["callId"] == call_id] == [
            ("alice", "bob", "accepted")
        ]

        answer = admin(relay, "DELETE", "/admin/sessions?user=alice")
        assert answer["disconnected"] == 1
        assert alice.gone.wait(WAIT_S)
        assert any("disconnected by the operator" in e for e in alice.errors), alice.errors
        assert bob.next() == ("/user/queue/call/hangup", {"callId": call_id})  # after the 1 s grace
        assert admin(relay, "GET", "/admin/sessions?user=alice")["sessions"] == []
    finally:
        alice.close()
        bob.close()
