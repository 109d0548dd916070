"""Two nodes in Kubernetes mode: two agents following the real API server, pods made of netns on one kernel.

The layout is ``helpers.twonodes``' (two node cgroups, a host netns per node holding the Node's
InternalIPs, backend pods ``pod-a1``/``pod-a2``/``pod-b1``/``pod-b2`` on TCP+UDP 8080, client pods
``pause-a``/``pause-b``), but nothing is written to a manifest directory: the objects live in the real
control plane (``helpers.controlplane.ControlPlane``, the cluster tests' ``kube`` fixture) and each node's
agent runs ``balancing agent --kubeconfig <admin> --node-name node-a|node-b`` with its own cgroup and bpffs.

- The Node objects are written through the API as a kubelet registers them (InternalIPs, zone labels) and
  deleted after the module (``KubeCluster.close``).
- A pod is created through the API with ``spec.nodeName`` set (there is no scheduler) and then its status
  is patched on the status subresource as a kubelet would (phase Running, condition Ready, ``podIP(s)`` =
  the netns pod's addresses); the real EndpointSlice controller then writes the slices the agents read.
  Deleting a pod is two steps, as with a kubelet: the user's graceful delete (the pod stays, terminating)
  and the kubelet's final delete once the containers are gone (``delete_pod(force=True)``).
- Services get their ClusterIPs from the API server's allocator; tests find them with ``cluster_ips``.

``KubeCluster`` builds the topology and the agents once per test module (``KubeCluster.get``) and rebuilds
them after a failed test; ``for_test`` hands out a ``KubeNodes`` bound to one test's namespace and, after the
test, deletes what the test created there and waits until both agents have dropped its frontends.

Neighbours: ``tests/cluster/test_apiserver_nodes.py`` and ``test_apiserver_watches.py`` use it;
``helpers.twonodes`` (the manifest-mode harness it extends) and ``helpers.support.AgentProcess``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancing_testkit.topology import Pod, Topology
from helpers.controlplane import ControlPlane
from helpers.support import AgentProcess
from helpers.support import pod as support_pod
from helpers.twonodes import (
    BACKEND_PORT,
    HEALTHCHECK_ADDRESS,
    NODES,
    Doc,
    Node,
    TwoNodes,
    key,
    node_object,
)

__all__ = ["BACKEND_PORT", "KubeCluster", "KubeNodes", "for_test", "key", "metric"]

IMAGE = "registry.invalid/backend:1"  # never pulled: no kubelet runs here
PortSpec = tuple[str, int, str, int | str]  # (name, port, protocol, targetPort)
ContainerPort = tuple[str, int, str]  # (name, containerPort, protocol)
DEFAULT_CONTAINER_PORTS: tuple[ContainerPort, ...] = (
    ("http", BACKEND_PORT, "TCP"),
    ("dns", BACKEND_PORT, "UDP"),
)


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on ``agent``'s metrics port whose labels include ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass
class KubeNodes(TwoNodes):
    """``TwoNodes`` whose agents follow the API server; objects go to ``namespace`` through ``kube``.

    The manifest-directory methods of ``TwoNodes`` (``apply``, ``apply_synced``, ``delete``) do not apply
    here and raise; the waits, traffic and healthCheckNodePort helpers are the same."""

    kube: ControlPlane | None = None
    namespace: str = ""

    @property
    def api(self) -> ControlPlane:
        assert self.kube is not None
        return self.kube

    def apply(self, name: str, docs: list[Doc]) -> None:
        raise TypeError("Kubernetes mode: create objects through the API (create, run_pod)")

    def apply_synced(self, name: str, docs: list[Doc]) -> None:
        raise TypeError("Kubernetes mode: create objects through the API (create, run_pod)")

    def delete(self, name: str) -> None:
        raise TypeError("Kubernetes mode: delete objects through the API (kubectl, delete_pod)")

    # -- objects --------------------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``kubectl -n <namespace> ARGS`` as the admin."""
        return self.api.kubectl("-n", self.namespace, *args, check=check)

    def create(self, *docs: Doc) -> None:
        """Server-side apply of ``docs`` into the test's namespace."""
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = self.namespace
        self.api.apply(list(docs))

    def service(
        self,
        name: str,
        ports: Iterable[PortSpec] = (("http", 80, "TCP", "http"), ("dns", 53, "UDP", "dns")),
        *,
        selector: dict[str, str] | None = None,
        **spec: Any,
    ) -> Doc:
        """A Service (ClusterIPs left to the allocator) selecting ``app: <name>`` unless told otherwise;
        other ``spec`` fields as camelCase keyword arguments. Not created: pass it to ``create``."""
        body: dict[str, Any] = {
            "selector": {"app": name} if selector is None else selector,
            "ports": [{"name": n, "port": p, "protocol": pr, "targetPort": t} for n, p, pr, t in ports],
            **spec,
        }
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": body}

    def run_pod(
        self,
        pod: Pod,
        labels: dict[str, str],
        ports: Iterable[ContainerPort] = DEFAULT_CONTAINER_PORTS,
        *,
        ready: bool = True,
        name: str | None = None,
    ) -> str:
        """Pod ``name`` (default: the netns pod's name) on the netns pod's node, created through the API,
        then "started" by patching its status as the kubelet would; returns its name."""
        name = name or pod.name
        doc = support_pod(
            name,
            [pod.ip4, pod.ip6],
            labels,
            ports,
            ready=ready,
            node=pod.node or "",
            namespace=self.namespace,
        )
        status = doc.pop("status")
        doc["spec"]["containers"][0]["image"] = IMAGE
        self.api.apply([doc])
        self.patch_status(name, status)
        return name

    def patch_status(self, pod: str, status: dict[str, Any]) -> None:
        """A strategic-merge patch of ``pod``'s status subresource (conditions merge by type)."""
        self.kubectl(
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type=strategic",
            "-p",
            json.dumps({"status": status}),
        )

    def set_ready(self, pod: str, ready: bool) -> None:
        """The kubelet's readiness probe result for ``pod``."""
        self.patch_status(pod, {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]})

    def delete_pod(self, pod: str, *, force: bool = False) -> None:
        """The user's graceful delete (the pod stays, terminating, until its kubelet confirms), or with
        ``force`` the kubelet's final delete (grace period 0): the pod object goes."""
        extra = ["--grace-period=0", "--force"] if force else []
        self.kubectl("delete", "pod", pod, "--wait=false", *extra)

    def cluster_ips(self, service: str) -> list[str]:
        ips: list[str] = self.api.get("service", service, self.namespace)["spec"]["clusterIPs"]
        return ips

    def slices(self, service: str) -> list[Doc]:
        """The EndpointSlices of ``service`` (as the EndpointSlice controller wrote them)."""
        out = self.kubectl(
            "get", "endpointslices", "-l", f"kubernetes.io/service-name={service}", "-o", "json"
        )
        items: list[Doc] = json.loads(out.stdout)["items"]
        return items

    def endpoints(self, service: str) -> dict[str, dict[str, Any]]:
        """{pod name: its endpoint's conditions (and the ports of its slice)} over every slice of
        ``service``, one entry per address family (``pod-a1``, ``pod-a1/IPv6``)."""
        out: dict[str, dict[str, Any]] = {}
        for sl in self.slices(service):
            suffix = "" if sl["addressType"] == "IPv4" else f"/{sl['addressType']}"
            ports = sorted((p.get("name", ""), p["port"], p["protocol"]) for p in sl.get("ports") or [])
            for ep in sl.get("endpoints") or []:
                name = (ep.get("targetRef") or {}).get("name", ep["addresses"][0])
                out[name + suffix] = {**ep["conditions"], "ports": ports}
        return out

    def wait_endpoints(
        self, service: str, ok: Callable[[dict[str, dict[str, Any]]], bool], what: str, timeout: float = 30.0
    ) -> dict[str, dict[str, Any]]:
        """Poll ``endpoints(service)`` until ``ok`` holds for it; returns it."""
        seen: list[dict[str, dict[str, Any]]] = [{}]

        def check() -> bool:
            seen[0] = self.endpoints(service)
            return ok(seen[0])

        try:
            self.api.wait_for(check, f"{what} (Service {self.namespace}/{service})", timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nlast seen: {seen[0]}") from None
        return seen[0]

    # -- agents ---------------------------------------------------------------------------------------

    agent_ready_timeout = 60.0  # the first lists of every collection come first

    def _start_agent(self, agent: AgentProcess) -> None:
        """Start ``agent`` (not waiting) in Kubernetes mode: its ``--kubeconfig`` is among its options."""
        agent.start(wait=False, manifests_flag=False)

    @contextlib.contextmanager
    def agents_frozen(self) -> Iterator[None]:
        """Both agents stopped (SIGSTOP) inside the block, continued (SIGCONT) after it, even on failure: the
        datapath keeps translating what it has, and nothing the API server says meanwhile is read."""
        pids = [a.proc.pid for a in self.agents if a.proc is not None]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def metric(self, name: str, **labels: str) -> list[float]:
        """``metric(agent, name, **labels)`` for each agent, node-a's first."""
        return [metric(a, name, **labels) for a in self.agents]


# --- the cluster of one test module -----------------------------------------------------------------------


def _agent(topo: Topology, manifests: Path, kube: ControlPlane, node: str, host_netns: Path) -> AgentProcess:
    extra = [
        "--kubeconfig",
        str(kube.kubeconfig),
        "--host-netns",
        str(host_netns),
        "--healthcheck-address",
        HEALTHCHECK_ADDRESS[node],
    ]
    return AgentProcess(topo, manifests, node, extra=extra)


@dataclass
class KubeCluster:
    """A module's topology, Node objects and agents: built on first use (``get``), rebuilt after a failure."""

    kube: ControlPlane
    tmp: Path
    topo: Topology | None = None
    nodes: list[Node] = field(default_factory=list)
    base_backends: frozenset[str] = frozenset()
    builds: int = 0

    def get(self) -> list[Node]:
        if self.topo is None:
            self.builds += 1
            self.topo = Topology().open()
            try:
                self._build(self.topo)
            except BaseException:
                self.discard()
                raise
        return self.nodes

    def _build(self, topo: Topology) -> None:
        manifests = self.tmp / f"unused-manifests-{self.builds}"  # Kubernetes mode reads none
        manifests.mkdir()
        hosts = {n: topo.add_client(f"host-{n[-1]}", node=n) for n in NODES}
        pods = {n: [topo.add_pod(f"pod-{n[-1]}{i}", node=n) for i in (1, 2)] for n in NODES}
        clients = {n: topo.add_pod(f"pause-{n[-1]}", node=n) for n in NODES}
        topo.start_backends([p for n in NODES for p in pods[n]], port=BACKEND_PORT)
        self.base_backends = frozenset(topo.backends)
        for n in NODES:
            self._register_node(n, node_object(n, hosts[n]))
        self.nodes = [
            Node(
                n,
                hosts[n],
                pods[n],
                clients[n],
                _agent(topo, manifests, self.kube, n, hosts[n].netns_path),
                HEALTHCHECK_ADDRESS[n],
            )
            for n in NODES
        ]
        for node in self.nodes:
            node.agent.start(wait=False, manifests_flag=False)
        for node in self.nodes:
            node.agent.wait_ready(timeout=60)

    def _register_node(self, name: str, doc: Doc) -> None:
        """The Node as its kubelet registers it: created (not applied: server-side apply refuses a dual-stack
        Node, whose two InternalIP entries share the list-map key ``type``), or, if it exists, given these
        labels and addresses (the status subresource, replaced by a merge patch)."""
        if not self.kube.exists("node", name):
            self.kube.kubectl("create", "-f", "-", input=json.dumps(doc))
        labels = json.dumps({"metadata": {"labels": doc["metadata"]["labels"]}})
        self.kube.kubectl("patch", "node", name, "--type=merge", "-p", labels)
        status = json.dumps({"status": {"addresses": doc["status"]["addresses"]}})
        self.kube.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", status)

    def discard(self) -> None:
        topo, self.topo = self.topo, None
        self.nodes = []
        if topo is not None:
            topo.close()

    def close(self) -> None:
        self.discard()
        for n in NODES:
            self.kube.kubectl("delete", "node", n, "--ignore-not-found", "--wait=false", check=False)

    def reset(self, kn: KubeNodes) -> None:
        """After a test: its Services and pods deleted (pods at once, as their kubelet would), its extra
        backends stopped, and both agents seen without any of its Services' frontends."""
        out = kn.kubectl("get", "services", "-o", "json").stdout
        ips = {ip for svc in json.loads(out)["items"] for ip in svc["spec"].get("clusterIPs") or []}
        kn.kubectl("delete", "services", "--all", "--wait=false")
        kn.kubectl("delete", "pods", "--all", "--grace-period=0", "--force", "--wait=false")
        assert self.topo is not None
        for name in sorted(set(self.topo.backends) - self.base_backends):
            self.topo.stop(self.topo.backends.pop(name))
        hosts = {f"[{ip}]" if ":" in ip else ip for ip in ips}

        def clean(frontends: dict[str, list[str]]) -> bool:
            return not any(k.rsplit(":", 1)[0] in hosts for k in frontends)

        for node in self.nodes:
            node.agent.wait_frontends(clean, timeout=30, what=f"{node.name} to drop the test's frontends")
            proc = node.agent.proc
            assert proc is not None and proc.poll() is None, (
                f"agent on {node.name} exited:\n{node.agent.stderr()}"
            )

    def diagnostics(self) -> str:
        parts = [self.topo.diagnostics() if self.topo is not None else "(no topology)"]
        for node in self.nodes:
            parts.append(f"==== agent {node.name} frontends: {node.agent.frontends()}")
        parts.append(self.kube.diagnostics())
        return "\n".join(parts)


@contextlib.contextmanager
def for_test(cluster: KubeCluster, namespace: str, request: pytest.FixtureRequest) -> Iterator[KubeNodes]:
    """The module's cluster bound to one test's ``namespace``; cleaned up after the test (the cluster is
    discarded, with diagnostics printed, when the test or the clean-up fails)."""
    a, b = cluster.get()
    assert cluster.topo is not None
    kn = KubeNodes(cluster.topo, cluster.tmp, a, b, kube=cluster.kube, namespace=namespace)
    yield kn
    rep = getattr(request.node, "_blt_rep_call", None)
    if rep is not None and rep.failed:
        print(cluster.diagnostics())  # pytest shows it as "Captured stdout teardown"
        cluster.discard()
        kn.kubectl("delete", "pods", "--all", "--grace-period=0", "--force", "--wait=false", check=False)
        return
    try:
        cluster.reset(kn)
    except BaseException:
        print(cluster.diagnostics())
        cluster.discard()
        raise
