"""The kernel tests: every test below this directory needs root and the real kernel.

The fixtures (``topology``, ``cluster``, ``dp``, ``pod_a_cgroup``, ``cgroup_dir``, ``bpffs_dir``,
``host_netns_inode``) and the skip logic live in the plugin ``helpers.kernel_fixtures``; this file opts the
directory in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import kernel_fixtures

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel_fixtures.require_kernel(items, below=_HERE)


@pytest.fixture(scope="session", autouse=True)
def _kernel_harness(harness_sweep: None) -> None:
    """Leftovers of dead test processes swept before the first test here, ours after the last one."""
