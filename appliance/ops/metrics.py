"""Prometheus metrics, read at scrape time from the objects that already count.

Nothing on a hot path touches prometheus-client: the relay and the signaling
keep plain integers (batch-added on the relay's paths) and this collector
turns a snapshot of them into metric families when /metrics is scraped.
Labels are bounded sets (reason, code, outcome, direction, transport); no
user id, username or address is ever a label, because ephemeral usernames
would grow the series without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from signaling.calls.machine import Outcome

from ..credentials.watcher import RingWatcher

if TYPE_CHECKING:  # the relay workers import this module too: no web app for them
    from signaling.app import SignalingApp

P = "appliance_"

# TurnCore counter -> (metric, label value); the rest go to relay_events_total.
RELAY_AUTH_FAILURES = {"auth_bad_credentials": "bad_credentials", "auth_expired": "expired"}
SIGNALING_AUTH_FAILURES = {
    "auth_missing_token": "missing_token",
    "auth_bad_token": "bad_token",
    "auth_wrong_user": "wrong_user",
}
# Why the signaling refused a connection or session (signaling.guard), and cut one off:
# a write stalled past stomp.send_timeout_s, an outbox over its budget while its writer was
# stuck, a close that did not finish, a finished request whose disconnect never came.
# Where the relay catches a bug on a packet (TurnCore.internal_error, handle_stun).
RELAY_PACKET_PATHS = ("stun", "udp_listener", "relay_port", "stream")
SIGNALING_REFUSALS = (
    "connections",
    "connections_per_ip",
    "sessions_per_ip",
    "session_rate",
    "origin",
    "sockjs_other_address",
    "sockjs_body_too_large",
)
SIGNALING_ABORTS = ("send_timeout", "overflow", "close_timeout", "drain", "server_error")


# Relay snapshot fields that only grow: kept from a worker that exited, so totals never fall.
MONOTONIC_FIELDS = (
    "to_peer_packets",
    "to_peer_bytes",
    "to_client_packets",
    "to_client_bytes",
    "dropped_packets",
)


def combine_stats(snapshots: list[dict]) -> dict:
    """One relay snapshot from several processes' (RelayNode.stats()): sums, counters merged."""
    snapshots = [s for s in snapshots if s]
    if not snapshots:
        return {}
    total: dict = {"counters": {}}
    for snap in snapshots:
        for key, value in snap.items():
            if key == "counters":
                for name, n in value.items():
                    total["counters"][name] = total["counters"].get(name, 0) + n
            elif isinstance(value, bool):
                total[key] = total.get(key, False) or value
            else:
                total[key] = total.get(key, 0) + value
    return total


