"""Issue 17, hot reload: the declared split of the configuration keys (live or needs a
restart), the plan a reload follows, the reloader's refusal of a file that does not
validate, and TurnCore.apply taking new quotas and a new peer policy without touching a
live allocation."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from appliance.config.live_keys import LIVE_KEYS, RESTART_KEYS, plan_reload, schema_keys
from appliance.config.loader import load_config
from appliance.ops.metrics import ApplianceCollector
from appliance.process.config_reload import ConfigReloader
from turn import stun
from turn.core import RelaySettings
from turn.policy import build_policy

from .test_operator_metrics import samples
from .turn_fakes import REALM, CoreClient, error_code, make_core, peer_attr


def test_every_schema_key_is_live_or_needs_a_restart_and_not_both():
    keys = schema_keys()
    assert set(keys) == LIVE_KEYS | RESTART_KEYS, {
        "undeclared": sorted(set(keys) - LIVE_KEYS - RESTART_KEYS),
        "not in the schema": sorted((LIVE_KEYS | RESTART_KEYS) - set(keys)),
    }
    assert not LIVE_KEYS & RESTART_KEYS


def test_the_readme_lists_exactly_the_live_keys():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    listed = readme.split("<!-- live keys:", 1)[1].split("<!-- end of live keys -->", 1)[0]
    assert set(re.findall(r"`([a-z0-9_.]+)`", listed)) == LIVE_KEYS


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


BASE = {"data_dir": "data", "turn": {"user_quota": 10, "deny_peers": ["recommended"]}}


def test_a_plan_takes_the_live_keys_and_reports_the_others(tmp_path):
    running = load_config(write(tmp_path / "a.yaml", BASE), environ={})
    changed = {
        **BASE,
        "log_level": "debug",
        "turn": {"user_quota": 1, "deny_peers": ["10.0.0.0/8"], "workers": 3, "relay_ports": "50000-50100"},
    }
    plan = plan_reload(running, load_config(write(tmp_path / "b.yaml", changed), environ={}))
    assert set(plan.applied) == {"log_level", "turn.user_quota", "turn.deny_peers"}
    assert set(plan.needs_restart) == {"turn.workers", "turn.relay_ports"}
    assert plan.config.turn.user_quota == 1 and plan.config.log_level == "debug"
    assert plan.config.turn.workers == running.turn.workers
    assert plan.config.turn.relay_ports == running.turn.relay_ports
    unchanged = plan_reload(running, load_config(tmp_path / "a.yaml", environ={}))
    assert not unchanged.applied and not unchanged.needs_restart


def test_a_file_that_does_not_validate_changes_nothing_and_is_counted(tmp_path, caplog):
    path = write(tmp_path / "a.yaml", BASE)
    running = load_config(path, environ={})
    applied = []
    reloader = ConfigReloader(path, running, applied.append, lambda p: load_config(p, environ={}))
    write(path, {**BASE, "turn": {"user_quota": -1, "deny_peers": []}})
    outcome = reloader.reload()
    assert outcome.result == "refused" and "turn.user_quota" in (outcome.error or "")
    path.write_text("turn: [unclosed")
    assert reloader.reload().result == "refused"
    assert applied == [] and reloader.running is running
    assert reloader.counts["refused"] == 2
    assert "configuration reload refused" in caplog.text
    write(path, {**BASE, "turn": {"user_quota": 2, "deny_peers": []}})
    outcome = reloader.reload()
    assert outcome.result == "applied" and set(outcome.applied) == {"turn.user_quota", "turn.deny_peers"}
    assert applied == [reloader.running] and reloader.running.turn.user_quota == 2


def test_an_apply_that_fails_refuses_the_reload(tmp_path):
    path = write(tmp_path / "a.yaml", BASE)
    running = load_config(path, environ={})

    def broken(config):
        raise OSError("the key file went away")

    reloader = ConfigReloader(path, running, broken, lambda p: load_config(p, environ={}))
    write(path, {**BASE, "log_level": "debug"})
    outcome = reloader.reload()
    assert outcome.result == "refused" and "went away" in (outcome.error or "")
    assert reloader.running is running


def test_reloads_are_on_metrics_by_result_with_the_last_success(tmp_path):
    path = write(tmp_path / "a.yaml", BASE)
    now = [1000.0]
    reloader = ConfigReloader(
        path,
        load_config(path, environ={}),
        lambda c: None,
        lambda p: load_config(p, environ={}),
        lambda: now[0],
    )
    collector = ApplianceCollector(None, config_reloads=reloader)

    def reloads(result: str) -> float:
        return samples(collector)[("appliance_config_reloads_total", frozenset({("result", result)}))]

    def last(name: str) -> float:
        return samples(collector)[(f"appliance_config_last_reload_{name}", frozenset())]

    assert [reloads(r) for r in ("applied", "unchanged", "refused")] == [0, 0, 0]
    assert last("success_timestamp_seconds") == 1000.0 and last("successful") == 1
    now[0] = 1010.0
    assert reloader.reload().result == "unchanged"
    write(path, {**BASE, "log_level": "debug"})
    now[0] = 1020.0
    assert reloader.reload().result == "applied"
    write(path, {**BASE, "turn": {"user_quota": -1}})
    now[0] = 1030.0
    assert reloader.reload().result == "refused"
    assert [reloads(r) for r in ("applied", "unchanged", "refused")] == [1, 1, 1]
    assert last("success_timestamp_seconds") == 1020.0 and last("successful") == 0


def test_no_file_no_reload():
    reloader = ConfigReloader(None, load_config(None, environ={}), lambda c: None)
    assert reloader.reload().result == "refused"


PEER = ("8.8.8.8", 5000)


def test_turn_core_apply_tightens_quota_and_policy_for_new_requests_only():
    core, _ = make_core(user_quota=3, deny=())
    live = CoreClient(core, addr=("198.51.100.1", 1001))
    assert live.allocate().cls == stun.SUCCESS
    assert live.send(stun.CREATE_PERMISSION, [peer_attr(PEER)]).cls == stun.SUCCESS
    alloc = core.table.get(live.key_id)
    permissions_before = dict(alloc.permissions)

    tighter = build_policy(("8.8.8.0/24",), (), [("10.9.0.1", 3478)], [], (49152, 65535))
    core.apply(dataclasses.replace(core.settings, user_quota=1), tighter)

    assert core.table.get(live.key_id) is alloc and alloc.permissions == permissions_before
    assert error_code(CoreClient(core, addr=("198.51.100.1", 1002)).allocate()) == 486
    assert error_code(live.send(stun.CREATE_PERMISSION, [peer_attr(("8.8.8.9", 5000))])) == 403
    assert len(core.table) == 1


def test_turn_core_apply_refuses_a_new_realm():
    core, _ = make_core()
    with pytest.raises(ValueError):
        core.apply(RelaySettings(realm=REALM + ".other"), core.policy)


def test_new_bandwidth_caps_meter_new_allocations_and_old_ones_detach_where_they_attached():
    core, _ = make_core(user_quota=0, user_max_bps=80_000)
    first = CoreClient(core, addr=("198.51.100.1", 1001))
    assert first.allocate().cls == stun.SUCCESS
    old_caps = core.bandwidth
    core.apply(dataclasses.replace(core.settings, user_max_bps=160_000), core.policy)
    assert core.bandwidth is not old_caps
    second = CoreClient(core, addr=("198.51.100.1", 1002))
    assert second.allocate().cls == stun.SUCCESS
    assert old_caps.users["alice"].allocations == 1 and core.bandwidth.users["alice"].allocations == 1
    first.send(stun.REFRESH, [(stun.LIFETIME, b"\x00\x00\x00\x00")])
    assert "alice" not in old_caps.users and core.bandwidth.users["alice"].allocations == 1
