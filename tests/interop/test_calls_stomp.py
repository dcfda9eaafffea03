"""Calls end to end with stomp.py clients (and the HTTP twins): A calls B, who has a
phone and a laptop; both ring, the phone answers, the laptop gets call/down, offer,
answer and candidates flow A <-> phone only, A hangs up and only the phone hears it.
Then reject, cancel, timeout, busy, offline and a connection dropped mid-call."""

from __future__ import annotations

import json
import queue
import urllib.request

import stomp

DESTINATIONS = [
    "/user/queue/call/request",
    "/user/queue/call/response",
    "/user/queue/call/down",
    "/user/queue/call/hangup",
    "/user/queue/call/timeout",
    "/user/queue/rtc/signaling",
    "/user/queue/errors",
]
TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "carol": "tok-carol"}


class Device(stomp.ConnectionListener):
    def __init__(self, relay, user: str) -> None:
        self.user = user
        self.inbox: queue.Queue = queue.Queue()
        self.conn = stomp.WSConnection(
            [("127.0.0.1", relay.http_port)], ws_path=f"/imserver/ws?userId={user}", heartbeats=(0, 0)
        )
        self.conn.set_listener("device", self)
        self.conn.connect(headers={"ide": TOKENS[user]}, wait=True)
        for i, destination in enumerate(DESTINATIONS):
            self.conn.subscribe(destination, id=f"s{i}")
        # A round trip, so every SUBSCRIBE is in place before the test goes on.
        self.conn.subscribe("/topic/user/status", id="status")
        self.send("/app/user/status", [user])
        assert self.next()[0] == "/topic/user/status"

    def on_message(self, frame) -> None:
        self.inbox.put((frame.headers["destination"], json.loads(frame.body)))

    def send(self, destination: str, body) -> None:
        self.conn.send(destination, json.dumps(body, ensure_ascii=False), content_type="application/json")

    def next(self, timeout: float = 5.0):
        return self.inbox.get(timeout=timeout)

    def quiet(self, wait: float = 0.3) -> bool:
        try:
            got = self.inbox.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError(f"{self.user} got {got}")

    def close(self) -> None:
        if self.conn.is_connected():
            self.conn.disconnect()


def call_request(call_id: str, callee: str = "bob") -> dict:
    return {
        "callId": call_id,
        "type": "VIDEO",
        "callee": callee,
        "callerUserName": "爱丽丝",
        "calleeUserName": "Bob",
    }


