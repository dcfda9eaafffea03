"""The edge's certificate and TLS context.

edge.tls_cert/tls_key if given, else the http listener's pair (the one `appliance serve`
resolved), else the development certificate, as config/appliance.yaml says. The context
offers the edge's ALPN protocols and is tracked for SIGHUP reloads like every other.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ...config.schema import AppConfig
from ...tls.files import TlsFiles
from ...tls.reload import CertificateReloader
from ...wiring.relay import tls_context
from .route import EDGE_ALPN_PROTOCOLS


def edge_certificate(config: AppConfig, files: TlsFiles) -> tuple[Path, Path]:
    """The certificate chain and key the edge serves."""
    e = config.edge
    if e.tls_cert is not None and e.tls_key is not None:
        return e.tls_cert, e.tls_key
    if files.http_cert is not None and files.http_key is not None:
        return files.http_cert, files.http_key
    from ...tls.devcert import ensure_dev_certificate  # cryptography: only when needed

    cert, key, _ = ensure_dev_certificate(config.data_dir / "certs")
    return cert, key


def edge_tls_context(cert: Path, key: Path, reloader: CertificateReloader) -> ssl.SSLContext:
    """A server context for the edge: TLS 1.2 or later, the edge's ALPN list, reloaded
    from `cert` and `key` on SIGHUP (established connections keep theirs)."""
    ctx = tls_context(cert, key)
    ctx.set_alpn_protocols(EDGE_ALPN_PROTOCOLS)
    return reloader.track("edge", ctx, cert, key)
