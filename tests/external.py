"""What a test needs from outside the project: a program (coturn's tools, redis-server,
node, chromium) or an installed package set (the Node clients, the demo's libraries).

Under plain pytest a missing one skips the test and says what to install; under
REQUIRE_INTEROP=1 (CI) it fails the test, so a missing install step cannot pass unseen.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(problem: str) -> NoReturn:
    if os.environ.get("REQUIRE_INTEROP") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


def require_program(name: str, install: str) -> str:
    """The program's path, or `unavailable` naming the install step."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found: install it with `{install}`")
    return path
