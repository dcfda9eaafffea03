"""The SockJS server protocol at the HTTP level (the sockjs-protocol suite's classes for
our transports: Protocol, InfoTest, SessionURLs, XhrPolling, XhrStreaming, EventSource,
HandlingClose, JSONEncoding), plus STOMP carried over it."""

from __future__ import annotations

import asyncio
import json

import pytest
from quart import Quart

from signaling.app import create_app
from signaling.auth import StaticVerifier
from signaling.broker import MemoryBroker
from signaling.origins import OriginPolicy
from signaling.service import SignalingService
from signaling.sockjs.protocol import (
    DISCONNECT_DELAY_S,
    PayloadError,
    SockJSSession,
    close_frame,
    decode_payload,
    message_frame,
    quote,
)
from signaling.sockjs.server import SockJSServer
from signaling.stomp import Limits

BASE = "/imserver/ws"
CONNECT = "CONNECT\naccept-version:1.2\nide:tok-a\n\n\x00"


@pytest.fixture
def client():
    app = create_app(
        "/imserver",
        StaticVerifier({"tok-a": "alice"}),
        Limits(heartbeat_ms=(0, 0)),
        64,
        origins=OriginPolicy(["https://app.example"]),
    )
    return app.web.test_client()


async def text(response) -> str:
    return await response.get_data(as_text=True)


async def test_greeting(client):
    for path in (BASE, BASE + "/"):
        response = await client.get(path)
        assert response.status_code == 200 and await text(response) == "Welcome to SockJS!\n"
        assert response.content_type.startswith("text/plain")


async def test_info(client):
    response = await client.get(BASE + "/info?userId=alice", headers={"Origin": "https://app.example"})
    body = await response.get_json()
    assert body["websocket"] is True and body["cookie_needed"] is False
    assert body["origins"] == ["*:*"] and isinstance(body["entropy"], int)
    assert "no-cache" in response.headers["Cache-Control"]
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert (await (await client.get(BASE + "/info")).get_json())["entropy"] != body["entropy"]


