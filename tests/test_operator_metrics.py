"""The metrics operators asked for (issue 17): allocation and session duration histograms,
live allocations per client transport, current relayed bits and packets per second; and
that they add up across relay processes as the workers' snapshots travel (combine_stats,
retired_part), histograms bucket by bucket."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config.loader import load_config
from appliance.ops.metrics import ApplianceCollector, combine_stats, metrics_registry, render, retired_part
from appliance.ops.rates import RateWindow
from appliance.wiring.signaling import signaling_app
from signaling.auth import StaticVerifier
from signaling.broker import MemoryBroker
from signaling.service import SignalingService
from signaling.session import Session
from signaling.stomp import StompServerConnection
from turn import stun

from .turn_fakes import T0, CoreClient, lifetime_attr, make_core


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def snapshot(core, **figures) -> dict:
    """A RelayNode.stats()-shaped snapshot of `core` (the fields metrics reads)."""
    t = core.traffic
    return {
        "processes": 1,
        "allocations": len(core.table),
        "to_peer_packets": t.to_peer_packets,
        "to_peer_bytes": t.to_peer_bytes,
        "to_client_packets": t.to_client_packets,
        "to_client_bytes": t.to_client_bytes,
        "dropped_packets": 0,
        "counters": dict(core.counters),
        **figures,
    }


def samples(collector: ApplianceCollector) -> dict:
    """{(sample name, frozenset of labels): value} of one render of /metrics."""
    text = render(metrics_registry(collector)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def bucket(name: str, le: str) -> tuple[str, frozenset]:
    return (f"{name}_bucket", frozenset({("le", le)}))


ALLOC = "appliance_relay_allocation_duration_seconds"
SESSION = "appliance_signaling_session_duration_seconds"


# ------------------------------------------------------------------ the relay core


def test_an_allocation_ending_for_any_reason_is_counted_with_its_duration():
    core, _ = make_core()
    expired = CoreClient(core, addr=("198.51.100.1", 1))
    deleted = CoreClient(core, addr=("198.51.100.2", 2))
    closed = CoreClient(core, addr=("198.51.100.3", 3), transport="tcp")
    for client in (expired, deleted, closed):
        assert client.allocate(lifetime_attr(600)).cls == stun.SUCCESS
    assert core.counters["allocations_open_udp"] == 2 and core.counters["allocations_open_tcp"] == 1

    deleted.now = T0 + 45  # a Refresh to 0 after 45 s: the ≤ 60 s bucket (index 2)
    assert deleted.send(stun.REFRESH, [lifetime_attr(0)]).cls == stun.SUCCESS
    core.handle_timer(T0 + 1000)  # the other two expired: 1000 s, the ≤ 1800 s bucket (index 5)
    assert core.counters["allocation_seconds_bucket_2"] == 1
    assert core.counters["allocation_seconds_bucket_5"] == 2
    assert core.counters["allocation_seconds_sum_ms"] == 45_000 + 2 * 1_000_000
    assert core.counters["allocations_open_udp"] == 0 and core.counters["allocations_open_tcp"] == 0


def test_a_stream_client_gone_ends_its_allocation_at_the_latest_instant_the_core_saw():
    core, _ = make_core()
    client = CoreClient(core, transport="tls")
    assert client.allocate().cls == stun.SUCCESS
    assert core.counters["allocations_open_tls"] == 1
    core.handle_timer(T0 + 5)
    core.client_gone(client.key_id)
    assert core.counters["allocation_seconds_bucket_0"] == 1  # ≤ 10 s
    assert core.counters["allocation_seconds_sum_ms"] == 5_000
    assert core.counters["allocations_open_tls"] == 0


def test_a_clock_that_steps_back_counts_no_negative_duration():
    core, _ = make_core()
    client = CoreClient(core)
    assert client.allocate().cls == stun.SUCCESS
    core.handle_timer(T0 - 100)
    core.close_all("shutdown")
    assert core.counters["allocation_seconds_bucket_0"] == 1
    assert core.counters["allocation_seconds_sum_ms"] == 0


# ------------------------------------------------------------------ /metrics


def test_histograms_and_transport_gauges_of_several_relay_processes_add_up():
    one, _ = make_core()
    two, _ = make_core()
    for i, (core, transport) in enumerate([(one, "udp"), (one, "tcp"), (two, "udp"), (two, "udp")]):
        client = CoreClient(core, addr=("198.51.100.9", 100 + i), transport=transport)
        assert client.allocate().cls == stun.SUCCESS
    ended = CoreClient(two, addr=("198.51.100.9", 999))
    assert ended.allocate().cls == stun.SUCCESS
    ended.now = T0 + 3700  # ends after 3700 s: the ≤ 7200 s bucket
    assert ended.send(stun.REFRESH, [lifetime_attr(0)]).cls == stun.SUCCESS
    one.handle_timer(T0 + 20)
    one.client_gone(("198.51.100.9", 100))  # ends after 20 s: the ≤ 30 s bucket

    combined = combine_stats([snapshot(one), snapshot(two)])
    got = samples(ApplianceCollector(relay_stats=lambda: combined))
    by_transport = "appliance_relay_allocations_by_transport"
    assert got[(by_transport, frozenset({("transport", "udp")}))] == 2
    assert got[(by_transport, frozenset({("transport", "tcp")}))] == 1
    assert got[(by_transport, frozenset({("transport", "tls")}))] == 0
    assert got[bucket(ALLOC, "10.0")] == 0
    assert got[bucket(ALLOC, "30.0")] == 1  # process one's, 20 s
    assert got[bucket(ALLOC, "3600.0")] == 1
    assert got[bucket(ALLOC, "7200.0")] == 2  # and process two's, 3700 s (cumulative)
    assert got[bucket(ALLOC, "+Inf")] == 2
    assert got[(f"{ALLOC}_count", frozenset())] == 2
    assert got[(f"{ALLOC}_sum", frozenset())] == pytest.approx(3720.0)


def test_an_exited_worker_leaves_its_histogram_but_not_its_open_allocations():
    core, _ = make_core()
    for port in (1, 2):
        assert CoreClient(core, addr=("198.51.100.9", port)).allocate().cls == stun.SUCCESS
    core.handle_timer(T0 + 700)  # both expire
    assert CoreClient(core, addr=("198.51.100.9", 3)).allocate().cls == stun.SUCCESS
    kept = retired_part(snapshot(core))
    assert kept["counters"]["allocation_seconds_bucket_5"] == 2
    assert not any(name.startswith("allocations_open_") for name in kept["counters"])
    got = samples(ApplianceCollector(relay_stats=lambda: combine_stats([kept])))
    assert got[("appliance_relay_allocations_by_transport", frozenset({("transport", "udp")}))] == 0
    assert got[(f"{ALLOC}_count", frozenset())] == 2


def test_relayed_bits_per_second_each_way_over_the_last_seconds():
    core, _ = make_core()
    clock = Clock(100.0)
    collector = ApplianceCollector(relay_stats=lambda: snapshot(core), monotonic=clock)

    def rate(metric: str, direction: str) -> float:
        return samples(collector)[(metric, frozenset({("direction", direction)}))]

    assert rate("appliance_relay_bits_per_second", "to_peer") == 0  # nothing to compare yet
    for _ in range(4):  # 1000 B and 10 packets a second to the peer, 500 B back
        clock.now += 1
        core.traffic.to_peer_bytes += 1000
        core.traffic.to_peer_packets += 10
        core.traffic.to_client_bytes += 500
        assert rate("appliance_relay_bits_per_second", "to_peer") == pytest.approx(8000)
    assert rate("appliance_relay_bits_per_second", "to_client") == pytest.approx(4000)
    assert rate("appliance_relay_packets_per_second", "to_peer") == pytest.approx(10)
    clock.now += 60  # traffic stopped: a minute later the rate says so
    assert rate("appliance_relay_bits_per_second", "to_peer") == 0


# ------------------------------------------------------------------ RateWindow


def test_rate_window_uses_the_last_few_seconds_when_read_often():
    window = RateWindow(window_s=5, min_span_s=1, min_gap_s=0.25)
    total = 0.0
    for step in range(100):  # 0.1 s apart: 10 per second, then 100 per second from step 50
        total += 1 if step < 50 else 10
        rates = window.rates(step / 10, {"n": total})
    assert rates["n"] == pytest.approx(100, rel=0.05)  # only the last 5 s count


def test_rate_window_averages_since_the_previous_read_when_read_seldom():
    window = RateWindow(window_s=5)
    assert window.rates(0, {"n": 0}) == {"n": 0.0}
    assert window.rates(15, {"n": 300}) == {"n": 20.0}
    assert window.rates(30, {"n": 600}) == {"n": 20.0}


def test_rate_window_stays_bounded_however_often_it_is_read():
    window = RateWindow(window_s=5, min_gap_s=0.25)
    for i in range(100_000):
        window.rates(i / 1000, {"n": float(i)})  # a thousand reads a second
    assert len(window._samples) <= 5 / 0.25 + 2
    assert window.rates(100.0, {"n": 100_000.0})["n"] == pytest.approx(1000, rel=0.05)


def test_rate_window_a_total_that_fell_is_no_negative_rate():
    window = RateWindow()
    window.rates(0, {"n": 500})
    assert window.rates(2, {"n": 10}) == {"n": 0.0}


# ------------------------------------------------------------------ signaling sessions


def open_session(service: SignalingService, name: str) -> Session:
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\nide:x\n\n\x00", 0)
    conn.accept(0)
    session = Session(name, f"user-{name}", conn)
    service.connected(session)
    return session


def test_session_durations_from_connect_accepted_to_close():
    clock = Clock(1000.0)
    service = SignalingService(MemoryBroker(), StaticVerifier({}), clock=clock)
    short, long, still_open = (open_session(service, name) for name in ("a", "b", "c"))
    clock.now += 5
    service.closed(short)
    clock.now += 3600
    service.closed(long)
    service.closed(long)  # a second close of the same session counts nothing
    assert service.counters["session_seconds_bucket_0"] == 1  # ≤ 10 s
    assert service.counters["session_seconds_bucket_6"] == 1  # ≤ 7200 s
    assert sum(n for k, n in service.counters.items() if k.startswith("session_seconds_bucket_")) == 2
    assert service.counters["session_seconds_sum_ms"] == 3_610_000


def test_session_durations_are_exported_as_a_histogram(tmp_path):
    path = tmp_path / "appliance.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\nhttp:\n  demo: false\n")
    app = signaling_app(load_config(path, {}))
    for name in ("a", "b"):
        app.service.closed(open_session(app.service, name))
    got = samples(ApplianceCollector(None, signaling=app))
    assert got[bucket(SESSION, "10.0")] == 2  # closed at once
    assert got[bucket(SESSION, "+Inf")] == 2
    assert got[(f"{SESSION}_count", frozenset())] == 2
