"""CI's fresh-root harness (.ci/fresh_root.py), loaded for tests of its parsing: the
README's commands and the machine's apt sources.  It is a script, not a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / ".ci" / "fresh_root.py"
_spec = importlib.util.spec_from_file_location("fresh_root", _PATH)
fresh_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fresh_root)
