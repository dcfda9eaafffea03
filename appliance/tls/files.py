"""The certificate and key files of the TLS listeners, as the configuration names them (the
configured ones, or the development certificate when a section names none): resolved by
`appliance serve` at the start, and again by a configuration reload, which points the
listeners at new files (CertificateReloader.retarget)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import AppConfig
from ..wiring.relay import needs_turn_certificate

Pair = tuple[Path, Path] | tuple[None, None]


@dataclass(frozen=True)
class TlsFiles:
    turn_cert: Path | None = None
    turn_key: Path | None = None
    http_cert: Path | None = None
    http_key: Path | None = None


def _quiet(line: str) -> None:
    pass


def listener_files(config: AppConfig, section: str, announce: Callable[[str], None] = _quiet) -> Pair:
    """The pair the `section` ("turn" or "http") listener serves: its tls_cert/tls_key, or
    the development certificate under data_dir/certs if it names none (made when missing);
    (None, None) when the section serves no TLS.  `announce` is told which, in a line."""
    if section == "turn":
        t = config.turn
        needed, cert, key = needs_turn_certificate(config), t.tls_cert, t.tls_key
    else:
        h = config.http
        needed, cert, key = h.listen is not None and h.tls, h.tls_cert, h.tls_key
    if not needed:
        return None, None
    if cert is None or key is None:
        from .devcert import ensure_dev_certificate  # cryptography: only when needed

        cert, key, made = ensure_dev_certificate(config.data_dir / "certs")
        announce(
            f"{section} TLS: development certificate {cert} ({'created' if made else 'reused'}); "
            f"set {section}.tls_cert/tls_key for production"
        )
    else:
        announce(f"{section} TLS: {cert}, {key}")
    return cert, key


def tls_files(config: AppConfig, announce: Callable[[str], None] = _quiet) -> TlsFiles:
    """The files of the relay's and the signaling's TLS listeners (listener_files)."""
    return TlsFiles(*listener_files(config, "turn", announce), *listener_files(config, "http", announce))
