"""Test-wide set-up. ``tests/`` is on ``sys.path`` through the ``pythonpath`` ini option, so every suite
imports ``helpers`` (what only the tests need); the shared harness is the ``balancing_testkit`` package
(``testkit/``, installed with the dev dependencies). The kernel tests' plugin is registered here because
``pytest_plugins`` is only honoured in the root conftest.
"""

from __future__ import annotations

pytest_plugins = ["helpers.kernel_fixtures"]
