"""Certificates that can be replaced while the listeners run: new contents of the same
files (SIGHUP, reload), or other files (a configuration reload, retarget).

An `ssl.SSLContext` may be given a new chain at any time: handshakes after
the call use it, established connections keep theirs.  A new pair is first
loaded into a throwaway context, so a half-copied file or a key that does not
match never replaces a working certificate.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger("appliance")


def check_pair(cert: Path, key: Path) -> None:
    """Raise (ssl.SSLError or OSError) unless `cert` and `key` load and match."""
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))


def require_pair(name: str, cert: Path, key: Path) -> None:
    """check_pair, raising an OSError that names the listener and both files (the error a
    refused configuration reload reports)."""
    try:
        check_pair(cert, key)
    except OSError as exc:  # ssl.SSLError is one
        raise OSError(f"{name} certificate {cert} with key {key} does not load: {exc}") from exc


class CertificateReloader:
    def __init__(self) -> None:
        self._contexts: list[tuple[str, ssl.SSLContext, Path, Path]] = []

    def track(self, name: str, ctx: ssl.SSLContext, cert: Path, key: Path) -> ssl.SSLContext:
        self._contexts.append((name, ctx, Path(cert), Path(key)))
        return ctx

    def retarget(self, name: str, cert: Path, key: Path) -> None:
        """Serve `cert` and `key` on every context tracked as `name` from now on, and reload
        them from there (a configuration reload naming other files).  The pair is loaded
        first: if it does not, this raises OSError (require_pair) and nothing changed."""
        cert, key = Path(cert), Path(key)
        require_pair(name, cert, key)
        for index, (tracked, ctx, _, _) in enumerate(self._contexts):
            if tracked == name:
                ctx.load_cert_chain(str(cert), str(key))
                self._contexts[index] = (name, ctx, cert, key)
        log.info("%s certificate now from %s", name, cert)

    def reload(self) -> list[str]:
        """Reload every tracked context from its files; returns the names that failed."""
        failed = []
        for name, ctx, cert, key in self._contexts:
            try:
                check_pair(cert, key)
                ctx.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                failed.append(name)
                log.error("%s certificate not reloaded, keeping the current one: %s (%s)", name, cert, exc)
            else:
                log.info("%s certificate reloaded from %s", name, cert)
        return failed
