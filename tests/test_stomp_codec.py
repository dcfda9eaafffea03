"""The STOMP frame codec and incremental parser: frames split at every byte,
several per message, NUL bytes in bodies, CRLF, heart-beat EOLs, escaping per
version, every limit -- and cross-checks with stomp.py's own frame codec."""

from __future__ import annotations

import pytest
import stomp.utils as stomp_utils
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling.stomp.frames import (
    HEARTBEAT,
    Frame,
    FrameError,
    FrameParser,
    ParserLimits,
    encode,
    escape,
    unescape,
)

CONNECT = b"CONNECT\naccept-version:1.1,1.2\nhost:h\nide:token\nheart-beat:10000,10000\n\n\x00"
SEND = 'SEND\ndestination:/app/user/status\ncontent-type:application/json\n\n["u1","用户"]\x00'.encode()
SUBSCRIBE = b"SUBSCRIBE\nid:sub-0\ndestination:/topic/user/status\n\n\x00"


def frames_of(items):
    return [i for i in items if i is not HEARTBEAT]


def test_one_frame():
    (frame,) = frames_of(FrameParser().feed(CONNECT))
    assert frame.command == "CONNECT"
    assert frame.headers == {
        "accept-version": "1.1,1.2",
        "host": "h",
        "ide": "token",
        "heart-beat": "10000,10000",
    }
    assert frame.body == b""


def test_several_frames_in_one_message_with_heartbeats_between():
    parser = FrameParser()
    items = parser.feed(CONNECT + b"\n\r\n" + SEND + b"\n" + SUBSCRIBE)
    assert [f.command for f in frames_of(items)] == ["CONNECT", "SEND", "SUBSCRIBE"]
    assert items.count(HEARTBEAT) == 2
    assert frames_of(items)[1].body.decode() == '["u1","用户"]'


@pytest.mark.parametrize("data", [CONNECT, SEND, SUBSCRIBE, CONNECT + SEND + SUBSCRIBE])
def test_every_split_position_gives_the_same_frames(data):
    expected = [(f.command, f.headers, f.body) for f in frames_of(FrameParser().feed(data))]
    for cut in range(1, len(data)):
        parser = FrameParser()
        got = frames_of(parser.feed(data[:cut])) + frames_of(parser.feed(data[cut:]))
        assert [(f.command, f.headers, f.body) for f in got] == expected, cut


def test_byte_by_byte():
    parser = FrameParser()
    got = []
    for b in CONNECT + SEND:
        got += frames_of(parser.feed(bytes([b])))
    assert [f.command for f in got] == ["CONNECT", "SEND"]


def test_content_length_body_may_contain_nul():
    body = b"a\x00b\x00c"
    data = b"SEND\ndestination:/app/x\ncontent-length:5\n\n" + body + b"\x00"
    (frame,) = frames_of(FrameParser().feed(data))
    assert frame.body == body


def test_crlf_line_ends():
    data = b"SEND\r\ndestination:/app/x\r\nreceipt:r1\r\n\r\nbody\x00"
    (frame,) = frames_of(FrameParser().feed(data))
    assert frame.headers == {"destination": "/app/x", "receipt": "r1"} and frame.body == b"body"


def test_first_header_occurrence_wins():
    (frame,) = frames_of(FrameParser().feed(b"SEND\ndestination:/app/a\ndestination:/app/b\n\n\x00"))
    assert frame.get("destination") == "/app/a"


@pytest.mark.parametrize(
    "version, raw, value",
    [
        ("1.2", "a\\cb\\nc\\\\d\\re", "a:b\nc\\d\re"),
        ("1.1", "a\\cb\\nc\\\\d", "a:b\nc\\d"),
        ("1.0", "a\\cb", "a\\cb"),
    ],
)
def test_unescape_by_version(version, raw, value):
    assert unescape(raw, version) == value
    parser = FrameParser()
    parser.version = version
    (frame,) = frames_of(parser.feed(f"SEND\ndestination:/app/x\nk:{raw}\n\n\x00".encode()))
    assert frame.get("k") == value


