"""Prometheus metrics, read at scrape time from the objects that already count.

Nothing on a hot path touches prometheus-client: the relay and the signaling
keep plain integers (batch-added on the relay's paths) and this collector
turns a snapshot of them into metric families when /metrics is scraped.
Labels are bounded sets (reason, code, outcome, direction, transport); no
user id, username or address is ever a label, because ephemeral usernames
would grow the series without bound.

Durations are histograms the cores count bucket by bucket in their counters
(turn.core.ALLOCATION_SECONDS_BUCKETS, signaling.service.SESSION_SECONDS_BUCKETS),
so the relay processes' add up like any counter; current rates (bits and packets
per second) are computed here from the relayed totals (ops/rates.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from signaling.calls.machine import Outcome
from signaling.forwarded import COUNT_FORWARDED, COUNT_MALFORMED, COUNT_UNTRUSTED
from signaling.service import SESSION_SECONDS_BUCKETS
from turn.core import ALLOCATION_SECONDS_BUCKETS, OPEN_BY_TRANSPORT

from ..credentials.watcher import RingWatcher
from .rates import RateWindow

if TYPE_CHECKING:  # the relay workers import this module too: no web app for them
    from signaling.app import SignalingApp

    from ..process.config_reload import ConfigReloader

P = "appliance_"

# TurnCore counter -> (metric, label value); the rest go to relay_events_total.
RELAY_AUTH_FAILURES = {
    "auth_bad_credentials": "bad_credentials",
    "auth_expired": "expired",
    "auth_revoked": "revoked",  # a user an operator revoked (appliance revoke)
}
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
# What signaling.forwarded.TrustedForwarded did with a request's forwarding headers.
SIGNALING_FORWARDED = {
    "applied": COUNT_FORWARDED,
    "malformed": COUNT_MALFORMED,
    "untrusted": COUNT_UNTRUSTED,
}
SIGNALING_ABORTS = ("send_timeout", "overflow", "close_timeout", "drain", "server_error")
# Why the relay closed a TCP/TLS connection before it carried TURN (turn.node): no first
# bytes in time, too many pending, EOF, a PROXY header refused, a bug (demux.accept.COUNTED;
# accept_error is an accept() that failed), then a kind the listener does not serve (HTTP
# on turn.tcp, plain STUN on turn.tls...) or a failed TLS handshake (turn.tcp.StreamAcceptor).
RELAY_STREAM_REFUSALS = (
    "sniff_timeout",
    "sniff_overflow",
    "sniff_eof",
    "proxy_untrusted",
    "proxy_malformed",
    "sniff_error",
    "stream_error",
    "accept_error",
    "unexpected_tls",
    "unexpected_stun",
    "unexpected_http",
    "unexpected_unknown",
    "tls_handshake_failed",
)
# The client transports an allocation can come over (turn.allocation.ClientLink.transport_name):
# each is a series of relay_allocations_by_transport, 0 when none is open.
RELAY_TRANSPORTS = ("udp", "tcp", "tls")

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
    # Every counter but the levels (open allocations): those ended with the worker.
    kept["counters"] = {
        name: n for name, n in snapshot.get("counters", {}).items() if not name.startswith(OPEN_BY_TRANSPORT)
    }
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


def _histogram(
    name: str, doc: str, bounds: Sequence[float], counters: Mapping[str, float], prefix: str
) -> HistogramMetricFamily:
    """A histogram from a core's per-bucket counts (`<prefix>_bucket_<i>`, not cumulative,
    index len(bounds) for what is over the last bound) and `<prefix>_sum_ms`."""
    buckets = []
    cumulative = 0.0
    for index, bound in enumerate((*bounds, math.inf)):
        cumulative += counters.get(f"{prefix}_bucket_{index}", 0)
        buckets.append((floatToGoString(bound), cumulative))
    return HistogramMetricFamily(
        P + name, doc, buckets=buckets, sum_value=counters.get(f"{prefix}_sum_ms", 0) / 1000
    )


class ApplianceCollector:
    """Yields the appliance's metric families; each source may be absent (None)."""

    def __init__(
        self,
        relay_stats: Callable[[], dict] | None,
        signaling: SignalingApp | None = None,
        watcher: RingWatcher | None = None,
        draining: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
        edge_stats: Callable[[], dict] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        config_reloads: ConfigReloader | None = None,
    ) -> None:
        self.relay_stats = relay_stats
        self.signaling = signaling
        self.watcher = watcher
        self.draining = draining
        self.clock = clock
        self.edge_stats = edge_stats
        self.monotonic = monotonic  # for rates: a wall clock may step
        self.relay_rates = RateWindow()
        self.config_reloads = config_reloads

    def collect(self):
        yield _gauge("draining", "1 while the appliance is shutting down", int(self.draining()))
        if self.watcher is not None:
            yield from self._ring()
        if self.config_reloads is not None:
            yield from self._config_reloads(self.config_reloads)
        if self.relay_stats is not None:
            yield from self._relay(self.relay_stats())
        if self.signaling is not None:
            yield from self._signaling()
        if self.edge_stats is not None:
            yield from self._edge(self.edge_stats())

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

    def _config_reloads(self, reloader: ConfigReloader):
        yield _labelled(
            "config_reloads",
            "configuration reloads (SIGHUP, POST /admin/reload) by result: applied, unchanged "
            "(no live key changed), refused (the file did not validate: nothing changed)",
            "result",
            reloader.counts,
        )
        yield _gauge(
            "config_last_reload_success_timestamp_seconds",
            "when the configuration file was last read and validated (at first the start)",
            reloader.last_success,
        )
        yield _gauge(
            "config_last_reload_successful",
            "0 if the latest reload was refused (the previous configuration still runs), else 1",
            int(not reloader.last_refused),
        )

    def _relay(self, s: dict):
        if not s:
            return
        counters = s["counters"]
        yield _gauge(
            "relay_processes", "relay processes whose figures are summed here", s.get("processes", 1)
        )
        yield _gauge("relay_allocations", "live TURN allocations", s.get("allocations", 0))
        yield _labelled(
            "relay_allocations_by_transport",
            "live TURN allocations by the client's transport to the relay",
            "transport",
            {t: counters.get(OPEN_BY_TRANSPORT + t, 0) for t in RELAY_TRANSPORTS},
            kind=GaugeMetricFamily,
        )
        yield _histogram(
            "relay_allocation_duration_seconds",
            "how long allocations lasted, from the Allocate's success to their end for any reason",
            ALLOCATION_SECONDS_BUCKETS,
            counters,
            "allocation_seconds",
        )
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
        yield from self._relay_rates(s)
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
            "relay_allocations_revoked",
            "allocations ended because an operator revoked their user (appliance revoke, "
            "DELETE /admin/allocations)",
            counters.get("allocations_revoked", 0),
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
        yield _labelled(
            "relay_stream_refused",
            "TCP/TLS connections to turn.tcp and turn.tls closed before they carried TURN "
            "(accept_error: an accept that failed)",
            "reason",
            {reason: counters.get(f"stream_refused_{reason}", 0) for reason in RELAY_STREAM_REFUSALS},
        )
        yield _counter(
            "relay_stream_proxied",
            "TCP/TLS connections whose client a PROXY header from trusted_proxies named",
            counters.get("stream_proxied", 0),
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

    def _relay_rates(self, s: dict):
        """Relayed bits and packets per second each way over the last few seconds
        (ops/rates.py: or since the previous read of /metrics, if that is older)."""
        rates = self.relay_rates.rates(self.monotonic(), {key: s[key] for key in MONOTONIC_FIELDS})
        yield _labelled(
            "relay_bits_per_second",
            "payload bits relayed per second now (over the last few seconds, or since the previous scrape)",
            "direction",
            {d: 8 * rates[f"{d}_bytes"] for d in ("to_peer", "to_client")},
            kind=GaugeMetricFamily,
        )
        yield _labelled(
            "relay_packets_per_second",
            "packets relayed per second now (the same window)",
            "direction",
            {d: rates[f"{d}_packets"] for d in ("to_peer", "to_client")},
            kind=GaugeMetricFamily,
        )

    def _signaling(self):
        app = self.signaling
        svc = app.service
        broker = app.broker
        counters = svc.counters
        yield _gauge("signaling_sessions", "STOMP sessions connected to this node", broker.session_count())
        yield _histogram(
            "signaling_session_duration_seconds",
            "how long STOMP sessions on this node lasted, from CONNECT accepted to their close",
            SESSION_SECONDS_BUCKETS,
            counters,
            "session_seconds",
        )
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
        yield _counter(
            "signaling_operator_disconnects",
            "sessions an operator disconnected (DELETE /admin/sessions)",
            counters.get("operator_disconnects", 0),
        )
        yield _counter(
            "signaling_oversight_unanswered",
            "other nodes' questions for an admin listing this node left unanswered (too many at once)",
            counters.get("oversight_unanswered", 0),
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
        yield _labelled(
            "signaling_forwarded",
            "requests from a trusted proxy whose X-Forwarded-For or Forwarded named the client "
            "(applied), could not be read (malformed: the proxy's address kept), and forwarding "
            "headers from a peer not in trusted_proxies (untrusted: ignored)",
            "result",
            {result: counters.get(name, 0) for result, name in SIGNALING_FORWARDED.items()},
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

    # ------------------------------------------------------------ the edge listener

    def _edge(self, s: dict):
        """The edge listener (appliance.process.edge.EdgeListener.stats): where its
        connections went (route: turn_alpn, turn_sniffed, http_alpn, http_sniffed) and why
        the others were closed before a route (a bounded set of reasons)."""
        yield _labelled(
            "edge_connections",
            "edge connections routed after TLS, by route: TURN or HTTP, by ALPN or by the first bytes",
            "route",
            s["routes"],
        )
        yield _labelled(
            "edge_closed",
            "edge connections closed before a route: not TLS, a failed handshake, "
            "nothing sent in time, a PROXY header refused, the edge stopping...",
            "reason",
            s["closed"],
        )
        yield _gauge(
            "edge_http_connections",
            "HTTP connections the edge handed to the signaling, open now",
            s["http_open"],
        )


def metrics_registry(collector: ApplianceCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
