"""`appliance probe` against a running appliance: two aiortc peers call each other through
our signaling (STOMP) and relay-only through our relay over the UDP, TCP and TLS TURN URLs
the signaling hands out, with data and an audio track; and it names the failing step when
the token is wrong (auth), the relay does not share the signaling's secret (allocation,
401) or the relay is down (allocation, no answer)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ..netports import free_port_pair
from .conftest import start_appliance, stop_appliance


def probe(app, *extra: str) -> tuple[int, dict]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "probe",
            "--json",
            "--config",
            str(app.config_path),
            "--ca",
            str(app.cert),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def test_probe_passes_over_udp_tcp_and_tls(relay):
    code, report = probe(relay)
    assert code == 0 and report["ok"], report
    assert [r["url"] for r in report["results"]] == [
        f"turn:127.0.0.1:{relay.port}?transport=udp",
        f"turn:127.0.0.1:{relay.port}?transport=tcp",
        f"turns:127.0.0.1:{relay.tls_port}?transport=tcp",
    ]
    for result in report["results"]:
        assert result["path"] == ["relay", "relay"]
        assert result["audioFrames"] >= 10 and result["throughputKiBs"] > 0 and result["rttMs"] > 0


def test_probe_names_a_refused_token(relay):
    code, report = probe(relay, "--user-a", "alice=not-a-token", "--user-b", "bob=tok-bob")
    assert code == 1 and report["failedStep"] == "auth" and "alice" in report["failure"]


@pytest.fixture
def signaling_only(tmp_path):
    started = []

    def start(external_url: str):
        app = start_appliance(
            tmp_path / f"s{len(started)}",
            extra_turn={"udp": None, "tcp": None, "tls": None},
            credentials={"external": [external_url]},
        )
        started.append(app)
        return app

    yield start
    for app in started:
        assert stop_appliance(app) == 0, app.log()


def test_probe_names_a_relay_with_another_secret(relay, signaling_only):
    # This signaling has its own secret ring: the relay refuses what it hands out.
    app = signaling_only(f"turn:127.0.0.1:{relay.port}?transport=udp")
    code, report = probe(app)
    assert code == 1 and report["failedStep"] == "allocation", report
    assert "401" in report["failure"] and "secret" in report["failure"]


def test_probe_names_a_relay_that_is_down(signaling_only):
    app = signaling_only(f"turn:127.0.0.1:{free_port_pair()}?transport=tcp")
    code, report = probe(app)
    assert code == 1 and report["failedStep"] == "allocation", report
    assert "cannot reach" in report["failure"] or "no answer" in report["failure"]
