"""Which capabilities the agent needs: the real agent process, run with exactly the chart's capability list
(``agent.securityContext.capabilities.add`` in deploy/helm/balancing/values.yaml) or with one of them removed.

The agent runs as root as it does in the chart's container: ``setpriv`` sets the bounding set to the list
(so the exec gives root exactly those capabilities, as a container runtime does), no inheritable or ambient
capabilities, and no_new_privs (``allowPrivilegeEscalation: false``); ``prlimit`` lowers RLIMIT_MEMLOCK to
64 KiB, a container runtime's usual default, to show CAP_SYS_RESOURCE is not needed. CAP_SYS_ADMIN passes
the kernel's CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON checks on bpf() by itself, so each of those is removed
together with CAP_SYS_ADMIN. The client's namespace is found through a test-owned netns directory (the
chart's hostPaths.netns); what values.yaml says about each capability is what these tests show.

North-south runs the agent as the chart does on a node's host network: inside a test-owned network namespace
(``nsenter --net`` before the capabilities are dropped) whose veth device ``uplink0`` holds the Node's
address; its TC programs attach there and are found at their pins (``<bpffs>/links/bl_ns_*@uplink0``).
Neighbours: ``helpers.support`` (``AgentProcess``), ``test_northsouth.py`` (what north-south translates).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancing.datapath import abi, maps, northsouth, tcattach
from balancing_testkit.topology import Cluster, Topology, in_netns, ip_batch, netns_path
from helpers.nsagents import external_service
from helpers.sockets import Holder, NetnsDir
from helpers.support import ROOT, AgentProcess, endpoint, endpoint_slice, service, wait_until, write_manifest

VALUES = ROOT / "deploy/helm/balancing/values.yaml"
VIP = "10.96.0.10"
MEMLOCK = 64 * 1024
CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")
CAP_PERFMON, CAP_BPF = 38, 39
NS_NODE, NS_DEVICE = "node-ns", "uplink0"
NS_NODE_IP = "192.0.2.1"  # on uplink0, inside the test's namespace only
NODE_PORT = 30080


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


def entering(netns: str | None) -> list[str]:
    """The argv prefix that runs a command in network namespace ``netns`` (none: this one's)."""
    return [] if netns is None else ["nsenter", f"--net={netns_path(netns)}", "--"]


class CappedAgent(AgentProcess):
    """``balancing agent`` under ``capped(caps)``, in network namespace ``netns`` if one is given (entered
    while still privileged, as the container runtime joins the host's before the agent starts)."""

    def __init__(
        self,
        topo: Topology,
        manifests: Path,
        node: str,
        caps: Sequence[str],
        extra: Sequence[str],
        netns: str | None = None,
    ):
        super().__init__(topo, manifests, node, extra=list(extra))
        self.caps = list(caps)
        self.netns = netns

    def start(self, *, wait: bool = True, manifests_flag: bool = True) -> AgentProcess:
        real = self.topo.spawn

        def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
            proc: subprocess.Popen[bytes] = real([*entering(self.netns), *capped(self.caps), *argv], **kwargs)
            return proc

        self.topo.spawn = spawn  # type: ignore[method-assign]  # this instance only, for this one call
        try:
            return super().start(wait=wait, manifests_flag=manifests_flag)
        finally:
            del self.topo.spawn

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """From the agent's ports, on the loopback of its network namespace."""
        if self.netns is None:
            return super().get(path)
        with in_netns(self.netns):
            return super().get(path)

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
        agent = CappedAgent(cluster.topo, manifests, cluster.node, caps, ["--netns-dir", str(netns_dir)])
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


# --- north-south ------------------------------------------------------------------------------------------


@pytest.fixture
def ns_node(topology: Topology) -> str:
    """A node's network namespace (the topology's: deleted at teardown, its devices with it) whose device
    uplink0, one end of a veth pair, holds the Node's InternalIP."""
    netns = topology.add_netns("ns-node")
    ip_batch(
        netns,
        [
            f"link add {NS_DEVICE} type veth peer name peer0",
            f"addr add {NS_NODE_IP}/24 dev {NS_DEVICE}",
            f"link set {NS_DEVICE} up",
            "link set peer0 up",
        ],
    )
    return netns


@pytest.fixture
def ns_manifests(tmp_path: Path) -> Path:
    """The Node and a NodePort Service with one endpoint on it (nothing is sent to it)."""
    d = tmp_path / "ns-manifests"
    d.mkdir()
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NS_NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": NS_NODE_IP}]},
    }
    svc = external_service("web", [VIP], [("http", 80, "TCP", 8080, NODE_PORT)])
    slice_ = endpoint_slice("web", [endpoint("10.244.0.10", node=NS_NODE)], [("http", 8080, "TCP")])
    write_manifest(d, "web.yaml", [node, svc, slice_])
    return d


@pytest.fixture
def run_ns_agent(topology: Topology, ns_node: str, ns_manifests: Path) -> Iterator[Any]:
    """Start agents with north-south on uplink0 inside ``ns_node``; stops those still running."""
    started: list[CappedAgent] = []

    def run(caps: Sequence[str], *extra: str) -> CappedAgent:
        flags = ["--nodeport-devices", NS_DEVICE, "--no-terminate-udp-sockets", *extra]
        agent = CappedAgent(topology, ns_manifests, NS_NODE, caps, flags, netns=ns_node)
        started.append(agent)
        return agent

    yield run
    for agent in started:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()


def ns_attachments(agent: CappedAgent) -> list[tcattach.AttachInfo | None]:
    """What the agent's north-south pins on uplink0 attach (None: no pin), read in its namespace."""
    assert agent.netns is not None
    links = agent.bpffs / "links"
    with in_netns(agent.netns):
        return [tcattach.attached(links / tcattach.pin_name(p, NS_DEVICE)) for p in northsouth.PROGRAMS]


def maglev_tables(agent: CappedAgent) -> int:
    """How many frontends have a Maglev table in the agent's maps."""
    io = maps.KernelMaps(agent.bpffs / "maps")
    try:
        return len(dict(io.items(abi.MAP_MAGLEV)))
    finally:
        io.close()


@pytest.mark.parametrize("mode", ["tcx", "clsact"])
def test_the_charts_capabilities_run_north_south(run_ns_agent: Any, mode: str) -> None:
    """Load the TC programs, attach them to uplink0 (tcx links or clsact filters), program the NodePort with
    its Maglev table (an inner map the agent creates), and restart onto the same attachments."""
    if mode == "tcx" and not tcattach.tcx_supported():
        pytest.skip("the kernel has no tcx (Linux < 6.6)")
    caps = chart_capabilities()
    agent = run_ns_agent(caps, f"--tc-attach-mode={mode}").start()
    attached = ns_attachments(agent)
    assert all(a is not None and a.live and a.mode == mode for a in attached), attached
    assert {a.direction for a in attached if a is not None} == {"ingress", "egress"}
    agent.wait_frontends(lambda f: f"{NS_NODE_IP}:{NODE_PORT}/TCP" in f, what="the NodePort")
    assert maglev_tables(agent) >= 1
    agent.stop()
    restarted = run_ns_agent(caps, f"--tc-attach-mode={mode}").start()  # compares the programs it finds
    assert ns_attachments(restarted) == attached, restarted.stderr()


def test_without_net_admin_north_south_cannot_load(run_ns_agent: Any) -> None:
    """Without CAP_NET_ADMIN (and CAP_SYS_ADMIN, which passes the same check) no networking program loads,
    and the TC programs are networking programs (sched_cls) as the socket hooks are: the agent exits at the
    first it loads, naming it, and nothing is attached to uplink0."""
    caps = [c for c in chart_capabilities() if c not in ("NET_ADMIN", "SYS_ADMIN")]
    agent = run_ns_agent(caps)
    stderr = agent.start(wait=False).exits()
    assert "BPF program load failed: Operation not permitted" in stderr, stderr
    assert ns_attachments(agent) == [None, None]


def test_without_net_admin_clsact_cannot_attach(run_ns_agent: Any) -> None:
    """CAP_SYS_ADMIN stands in for CAP_NET_ADMIN on bpf() (the programs load), not on rtnetlink: the clsact
    qdisc and filters (kernels without tcx) need CAP_NET_ADMIN itself. The agent exits naming the device,
    and nothing is attached."""
    caps = [c for c in chart_capabilities() if c != "NET_ADMIN"]
    agent = run_ns_agent(caps, "--tc-attach-mode=clsact")
    stderr = agent.start(wait=False).exits()
    assert f"cannot attach bl_ns_ingress@{NS_DEVICE} (clsact ingress)" in stderr, stderr
    assert "Operation not permitted" in stderr, stderr
    assert ns_attachments(agent) == [None, None]
