"""The operator's metrics with two relay processes (issue 17): aioice clients allocate over
UDP and TCP, the kernel spreads them over the supervisor's relay and its worker, and the
supervisor's /metrics shows the live allocations per transport and, once they are deleted,
the duration histogram summed over both processes (a worker's figures come up its pipe)."""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import rest_credentials, start_appliance, stop_appliance
from .test_aioice import open_endpoint
from .test_credentials_admin import admin, metric_samples

UDP_CLIENTS = 16  # all on one process by chance: 2 in 2**16
TCP_CLIENTS = 2
WAIT_S = 10.0


@pytest.fixture
def two_workers(tmp_path):
    relay = start_appliance(tmp_path, workers=2)
    yield relay
    assert stop_appliance(relay) == 0, relay.log()


def metrics(relay) -> dict:
    return metric_samples(admin(relay, "GET", "/metrics").text)


async def metrics_until(relay, settled, what: str) -> dict:
    """/metrics once `settled(samples)` holds (workers report every second), bounded."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = metrics(relay)
        if settled(samples):
            return samples
        assert time.monotonic() < deadline, f"{what}: {samples}\n{relay.log()}"
        await asyncio.sleep(0.2)


def by_transport(samples: dict, transport: str) -> float:
    return samples.get(("appliance_relay_allocations_by_transport", (("transport", transport),)), -1)


def allocating_processes(relay) -> set[str]:
    """The pids (each log line names its process) that logged an allocation."""
    return {
        line.split("[")[1].split("]")[0]
        for line in relay.log().splitlines()
        if "allocation (" in line and " for user " in line and "ended" not in line
    }


async def test_allocations_by_transport_and_durations_summed_over_workers(two_workers):
    relay = two_workers
    await metrics_until(relay, lambda s: s.get(("appliance_relay_processes", ())) == 2, "a worker reports")
    clients = []
    try:
        for i in range(UDP_CLIENTS + TCP_CLIENTS):
            username, password = rest_credentials(relay.secret, f"metrics-user-{i}")
            transport = "udp" if i < UDP_CLIENTS else "tcp"
            clients.append((await open_endpoint(relay, transport, username, password))[0])
        live = await metrics_until(
            relay,
            lambda s: by_transport(s, "udp") == UDP_CLIENTS and by_transport(s, "tcp") == TCP_CLIENTS,
            "live allocations by transport",
        )
        assert by_transport(live, "tls") == 0
        assert live[("appliance_relay_allocations", ())] == UDP_CLIENTS + TCP_CLIENTS
        assert len(allocating_processes(relay)) == 2, relay.log()
    finally:
        for turn in clients:
            turn.close()  # aioice deletes the allocation (a Refresh to 0), or the TCP closes
    count = ("appliance_relay_allocation_duration_seconds_count", ())
    ended = await metrics_until(
        relay,
        lambda s: s.get(count) == UDP_CLIENTS + TCP_CLIENTS and by_transport(s, "udp") == 0,
        "durations summed over both processes",
    )
    assert by_transport(ended, "tcp") == 0
    # Seconds old at most: every one in the lowest buckets, none negative.
    assert ended[("appliance_relay_allocation_duration_seconds_bucket", (("le", "60.0"),))] == count_of(ended)
    assert 0 <= ended[("appliance_relay_allocation_duration_seconds_sum", ())] < 60 * count_of(ended)


def count_of(samples: dict) -> float:
    return samples[("appliance_relay_allocation_duration_seconds_count", ())]
