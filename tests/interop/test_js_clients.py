"""The JavaScript clients the existing web apps use, under Node, against our signaling:
@stomp/stompjs v7 over a native WebSocket and over sockjs-client, and the legacy
stompjs 2.3 (`Stomp.over(new SockJS(url))`), each SockJS transport on its own
(websocket, xhr-streaming, xhr-polling).  tests/js/client.js runs the session and
checks every answer; this test runs it and reads its verdict."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ..external import unavailable
from .conftest import require_program

JS_DIR = Path(__file__).resolve().parent.parent / "js"

MODES = [
    "stompjs-ws",
    "stompjs-sockjs-websocket",
    "stompjs-sockjs-xhr-streaming",
    "stompjs-sockjs-xhr-polling",
    "legacy-sockjs-websocket",
    "legacy-sockjs-xhr-streaming",
    "legacy-sockjs-xhr-polling",
]


def node_with_clients() -> str:
    node = shutil.which("node")
    problem = None
    if node is None:
        problem = "node not found: apt-get install nodejs npm"
    elif not (JS_DIR / "node_modules" / "@stomp" / "stompjs").is_dir():
        problem = "JS clients not installed: npm ci --prefix tests/js"
    if problem:
        unavailable(problem)
    return node


def node_with_browser() -> str:
    """node_with_clients, plus what the Chromium tests need: Debian's chromium, playwright-core
    to drive it, and the demo page's libraries."""
    node = node_with_clients()
    require_program("chromium", "apt-get install chromium")
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        unavailable("playwright-core missing: npm ci --prefix tests/js")
    from appliance.demo.site import libraries_installed

    if not libraries_installed():
        unavailable("demo libraries missing: npm ci --prefix appliance/demo")
    return node


@pytest.mark.parametrize("mode", MODES)
def test_js_client_session(relay, mode):
    node = node_with_clients()
    done = subprocess.run(
        [node, str(JS_DIR / "client.js"), mode, f"http://127.0.0.1:{relay.http_port}", "/imserver"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and steps and steps[-1]["step"] == "ok", (
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    names = [s["step"] for s in steps]
    assert names == [
        "connected",
        "status answer",
        "online push",
        "offline push",
        "error code",
        "still served",
        "ok",
    ]


def run_js_call(base: str, phone_base: str | None = None) -> None:
    """tests/js/calls.js: a call between @stomp/stompjs devices, the phone maybe on another node."""
    node = node_with_clients()
    done = subprocess.run(
        [node, str(JS_DIR / "calls.js"), base, "/imserver", *filter(None, [phone_base])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    steps = [json.loads(line)["step"] for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and steps[-1:] == ["ok"], f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert steps == [
        "phone rings",
        "laptop rings",
        "caller told",
        "laptop stops ringing",
        "offer to phone",
        "answer to caller",
        "hangup to phone",
        "ok",
    ]


def test_js_call_between_devices(relay):
    run_js_call(f"http://127.0.0.1:{relay.http_port}")
