"""Operating a running relay, with aioice as the client: secret rotation picked up
from the file (SIGHUP and change detection) without refusing credentials in
use, a corrupt ring file refused while the last good ring stays in force,
several worker processes sharing the ports, and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from aioice import stun as aioice_stun

from appliance.credentials.ring import Secret, SecretRing, load_ring, new_secret, save_ring

from .conftest import rest_credentials, start_appliance, stop_appliance
from .test_aioice import EchoPeer, open_endpoint, wait_for_count


@pytest.fixture
def own_relay(tmp_path):
    relays = []

    def start(**kw):
        relay = start_appliance(tmp_path / f"r{len(relays)}", **kw)
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        assert stop_appliance(relay) == 0, relay.log()


async def allocate_ok(relay, secret: str, user: str) -> bool:
    username, password = rest_credentials(secret, user)
    try:
        turn, _ = await open_endpoint(relay, "udp", username, password)
    except aioice_stun.TransactionFailed as exc:
        assert exc.response.attributes["ERROR-CODE"][0] == 401
        return False
    turn.close()
    await asyncio.sleep(0.05)
    return True


async def eventually(predicate, timeout: float = 6.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


def rotate(path, now: float) -> tuple[str, str]:
    """What `appliance secret rotate` will do: a new current secret, the old one retired."""
    ring = load_ring(path)
    old = ring.current()
    fresh = new_secret(now)
    save_ring(path, SecretRing((fresh, Secret(old.id, old.value, old.created, int(now)))))
    return old.value, fresh.value


async def test_rotation_by_file_change_keeps_old_credentials_working(own_relay):
    relay = own_relay()
    ring_path = relay.log_path.parent / "secrets.json"
    assert await allocate_ok(relay, relay.secret, "before")
    old, new = rotate(ring_path, time.time())
    assert await eventually(lambda: allocate_ok(relay, new, "after"))  # change detected
    assert await allocate_ok(relay, old, "still-in-grace")
    # Drop the old secret entirely: its credentials stop working for new allocations.
    save_ring(ring_path, SecretRing((load_ring(ring_path).current(),)))
    os.kill(relay.proc.pid, signal.SIGHUP)
    assert await eventually(lambda: _refused(relay, old))
    assert await allocate_ok(relay, new, "current")


async def _refused(relay, secret: str) -> bool:
    return not await allocate_ok(relay, secret, "refused")


async def test_corrupt_ring_is_refused_and_last_good_ring_stays(own_relay):
    relay = own_relay()
    ring_path = relay.log_path.parent / "secrets.json"
    ring_path.write_text("{ this is not json")
    os.kill(relay.proc.pid, signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert "secret ring not reloaded, keeping the last good one" in relay.log()
    assert await allocate_ok(relay, relay.secret, "still-served")
    assert relay.proc.poll() is None


async def test_two_workers_share_the_ports(own_relay):
    relay = own_relay(workers=2)
    # The extra worker starts once every listener of the main process is bound, so it may
    # still be starting when the main process already answers.
    assert await eventually(lambda: _both_ready(relay)), relay.log()
    with open(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children") as f:
        children = f.read().split()
    assert len(children) >= 1  # the extra relay process (and possibly a resource tracker)
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(EchoPeer, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    clients = []
    try:
        for i in range(8):
            username, password = relay.credentials(f"worker-user-{i}")
            clients.append(await open_endpoint(relay, "udp", username, password))
        for turn, _ in clients:
            for n in range(5):
                turn.sendto(b"w%d" % n, peer_addr)
        for _, collector in clients:
            await wait_for_count(collector, 5)
        assert peer.count == 40
    finally:
        for turn, _ in clients:
            turn.close()
        peer_transport.close()
        await asyncio.sleep(0.1)
    assert await _both_ready(relay), relay.log()


async def _both_ready(relay) -> bool:
    """Both relay processes logged "relay ready" (the log names each process's pid)."""
    return (
        len({line.split("[")[1].split("]")[0] for line in relay.log().splitlines() if "relay ready" in line})
        == 2
    )
