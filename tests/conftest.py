"""Test-wide set-up: ``tests/`` is importable, so every suite can use ``helpers`` (the harness, fakes)."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
