"""The kernel tests' pytest plugin: skip logic, leftover sweep, failure reports, and fixtures.

Registered for the whole run by ``pytest_plugins`` in ``tests/conftest.py``; the suites that need the kernel
(``tests/kernel``, ``tests/conformance``) opt in from their conftest with :func:`require_kernel` (every test
below the directory is marked ``kernel`` and skipped, with the reason, when the machine cannot run it: not
root, no cgroup2, no BPF syscall / cgroup-BPF, no bpffs, no `ip`) and an autouse fixture that requests
``harness_sweep``. Unit tests see the fixtures but use none of them.

Fixtures:
    topology     function scope: an open, empty ``Topology`` (fabric netns + bridge, parent cgroup, bpffs dir)
    cluster      function scope: ``build_cluster(topology)``: pods pod-a/b/c with backends on TCP+UDP 8080,
                 a client "client" whose processes run in cgroup node "node-a"
    cgroup_dir   function scope: a test-owned cgroup2 directory (``<cgroup2>/blt-<pid>-<n>``)
    bpffs_dir    function scope: a test-owned bpffs directory (``/sys/fs/bpf/blt-<pid>-<n>``)
    host_netns_inode  the inode of this process's network namespace
    harness_sweep     session scope: removes leftovers of dead test processes before the first kernel test
                      and everything of this process after the last one
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from balancing.model.desired import PodRef
from balancing_testkit.topology import (
    Cluster,
    HarnessError,
    Topology,
    build_cluster,
    find_cgroup2_mount,
    new_prefix,
    owned_bpffs_dir,
    owned_cgroup,
    sweep_leftovers,
)
from helpers.support import AgentProcess, Datapath

_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_PROG_QUERY = 16
_BPF_CGROUP_INET4_CONNECT = 10


class _BpfQueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("_pad", ctypes.c_uint8 * 108),
    ]


def _cgroup_bpf_supported(cgroup: Path) -> str | None:
    """BPF_PROG_QUERY (read-only, loads nothing) on a cgroup2 directory: None if OK, else the reason."""
    nr = _BPF_SYSCALL_NR.get(platform.machine())
    if nr is None:
        return None  # unknown arch: do not guess, let the tests find out
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = _BpfQueryAttr(target_fd=fd, attach_type=_BPF_CGROUP_INET4_CONNECT)
        rc = libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_int(_BPF_PROG_QUERY),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
        if rc != 0:
            err = ctypes.get_errno()
            return (
                f"bpf(BPF_PROG_QUERY) on a cgroup2 directory failed: {os.strerror(err)} (cgroup BPF missing?)"
            )
    finally:
        os.close(fd)
    return None


@functools.cache
def kernel_skip_reason() -> str | None:
    """Why the kernel tests cannot run here, or None."""
    if sys.platform != "linux":
        return "kernel tests need Linux"
    if os.geteuid() != 0:
        return "kernel tests need root (netns, cgroup2, bpffs, BPF)"
    for tool in ("ip", "mount"):
        if shutil.which(tool) is None:
            return f"kernel tests need the `{tool}` command (iproute2 / util-linux)"
    if not Path("/proc/sys/kernel/unprivileged_bpf_disabled").exists():
        return "kernel has no BPF syscall (CONFIG_BPF_SYSCALL)"
    filesystems = Path("/proc/filesystems").read_text()
    if "\tbpf\n" not in filesystems:
        return "kernel has no bpffs"
    try:
        cg2 = find_cgroup2_mount()
    except HarnessError as exc:
        return str(exc)
    probe = cg2 / f"{new_prefix()}-probe"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a cgroup under {cg2}: {exc}"
    try:
        return _cgroup_bpf_supported(probe)
    finally:
        probe.rmdir()


def require_kernel(
    items: list[pytest.Item], below: Path, extra: Callable[[], str | None] | None = None
) -> None:
    """Mark the items collected below ``below`` ``kernel``; skip them when the machine cannot run them
    (:func:`kernel_skip_reason`, then ``extra()``, a further requirement of that suite)."""
    mine = [it for it in items if below in Path(str(it.path)).resolve().parents]
    if not mine:
        return
    reason = kernel_skip_reason()
    if reason is None and extra is not None:
        reason = extra()
    for item in mine:
        item.add_marker(pytest.mark.kernel)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"_blt_rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def harness_sweep() -> Iterator[None]:
    """Before: remove leftovers of dead processes. After: remove anything this process still owns."""
    removed = sweep_leftovers()
    if removed:
        print(f"\nkernel tests: swept {len(removed)} leftovers of dead test processes", file=sys.stderr)
    yield
    sweep_leftovers(own=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """An open, empty Topology, torn down after the test (also when it fails)."""
    with Topology() as topo:
        yield topo
        rep = getattr(request.node, "_blt_rep_call", None)
        if rep is not None and rep.failed:
            print(topo.diagnostics())  # pytest shows it as "Captured stdout teardown"


@pytest.fixture
def cluster(topology: Topology) -> Cluster:
    """pod-a, pod-b, pod-c with backends on TCP+UDP 8080, and client "client" running in node "node-a"."""
    return build_cluster(topology)


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    """An empty manifest directory for an agent."""
    d = tmp_path / "manifests"
    d.mkdir()
    return d


@pytest.fixture
def agent(cluster: Cluster, manifests: Path) -> Iterator[AgentProcess]:
    """``balancing agent`` for the cluster's node on ``manifests`` (not started: tests start it)."""
    a = AgentProcess(cluster.topo, manifests, cluster.node)
    yield a
    if a.proc is not None and a.proc.poll() is None:
        a.stop()


@pytest.fixture
def dp(cluster: Cluster) -> Iterator[Datapath]:
    """The real BPF object loaded into the cluster's node cgroup, its pins in the node's bpffs directory,
    with the real writer over its maps; unloaded afterwards. (test_events has its own, with events on.)"""
    d = Datapath(cluster.cgroup, cluster.topo.bpffs / cluster.node)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def pod_a_cgroup(cluster: Cluster, dp: Datapath) -> tuple[PodRef, Path]:
    """pod-a gets a kubelet-like cgroup of its own below the node's; its client processes run there."""
    path = cluster.cgroup / "kubepods" / "podaaaa"
    path.mkdir(parents=True)
    ref = PodRef("default", "pod-a", "aaaa")
    dp.pod_cgroups[ref] = [path]
    return ref, path


@pytest.fixture
def cgroup_dir() -> Iterator[Path]:
    """A test-owned, empty cgroup2 directory; its processes are killed and it is removed afterwards."""
    with owned_cgroup() as path:
        yield path


@pytest.fixture
def bpffs_dir() -> Iterator[Path]:
    """A test-owned bpffs directory; pinned objects under it are unlinked and it is removed afterwards."""
    with owned_bpffs_dir() as path:
        yield path


@pytest.fixture(scope="session")
def host_netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino
