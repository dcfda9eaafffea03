"""Two appliance processes on one Redis (broker.url), with stomp.py clients: Alice on
node 1 calls Bob, who has a phone on node 1 and a laptop on node 2.  Ringing,
call/down, RTC signaling, hangup, the HTTP twins and the ring timeout behave as on
one node, for stomp.py and for @stomp/stompjs; killing node 2 marks Bob's session there
offline within the node TTL.
Then a Redis outage: 503 to clients, /readyz false, and service back with Redis."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

from .conftest import start_appliance, stop_appliance
from .test_calls_stomp import Device, call_request
from .test_credentials_admin import admin, metric_samples
from .test_js_clients import run_js_call

NODE_TTL_S = 3
RING_TIMEOUT_S = 3


@pytest.fixture
def two_nodes(tmp_path, redis_url, redis_prefix):
    broker = {"url": redis_url, "prefix": redis_prefix, "node_ttl_s": NODE_TTL_S}
    calls = {"ring_timeout_s": RING_TIMEOUT_S, "grace_s": 1}
    nodes = [start_appliance(tmp_path / f"node{i}", broker=broker, calls=calls) for i in (1, 2)]
    yield nodes
    for node in nodes:
        if node.proc.poll() is None:
            assert stop_appliance(node) == 0, node.log()


def http_post(node, path: str, body, token: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.http_port}/imserver{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"ide": token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def test_a_call_across_two_nodes(two_nodes):
    one, two = two_nodes
    alice, phone, laptop = Device(one, "alice"), Device(one, "bob"), Device(two, "bob")
    try:
        # Ringing on both devices, answered on node 2.
        alice.send("/app/call/request", call_request("x-1"))
        for device in (phone, laptop):
            assert device.next() == ("/user/queue/call/request", {**call_request("x-1"), "caller": "alice"})
        laptop.send("/app/call/response", {"callId": "x-1", "type": "ACCEPT"})
        assert alice.next() == ("/user/queue/call/response", {"callId": "x-1", "type": "ACCEPT"})
        assert phone.next() == ("/user/queue/call/down", {"callId": "x-1", "type": "ACCEPT"})
        phone.send("/app/call/response", {"callId": "x-1", "type": "ACCEPT"})
        assert phone.next()[1]["code"] == 1004
        # Signaling both ways, only between the two devices in the call.
        offer = {"callId": "x-1", "type": "OFFER", "payload": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"}
        alice.send("/app/rtc/signaling", offer)
        assert laptop.next() == ("/user/queue/rtc/signaling", {**offer, "from": "alice"})
        answer = {"callId": "x-1", "type": "ANSWER", "payload": "v=0\r\n"}
        laptop.send("/app/rtc/signaling", answer)
        assert alice.next() == ("/user/queue/rtc/signaling", {**answer, "from": "bob"})
        # Busy for a caller on either node.
        carol = Device(two, "carol")
        carol.send("/app/call/request", call_request("x-2"))
        assert carol.next() == ("/user/queue/errors", {"code": 1001, "message": "callee busy"})
        alice.send("/app/call/hangup", {"callId": "x-1"})
        assert laptop.next() == ("/user/queue/call/hangup", {"callId": "x-1"})
        assert phone.quiet() and alice.quiet()

        # The HTTP twin: Carol calls from node 2 (which owns the call), Bob rejects over
        # HTTP on node 1, which forwards it to node 2 and answers with its result.
        carol.send("/app/call/request", call_request("x-3"))
        for device in (phone, laptop):
            assert device.next()[0] == "/user/queue/call/request"
        assert http_post(one, "/call/response", {"callId": "x-3", "type": "REJECT"}, "tok-bob")["code"] == 200
        assert carol.next() == ("/user/queue/call/response", {"callId": "x-3", "type": "REJECT"})
        for device in (phone, laptop):
            assert device.next() == ("/user/queue/call/down", {"callId": "x-3", "type": "REJECT"})
        again = http_post(one, "/call/response", {"callId": "x-3", "type": "ACCEPT"}, "tok-bob")
        assert again["code"] == 1003

        # Nobody answers: one timeout each, from the one node that owns the call.
        alice.send("/app/call/request", call_request("x-4"))
        for device in (phone, laptop):
            assert device.next()[0] == "/user/queue/call/request"
        for device in (alice, phone, laptop):
            assert device.next(RING_TIMEOUT_S + 3) == ("/user/queue/call/timeout", {"callId": "x-4"})
        for device in (alice, phone, laptop):
            assert device.quiet(1.0)
        carol.close()
    finally:
        for device in (alice, phone, laptop):
            device.close()


def test_stompjs_devices_call_across_nodes(two_nodes):
    """The web client stack, unchanged: @stomp/stompjs under Node, Alice and Bob's laptop on
    node 1, Bob's phone (which answers) on node 2."""
    one, two = two_nodes
    run_js_call(f"http://127.0.0.1:{one.http_port}", f"http://127.0.0.1:{two.http_port}")


