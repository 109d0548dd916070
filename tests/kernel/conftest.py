"""The kernel tests: every test below this directory needs root and the real kernel.

The fixtures (``topology``, ``cluster``, ``dp``, ``pod_a_cgroup``, ``cgroup_dir``, ``bpffs_dir``,
``host_netns_inode``) and the skip logic live in the plugin ``helpers.kernel_fixtures``; this file opts the
directory in.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import kernel_fixtures

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel_fixtures.require_kernel(items, below=_HERE)
    # test_infra's probes run only inside the child session that a harness test starts for them (with
    # BLT_HARNESS_PROBE set): deselected otherwise, so a plain run shows no skips for them
    if not os.environ.get("BLT_HARNESS_PROBE"):
        probes = [item for item in items if item.name.startswith("test_probe_")]
        if probes:
            config.hook.pytest_deselected(items=probes)
            items[:] = [item for item in items if not item.name.startswith("test_probe_")]


@pytest.fixture(scope="session", autouse=True)
def _kernel_harness(harness_sweep: None) -> None:
    """Leftovers of dead test processes swept before the first test here, ours after the last one."""
