"""Which capabilities the agent needs: the real agent process, run with exactly the chart's capability list
(``agent.securityContext.capabilities.add`` in deploy/helm/balancing/values.yaml) or with one of them removed.

The agent runs as root as it does in the chart's container: ``setpriv`` sets the bounding set to the list
(so the exec gives root exactly those capabilities, as a container runtime does), no inheritable or ambient
capabilities, and no_new_privs (``allowPrivilegeEscalation: false``); ``prlimit`` lowers RLIMIT_MEMLOCK to
64 KiB, a container runtime's usual default, to show CAP_SYS_RESOURCE is not needed. CAP_SYS_ADMIN passes
the kernel's CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON checks on bpf() by itself, so each of those is removed
together with CAP_SYS_ADMIN. The client's namespace is found through a test-owned netns directory (the
chart's hostPaths.netns); what values.yaml says about each capability is what these tests show.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancing_testkit.topology import Cluster, Topology
from helpers.sockets import Holder, NetnsDir
from helpers.support import ROOT, AgentProcess, endpoint, endpoint_slice, service, wait_until, write_manifest

VALUES = ROOT / "deploy/helm/balancing/values.yaml"
VIP = "10.96.0.10"
MEMLOCK = 64 * 1024
CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")
CAP_PERFMON, CAP_BPF = 38, 39


def chart_capabilities() -> list[str]:
    values = yaml.safe_load(VALUES.read_text())
    caps: list[str] = values["agent"]["securityContext"]["capabilities"]["add"]
    return caps


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("setpriv", "prlimit"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    if int(CAP_LAST_CAP.read_text()) < CAP_BPF:
        pytest.skip("the kernel has no CAP_BPF / CAP_PERFMON (Linux < 5.8)")


def capped(caps: Sequence[str]) -> list[str]:
    """The argv prefix that runs a command as root with exactly ``caps`` (as a container would)."""
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    return [
        "prlimit",
        f"--memlock={MEMLOCK}:{MEMLOCK}",
        "--",
        "setpriv",
        "--no-new-privs",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        f"--bounding-set={bounding}",
        "--",
    ]


class CappedAgent(AgentProcess):
    """``balancing agent`` under ``capped(caps)``."""

    def __init__(self, topo: Topology, manifests: Path, node: str, caps: Sequence[str], netns_dir: Path):
        super().__init__(topo, manifests, node, extra=["--netns-dir", str(netns_dir)])
        self.caps = list(caps)

    def start(self, *, wait: bool = True, manifests_flag: bool = True) -> AgentProcess:
        real = self.topo.spawn

        def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
            proc: subprocess.Popen[bytes] = real([*capped(self.caps), *argv], **kwargs)
            return proc

        self.topo.spawn = spawn  # type: ignore[method-assign]  # this instance only, for this one call
        try:
            return super().start(wait=wait, manifests_flag=manifests_flag)
        finally:
            del self.topo.spawn

    def exits(self, timeout: float = 20.0) -> str:
        """Wait for the agent to exit (it must); its stderr."""
        assert self.proc is not None
        wait_until(
            lambda: self.proc is not None and self.proc.poll() is not None, timeout, "the agent to exit"
        )
        assert self.proc.returncode != 0
        return self.stderr()


def web(cluster: Cluster, pod: int) -> list[dict[str, Any]]:
    ports = [("http", 80, "TCP", 8080), ("dns", 53, "UDP", 8080)]
    return [
        service("web", [VIP], ports),
        endpoint_slice(
            "web", [endpoint(cluster.pods[pod].ip4)], [("http", 8080, "TCP"), ("dns", 8080, "UDP")]
        ),
    ]


@pytest.fixture
def manifests(cluster: Cluster, tmp_path: Path) -> Path:
    d = tmp_path / "manifests"
    d.mkdir()
    write_manifest(d, "web.yaml", web(cluster, 0))
    return d


@pytest.fixture
def netns_dir(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    """The chart's hostPaths.netns: a bind mount of the client's namespace. Torn down before ``cluster``."""
    d = NetnsDir(tmp_path / "netns")
    try:
        d.add(cluster.client.netns)
        yield d.path
    finally:
        d.close()


@pytest.fixture
def run_agent(cluster: Cluster, manifests: Path, netns_dir: Path) -> Iterator[Any]:
    started: list[CappedAgent] = []

    def run(caps: Sequence[str]) -> CappedAgent:
        agent = CappedAgent(cluster.topo, manifests, cluster.node, caps, netns_dir)
        started.append(agent)
        return agent

    yield run
    for agent in started:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()


def translated(cluster: Cluster, count: int = 10) -> dict[str, int]:
    result = cluster.topo.run_client(cluster.client, None, ["tcp", VIP, "80", "--count", str(count)])
    assert not result.get("errors"), result
    backends: dict[str, int] = result["backends"]
    return backends


def test_the_charts_capabilities_are_enough(cluster: Cluster, manifests: Path, run_agent: Any) -> None:
    """Load, attach, translate, terminate a UDP socket of a removed backend, restart and converge."""
    caps = chart_capabilities()
    assert "SYS_RESOURCE" not in caps and "SYS_PTRACE" not in caps
    agent = run_agent(caps).start()
    assert translated(cluster) == {"pod-a": 10}
    holder = Holder(cluster, "udp", VIP, 53)
    assert holder.first["reply"] == "pod-a"
    write_manifest(manifests, "web.yaml", web(cluster, 1))
    wait_until(lambda: "connected sockets destroyed" in agent.stderr(), 5.0, "socket termination")
    assert "1 connected sockets destroyed in 1 network namespaces" in agent.stderr(), agent.stderr()
    assert holder.again() == {"step": "again", "send": "EDESTADDRREQ", "recv": "ECONNABORTED"}
    assert holder.reconnect()["reply"] == "pod-b"
    agent.stop()
    assert translated(cluster) == {"pod-b": 10}  # the pinned datapath outlives the agent
    restarted = run_agent(caps).start()  # reuses the pins, compares and swaps programs on the links
    write_manifest(manifests, "web.yaml", web(cluster, 2))
    restarted.wait_frontends(lambda f: f.get(f"{VIP}:80/TCP") == [f"{cluster.pods[2].ip4}:8080"])
    assert translated(cluster) == {"pod-c": 10}


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("BPF", "bpf_object__load: Operation not permitted"),
        ("NET_ADMIN", "prog 'bl_connect4': BPF program load failed: Operation not permitted"),
        ("PERFMON", "program of this type cannot use helper bpf_get_current_comm"),
    ],
)
def test_without_one_the_agent_cannot_load(run_agent: Any, missing: str, message: str) -> None:
    caps = [c for c in chart_capabilities() if c not in (missing, "SYS_ADMIN")]
    stderr = run_agent(caps).start(wait=False).exits()
    assert message in stderr, stderr


def test_without_sys_admin_restarts_fail_and_sockets_are_not_terminated(
    cluster: Cluster, manifests: Path, run_agent: Any
) -> None:
    """The first start translates; socket termination cannot enter the client's namespace (setns) and
    destroys nothing; a restart cannot open the programs its pinned links run (bpf_prog_get_fd_by_id) and
    exits. (The agent also cannot read /proc/<pid>/ns/net of the more privileged client without
    CAP_SYS_PTRACE, with or without CAP_SYS_ADMIN; the chart's agent has no hostPID and never tries.)"""
    caps = [c for c in chart_capabilities() if c != "SYS_ADMIN"]
    agent = run_agent(caps).start()
    assert translated(cluster) == {"pod-a": 10}
    holder = Holder(cluster, "udp", VIP, 53)
    write_manifest(manifests, "web.yaml", web(cluster, 1))
    wait_until(lambda: "socket termination" in agent.stderr(), 5.0, "socket termination")
    assert "0 connected sockets destroyed in 0 network namespaces" in agent.stderr(), agent.stderr()
    assert holder.again()["reply"] == "pod-a"  # still connected to the removed backend
    agent.stop()
    stderr = run_agent(caps).start(wait=False).exits()
    assert "bpf_prog_get_fd_by_id: Operation not permitted" in stderr, stderr
