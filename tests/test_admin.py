"""The admin API in-process (Quart's test client) on a float clock: bearer token checks,
secret endpoints refused without a configured token, readiness, ring listing without
values, rotation and pruning; the ring watcher re-applying the accepted set when a
grace period ends without any file change, and keeping the last good ring."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from appliance.credentials.ring import Secret, SecretRing, load_ring, save_ring
from appliance.credentials.store import FileRingStore
from appliance.credentials.watcher import RingWatcher
from appliance.ops.admin import AdminContext, create_admin_app
from appliance.ops.metrics import ApplianceCollector, metrics_registry

NOW = 1_900_000_000.0
TOKEN = "t" * 24


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_admin(tmp_path, token=TOKEN, ready=True):
    path = tmp_path / "secrets.json"
    save_ring(path, SecretRing((Secret("k-1", "v" * 43, int(NOW) - 1000),)))
    clock = Clock()
    applied = []
    store = FileRingStore(path)
    watcher = RingWatcher(store, grace_s=60, apply=applied.append, clock=clock)
    watcher.load(force=True)
    reloads = []

    async def secrets_changed():
        reloads.append(1)
        await watcher.poll(force=True)

    ctx = AdminContext(
        token=token,
        watcher=watcher,
        store=store,
        grace_s=60,
        activation_s=5,
        registry=metrics_registry(ApplianceCollector(None, watcher=watcher, clock=clock)),
        readiness=lambda: {"relay": ready, "secret_ring": True},
        secrets_changed=secrets_changed,
        clock=clock,
    )
    return create_admin_app(ctx).test_client(), ctx, clock, reloads


BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def test_health_and_readiness_need_no_token(tmp_path):
    client, *_ = make_admin(tmp_path, ready=False)
    assert (await client.get("/healthz")).status_code == 200
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert await response.get_json() == {"ready": False, "checks": {"relay": False, "secret_ring": True}}


async def test_every_other_endpoint_refuses_a_missing_or_wrong_token(tmp_path):
    client, ctx, *_ = make_admin(tmp_path)
    for method, path in (
        ("GET", "/metrics"),
        ("GET", "/admin/secrets"),
        ("POST", "/admin/secrets/rotate"),
        ("POST", "/admin/secrets/prune"),
    ):
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
        ):
            response = await client.open(path, method=method, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="appliance-admin"'
    assert ctx.refusals["wrong_token"] == 4 and ctx.refusals["missing_token"] == 12
    assert len(load_ring(ctx.store.path).secrets) == 1


async def test_without_a_token_metrics_are_open_and_secrets_closed(tmp_path):
    client, *_ = make_admin(tmp_path, token=None)
    assert (await client.get("/metrics")).status_code == 200
    response = await client.post("/admin/secrets/rotate")
    assert response.status_code == 403 and "admin.token" in (await response.get_json())["error"]


async def test_rotate_list_and_prune(tmp_path):
    client, ctx, clock, reloads = make_admin(tmp_path)
    listed = await (await client.get("/admin/secrets", headers=BEARER)).get_json()
    assert listed["current"] == listed["signing"] == "k-1"
    assert "v" * 43 not in str(listed)
    rotated = await (await client.post("/admin/secrets/rotate", headers=BEARER)).get_json()
    new_id = rotated["current"]
    assert new_id != "k-1" and rotated["signing"] == "k-1" and reloads == [1]
    assert ctx.watcher.ring.current().id == new_id  # the running view changed at once
    clock.now += 5
    listed = await (await client.get("/admin/secrets", headers=BEARER)).get_json()
    assert listed["signing"] == new_id
    assert [r["state"] for r in listed["secrets"]] == ["current", "retired"]
    assert (await (await client.post("/admin/secrets/prune", headers=BEARER)).get_json()) == {"pruned": []}
    clock.now += 60
    pruned = await (await client.post("/admin/secrets/prune", headers=BEARER)).get_json()
    assert pruned == {"pruned": ["k-1"]}
    assert [s.id for s in load_ring(ctx.store.path).secrets] == [new_id]


async def test_metrics_are_prometheus_text(tmp_path):
    client, ctx, clock, _ = make_admin(tmp_path)
    response = await client.get("/metrics", headers=BEARER)
    assert response.content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(await response.get_data(as_text=True))}
    assert families["appliance_secret_ring_size"].samples[0].value == 1
    assert families["appliance_secret_current_age_seconds"].samples[0].value == 1000
    assert families["appliance_draining"].samples[0].value == 0


async def test_a_broken_ring_file_fails_rotation_and_keeps_the_old_ring(tmp_path):
    client, ctx, *_ = make_admin(tmp_path)
    ctx.store.path.write_text("{")
    response = await client.post("/admin/secrets/rotate", headers=BEARER)
    assert response.status_code == 500 and "not valid JSON" in (await response.get_json())["error"]
    assert ctx.watcher.ring.current().id == "k-1"


def test_watcher_withdraws_a_secret_when_its_grace_ends(tmp_path):
    path = tmp_path / "secrets.json"
    save_ring(
        path,
        SecretRing(
            (Secret("k-old", "o" * 43, int(NOW) - 100, int(NOW)), Secret("k-new", "n" * 43, int(NOW)))
        ),
    )
    clock = Clock()
    applied = []
    watcher = RingWatcher(FileRingStore(path), grace_s=30, apply=applied.append, clock=clock)
    watcher.load(force=True)
    assert applied == [(b"n" * 43, b"o" * 43)]
    clock.now += 29.9
    watcher.refresh()
    assert len(applied) == 1  # unchanged: not re-applied
    clock.now += 0.1
    watcher.refresh()
    assert applied[-1] == (b"n" * 43,)


def test_watcher_keeps_the_last_good_ring_on_a_corrupt_file(tmp_path):
    path = tmp_path / "secrets.json"
    save_ring(path, SecretRing((Secret("k-1", "a" * 43, int(NOW)),)))
    watcher = RingWatcher(FileRingStore(path), grace_s=30, clock=Clock())
    assert watcher.load(force=True)
    path.write_text("garbage")
    assert not watcher.load()
    assert watcher.ring.current().id == "k-1" and watcher.failures == 1
    assert not watcher.load()  # the same bad file is not re-reported
    assert watcher.failures == 1
