"""The certificate and key files of the TLS listeners, as `appliance serve` resolved them
(the configured ones, or the development certificate when a section names none)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    turn_cert: Path | None = None
    turn_key: Path | None = None
    http_cert: Path | None = None
    http_key: Path | None = None
