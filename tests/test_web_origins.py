"""Which web pages may use the signaling (signaling/origins.py), the `http.allowed_origins`
key, and the bounded xhr_send body (signaling/sockjs/request_body.py), without a server."""

from __future__ import annotations

import asyncio

import pytest

from appliance.config.loader import load_config
from appliance.config.schema import ConfigError
from signaling.origins import OriginPolicy, origin_problem
from signaling.sockjs.request_body import BodyState, read_body, respond

HOST = "im.example.com:8443"


@pytest.mark.parametrize(
    "origin, host, allowed",
    [
        (None, HOST, True),  # not a browser
        ("https://im.example.com:8443", HOST, True),  # the appliance's own pages
        ("http://im.example.com:8443", HOST, True),  # a TLS-terminating proxy in front
        ("HTTPS://IM.example.com:8443", HOST, True),
        ("https://im.example.com", "im.example.com", True),  # default ports on both sides
        ("https://im.example.com:443", "im.example.com", True),
        ("https://im.example.com", HOST, False),  # another port
        ("https://evil.example", HOST, False),
        ("https://evil.example", "evil.example", True),  # (its own origin, to itself)
        ("https://im.example.com.evil.example:8443", HOST, False),
        ("null", HOST, False),
        ("", HOST, False),
        ("https://im.example.com:8443/", HOST, False),  # not a serialized origin
        ("https://user@im.example.com:8443", HOST, False),
        ("https://im.example.com:8443\t", HOST, False),
        ("https://im.example.com:99999", HOST, False),
        ("https://im.example.com:8443", None, False),
        ("https://im.example.com:8443", "im.example.com:bad", False),
        ("http://[::1]:8443", "[::1]:8443", True),
    ],
)
def test_own_origin(origin, host, allowed):
    assert OriginPolicy().allows(origin, host) is allowed


def test_listed_origins_any_and_null():
    policy = OriginPolicy(["https://app.example.com", "capacitor://localhost"])
    assert policy.allows("https://app.example.com", HOST)
    assert policy.allows("https://app.example.com:443", HOST)
    assert policy.allows("capacitor://localhost", HOST)
    assert not policy.allows("http://app.example.com", HOST)
    assert not policy.allows("https://app.example.com:8443", HOST)
    everyone = OriginPolicy(["*"])
    assert everyone.allows("https://evil.example", HOST)
    assert not everyone.allows("null", HOST)  # "*" never covers null
    assert OriginPolicy(["null"]).allows("null", HOST)


def test_cors_echoes_allowed_origins_only_and_never_a_wildcard():
    policy = OriginPolicy(["*"])
    assert policy.cors_headers("https://evil.example", HOST) == {
        "Access-Control-Allow-Origin": "https://evil.example",
        "Access-Control-Allow-Credentials": "true",
    }
    assert OriginPolicy().cors_headers("https://evil.example", HOST) == {}
    assert OriginPolicy().cors_headers("null", HOST) == {}
    assert OriginPolicy().cors_headers(None, HOST) == {}


@pytest.mark.parametrize(
    "entry",
    [
        "https://app.example.com",
        "http://127.0.0.1:3000",
        "*",
        "null",
        "capacitor://localhost",
        "http://[::1]:8080",
    ],
)
def test_valid_entries(entry):
    assert origin_problem(entry) is None


@pytest.mark.parametrize(
    "entry",
    [
        "app.example.com",
        "https://app.example.com/",
        "https://",
        "https://app.example.com/path",
        "*.example.com",
        "",
    ],
)
def test_invalid_entries(entry):
    assert origin_problem(entry) is not None
    with pytest.raises(ValueError):
        OriginPolicy([entry])


def test_allowed_origins_in_the_configuration(tmp_path):
    path = tmp_path / "appliance.yaml"
    path.write_text(f"data_dir: {tmp_path}\nhttp:\n  allowed_origins: [https://app.example.com, '*']\n")
    assert load_config(path, {}).http.allowed_origins == ("https://app.example.com", "*")
    path.write_text(f"data_dir: {tmp_path}\nhttp:\n  allowed_origins: [app.example.com]\n")
    with pytest.raises(ConfigError, match=r"http\.allowed_origins\[0\].*not an origin"):
        load_config(path, {})


# ---------------------------------------------------------------- bounded bodies


def receiver(chunks: list[bytes]):
    """An ASGI receive handing out `chunks` as one request body; counts what was taken."""
    taken = []

    async def receive():
        i = len(taken)
        taken.append(i)
        if i >= len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    return receive, taken


async def test_a_body_is_read_whole_up_to_the_limit():
    receive, _ = receiver([b"ab", b"cd"])
    body = await read_body(receive, 4, None, 5.0)
    assert (body.data, body.state, body.finished) == (b"abcd", BodyState.COMPLETE, True)


async def test_a_declared_length_over_the_limit_is_refused_before_reading():
    receive, taken = receiver([b"x" * 10])
    body = await read_body(receive, 4, 10, 5.0)
    assert (body.data, body.state, body.finished) == (None, BodyState.TOO_LARGE, False)
    assert taken == []


async def test_a_growing_body_is_refused_as_it_passes_the_limit():
    receive, taken = receiver([b"x" * 3] * 1000)
    body = await read_body(receive, 4, None, 5.0)
    assert (body.state, body.finished, len(taken)) == (BodyState.TOO_LARGE, False, 2)


async def test_an_early_answer_goes_out_whole_then_the_rest_is_drained():
    receive, taken = receiver([b"x" * 1000] * 50)
    sent = []

    async def send(message):
        sent.append((message, len(taken)))

    await respond(send, 413, {"Content-Type": "text/plain"}, "too large", receive, 5.0)
    (start, _), (first, before_body), (last, after) = sent
    assert start["status"] == 413 and (b"content-length", b"9") in start["headers"]
    assert first == {"type": "http.response.body", "body": b"too large", "more_body": True}
    assert before_body == 0 and after == 50  # answered first, drained after
    assert last == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_body_that_does_not_come_times_out():
    async def receive():
        await asyncio.sleep(10)

    body = await read_body(receive, 4, None, 0.05)
    assert body.state is BodyState.TIMEOUT


async def test_a_body_that_goes_on_past_the_drain_bound_is_left_unended():
    receive, taken = receiver([b"x" * 1000] * 50)
    sent = []

    async def send(message):
        sent.append(message)

    finished = await respond(send, 413, {}, "too large", receive, 5.0, max_bytes=10_000)
    assert not finished and len(taken) == 11  # the caller cuts the connection off
    assert [m.get("more_body") for m in sent[1:]] == [True]
