"""deploy/grafana/appliance.json names only metrics /metrics exposes (issue 17).

/metrics is rendered from an ApplianceCollector fed with every source it reads (a relay
snapshot summed over two relay cores, the signaling app with a broker spanning nodes and
TURN credentials, the secret ring, the edge listener), and read back as Prometheus
ingests it: counters as `<name>_total`, histograms as `_bucket`, `_sum` and `_count`.
Every expression of every panel is reduced to the metric names it selects (functions,
label matchers, ranges, grouping clauses, numbers and operators stripped) and each must
be one of those series: a panel naming a metric that does not exist (a typo, a renamed
metric, a counter without its `_total`) fails here instead of drawing nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config.loader import load_config
from appliance.credentials.ring import Secret, SecretRing, save_ring
from appliance.credentials.store import FileRingStore
from appliance.credentials.watcher import RingWatcher
from appliance.ops.metrics import ApplianceCollector, combine_stats, metrics_registry, render
from appliance.process.edge.listener import CLOSE_REASONS
from appliance.process.edge.route import Route
from appliance.wiring.signaling import signaling_app
from signaling.errors import SignalingError
from signaling.session import Session
from signaling.stomp import StompServerConnection
from turn import stun

from .turn_fakes import T0, CoreClient, lifetime_attr, make_core

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "appliance.json"

# PromQL words that are neither metrics nor functions.
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries, $__rate_interval
    # Grouping and matching clauses name labels, not metrics: by (le), on (instance)...
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"\$\w+|\$\{[^}]*\}", " ", text)  # Grafana variables outside ranges
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def panels(dashboard: dict):
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel or variable title, PromQL) of every target of every panel and of every query
    variable (Grafana's `label_values(metric, label)` selects `metric`)."""
    found = [
        (panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            label_values = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            found.append((variable["name"], label_values.group(1) if label_values else query))
    return found


def missing_metrics(dashboard: dict, exposed: set[str]) -> list[tuple[str, str]]:
    """(panel title, metric) for each metric an expression names that is not exposed."""
    return sorted(
        (title, name) for title, expr in expressions(dashboard) for name in metric_names(expr) - exposed
    )


# ------------------------------------------------------------------ /metrics, every source


def relay_snapshot(core) -> dict:
    """What RelayNode.stats() gives of `core`."""
    t = core.traffic
    return {
        "processes": 1,
        "allocations": len(core.table),
        "permissions": 0,
        "channels": 0,
        "connections": 0,
        "to_peer_packets": t.to_peer_packets,
        "to_peer_bytes": t.to_peer_bytes,
        "to_client_packets": t.to_client_packets,
        "to_client_bytes": t.to_client_bytes,
        "dropped_packets": 0,
        "counters": dict(core.counters),
        "draining": False,
    }


def busy_relay() -> dict:
    """Two relay cores' figures summed, with allocations made, ended and refused."""
    snapshots = []
    for transport in ("udp", "tcp"):
        core, _ = make_core()
        client = CoreClient(core, transport=transport)
        assert client.allocate(lifetime_attr(600)).cls == stun.SUCCESS
        CoreClient(core, addr=("198.51.100.7", 7), password="d3Jvbmc=").allocate()  # a 401
        core.handle_timer(T0 + 700)  # it expires: a duration
        snapshots.append(relay_snapshot(core))
    return combine_stats(snapshots)


def signaling(tmp_path):
    path = tmp_path / "appliance.yaml"
    path.write_text(
        f"data_dir: {tmp_path / 'data'}\nhttp:\n  demo: false\n"
        # A broker spanning nodes (not connected here): its health is a metric too.
        "broker:\n  url: redis://127.0.0.1:1/0\n"
    )
    app = signaling_app(load_config(path, {}), issue_credentials=lambda user: {"iceServers": []})
    assert app.credentials is not None
    app.credentials.answer("alice", "stomp")
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\nide:x\n\n\x00", 0)
    conn.accept(0)
    session = Session("s-1", "alice", conn)
    app.service.connected(session)
    app.service.error(session, SignalingError(404, "no such destination"))
    return app


def ring_watcher(tmp_path) -> RingWatcher:
    path = tmp_path / "secrets.json"
    save_ring(path, SecretRing((Secret("k-1", "v" * 43, int(T0) - 1000),)))
    watcher = RingWatcher(FileRingStore(path), grace_s=60, clock=lambda: T0)
    watcher.load(force=True)
    return watcher


def edge_stats() -> dict:
    """The shape of EdgeListener.stats(): every route and reason present."""
    return {
        "routes": {route.value: 0 for route in Route},
        "closed": dict.fromkeys(CLOSE_REASONS, 0),
        "http_open": 0,
    }


def exposed_names(tmp_path) -> set[str]:
    """Every series name /metrics exposes with every source fed, as Prometheus ingests them."""
    relay = busy_relay()
    collector = ApplianceCollector(
        relay_stats=lambda: relay,
        signaling=signaling(tmp_path),
        watcher=ring_watcher(tmp_path),
        clock=lambda: T0,
        edge_stats=edge_stats,
    )
    text = render(metrics_registry(collector)).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> set[str]:
    return exposed_names(tmp_path_factory.mktemp("metrics"))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# ------------------------------------------------------------------ the tests


def test_every_metric_the_dashboard_names_exists_on_metrics(dashboard, exposed):
    named = {name for _, expr in expressions(dashboard) for name in metric_names(expr)}
    assert len(named) >= 20, named  # the extraction found the panels' metrics at all
    assert missing_metrics(dashboard, exposed) == []


def test_a_panel_naming_a_metric_that_does_not_exist_fails(dashboard, exposed):
    broken = json.loads(json.dumps(dashboard))
    broken["panels"][1]["targets"].append(
        {"expr": 'sum(rate(appliance_relay_packetz_total{direction="to_peer"}[5m]))', "refId": "Z"}
    )
    # A counter named without the `_total` Prometheus stores it under selects nothing either.
    broken["panels"][1]["targets"].append({"expr": "rate(appliance_relay_bytes[1m]) * 8", "refId": "Y"})
    title = broken["panels"][1]["title"]
    assert missing_metrics(broken, exposed) == [
        (title, "appliance_relay_bytes"),
        (title, "appliance_relay_packetz_total"),
    ]


def test_the_issue_asks_for_these_panels(dashboard, exposed):
    """Issue 17's list, each drawn from the metric that says it."""
    named = {name for _, expr in expressions(dashboard) for name in metric_names(expr)}
    for metric in (
        "appliance_relay_packets_total",
        "appliance_relay_bytes_total",
        "appliance_relay_bits_per_second",
        "appliance_relay_allocations_by_transport",
        "appliance_relay_allocation_duration_seconds_bucket",
        "appliance_signaling_session_duration_seconds_bucket",
        "appliance_signaling_sessions",
        "appliance_signaling_online_users",
        "appliance_calls_total",
        "appliance_relay_auth_failures_total",
        "appliance_signaling_auth_failures_total",
        "appliance_signaling_refused_total",
        "appliance_signaling_connections_aborted_total",
        "appliance_relay_stream_connections_aborted_total",
        "appliance_relay_stream_refused_total",
        "appliance_edge_connections_total",
        "appliance_relay_internal_errors_by_path_total",
        "appliance_secret_current_age_seconds",
    ):
        assert metric in named, metric
        assert metric in exposed, metric


def test_every_panel_queries_the_prometheus_datasource_variable(dashboard):
    assert 38 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (direction) (rate(a_total{direction="to_peer"}[$__rate_interval])) * 8', {"a_total"}),
        (
            "histogram_quantile(0.95, sum by (le) (rate(h_bucket[5m])))",
            {"h_bucket"},
        ),
        ("sum(rate(x_sum[5m])) / sum(rate(x_count[5m]))", {"x_sum", "x_count"}),
        ("time() - max(m) offset 1h", {"m"}),
        ('label_replace(g, "to", "$1", "from", "(.*)") > bool 0', {"g"}),
        ("sum(a) without (instance) + on (job) group_left b", {"a", "b"}),
        ("1e3 * c", {"c"}),
    ],
)
def test_metric_names_are_read_from_promql(expr, names):
    assert metric_names(expr) == names
