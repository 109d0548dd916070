"""Fixtures of the Service conformance suite: the kernel tests' harness, and a two-node cluster.

Uses the kernel tests' plugin ``helpers.kernel_fixtures`` (the skip logic when the machine cannot run kernel
tests, the sweep of leftovers, the report hook that drives failure diagnostics, the ``topology`` fixture) and
``helpers.support``. Every test here is marked ``kernel`` and skipped, with the reason, where kernel tests
cannot run or ``build/bpf/balancing.o`` is missing.

Fixtures:
    two_nodes   function scope: a ``helpers.twonodes.TwoNodes`` (layout in ``tests/helpers/twonodes.py``)
                with both agents running and ready, the Node objects written, no Service.
                ``@pytest.mark.agent_args("--flag=value")`` on a test runs both agents with these options (an
                option the agent lacks is left out; the test then fails in ``require_flags``).

The cluster (namespaces, cgroups, backends, agents) is built once per test module, because starting two
agents costs about a second: between tests the manifest directory is emptied (Node objects excepted), the
backends a test started are stopped, and both agents' maps are seen empty before the next test starts. A
test that fails gets a fresh cluster after it (and its diagnostics printed), so one failure cannot leak
into the next test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from balancing_testkit.topology import Host, Topology
from helpers import kernel_fixtures
from helpers.support import OBJECT, AgentProcess, write_manifest
from helpers.twonodes import (
    BACKEND_PORT,
    HEALTHCHECK_ADDRESS,
    NODES,
    Node,
    TwoNodes,
    agent_flags,
    node_object,
)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel_fixtures.require_kernel(items, below=_HERE, extra=_object_missing)


def _object_missing() -> str | None:
    return None if OBJECT.is_file() else f"{OBJECT} is missing (run `make bpf`)"


@pytest.fixture(scope="session", autouse=True)
def _kernel_harness(harness_sweep: None) -> None:
    """Leftovers of dead test processes swept before the first test here, ours after the last one."""


@dataclass
class _Cluster:
    """One built cluster: what ``two_nodes`` hands out, and how to reset it between tests."""

    topo: Topology
    manifests: Path
    nodes: list[Node]
    base_backends: frozenset[str]
    agent_args: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, topo: Topology, manifests: Path) -> _Cluster:
        hosts = {n: topo.add_client(f"host-{n[-1]}", node=n) for n in NODES}
        pods = {n: [topo.add_pod(f"pod-{n[-1]}{i}", node=n) for i in (1, 2)] for n in NODES}
        clients = {n: topo.add_pod(f"pause-{n[-1]}", node=n) for n in NODES}
        topo.start_backends([p for n in NODES for p in pods[n]], port=BACKEND_PORT)
        write_manifest(manifests, "nodes.yaml", [node_object(n, hosts[n]) for n in NODES])
        nodes = [
            Node(
                n,
                hosts[n],
                pods[n],
                clients[n],
                _agent(topo, manifests, n, [], hosts[n]),
                HEALTHCHECK_ADDRESS[n],
            )
            for n in NODES
        ]
        cluster = cls(topo, manifests, nodes, frozenset(topo.backends))
        cluster.start_agents()
        return cluster

    def start_agents(self) -> None:
        for node in self.nodes:
            node.agent.start(wait=False)
        for node in self.nodes:
            node.agent.wait_ready()

    def use_agent_args(self, args: list[str]) -> None:
        """Restart both agents with ``args`` unless they already run with them (pins and maps are reused)."""
        if args == self.agent_args:
            return
        for node in self.nodes:
            node.agent.stop()
            node.agent = _agent(self.topo, self.manifests, node.name, args, node.host)
        self.agent_args = list(args)
        self.start_agents()

    def reset(self) -> None:
        """Back to "no Service": test manifests removed, test backends stopped, both agents' maps empty."""
        for path in self.manifests.iterdir():
            if path.name != "nodes.yaml":
                path.unlink()
        for name in sorted(set(self.topo.backends) - self.base_backends):
            self.topo.stop(self.topo.backends.pop(name))
        for node in self.nodes:
            node.agent.wait_frontends(lambda f: not f, timeout=10, what=f"{node.name}'s maps to empty")
            proc = node.agent.proc
            assert proc is not None and proc.poll() is None, (
                f"agent on {node.name} exited:\n{node.agent.stderr()}"
            )

    def diagnostics(self) -> str:
        parts = [self.topo.diagnostics()]
        for node in self.nodes:
            parts.append(f"==== agent {node.name} frontends: {node.agent.frontends()}")
        return "\n".join(parts)


def _agent(topo: Topology, manifests: Path, node: str, args: list[str], host: Host) -> AgentProcess:
    extra = list(args)
    if "--host-netns" in agent_flags():  # the node's host network is a namespace of its own here
        extra += ["--host-netns", str(host.netns_path)]
    if "--healthcheck-address" in agent_flags():  # both agents share the host: one address each
        extra += ["--healthcheck-address", HEALTHCHECK_ADDRESS[node]]
    return AgentProcess(topo, manifests, node, extra=extra)


class _ClusterHolder:
    """A module's cluster, built on first use and rebuilt after a failed test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.topo: Topology | None = None
        self.cluster: _Cluster | None = None
        self.builds = 0

    def get(self) -> _Cluster:
        if self.cluster is None:
            self.builds += 1
            manifests = self.tmp / f"manifests-{self.builds}"
            manifests.mkdir()
            self.topo = Topology().open()
            try:
                self.cluster = _Cluster.build(self.topo, manifests)
            except BaseException:
                self.discard()
                raise
        return self.cluster

    def discard(self) -> None:
        topo, self.topo, self.cluster = self.topo, None, None
        if topo is not None:
            topo.close()


@pytest.fixture(scope="module")
def _two_nodes_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ClusterHolder]:
    holder = _ClusterHolder(tmp_path_factory.mktemp("two-nodes"))
    try:
        yield holder
    finally:
        holder.discard()


@pytest.fixture
def two_nodes(_two_nodes_cluster: _ClusterHolder, request: pytest.FixtureRequest) -> Iterator[TwoNodes]:
    """Two nodes, four backend pods, two client pods, two host netns, two agents on one manifest dir."""
    cluster = _two_nodes_cluster.get()
    marker = request.node.get_closest_marker("agent_args")
    wanted = [str(a) for a in marker.args] if marker else []
    cluster.use_agent_args([a for a in wanted if a.split("=", 1)[0] in agent_flags()])
    a, b = cluster.nodes
    yield TwoNodes(cluster.topo, cluster.manifests, a, b, cluster.agent_args)
    rep = getattr(request.node, "_blt_rep_call", None)
    if rep is not None and rep.failed:
        print(cluster.diagnostics())  # pytest shows it as "Captured stdout teardown"
        _two_nodes_cluster.discard()
        return
    try:
        cluster.reset()
    except BaseException:
        print(cluster.diagnostics())
        _two_nodes_cluster.discard()
        raise
