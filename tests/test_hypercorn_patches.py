"""The appliance's one change to Hypercorn (appliance/wiring/hypercorn_patches.py): WebSocket
handshakes are answered without permessage-deflate.  The patch replaces the name
`hypercorn.protocol.ws_stream.PerMessageDeflate`, so these tests fail when a Hypercorn
upgrade drops that name or stops building the extension through it; Hypercorn's own
handshake code (ws_stream.Handshake) answers the offers.  End to end, through the running
appliance and a real client: tests/interop/test_ws_protocol.py."""

from __future__ import annotations

import hypercorn.protocol.ws_stream as ws_stream
import pytest
from wsproto.extensions import PerMessageDeflate

from appliance.config.loader import load_config
from appliance.wiring.hypercorn_patches import DeclinedDeflate, decline_websocket_compression
from appliance.wiring.signaling import hypercorn_config

# What browsers offer, and what python-websockets offers.
OFFERS = [
    b"permessage-deflate; client_max_window_bits",
    b"permessage-deflate; server_max_window_bits=12; client_max_window_bits=12",
]


@pytest.fixture
def hypercorn_as_shipped(monkeypatch):
    """Hypercorn with its own extension class under the patched name (whatever an earlier
    test in this process did), restored afterwards.  monkeypatch refuses to set a name the
    module does not have, so a Hypercorn without it fails here."""
    monkeypatch.setattr(ws_stream, "PerMessageDeflate", PerMessageDeflate)


def answer(offer: bytes) -> tuple[int, dict[bytes, bytes]]:
    """Status and headers with which Hypercorn answers an HTTP/1.1 upgrade offering `offer`."""
    request = [
        (b"host", b"127.0.0.1"),
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-extensions", offer),
    ]
    status, headers, _ = ws_stream.Handshake(request, "1.1").accept(None, [])
    return status, dict(headers)


def test_hypercorn_builds_the_extension_under_the_patched_name():
    assert "PerMessageDeflate" in vars(ws_stream)
    assert issubclass(ws_stream.PerMessageDeflate, PerMessageDeflate)


@pytest.mark.parametrize("offer", OFFERS)
def test_unpatched_hypercorn_accepts_the_offer(hypercorn_as_shipped, offer):
    """The control: what the patch is there to change."""
    status, headers = answer(offer)
    assert status == 101 and headers[b"sec-websocket-extensions"].startswith(b"permessage-deflate")


@pytest.mark.parametrize("offer", OFFERS)
def test_the_patch_answers_the_offer_without_the_extension(hypercorn_as_shipped, offer):
    decline_websocket_compression()
    assert ws_stream.PerMessageDeflate is DeclinedDeflate
    status, headers = answer(offer)
    assert status == 101 and b"sec-websocket-extensions" not in headers
    decline_websocket_compression()  # a second signaling config changes nothing
    assert answer(offer) == (status, headers)


def test_the_signaling_hypercorn_settings_apply_the_patch(hypercorn_as_shipped, tmp_path):
    config = load_config(None, {"APPLIANCE__DATA_DIR": str(tmp_path)})
    hypercorn_config(config, "127.0.0.1:0", None, None)
    assert b"sec-websocket-extensions" not in answer(OFFERS[0])[1]