def test_call_with_two_callee_devices(relay):
    alice, phone, laptop = Device(relay, "alice"), Device(relay, "bob"), Device(relay, "bob")
    try:
        alice.send("/app/call/request", call_request("call-1"))
        for device in (phone, laptop):
            assert device.next() == (
                "/user/queue/call/request",
                {**call_request("call-1"), "caller": "alice"},
            )
        phone.send("/app/call/response", {"callId": "call-1", "type": "ACCEPT"})
        assert alice.next() == ("/user/queue/call/response", {"callId": "call-1", "type": "ACCEPT"})
        assert laptop.next() == ("/user/queue/call/down", {"callId": "call-1", "type": "ACCEPT"})
        laptop.send("/app/call/response", {"callId": "call-1", "type": "ACCEPT"})
        assert laptop.next()[1]["code"] == 1004
        offer = {"callId": "call-1", "type": "OFFER", "payload": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"}
        alice.send("/app/rtc/signaling", offer)
        assert phone.next() == ("/user/queue/rtc/signaling", {**offer, "from": "alice"})
        answer = {"callId": "call-1", "type": "ANSWER", "payload": "v=0\r\n"}
        phone.send("/app/rtc/signaling", answer)
        assert alice.next() == ("/user/queue/rtc/signaling", {**answer, "from": "bob"})
        candidate = {
            "callId": "call-1",
            "type": "ICE_CANDIDATE",
            "payload": {
                "candidate": "candidate:1 1 udp 1 192.0.2.1 9 typ relay",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
            },
        }
        phone.send("/app/rtc/signaling", candidate)
        assert alice.next() == ("/user/queue/rtc/signaling", {**candidate, "from": "bob"})
        alice.send("/app/call/hangup", {"callId": "call-1"})
        assert phone.next() == ("/user/queue/call/hangup", {"callId": "call-1"})
        assert laptop.quiet() and alice.quiet()
    finally:
        for device in (alice, phone, laptop):
            device.close()


def test_reject_cancel_busy_offline_and_timeout(relay):
    alice, bob, carol = Device(relay, "alice"), Device(relay, "bob"), Device(relay, "carol")
    try:
        alice.send("/app/call/request", call_request("call-r"))
        bob.next()
        bob.send("/app/call/response", {"callId": "call-r", "type": "REJECT"})
        assert alice.next() == ("/user/queue/call/response", {"callId": "call-r", "type": "REJECT"})

        alice.send("/app/call/request", call_request("call-c"))
        bob.next()
        carol.send("/app/call/request", {**call_request("call-busy"), "callerUserName": "Carol"})
        assert carol.next() == ("/user/queue/errors", {"code": 1001, "message": "callee busy"})
        alice.send("/app/call/hangup", {"callId": "call-c"})  # cancel while ringing
        assert bob.next() == ("/user/queue/call/hangup", {"callId": "call-c"})

        alice.send("/app/call/request", call_request("call-off", callee="dave"))
        assert alice.next()[1]["code"] == 1002
        alice.send("/app/call/request", call_request("call-r"))
        assert alice.next()[1]["code"] == 1005

        alice.send("/app/call/request", call_request("call-t"))  # ring_timeout_s is 3 here
        bob.next()
        assert bob.next(timeout=6) == ("/user/queue/call/timeout", {"callId": "call-t"})
        assert alice.next(timeout=6) == ("/user/queue/call/timeout", {"callId": "call-t"})
        assert carol.quiet()
    finally:
        for device in (alice, bob, carol):
            device.close()


def test_dropped_connection_mid_call_hangs_up_after_grace(relay):
    alice, bob = Device(relay, "alice"), Device(relay, "bob")
    try:
        alice.send("/app/call/request", call_request("call-drop"))
        bob.next()
        bob.send("/app/call/response", {"callId": "call-drop", "type": "ACCEPT"})
        alice.next()
        bob.conn.disconnect()  # grace_s is 1 here
        assert alice.next(timeout=5) == ("/user/queue/call/hangup", {"callId": "call-drop"})
    finally:
        alice.close()
        bob.close()


def http_post(relay, path: str, token: str, body) -> dict:
    data = b"" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{relay.http_port}/imserver{path}",
        data=data,
        headers={"ide": token, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as response:
        return json.loads(response.read())


def test_http_twins(relay):
    alice, bob = Device(relay, "alice"), Device(relay, "bob")
    try:
        assert http_post(relay, "/call/request", "tok-alice", call_request("call-h")) == {
            "code": 200,
            "msg": "ok",
            "data": None,
        }
        assert bob.next()[0] == "/user/queue/call/request"
        assert http_post(relay, "/call/request", "tok-carol", call_request("call-h2"))["code"] == 1001
        assert (
            http_post(relay, "/call/response", "tok-bob", {"callId": "call-h", "type": "ACCEPT"})["code"]
            == 200
        )
        assert alice.next() == ("/user/queue/call/response", {"callId": "call-h", "type": "ACCEPT"})
        # Answered over HTTP, so no STOMP session of bob's took it: they all stop ringing.
        assert bob.next() == ("/user/queue/call/down", {"callId": "call-h", "type": "ACCEPT"})
        assert http_post(relay, "/call/hangup", "tok-alice", None)["code"] == 200  # empty body: all calls
        assert bob.next() == ("/user/queue/call/hangup", {"callId": "call-h"})
        assert http_post(relay, "/call/hangup", "tok-alice", {"callId": "call-h"})["code"] == 1003
    finally:
        alice.close()
        bob.close()
