"""The C programs of the relay benchmark (bench/loadgen.c, bench/forwarder.c), compiled
when a benchmark runs with the system compiler: no binary is kept in the tree.

`build(name)` compiles bench/NAME.c with `cc -O2` into a cache directory keyed by the
source's hash, with OpenSSL (TLS support) when its headers and libraries link and
without it otherwise; `has_tls(path)` says which one a binary is.  `compiler()` is None
when there is no compiler, for a caller (a test) to skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / f"bench-c-{os.getuid()}"
TLS_FLAGS = ["-DWITH_TLS", "-lssl", "-lcrypto"]


class BuildError(RuntimeError):
    """The compiler is missing or refused a source."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build(name: str) -> Path:
    """bench/NAME.c compiled (or found compiled from the same source); TLS when it links."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (cc, gcc or clang) on PATH")
    source = BENCH / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    CACHE.mkdir(mode=0o700, exist_ok=True)
    for flavour in ("tls", "plain"):
        done = CACHE / f"{name}-{digest}-{flavour}"
        if done.exists():
            return done
    errors = []
    for flavour, extra in (("tls", TLS_FLAGS), ("plain", [])):
        target = CACHE / f"{name}-{digest}-{flavour}"
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        run = subprocess.run(
            [cc, "-O2", "-Wall", "-o", str(partial), str(source), *extra],
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode == 0:
            partial.replace(target)  # atomic: a concurrent build sees all of it or nothing
            return target
        errors.append(run.stderr.strip())
    raise BuildError(f"{source.name} did not compile:\n" + "\n".join(errors))


def has_tls(binary: Path) -> bool:
    return binary.name.endswith("-tls")
