"""A real call between two headless Chromium browsers (Debian's /usr/bin/chromium, driven by
playwright-core under Node) through the demo page, our signaling and our relay: A calls B,
B has two tabs, both ring, the second answers and the first stops ringing, both sides connect
relay-only over our TURN and decode video, A hangs up and B sees it.  A poses as "carol" in the
free-text callerUserName: B's page shows A's authenticated user id, the pose only beside it.
Once over a native WebSocket and once over SockJS with WebSocket disabled.  Screenshots of both
sides go to $TEST_ARTIFACTS (default test-artifacts/)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .test_credentials_admin import admin, metric_samples
from .test_js_clients import JS_DIR, node_with_browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))


def allocations_created(relay) -> float:
    samples = metric_samples(admin(relay, "GET", "/metrics").text)
    return samples[("appliance_relay_allocations_created_total", ())]


@pytest.mark.parametrize("transport", ["websocket", "sockjs-no-websocket"])
def test_browser_call_relay_only(relay, transport):
    node = node_with_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = allocations_created(relay)
    done = subprocess.run(
        [
            node,
            str(JS_DIR / "browser_call.js"),
            f"http://127.0.0.1:{relay.http_port}",
            transport,
            str(ARTIFACTS),
            "tok-alice",
            "tok-bob",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sawBobOnline"] and result["bothTabsRang"]
    assert result["ringFrom"] == "alice", result  # the id the appliance stamped
    assert result["ringName"] == "calls itself “carol” (self-declared, not verified)", result
    assert result["otherTabEnded"] == "Call ended: answered on another device"
    assert result["policy"] == "relay" and result["relayOnly"]
    for side in ("alice", "bob"):
        stats = result[side]
        assert stats["iceConnectionState"] in ("connected", "completed"), result
        assert (stats["localType"], stats["remoteType"]) == ("relay", "relay"), result
        assert stats["framesDecoded"] > 0, result
    restart = result["restart"]  # new credentials, ICE restart, still on the relay
    assert restart["fetches"] == 1 and restart["restarts"] == 1
    assert (restart["after"]["localType"], restart["after"]["remoteType"]) == ("relay", "relay")
    assert result["bobSawHangup"] == "Call ended: hung up by the other side"
    assert result["aliceEnded"] == "Call ended: you hung up"
    assert result["bobTab1Call"] is None
    assert allocations_created(relay) >= before + 2  # both browsers allocated on our relay
    for who in ("alice", "bob"):
        assert (ARTIFACTS / f"{who}-{transport}.png").stat().st_size > 1000
    # The browsers are gone, but a SockJS session lingers for its disconnect delay (5 s):
    # later tests on this shared appliance expect alice and bob to come online afresh.
    wait_until_no_sessions(relay)


def wait_until_no_sessions(relay, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = metric_samples(admin(relay, "GET", "/metrics").text)
        if samples.get(("appliance_signaling_sessions", ())) == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"signaling sessions still open {timeout_s} s after the browsers closed")
