"""The TLS pieces of bench/relay.py: the client context of the Python set-up, and the
configuration that gives our appliance a TURN-over-TLS listener (turn.tls) or the edge port
(edge.listen, TURN and HTTPS on one TLS port).

The TLS load itself runs in bench/loadgen.c (OpenSSL): it makes the TLS 1.3 handshakes
(ALPN "stun.turn", as RFC 7443 asks of TURN clients) and bridges the plaintext to the
harness for the TURN set-up, so the load and the set-up share one TLS connection per
allocation.  `python bench/relay.py --tls` is `--transports tls` with the edge among the
servers.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from turn_servers import free_tcp_port


def client_context() -> ssl.SSLContext:
    """What the harness's readiness check speaks: TLS 1.3, ALPN stun.turn, no verification
    (the servers share a development certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["stun.turn"])
    return ctx


def tls_overrides(cert: Path, key: Path, tls_port: int) -> dict:
    return {"turn": {"tls": f"127.0.0.1:{tls_port}", "tls_cert": str(cert), "tls_key": str(key)}}


def edge_overrides(cert: Path, key: Path, edge_port: int) -> dict:
    """The edge with the signaling it hands HTTP to, and no other TURN stream listener."""
    files = {"tls_cert": str(cert), "tls_key": str(key)}
    return {
        "http": {"listen": f"127.0.0.1:{free_tcp_port()}", "tls": True, **files},
        "edge": {"listen": f"127.0.0.1:{edge_port}", **files},
    }