def retired_part(snapshot: dict) -> dict:
    """What of an exited worker's last snapshot still counts: its monotonic totals."""
    if not snapshot:
        return {}
    kept = {key: snapshot.get(key, 0) for key in MONOTONIC_FIELDS}
    kept["counters"] = dict(snapshot.get("counters", {}))
    return kept


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(P + name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: dict, kind=CounterMetricFamily):
    family = kind(P + name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family


class ApplianceCollector:
    """Yields the appliance's metric families; each source may be absent (None)."""

    def __init__(
        self,
        relay_stats: Callable[[], dict] | None,
        signaling: SignalingApp | None = None,
        watcher: RingWatcher | None = None,
        draining: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.relay_stats = relay_stats
        self.signaling = signaling
        self.watcher = watcher
        self.draining = draining
        self.clock = clock

    def collect(self):
        yield _gauge("draining", "1 while the appliance is shutting down", int(self.draining()))
        if self.watcher is not None:
            yield from self._ring()
        if self.relay_stats is not None:
            yield from self._relay(self.relay_stats())
        if self.signaling is not None:
            yield from self._signaling()

    def _ring(self):
        w = self.watcher
        yield _counter(
            "secret_ring_reload_failures", "secret files refused (last good ring kept)", w.failures
        )
        if w.ring is None:
            return
        now = self.clock()
        yield _gauge("secret_ring_size", "secrets in the ring file", len(w.ring.secrets))
        yield _gauge(
            "secret_ring_accepted",
            "secrets the relay verifies with now",
            len(w.ring.accepted(now, w.grace_s)),
        )
        yield _gauge(
            "secret_current_age_seconds",
            "age of the current secret",
            max(0.0, now - w.ring.current().created),
        )

    def _relay(self, s: dict):
        if not s:
            return
        counters = s["counters"]
        yield _gauge(
            "relay_processes", "relay processes whose figures are summed here", s.get("processes", 1)
        )
        yield _gauge("relay_allocations", "live TURN allocations", s.get("allocations", 0))
        yield _gauge("relay_permissions", "live permissions over all allocations", s.get("permissions", 0))
        yield _gauge("relay_channels", "live channel bindings over all allocations", s.get("channels", 0))
        yield _gauge("relay_stream_connections", "open TCP/TLS client connections", s.get("connections", 0))
        yield _labelled(
            "relay_packets",
            "packets relayed",
            "direction",
            {"to_peer": s["to_peer_packets"], "to_client": s["to_client_packets"]},
        )
        yield _labelled(
            "relay_bytes",
            "payload bytes relayed",
            "direction",
            {"to_peer": s["to_peer_bytes"], "to_client": s["to_client_bytes"]},
        )
        yield _counter(
            "relay_dropped_packets",
            "packets without a permission, channel or allocation, or that could not be sent",
            s["dropped_packets"],
        )
        yield _counter(
            "relay_malformed_packets",
            "datagrams and stream frames that are neither STUN nor ChannelData, or do not parse",
            counters.get("malformed", 0),
        )
        yield _counter(
            "relay_internal_errors",
            "messages that hit a bug in the relay: answered 500 or dropped, logged at a bounded rate",
            counters.get("internal_errors", 0),
        )
        yield _labelled(
            "relay_internal_errors_by_path",
            "the same, by where the bug was caught",
            "path",
            {path: counters.get(f"internal_errors_{path}", 0) for path in RELAY_PACKET_PATHS},
        )
        yield _labelled(
            "relay_auth_failures",
            "TURN requests refused for their credentials",
            "reason",
            {label: counters.get(key, 0) for key, label in RELAY_AUTH_FAILURES.items()},
        )
        yield _labelled(
            "relay_errors",
            "STUN error responses sent",
            "code",
            {key[6:]: v for key, v in counters.items() if key.startswith("error_")},
        )
        yield _counter(
            "relay_unauth_replies_suppressed",
            "error responses not sent: the source "
            "holds no allocation and has spent its "
            "budget (turn.unauth_replies_per_s)",
            counters.get("unauth_replies_suppressed", 0),
        )
        yield _counter(
            "relay_allocations_created", "allocations made", counters.get("allocations_created", 0)
        )
        yield _counter(
            "relay_peer_denied",
            "permissions and channels refused by the peer policy",
            counters.get("peer_denied", 0),
        )
        yield _labelled(
            "relay_bandwidth_dropped_packets",
            "packets dropped past a bandwidth cap (turn.max_bps, user_max_bps, total_max_bps)",
            "direction",
            {
                "to_peer": counters.get("bandwidth_dropped_to_peer", 0),
                "to_client": counters.get("bandwidth_dropped_to_client", 0),
            },
        )
        yield _counter(
            "relay_stream_output_dropped",
            "relayed packets dropped because a TCP/TLS client's output queue was over its budget",
            counters.get("stream_output_dropped", 0),
        )
        yield _labelled(
            "relay_stream_connections_aborted",
            "TCP/TLS connections cut off: output stalled, or idle without an allocation",
            "reason",
            {
                "stalled": counters.get("stalled_connections_aborted", 0),
                "idle": counters.get("idle_connections_closed", 0),
            },
        )
        yield _counter(
            "relay_ports_exhausted",
            "Allocates refused (508) for want of a relay port",
            counters.get("relay_ports_exhausted", 0),
        )
        yield _counter(
            "relay_fd_exhausted",
            "of those, refused because the process was out of file descriptors or socket memory",
            counters.get("relay_fd_exhausted", 0),
        )

    def _signaling(self):
        app = self.signaling
        svc = app.service
        broker = app.broker
        counters = svc.counters
        yield _gauge("signaling_sessions", "STOMP sessions connected to this node", broker.session_count())
        yield _gauge(
            "signaling_online_users", "users with at least one session (on any node)", broker.user_count()
        )
        if broker.node_bus is not None:
            yield _gauge(
                "signaling_broker_up", "1 while the Redis the nodes share answers", 1 if broker.healthy else 0
            )
        yield _labelled(
            "signaling_auth_failures",
            "CONNECTs and HTTP calls refused",
            "reason",
            {label: counters.get(key, 0) for key, label in SIGNALING_AUTH_FAILURES.items()},
        )
        yield _labelled(
            "signaling_errors",
            "error messages sent to clients' /user/queue/errors",
            "code",
            {key[6:]: v for key, v in counters.items() if key.startswith("error_")},
        )
        yield _counter(
            "signaling_protocol_errors",
            "sessions closed for a STOMP protocol error",
            counters.get("protocol_errors", 0),
        )
        yield _counter(
            "signaling_slow_consumers", "sessions cut off for not reading", counters.get("slow_consumers", 0)
        )
        yield _labelled(
            "signaling_refused",
            "connections, sessions and requests refused: 503 "
            "past the total cap, 429 past a per-address one, "
            "403 a web page not in http.allowed_origins, 404 a "
            "SockJS session used from another address, 413 an "
            "xhr_send body over stomp.max_frame_bytes",
            "reason",
            {reason: counters.get(f"refused_{reason}", 0) for reason in SIGNALING_REFUSALS},
        )
        yield _counter(
            "signaling_connect_timeouts",
            "WebSocket and SockJS sessions closed for sending no CONNECT in time",
            counters.get("connect_timeouts", 0),
        )
        yield _labelled(
            "signaling_connections_aborted",
            "connections cut off without a close handshake",
            "reason",
            {reason: counters.get(f"aborted_{reason}", 0) for reason in SIGNALING_ABORTS},
        )
        reg = app.calls.registry
        yield _gauge("calls_active", "calls ringing or in progress (held by this node)", len(reg.calls))
        yield _labelled(
            "calls",
            "calls by outcome",
            "outcome",
            {o.value.replace(" ", "_"): reg.outcomes.get(o, 0) for o in Outcome},
        )
        if app.credentials is not None:
            yield _labelled(
                "turn_credentials_issued", "iceServers answers", "transport", dict(app.credentials.counters)
            )


def metrics_registry(collector: ApplianceCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
