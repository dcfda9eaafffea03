"""Issue 17, the operator page: a real appliance with admin.token set, relay traffic from two
aioice clients (alice and bob, each through a channel to a UDP echo peer, both ways), and the
page at /admin/ in headless Chromium (tests/js/operator_page.js).  The page asks for the token,
says so when it is wrong and asks again; with the right one its charts show non-zero bits and
packets per second both ways, and its allocations table lists alice and bob.  Clicking alice's
Revoke button (confirmed in the page's dialog, default period) ends her allocation: the admin
API lists none of hers, her old allocation relays nothing, a fresh Allocate with her
still-valid credential gets 401, and bob keeps relaying.  No console error (CSP violations
included) on the way.  Without admin.token (loopback only) the page asks for none, lists the
allocations, and shows the appliance's refusal when Revoke is clicked.  Screenshots go to
$TEST_ARTIFACTS (default test-artifacts/): operator-page.png, operator-page-revoked.png and
operator-page-no-token.png."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from appliance.ops.console.site import library_installed

from ..external import unavailable
from .conftest import ADMIN_TOKEN, start_appliance, stop_appliance
from .test_aioice import EchoPeer
from .test_browser_call import ARTIFACTS
from .test_credentials_admin import allocate
from .test_js_clients import JS_DIR, node_with_browser
from .test_revoke import SteadySender, open_allocations, relays

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def app(tmp_path):
    running = start_appliance(tmp_path / "a")
    yield running
    assert stop_appliance(running) == 0, running.log()


def listed_users(app) -> list[str]:
    answer = httpx.get(f"http://127.0.0.1:{app.admin_port}/admin/allocations", headers=AUTH, timeout=5)
    return sorted(row["user"] for row in answer.json()["allocations"])


async def drive_page(app, token: str, user: str, other_user: str) -> dict:
    """tests/js/operator_page.js against the appliance's admin listener (in the background, so
    that the test's senders keep sending): what the page showed."""
    node = node_with_browser()
    if not library_installed():
        unavailable("uPlot missing: npm ci --prefix appliance/demo")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = await asyncio.create_subprocess_exec(
        node,
        str(JS_DIR / "operator_page.js"),
        f"http://127.0.0.1:{app.admin_port}",
        token,
        str(ARTIFACTS),
        user,
        other_user,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(driver.communicate(), 180)
    except TimeoutError:
        driver.kill()
        await driver.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    assert driver.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}\n{app.log()[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


async def test_operator_page_shows_live_rates_and_revokes_by_its_button(app):
    loop = asyncio.get_running_loop()
    peer_transport, _ = await loop.create_datagram_endpoint(EchoPeer, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    ((alice_turn, alice_collector),) = await open_allocations(app, "alice", 1)
    ((bob_turn, bob_collector),) = await open_allocations(app, "bob", 1)
    alice = SteadySender(alice_turn, alice_collector, peer_addr)
    bob = SteadySender(bob_turn, bob_collector, peer_addr)
    sending = [loop.create_task(alice.run()), loop.create_task(bob.run())]
    try:
        result = await drive_page(app, ADMIN_TOKEN, "alice", "bob")
    finally:
        alice.stopped.set()
        bob.stopped.set()
        await asyncio.gather(*sending)

    assert result["url"].endswith("/admin/") and result["askedForToken"] == "token-needed"
    assert "wrong token" in result["wrongTokenMessage"], result
    assert result["tokenKept"]
    for chart in ("bits", "packets"):
        assert result[chart]["to_peer"] > 0 and result[chart]["to_client"] > 0, result
    assert result["allocationsNow"]["all"] == 2, result
    assert float(result["tileToPeer"]) > 0 and result["canvases"] >= 7, result
    assert sorted(result["listedBefore"]) == ["alice", "bob"], result
    assert "alice" in result["confirmText"] and result["confirmPeriod"] == "3600", result
    assert result["actionState"] == "done" and "refused until" in result["actionStatus"], result
    assert result["listedAfter"] == ["bob"], result
    assert result["revocationRow"][0] == "alice", result
    assert result["errors"] == [], result
    assert result["statusBefore"] == result["statusAfter"] == "live", result  # every table read
    assert result["secretsListed"], result
    for name in ("operator-page.png", "operator-page-revoked.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000

    # What the button did, seen from the appliance and from real clients.
    assert listed_users(app) == ["bob"]
    assert not await relays(alice_turn, alice_collector, peer_addr, 0.5)
    assert await relays(bob_turn, bob_collector, peer_addr)
    username, password = app.credentials("alice")  # valid for an hour, signed by the current secret
    assert await allocate("127.0.0.1", app.port, username, password) == 401
    revocations = httpx.get(f"http://127.0.0.1:{app.admin_port}/admin/revocations", headers=AUTH, timeout=5)
    ((row,),) = [revocations.json()["revocations"]]
    assert row["user"] == "alice" and row["refusing"] and 3000 < row["until"] - row["issuedAt"] < 4200
    alice_turn.close()
    bob_turn.close()
    peer_transport.close()


async def test_without_admin_token_the_page_asks_for_none_and_shows_refusals(tmp_path):
    app = start_appliance(tmp_path / "open", admin={"token": None})
    try:
        ((turn, _),) = await open_allocations(app, "carol", 1)
        result = await drive_page(app, "-", "carol", "")
        turn.close()
    finally:
        assert stop_appliance(app) == 0, app.log()
    assert result["loginHidden"] and result["allocationsNow"]["all"] == 1, result
    assert "set admin.token" in result["secretsNote"] and result["rotateDisabled"], result
    assert result["actionState"] == "error", result
    assert result["actionStatus"] == "set admin.token to disconnect or revoke users over HTTP", result
    assert result["statusAfter"] == "live" and result["errors"] == [], result