def test_a_killed_node_takes_its_sessions_offline_within_the_ttl(two_nodes):
    """Bob has a phone on node 1 and a laptop on node 2, Carol only a session on node 2.
    Node 2 dies without a word: Carol goes OFFLINE within the TTL, Bob stays ONLINE on his
    phone, and a call to Bob rings there and connects."""
    one, two = two_nodes
    alice, phone = Device(one, "alice"), Device(one, "bob")
    Device(two, "bob"), Device(two, "carol")  # sessions that die with node 2
    try:
        alice.send("/app/user/status", ["bob", "carol"])
        assert alice.next() == (
            "/topic/user/status",
            [{"userId": "bob", "status": "ONLINE"}, {"userId": "carol", "status": "ONLINE"}],
        )
        two.proc.send_signal(signal.SIGKILL)  # no goodbye
        killed = time.monotonic()
        assert alice.next(NODE_TTL_S * 3) == (
            "/topic/user/status",
            [{"userId": "carol", "status": "OFFLINE"}],
        )
        assert time.monotonic() - killed <= NODE_TTL_S * 2 + 1
        assert alice.quiet(0.5)  # Bob is still online, on his phone
        alice.send("/app/call/request", call_request("k-1"))
        assert phone.next() == ("/user/queue/call/request", {**call_request("k-1"), "caller": "alice"})
        phone.send("/app/call/response", {"callId": "k-1", "type": "ACCEPT"})
        assert alice.next() == ("/user/queue/call/response", {"callId": "k-1", "type": "ACCEPT"})
        alice.send("/app/call/hangup", {"callId": "k-1"})
        assert phone.next() == ("/user/queue/call/hangup", {"callId": "k-1"})
        alice.send("/app/call/request", call_request("k-2", callee="carol"))
        assert alice.next() == ("/user/queue/errors", {"code": 1002, "message": "callee offline"})
    finally:
        for device in (alice, phone):
            device.close()
        two.proc.wait(5)


def readyz(node):
    return admin(node, "GET", "/readyz")


def broker_up(node) -> float:
    return metric_samples(admin(node, "GET", "/metrics").text)[("appliance_signaling_broker_up", ())]


def test_a_redis_outage_gives_503_and_heals(tmp_path, private_redis):
    node = start_appliance(tmp_path / "node", broker={"url": private_redis.url, "node_ttl_s": NODE_TTL_S})
    alice = Device(node, "alice")
    try:
        assert readyz(node).json()["checks"]["broker"] is True and broker_up(node) == 1
        private_redis.stop()
        deadline = time.monotonic() + NODE_TTL_S * 3 + 5
        while readyz(node).status_code == 200:
            assert time.monotonic() < deadline, "readiness stayed true without Redis"
            time.sleep(0.2)
        assert readyz(node).json()["checks"]["broker"] is False and broker_up(node) == 0
        alice.send("/app/call/request", call_request("o-1"))
        assert alice.next() == (
            "/user/queue/errors",
            {"code": 503, "message": "signaling backend unavailable, try again"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_post(node, "/call/hangup", {"callId": "o-1"}, "tok-alice")
        assert refused.value.code == 503 and json.load(refused.value)["code"] == 503
        credentials = urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{node.http_port}/imserver/turn/get-turn-credentials",
                headers={"ide": "tok-alice"},
            ),
            timeout=5,
        )
        assert json.load(credentials)["code"] == 200  # needs no Redis

        private_redis.start()
        deadline = time.monotonic() + 15
        while readyz(node).status_code != 200:
            assert time.monotonic() < deadline, "readiness did not come back with Redis"
            time.sleep(0.2)
        alice.send("/app/user/status", ["alice"])  # her session was written back
        assert alice.next() == ("/topic/user/status", [{"userId": "alice", "status": "ONLINE"}])
    finally:
        alice.close()
        assert stop_appliance(node) == 0, node.log()


def test_a_node_starts_before_redis_and_joins_when_it_answers(tmp_path, private_redis):
    private_redis.stop()
    node = start_appliance(tmp_path / "node", broker={"url": private_redis.url, "node_ttl_s": NODE_TTL_S})
    try:
        answer = readyz(node)
        assert answer.status_code == 503 and answer.json()["checks"]["broker"] is False
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_post(node, "/call/request", call_request("s-1"), "tok-alice")
        assert refused.value.code == 503
        private_redis.start()
        deadline = time.monotonic() + 15
        while readyz(node).status_code != 200:
            assert time.monotonic() < deadline, "the node did not join when Redis came"
            time.sleep(0.2)
        alice = Device(node, "alice")  # its status query is answered
        alice.close()
    finally:
        assert stop_appliance(node) == 0, node.log()
    log = node.log()
    assert "Redis does not answer (ConnectionError" in log and "Traceback" not in log
