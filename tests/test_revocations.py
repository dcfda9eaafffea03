"""Revocations (issue 17): records kept in the ring store (bounded, pruned, a hostile user id
refused and quoted with a bound), the relay core refusing a revoked user's credentials and
ending its allocations made before the revocation, the watcher handing the relay the set
in force, the admin API and `appliance revoke`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import socket

import pytest

from appliance.cli import main, parse_until
from appliance.credentials.ring import (
    MAX_REVOCATIONS,
    MAX_USER_CHARS,
    REVOCATION_SPREAD_S,
    Secret,
    SecretRing,
    SecretRingError,
    load_ring,
    parse_ring,
    revoke,
    ring_document,
    rotate,
    save_ring,
)
from appliance.credentials.store import FileRingStore
from appliance.credentials.watcher import RingWatcher
from appliance.ops.admin import create_admin_app
from appliance.process.relay_worker import WorkerReport
from turn import stun
from turn.auth import Revocation
from turn.core import RelaySettings

from .test_admin import BEARER, make_admin
from .turn_fakes import T0, CoreClient, error_code, lifetime_attr, make_core

NOW = 1_900_000_000.0


# ------------------------------------------------------------------ store records


def test_a_revocation_is_saved_with_the_ring_and_survives_a_rotation(store):
    store.ensure(NOW)
    record = revoke(store.update, "alice", NOW, NOW + 3600)
    assert record == Revocation("alice", NOW, NOW + 3600)
    rotate(store.update, NOW + 1)
    ring = store.load()
    assert ring.revocations == (record,) and len(ring.secrets) == 2


def test_revoking_again_replaces_the_record_and_end_only_keeps_a_refusal(store):
    store.ensure(NOW)
    revoke(store.update, "alice", NOW, NOW + 3600)
    ended = revoke(store.update, "alice", NOW + 10, None)  # DELETE /admin/allocations
    assert ended == Revocation("alice", NOW + 10, NOW + 3600)  # the hour's refusal stays
    shorter = revoke(store.update, "alice", NOW + 20, NOW + 60)  # an explicit until is the operator's word
    assert store.load().revocations == (shorter,)
    only_live = revoke(store.update, "bob", NOW + 20, None)
    assert only_live.until == only_live.issued_at


def test_records_are_pruned_once_past_and_end_only_records_stay_long_enough_to_spread(store):
    store.ensure(NOW)
    revoke(store.update, "short", NOW, NOW + 5)
    revoke(store.update, "live-only", NOW, None)
    revoke(store.update, "long", NOW, NOW + 3600)
    later = NOW + REVOCATION_SPREAD_S - 1
    assert {r.user for r in store.load().in_force(later)} == {"short", "live-only", "long"}
    revoke(store.update, "bob", NOW + REVOCATION_SPREAD_S + 1, None)  # any write prunes
    assert {r.user for r in store.load().revocations} == {"long", "bob"}


def test_the_list_is_bounded(tmp_path):
    store = FileRingStore(tmp_path / "secrets.json")
    store.ensure(NOW)
    full = SecretRing(
        store.load().secrets, tuple(Revocation(f"u{i}", NOW, NOW + 3600) for i in range(MAX_REVOCATIONS))
    )
    save_ring(store.path, full)
    with pytest.raises(SecretRingError, match="revocations are in force already"):
        revoke(store.update, "one-more", NOW, NOW + 10)
    revoke(store.update, "u7", NOW, NOW + 10)  # replacing one is fine
    assert len(store.load().revocations) == MAX_REVOCATIONS
    doc = json.loads(ring_document(full))
    doc["revocations"].append({"user": "x", "issued_at": NOW, "until": NOW})
    with pytest.raises(SecretRingError, match="at most 1000"):
        parse_ring("test", json.dumps(doc))


@pytest.mark.parametrize(
    "user",
    ["", "x" * (MAX_USER_CHARS + 1), "evil\n2026 INFO forged line", "\x1b[2Jbell\x07", 42, None],
)
def test_a_hostile_user_id_is_refused_quoted_and_bounded(tmp_path, user):
    store = FileRingStore(tmp_path / "secrets.json")
    store.ensure(NOW)
    with pytest.raises(SecretRingError) as refused:
        revoke(store.update, user, NOW, NOW + 10)
    message = str(refused.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 200
    # The same user id written into the file by hand is refused on load, the ring untouched.
    doc = json.loads(store.path.read_text())
    doc["revocations"] = [{"user": user, "issued_at": NOW, "until": NOW + 10}]
    with pytest.raises(SecretRingError, match=r"revocations\[0\]") as refused:
        parse_ring(store.path, json.dumps(doc))
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 300


def test_a_printable_unicode_user_id_round_trips(tmp_path):
    path = tmp_path / "secrets.json"
    save_ring(path, SecretRing((Secret("k-1", "v" * 43, int(NOW)),)))
    revoke(FileRingStore(path).update, "zoë:テスト", NOW, NOW + 10)
    assert load_ring(path).revocations[0].user == "zoë:テスト"


@pytest.mark.parametrize(
    "record",
    [
        {"user": "a", "issued_at": NOW, "until": NOW - 1},
        {"user": "a", "issued_at": True, "until": NOW},
        {"user": "a", "issued_at": "soon", "until": NOW},
        {"user": "a", "issued_at": NOW, "until": 1e300},
        {"user": "a", "issued_at": NOW, "until": NOW, "extra": 1},
        ["a", NOW, NOW],
    ],
)
def test_malformed_records_are_refused(record):
    doc = json.loads(ring_document(SecretRing((Secret("k-1", "v" * 43, int(NOW)),))))
    doc["revocations"] = [record]
    with pytest.raises(SecretRingError, match=r"revocations\[0\]"):
        parse_ring("test", json.dumps(doc))


def test_a_ring_without_revocations_is_written_as_before():
    ring = SecretRing((Secret("k-1", "v" * 43, int(NOW)),))
    assert "revocations" not in json.loads(ring_document(ring))


# ------------------------------------------------------------------ the relay core


def test_a_revoked_user_is_refused_401_and_its_older_allocations_end_at_once():
    core, opener = make_core()
    alice = CoreClient(core, user="alice")
    other_alice = CoreClient(core, user="alice", addr=("198.51.100.21", 40001))
    bob = CoreClient(core, user="bob", addr=("198.51.100.22", 40002))
    for client in (alice, other_alice, bob):
        assert client.allocate().cls == stun.SUCCESS
    core.verifier.set_revocations((Revocation("alice", T0 + 1, T0 + 3600),))
    assert core.end_revoked(T0 + 1) == 2
    assert {a.user_id for a in core.table.by_client.values()} == {"bob"}
    assert [p.closed for p in opener.opened] == [True, True, False]
    assert core.counters["allocations_revoked"] == 2
    for client in (alice, bob):
        client.now = T0 + 2
    # alice's credential still verifies and has not expired: refused all the same
    assert error_code(alice.allocate()) == 401
    assert core.counters["auth_revoked"] == 1
    assert bob.send(stun.REFRESH, [lifetime_attr(600)]).cls == stun.SUCCESS
    # Once `until` passes, alice may allocate again; ending again spares what is newer.
    alice.now = T0 + 3600
    assert alice.allocate().cls == stun.SUCCESS
    assert core.end_revoked(T0 + 3600) == 0 and len(core.table) == 2


def test_end_only_revocation_refuses_nothing_new():
    core, _ = make_core()
    alice = CoreClient(core, user="alice")
    assert alice.allocate().cls == stun.SUCCESS
    core.verifier.set_revocations((Revocation("alice", T0 + 0.5, T0 + 0.5),))
    assert core.end_revoked(T0 + 0.5) == 1 and len(core.table) == 0
    alice.now = T0 + 0.5
    assert alice.allocate().cls == stun.SUCCESS  # made after issued_at: not ended again
    assert core.end_revoked(T0 + 1) == 0 and len(core.table) == 1


def test_a_refresh_of_a_revoked_user_is_401():
    core, _ = make_core()
    alice = CoreClient(core, user="alice")
    assert alice.allocate().cls == stun.SUCCESS
    # Refused before its allocation is ended (a revocation learnt between two requests)
    core.verifier.set_revocations((Revocation("alice", T0 - 10, T0 + 60),))
    assert error_code(alice.send(stun.REFRESH, [lifetime_attr(600)])) == 401


def test_the_watcher_hands_the_relay_the_revocations_in_force(tmp_path):
    path = tmp_path / "secrets.json"
    save_ring(path, SecretRing((Secret("k-1", "v" * 43, int(NOW)),)))
    now = [NOW]
    watcher = RingWatcher(FileRingStore(path), grace_s=60, clock=lambda: now[0])
    watcher.load(force=True)
    delivered: list[tuple[Revocation, ...]] = []
    watcher.deliver_revocations_to(delivered.append)
    assert delivered == [()]
    revoke(FileRingStore(path).update, "alice", NOW, None)
    watcher.load()
    assert [r.user for r in delivered[-1]] == ["alice"]
    watcher.load()
    assert len(delivered) == 2  # unchanged: not handed again
    now[0] = NOW + REVOCATION_SPREAD_S + 1
    watcher.refresh()
    assert delivered[-1] == ()


# ------------------------------------------------------------------ admin API and CLI


async def test_admin_revocations_need_a_token_and_reach_the_ring(tmp_path):
    client, ctx, clock, reloads = make_admin(tmp_path)
    for method, path in (("POST", "/admin/revocations"), ("DELETE", "/admin/allocations?user=a")):
        assert (await client.open(path, method=method, json={"user": "a"})).status_code == 401
    response = await client.post(
        "/admin/revocations", json={"user": "alice", "until": NOW + 600}, headers=BEARER
    )
    assert response.status_code == 200
    assert await response.get_json() == {"user": "alice", "issuedAt": NOW, "until": NOW + 600}
    assert reloads  # every relay process told to read the ring now
    response = await client.delete("/admin/allocations?user=bob", headers=BEARER)
    assert (await response.get_json())["until"] == NOW
    listing = await (await client.get("/admin/revocations", headers=BEARER)).get_json()
    assert [(r["user"], r["refusing"]) for r in listing["revocations"]] == [("alice", True), ("bob", False)]


async def test_admin_revocations_refuse_bad_bodies_and_without_a_token_setting(tmp_path):
    client, *_ = make_admin(tmp_path)
    for body in ({"user": ""}, {"user": 5}, {"user": "a", "until": "tomorrow"}, {"user": "a\nb"}, [1]):
        response = await client.post("/admin/revocations", json=body, headers=BEARER)
        assert response.status_code == 400, body
    huge = await client.post("/admin/revocations", data=b"{" + b" " * 10_000 + b"}", headers=BEARER)
    assert huge.status_code in (400, 413)
    assert (await client.delete("/admin/allocations", headers=BEARER)).status_code == 400
    open_client, *_ = make_admin(tmp_path / "open", token=None)
    response = await open_client.post("/admin/revocations", json={"user": "a"})
    assert response.status_code == 403


def test_parse_until():
    assert parse_until("1900000000", NOW) == 1_900_000_000
    assert parse_until("1h", NOW) == NOW + 3600
    assert parse_until("90s", NOW) == NOW + 90
    assert parse_until("2030-01-02T03:04:05Z", NOW) == parse_until("2030-01-02T03:04:05", NOW)
    assert parse_until("2030-01-02T04:04:05+01:00", NOW) == parse_until("2030-01-02T03:04:05Z", NOW)
    for bad in ("soon", "-5", "1x", "h"):
        with pytest.raises(ValueError):
            parse_until(bad, NOW)


def test_cli_revoke_writes_through_the_store(tmp_path, capsys):
    config = tmp_path / "appliance.yaml"
    secrets = tmp_path / "secrets.json"
    config.write_text(f"credentials:\n  secrets_file: {secrets}\n")
    assert main(["revoke", "--user", "alice", "--config", str(config)]) == 2  # no ring yet
    save_ring(secrets, SecretRing((Secret("k-1", "v" * 43, int(NOW)),)))
    assert main(["revoke", "--user", "alice", "--until", "1h", "--config", str(config)]) == 0
    (record,) = load_ring(secrets).revocations
    assert record.user == "alice" and 3590 < record.until - record.issued_at <= 3600
    assert "refused until" in capsys.readouterr().out


# ------------------------------------------------------------------ listing allocations


async def test_a_node_lists_its_allocations_bounded_and_ends_revoked_ones():
    from .test_relay_io import REALM as IO_REALM
    from .test_relay_io import RawClient, start_node

    node = await start_node(RelaySettings(realm=IO_REALM))
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for user in ("alice", "alice", "bob"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", node.port))
            socks.append(sock)
            client = RawClient(sock, stream=False, user=user)
            await client.allocate()
            await client.create_permission(("127.0.0.1", 9))
        rows, truncated = node.allocation_rows()
        assert not truncated and sorted(r["user"] for r in rows) == ["alice", "alice", "bob"]
        row = rows[0]
        assert row["client"] == f"127.0.0.1:{socks[0].getsockname()[1]}"
        assert row["transport"] == "udp" and row["relayed"].startswith("127.0.0.1:")
        assert row["usernameExpiry"] == int(T0) + 3600 and row["permissions"] == 1 and row["channels"] == 0
        assert node.allocation_rows(limit=2) == (rows[:2], True)
        node.set_revocations((Revocation("alice", T0 + 1, T0 + 1),))
        assert [r["user"] for r in node.allocation_rows()[0]] == ["bob"]
    finally:
        for sock in socks:
            sock.close()
        await node.stop()


def test_worker_reports_cross_a_pipe_and_are_merged():
    receiver, sender = multiprocessing.Pipe(duplex=False)
    row = {"user": "alice", "created": T0}
    sender.send(WorkerReport({"allocations": 1}, [row], truncated=True))
    report = receiver.recv()
    assert report == WorkerReport({"allocations": 1}, [row], True)
    receiver.close()
    sender.close()


async def test_admin_lists_allocations_by_user_with_a_limit(tmp_path):
    _, ctx, *_ = make_admin(tmp_path)
    rows = [
        {"user": "alice", "created": NOW - 30, "client": "127.0.0.1:1"},
        {"user": "bob\n", "created": NOW - 20, "client": "127.0.0.1:2"},
        {"user": "alice", "created": NOW - 10, "client": "127.0.0.1:3"},
    ]
    client = create_admin_app(dataclasses.replace(ctx, allocations=lambda: (rows, False))).test_client()
    assert (await client.get("/admin/allocations")).status_code == 401
    answer = await (await client.get("/admin/allocations?user=alice", headers=BEARER)).get_json()
    assert [(r["client"], r["ageSeconds"]) for r in answer["allocations"]] == [
        ("127.0.0.1:1", 30),
        ("127.0.0.1:3", 10),
    ]
    assert answer["count"] == 2 and not answer["truncated"]
    answer = await (await client.get("/admin/allocations?limit=1", headers=BEARER)).get_json()
    assert answer["count"] == 1 and answer["truncated"]
    answer = await (await client.get("/admin/allocations?user=bob%0A", headers=BEARER)).get_json()
    assert answer["count"] == 1
    no_relay = create_admin_app(ctx).test_client()
    assert (await no_relay.get("/admin/allocations", headers=BEARER)).status_code == 404


def test_revocations_are_exported_on_metrics():
    from appliance.ops.metrics import ApplianceCollector, metrics_registry, render

    stats = {
        "to_peer_packets": 0,
        "to_client_packets": 0,
        "to_peer_bytes": 0,
        "to_client_bytes": 0,
        "dropped_packets": 0,
        "counters": {"auth_revoked": 3, "allocations_revoked": 2},
    }
    text = render(metrics_registry(ApplianceCollector(relay_stats=lambda: stats))).decode()
    assert 'appliance_relay_auth_failures_total{reason="revoked"} 3.0' in text
    assert "appliance_relay_allocations_revoked_total 2.0" in text
