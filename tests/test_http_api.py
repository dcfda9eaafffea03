"""The HTTP envelope: unknown paths, wrong methods and failures all answer
{"code", "msg", "data"} with the matching status and no stack trace; the one error type
(SignalingError) reads the same in the envelope and on a STOMP client's errors queue."""

from __future__ import annotations

import json

import pytest

from signaling.app import create_app
from signaling.auth import StaticVerifier
from signaling.errors import SignalingError
from signaling.http_api import authenticated_user, envelope
from signaling.session import Session
from signaling.stomp import Limits, StompServerConnection


def make_app():
    verifier = StaticVerifier({"tok-a": "alice"})
    app = create_app("/imserver", verifier, Limits(), 64).web

    @app.route("/imserver/test/whoami")
    async def whoami():
        return envelope(data={"userId": await authenticated_user(verifier)})

    @app.route("/imserver/test/boom")
    async def boom():
        raise RuntimeError("secret internals")

    @app.route("/imserver/test/busy")
    async def busy():
        raise SignalingError(1001, "callee busy")

    return app


async def test_unknown_path_is_a_404_envelope():
    client = make_app().test_client()
    response = await client.get("/imserver/nothing-here")
    assert response.status_code == 404
    assert await response.get_json() == {"code": 404, "msg": "not found", "data": None}


async def test_wrong_method_is_405_envelope():
    response = await make_app().test_client().post("/imserver/test/whoami")
    assert response.status_code == 405 and (await response.get_json())["code"] == 405


async def test_ide_token_is_required_and_checked():
    client = make_app().test_client()
    response = await client.get("/imserver/test/whoami")
    assert response.status_code == 401 and (await response.get_json())["code"] == 401
    response = await client.get("/imserver/test/whoami", headers={"ide": "bad"})
    assert response.status_code == 401
    response = await client.get("/imserver/test/whoami", headers={"ide": "tok-a"})
    assert await response.get_json() == {"code": 200, "msg": "ok", "data": {"userId": "alice"}}


async def test_failures_are_500_without_internals():
    response = await make_app().test_client().get("/imserver/test/boom")
    body = await response.get_data(as_text=True)
    assert response.status_code == 500 and "secret internals" not in body
    assert (await response.get_json())["code"] == 500


async def test_business_errors_go_out_with_status_200():
    response = await make_app().test_client().get("/imserver/test/busy")
    assert response.status_code == 200
    assert await response.get_json() == {"code": 1001, "msg": "callee busy", "data": None}


@pytest.mark.parametrize(
    "code, message",
    [(401, "unauthorized"), (404, "not found"), (413, "request too large"), (500, "internal error")],
)
def test_an_error_without_a_message_carries_its_code_s_standard_one(code, message):
    err = SignalingError(code)
    assert (err.code, err.message) == (code, message)
    assert json.loads(err.body()) == {"code": code, "message": message}


async def test_a_refused_call_says_the_same_over_http_and_stomp():
    signaling = create_app("/imserver", StaticVerifier({"tok-a": "alice", "tok-b": "bob"}), Limits(), 64)
    client = signaling.web.test_client()
    request = {"callId": "c1", "callee": "bob", "callerUserName": "A", "calleeUserName": "B", "type": "AUDIO"}
    # Bob is offline: the call is refused with a business code.
    response = await client.post("/imserver/call/request", json=request, headers={"ide": "tok-a"})
    enveloped = await response.get_json()
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\n\n\x00", 0)
    conn.accept(0)
    alice = Session("a1", "alice", conn)
    signaling.service.connected(alice)
    raw = (
        b"SUBSCRIBE\nid:e\ndestination:/user/queue/errors\n\n\x00SEND\ndestination:"
        b"/app/call/request\n\n" + json.dumps(request).encode() + b"\x00"
    )
    for event in conn.receive_data(raw, 0):
        signaling.service.handle(alice, event)
    *_, message = alice.take()
    queued = json.loads(message.partition(b"\n\n")[2][:-1])
    assert response.status_code == 200 and enveloped["code"] > 1000
    assert queued == {"code": enveloped["code"], "message": enveloped["msg"]}