def test_connect_headers_are_not_unescaped():
    (frame,) = frames_of(FrameParser().feed(b"CONNECT\nide:a\\cb\n\n\x00"))
    assert frame.get("ide") == "a\\cb"


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_escape_round_trip(version):
    value = "x:y\nz\\w" + ("\r" if version == "1.2" else "")
    assert unescape(escape(value, version), version) == value


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"BOGUS\n\n\x00", "unknown command"),
        (b"SEND\ndestination\n\n\x00", "without ':'"),
        (b"SEND\nk:a\\tb\n\n\x00", "undefined escape"),
        (b"SEND\ncontent-length:x\n\n\x00", "bad content-length"),
        (b"SEND\ncontent-length:2\n\nabc\x00", "not followed by NUL"),
        (b"SEND\nk:\xff\n\n\x00", "not UTF-8"),
        (b"\rSEND\n\n\x00", "carriage return"),
    ],
)
def test_violations(data, reason):
    with pytest.raises(FrameError, match=reason):
        FrameParser().feed(data)


def test_frame_size_cap_is_enforced_before_buffering_more():
    parser = FrameParser(ParserLimits(max_frame_bytes=100))
    with pytest.raises(FrameError, match="larger than 100"):
        parser.feed(b"SEND\ndestination:/app/x\n\n" + b"x" * 200)
    with pytest.raises(FrameError, match="larger than 100"):
        FrameParser(ParserLimits(max_frame_bytes=100)).feed(b"SEND\ncontent-length:500\n\n")
    with pytest.raises(FrameError, match="larger than 100"):
        FrameParser(ParserLimits(max_frame_bytes=100)).feed(b"SEND\nk:" + b"v" * 200)
    (frame,) = frames_of(
        FrameParser(ParserLimits(max_frame_bytes=100)).feed(b"SEND\ndestination:/a\n\n" + b"x" * 70 + b"\x00")
    )
    assert len(frame.body) == 70


def test_header_count_and_line_caps():
    many = b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(65)) + b"\n\x00"
    with pytest.raises(FrameError, match="more than 64 headers"):
        FrameParser().feed(many)
    long_line = b"SEND\nk:" + b"v" * 9000 + b"\n\n\x00"
    with pytest.raises(FrameError, match="longer than"):
        FrameParser(ParserLimits(max_frame_bytes=65536)).feed(long_line)


def test_encode_writes_lf_content_length_and_escapes():
    data = encode(Frame("MESSAGE", {"destination": "/user/queue/x", "k": "a:b\nc"}, "你好".encode()), "1.2")
    assert data == (
        "MESSAGE\ndestination:/user/queue/x\nk:a\\cb\\nc\ncontent-length:6\n\n你好".encode() + b"\x00"
    )
    assert b"\r" not in data


def test_connected_headers_are_not_escaped():
    data = encode(Frame("CONNECTED", {"version": "1.2", "server": "a:b"}), "1.2")
    assert b"server:a:b\n" in data


def test_stomp_py_parses_what_we_encode():
    data = encode(
        Frame(
            "MESSAGE",
            {"destination": "/topic/user/status", "subscription": "s-1", "message-id": "m1"},
            b'[{"userId":"u1"}]',
        ),
        "1.2",
    )
    parsed = stomp_utils.parse_frame(data[:-1])  # stomp.py strips the NUL before parsing
    assert parsed.cmd == "MESSAGE"
    assert parsed.headers["destination"] == "/topic/user/status"
    assert parsed.body == b'[{"userId":"u1"}]'


def test_we_parse_what_stomp_py_encodes():
    frame = stomp_utils.Frame(
        "SEND",
        {"destination": "/app/call/request", "content-type": "application/json"},
        '{"callId":"c1","calleeUserName":"李四"}',
    )
    data = b"".join(
        stomp_utils.encode(x) if isinstance(x, str) else x for x in stomp_utils.convert_frame(frame)
    )
    (parsed,) = frames_of(FrameParser().feed(data))
    assert parsed.command == "SEND" and parsed.get("destination") == "/app/call/request"
    assert parsed.body.decode() == '{"callId":"c1","calleeUserName":"李四"}'


# "\r" is excluded: STOMP 1.1 has no escape for it (1.2's \r is tested above).
header_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(header_text.filter(lambda s: s and s != "content-length"), header_text, max_size=6),
    st.binary(max_size=300),
    st.sampled_from(["1.1", "1.2"]),
    st.integers(1, 400),
)
def test_generated_frames_round_trip_through_any_split(headers, body, version, cut):
    data = encode(Frame("SEND", headers, body), version)
    parser = FrameParser()
    parser.version = version
    got = frames_of(parser.feed(data[:cut])) + frames_of(parser.feed(data[cut:]))
    assert len(got) == 1
    assert got[0].body == body
    expected = dict(headers)
    expected["content-length"] = str(len(body))
    assert got[0].headers == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_raises_frame_errors(data):
    try:
        FrameParser(ParserLimits(max_frame_bytes=256)).feed(data)
    except FrameError:
        pass