async def test_info_options(client):
    response = await client.options(BASE + "/info", headers={"Origin": "https://app.example"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "GET" in response.headers["Access-Control-Allow-Methods"]
    assert int(response.headers["Access-Control-Max-Age"]) > 1000


@pytest.mark.parametrize("path", ["/a.b/c/xhr", "/a/c.d/xhr", "//c/xhr"])
async def test_session_urls_reject_dots_and_empty_parts(client, path):
    assert (await client.post(BASE + path)).status_code == 404


async def test_xhr_polling_session(client):
    url = BASE + "/000/s1/"
    assert await text(await client.post(url + "xhr?userId=alice")) == "o\n"
    response = await client.post(url + "xhr_send", data=json.dumps([CONNECT]))
    assert response.status_code == 204
    frame = await text(await client.post(url + "xhr"))
    assert frame.startswith("a[") and frame.endswith("]\n")
    (stomp_frame,) = json.loads(frame[1:])
    assert stomp_frame.startswith("CONNECTED\nversion:1.2\n")


async def test_xhr_send_errors(client):
    url = BASE + "/000/s2/"
    await client.post(url + "xhr")
    assert (await client.post(BASE + "/000/unknown/xhr_send", data="[]")).status_code == 404
    response = await client.post(url + "xhr_send", data="")
    assert response.status_code == 500 and await text(response) == "Payload expected."
    response = await client.post(url + "xhr_send", data='["a"')
    assert response.status_code == 500 and await text(response) == "Broken JSON encoding."


async def test_closed_session_answers_go_away(client):
    url = BASE + "/000/s3/"
    await client.post(url + "xhr?userId=alice")
    await client.post(url + "xhr_send", data=json.dumps(["SEND\ndestination:/app/x\n\n\x00"]))
    frame = await text(await client.post(url + "xhr"))
    (error,) = json.loads(frame[1:])
    assert error.startswith("ERROR\n")  # SEND before CONNECT
    assert await text(await client.post(url + "xhr")) == 'c[3000,"Go away!"]\n'


async def test_xhr_streaming_prelude_open_and_frames(client):
    url = BASE + "/000/s4/"
    async with client.request(url + "xhr_streaming?userId=alice", method="POST") as connection:
        await connection.send_complete()
        data = b""
        while b"o\n" not in data:
            data += await connection.receive()
        assert data.startswith(b"h" * 2048 + b"\n")
        await client.post(url + "xhr_send", data=json.dumps([CONNECT]))
        while b"a[" not in data:
            data += await connection.receive()
        assert b"CONNECTED" in data
        await connection.disconnect()


async def test_eventsource(client):
    url = BASE + "/000/s5/"
    async with client.request(url + "eventsource?userId=alice", method="GET") as connection:
        await connection.send_complete()
        data = b""
        while b"data: o\r\n\r\n" not in data:
            data += await connection.receive()
        assert data.startswith(b"\r\n")
        await connection.disconnect()


def test_json_encoding_escapes_what_browsers_mangle_and_keeps_chinese():
    assert quote("你好") == '"你好"'
    assert quote("\u2028\u0000\ufeff") == '"\\u2028\\u0000\\ufeff"'
    assert json.loads(message_frame(["a\u2028b", "中"])[1:]) == ["a\u2028b", "中"]
    assert close_frame(3000, "Go away!") == 'c[3000,"Go away!"]'


@pytest.mark.parametrize("payload, messages", [('["a","b"]', ["a", "b"]), ('"x"', ["x"]), ("[]", [])])
def test_payloads(payload, messages):
    assert decode_payload(payload) == messages


@pytest.mark.parametrize("payload", ["", "[1]", "{", "{}"])
def test_bad_payloads(payload):
    with pytest.raises(PayloadError):
        decode_payload(payload)


def test_session_expires_without_a_receiver():
    session = SockJSSession("s", now=0.0)
    assert session.first_frame() == "o" and session.first_frame() is None
    assert session.attach(1.0) and not session.attach(1.5)  # a second receiver is refused
    assert not session.expired(100.0)  # attached: never expires
    session.detach(2.0)
    assert not session.expired(2.0 + DISCONNECT_DELAY_S)
    assert session.expired(2.1 + DISCONNECT_DELAY_S)


async def test_stomp_heartbeats_travel_as_an_eol_message_inside_an_a_frame():
    # SockJS `h` frames never reach stomp.js, so a STOMP heart-beat must be the
    # message "\n" in an a-frame; driven on the endpoint's own clock, no sleeping.
    from signaling.broker import MemoryBroker
    from signaling.endpoint import StompEndpoint
    from signaling.service import SignalingService
    from signaling.sockjs.server import Carrier

    service = SignalingService(MemoryBroker(), StaticVerifier({"tok-a": "alice"}))
    carrier = Carrier(
        SockJSSession("s", 0.0),
        lambda wake, overflow: StompEndpoint(
            service, Limits(heartbeat_ms=(1000, 0)), 64, "alice", 0.0, wake, overflow=overflow
        ),
    )
    await carrier.endpoint.feed("CONNECT\naccept-version:1.2\nide:tok-a\nheart-beat:0,1000\n\n\x00", 0.0)
    assert carrier.next_frame().startswith('a["CONNECTED')
    assert carrier.endpoint.next_timer() == 1.0
    carrier.endpoint.tick(1.0)
    assert carrier.next_frame() == 'a["\\n"]'


async def test_second_receiver_gets_another_connection_still_open(client):
    import asyncio

    url = BASE + "/000/s6/"
    assert await text(await client.post(url + "xhr?userId=alice")) == "o\n"
    first = asyncio.ensure_future(client.post(url + "xhr"))  # a long poll, held open
    await asyncio.sleep(0.05)
    second = await client.post(url + "xhr")
    assert await text(second) == 'c[2010,"Another connection still open"]\n'
    await client.post(url + "xhr_send", data=json.dumps([CONNECT]))
    assert (await text(await first)).startswith('a["CONNECTED')


async def test_streaming_response_ends_after_128_kib(client):
    url = BASE + "/000/s7/"
    async with client.request(url + "xhr_streaming?userId=alice", method="POST") as connection:
        await connection.send_complete()
        received = b""
        while b"o\n" not in received:  # the session exists once it has opened
            received += await connection.receive()
        await client.post(url + "xhr_send", data=json.dumps([CONNECT]))
        await client.post(
            url + "xhr_send", data=json.dumps(["SUBSCRIBE\nid:s\ndestination:/topic/user/status\n\n\x00"])
        )
        ids = [f"user-{i:04d}-{'x' * 40}" for i in range(200)]
        query = "SEND\ndestination:/app/user/status\ncontent-length:%d\n\n%s\x00"
        body = json.dumps(ids)
        for _ in range(20):  # 20 answers of ~9 KiB: past the 128 KiB limit
            await client.post(url + "xhr_send", data=json.dumps([query % (len(body), body)]))
        while True:
            chunk = await connection.receive()
            if not chunk:
                break
            received += chunk
        assert 128 * 1024 <= len(received) < 128 * 1024 + 20000
    # The session survives the closed stream: the next poll carries on.
    frame = await text(await client.post(url + "xhr"))
    assert frame.startswith('a["MESSAGE')


class ShiftedClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock reads a day ahead of time.monotonic(): whatever keeps time
    on another clock shows up a day off."""

    def time(self) -> float:
        return super().time() + 86400.0


def test_a_sockjs_session_keeps_time_on_the_event_loop_s_clock():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        service = SignalingService(MemoryBroker(), StaticVerifier({"tok-a": "alice"}))
        sockjs = SockJSServer(service, Limits(heartbeat_ms=(0, 0)), 64)
        web = Quart("sockjs-clock")
        sockjs.install(web, BASE)
        client = web.test_client()
        url = BASE + "/000/s1/"
        assert await text(await client.post(url + "xhr?userId=alice")) == "o\n"
        carrier = sockjs.carriers["s1"]
        try:
            # Created: the SockJS session and the STOMP endpoint's CONNECT deadline agree.
            deadline = carrier.endpoint.connect_deadline - sockjs.guard.policy.connect_timeout_s
            assert carrier.sockjs.last_seen == deadline
            await client.post(url + "xhr_send", data=json.dumps([CONNECT]))
            assert (await text(await client.post(url + "xhr"))).startswith('a["CONNECTED')
            # A receiver came and went: seen now, on the loop's clock (expiry compares the two).
            assert loop.time() - 5 < carrier.sockjs.last_seen <= loop.time()
            assert not carrier.sockjs.expired(loop.time())
        finally:
            carrier.task.cancel()

    loop = ShiftedClockLoop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
