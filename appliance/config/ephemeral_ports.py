"""The relay's ports against the kernel's ephemeral port range.

Linux gives every outgoing connection (and every socket bound to port 0) a
local port from net.ipv4.ip_local_port_range, 32768-60999 by default.  Relay
ports inside that range are taken by the host's own connections when an
allocation wants them, and relay sockets sit among ordinary local sockets (a
firewall opening the relay range opens theirs too).  Hence the default
turn.relay_ports 61000-65535, and a warning when a configured range overlaps.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .schema import AppConfig

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def warn_relay_ports_in_ephemeral_range(config: AppConfig, range_file: Path = EPHEMERAL_RANGE_FILE) -> None:
    """One `warning:` line on stderr when turn.relay_ports overlaps this machine's (this
    network namespace's) ephemeral port range; nothing when it cannot be read (not Linux)."""
    t = config.turn
    if not any((t.udp, t.tcp, t.tls)):
        return  # no relay, so no relay ports in use
    try:
        low, high = (int(port) for port in Path(range_file).read_text().split())
    except (OSError, ValueError):
        return
    relay_low, relay_high = t.relay_ports
    if relay_high < low or relay_low > high:
        return
    above = f" (e.g. {high + 1}-65535)" if high < 65535 else ""
    print(
        f"warning: turn.relay_ports {relay_low}-{relay_high} overlaps this machine's ephemeral "
        f"port range {low}-{high} (net.ipv4.ip_local_port_range), from which outgoing "
        f"connections take their local ports: pick turn.relay_ports outside it{above}, or "
        "narrow the ephemeral range to leave the relay's out (sysctl "
        "net.ipv4.ip_local_port_range, kept in /etc/sysctl.d/)",
        file=sys.stderr,
    )
