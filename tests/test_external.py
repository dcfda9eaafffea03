"""A missing external program skips with its install step under plain pytest and fails
under REQUIRE_INTEROP=1 (CI), where a skip would hide a missing install step."""

from __future__ import annotations

import sys

import pytest

from .external import require_program, unavailable


def test_a_missing_program_skips_and_names_the_install_step(monkeypatch):
    monkeypatch.delenv("REQUIRE_INTEROP", raising=False)
    with pytest.raises(
        pytest.skip.Exception,
        match="no-such-tool not found: install it with `apt-get install no-such-package`",
    ):
        require_program("no-such-tool", "apt-get install no-such-package")


def test_under_require_interop_a_missing_program_fails(monkeypatch):
    monkeypatch.setenv("REQUIRE_INTEROP", "1")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool not found"):
        require_program("no-such-tool", "apt-get install no-such-package")
    with pytest.raises(pytest.fail.Exception, match="playwright-core missing"):
        unavailable("playwright-core missing: npm ci --prefix tests/js")


def test_a_present_program_is_found(monkeypatch):
    monkeypatch.setenv("REQUIRE_INTEROP", "1")
    assert require_program(sys.executable, "nothing") == sys.executable
