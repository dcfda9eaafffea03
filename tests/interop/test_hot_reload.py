"""Issue 17, hot reload: a real appliance with two relay processes (turn.workers: 2) and a
live allocation relaying a steady numbered stream through an echo peer.  The file tightens
turn.deny_peers and lowers turn.user_quota, and SIGHUP is sent: not one packet of the live
stream is lost, a new Allocate over the new quota is refused (486) and a new permission to
a now-denied peer is refused (403), on whichever process the kernel gives the client.  A
file that does not validate, on SIGHUP or POST /admin/reload, changes nothing and is
logged; a key that needs a restart is reported and kept."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
from aioice import stun as aioice_stun

from .conftest import ADMIN_TOKEN, start_appliance, stop_appliance
from .test_aioice import EchoPeer, inner
from .test_credentials_admin import allocate
from .test_revoke import SteadySender, open_allocations, wait_for_both_processes

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MIN_STREAM = 150  # numbered datagrams of the live stream, sent across every reload
PROBES = 4  # allocations whose permissions are tried: distinct ports, spread over both processes


@pytest.fixture
def app(tmp_path):
    running = start_appliance(tmp_path / "a", workers=2, extra_turn={"deny_peers": [], "user_quota": 5})
    wait_for_both_processes(running)
    yield running
    assert stop_appliance(running) == 0, running.log()


def rewrite(app, **turn) -> dict:
    config = json.loads(app.config_path.read_text())
    config["turn"].update(turn)
    app.config_path.write_text(json.dumps(config))
    return config


async def wait_in_log(app, text: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while app.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not {count} time(s) in the log:\n{app.log()[-3000:]}"
        await asyncio.sleep(0.1)


async def admin(app, method: str, path: str) -> httpx.Response:
    """An admin request off the event loop, so the live stream keeps flowing meanwhile."""
    url = f"http://127.0.0.1:{app.admin_port}{path}"
    return await asyncio.to_thread(httpx.request, method, url, headers=AUTH, timeout=5)


async def permission_code(turn, peer: tuple[str, int]) -> int:
    """CreatePermission for `peer` on this allocation: 200 or the error code."""
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.CREATE_PERMISSION, message_class=aioice_stun.Class.REQUEST
    )
    request.attributes["XOR-PEER-ADDRESS"] = peer
    try:
        await inner(turn).request_with_retry(request)
    except aioice_stun.TransactionFailed as exc:
        return exc.response.attributes["ERROR-CODE"][0]
    return 200


async def new_alice_codes(app, tries: int) -> list[int]:
    username, password = app.credentials("alice")
    codes = []
    for _ in range(tries):
        got = await allocate("127.0.0.1", app.port, username, password)
        if not isinstance(got, int):
            got.close()
            got = 200
        codes.append(got)
    return codes


async def test_sighup_tightens_policy_and_quota_without_losing_a_packet(app):
    loop = asyncio.get_running_loop()
    peer_transport, _ = await loop.create_datagram_endpoint(EchoPeer, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    ((live_turn, live_collector), second) = await open_allocations(app, "alice", 2)
    probes = await open_allocations(app, "carol", PROBES)
    stream = SteadySender(live_turn, live_collector, peer_addr)
    sending = loop.create_task(stream.run())
    try:
        # Before: 127.0.0.2/31 is not denied (this would pass on a relay that ignores the reload).
        assert [await permission_code(turn, ("127.0.0.3", 9)) for turn, _ in probes] == [200] * PROBES
        rewrite(app, deny_peers=["127.0.0.2/31"], user_quota=2)
        app.proc.send_signal(signal.SIGHUP)
        await wait_in_log(app, "configuration reloaded: turn.deny_peers, turn.user_quota", 1)
        await wait_in_log(app, "relay worker: reloaded configuration applied", 1)
        # alice holds 2: a third is over the new quota on either process (the ledger is shared).
        assert await new_alice_codes(app, 4) == [486] * 4
        assert [await permission_code(turn, ("127.0.0.2", 9)) for turn, _ in probes] == [403] * PROBES

        # A file that does not validate changes nothing (the deny list stays, so does the quota).
        rewrite(app, deny_peers=[], user_quota=-1)
        app.proc.send_signal(signal.SIGHUP)
        await wait_in_log(app, "configuration reload refused, nothing changed: turn.user_quota", 1)
        answer = await admin(app, "POST", "/admin/reload")
        assert answer.status_code == 422 and answer.json()["result"] == "refused", answer.text
        assert [await permission_code(turn, ("127.0.0.2", 9)) for turn, _ in probes] == [403] * PROBES
        assert await new_alice_codes(app, 2) == [486] * 2
        ready = await admin(app, "GET", "/readyz")
        assert ready.status_code == 200, ready.text

        # A key that needs a restart is reported and kept; the live ones still apply.
        rewrite(app, deny_peers=["127.0.0.2/31"], user_quota=3, workers=3)
        answer = await admin(app, "POST", "/admin/reload")
        assert answer.status_code == 200, answer.text
        assert answer.json()["applied"] == ["turn.user_quota"]
        assert answer.json()["needsRestart"] == ["turn.workers"]
        await wait_in_log(app, "relay worker: reloaded configuration applied", 2)
        assert 200 in await new_alice_codes(app, 1)
        deadline = time.monotonic() + 5
        while stream.sent < MIN_STREAM and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stream.stopped.set()
        await sending
    deadline = time.monotonic() + 5
    while len(stream.echoed()) < stream.sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lost = stream.sent - len(stream.echoed())
    assert stream.sent >= MIN_STREAM and lost == 0, f"the live allocation lost {lost} of {stream.sent}"
    for turn, _ in [(live_turn, live_collector), second, *probes]:
        turn.close()
    peer_transport.close()
