"""The edge listener (edge.listen): one TLS port, usually 443, for TURN over TLS and the
signaling's HTTPS and WSS, for networks that let nothing else out.

- `route`: where a connection goes after its handshake (ALPN, else its first bytes);
  sans-I/O.
- `listener`: EdgeListener, accept -> TLS -> route -> hand-off, each step bounded.
- `hypercorn_handoff`: an HTTP connection becomes a Hypercorn connection of the
  signaling app, through the signaling's ClientGuard.
- `certificate`: the edge's certificate pair and TLS context.

The supervisor runs it (process/supervisor.py); TURN connections join the supervisor's
own relay node.
"""

from .certificate import edge_certificate, edge_tls_context
from .hypercorn_handoff import HypercornConnections
from .listener import EdgeListener, bind_edge_socket
from .route import Route

__all__ = [
    "EdgeListener",
    "HypercornConnections",
    "Route",
    "bind_edge_socket",
    "edge_certificate",
    "edge_tls_context",
]
