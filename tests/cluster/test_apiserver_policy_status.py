"""Policy status on the real API server: two agents (Kubernetes mode, one per Node) and the controller write
one LocalRedirectPolicy's and one BalancingPolicy's status through server-side apply, each under its own field
manager, and the real merge of ``status.nodes`` (a list-map keyed by ``nodeName`` in the CRDs) keeps them
apart.

Set-up (``plane``): the CRDs of ``deploy/crds`` applied server-side, two Nodes, a namespace holding the
Services the policies match and Pods created through the API with ``spec.nodeName`` and a status patched
Running/Ready with pod IPs (no kubelet, no datapath traffic: only the reports matter), the policies adapted
from ``examples/policies`` (names, selectors and the matched Services' namespace made unique to the run, as
the session's API server is shared), ``balancing controller`` and one ``balancing agent`` per Node, all with
the admin kubeconfig. What the tests prove:

- every agent's entry and the controller's Ready condition are on the object as ``kubectl get -o yaml``
  shows it, and ``metadata.managedFields`` gives each writer exactly its part (an agent its own entry); an
  agent restarted with nothing changed reads its entries back from the real objects and writes nothing;
- an agent stopped and its Node deleted: the controller removes that node's entries (its JSON patch), the
  other agent's entries stay as they were, and the departed agent no longer owns anything;
- an agent whose entry changes (its selected pod deleted) rewrites only its own entry.

Teardown (also after a failure) stops the processes, deletes the policies and the Nodes, and withdraws the
entries the agents wrote into other tests' policies (an apply without the entry, as an agent does itself).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancing.agent import policy_status
from balancing.controller import status as controller_status
from balancing.sources import kubestatus
from balancing_testkit.topology import Topology
from helpers.controlplane import ControlPlane, free_port
from helpers.support import AgentProcess

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "deploy/crds"
EXAMPLES = ROOT / "examples/policies"
LRP, BP = "LocalRedirectPolicy", "BalancingPolicy"
API = "balancing.elf.io/v1beta1"
RESOURCES = {LRP: "localredirectpolicies.balancing.elf.io", BP: "balancingpolicies.balancing.elf.io"}
TIMEOUT = 45.0  # an agent writes a changed entry at most every 10 s (kubestatus.WriterTiming.min_interval)

Doc = dict[str, Any]


# --- what the API server shows -----------------------------------------------------------------------------


def shown(kube: ControlPlane, kind: str, name: str) -> Doc:
    """The object as ``kubectl get -o yaml`` shows it, with its managedFields."""
    out = kube.kubectl("get", RESOURCES[kind], name, "-o", "yaml", "--show-managed-fields").stdout
    doc: Doc = yaml.safe_load(out)
    return doc


def fetch(kube: ControlPlane, kind: str, name: str) -> Doc | None:
    """The object from the API (cheaper than kubectl, for polling), or None when it does not exist."""
    try:
        doc: Doc = kube.request("GET", kubestatus.status_path(kind, name).removesuffix("/status"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return doc


def entries(doc: Doc | None) -> dict[str, Doc]:
    """``status.nodes`` by nodeName."""
    nodes = ((doc or {}).get("status") or {}).get("nodes") or []
    return {n["nodeName"]: n for n in nodes}


def ready(doc: Doc | None) -> Doc:
    """The Ready condition, or {}."""
    conditions = ((doc or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == controller_status.READY), {})


def status_managers(doc: Doc) -> dict[str, Doc]:
    """The managedFields records of the status subresource, by manager."""
    found: dict[str, Doc] = {}
    for record in doc["metadata"].get("managedFields") or []:
        if record.get("subresource") == "status":
            assert record["manager"] not in found, f"two status records of {record['manager']}"
            found[record["manager"]] = record
    return found


def owned_entries(record: Doc) -> set[str]:
    """The ``status.nodes`` entries a managedFields record owns (its ``k:{"nodeName":...}`` keys)."""
    nodes = record.get("fieldsV1", {}).get("f:status", {}).get("f:nodes", {})
    return {json.loads(key[2:])["nodeName"] for key in nodes if key.startswith("k:")}


# --- the cluster of this test ------------------------------------------------------------------------------


@dataclass
class Plane:
    kube: ControlPlane
    topo: Topology
    namespace: str
    nodes: tuple[str, str]
    policies: dict[str, str]  # kind -> name
    lrp_pods: dict[str, str]  # node -> the LocalRedirectPolicy's backend pod there
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    controller: subprocess.Popen[bytes] | None = None

    def logs(self) -> str:
        parts = [f"--- agent {n} ---\n{a.stderr()[-3000:]}" for n, a in self.agents.items() if a.proc]
        if self.controller is not None:
            parts.append(f"--- controller ---\n{self.topo.logs(self.controller)[1][-3000:]}")
        return "\n".join(parts)

    def wait(self, ok: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
        try:
            self.kube.wait_for(ok, what, timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def get(self, kind: str) -> Doc | None:
        return fetch(self.kube, kind, self.policies[kind])

    def settled(self) -> None:
        """Both agents' entries (ready) on both policies, the controller's Ready True for their generation."""

        def done() -> bool:
            for kind in (LRP, BP):
                doc = self.get(kind)
                found = entries(doc)
                if set(self.nodes) - found.keys() or not all(found[n]["ready"] for n in self.nodes):
                    return False
                condition = ready(doc)
                generation = doc["metadata"]["generation"] if doc else None
                if condition.get("status") != "True" or condition.get("observedGeneration") != generation:
                    return False
            return True

        self.wait(done, "both agents' entries and the controller's Ready condition")


def _apply_crds(kube: ControlPlane) -> None:
    """Applying is idempotent (other tests apply them too); the CRDs are never deleted."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{r}" for r in RESOURCES.values())
    )


def _example(name: str) -> Doc:
    doc: Doc = yaml.safe_load((EXAMPLES / name).read_text())
    return doc


def _policies(suffix: str, namespace: str) -> list[Doc]:
    """examples/policies' node-local-dns (LRP) and ingress-hostport (BP), made unique to this run. The BP
    redirects to the pod endpoints (podEndpoint): hostPort's backends are the Nodes' addresses, which would
    change the surviving node's count when a Node is deleted."""
    lrp = _example("node-local-dns.yaml")
    lrp["metadata"]["name"] = f"ps-dns-{suffix}"
    lrp["spec"]["frontend"]["serviceMatcher"]["namespace"] = namespace
    lrp["spec"]["backend"]["endpointSelector"] = {"matchLabels": {"k8s-app": f"node-local-dns-{suffix}"}}
    bp = _example("ingress-hostport.yaml")
    bp["metadata"]["name"] = f"ps-ingress-{suffix}"
    bp["spec"]["frontend"]["serviceMatcher"]["namespace"] = namespace
    endpoint = bp["spec"]["backend"]["serviceEndpoint"]
    endpoint["redirectMode"] = "podEndpoint"
    endpoint["endpointSelector"]["matchLabels"] = {"app.kubernetes.io/name": f"ingress-nginx-{suffix}"}
    return [lrp, bp]


def _services(namespace: str) -> list[Doc]:
    """The Services the policies match (no selector: the policies supply the backends)."""

    def service(name: str, ports: list[tuple[str, int, str]]) -> Doc:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports]},
        }

    return [
        service("kube-dns", [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")]),
        service("ingress-nginx-controller", [("http", 80, "TCP"), ("https", 443, "TCP")]),
    ]


def _pod(kube: ControlPlane, namespace: str, name: str, node: str, labels: dict[str, str], ip: str) -> None:
    """A Pod bound to ``node``, then Running and Ready with ``ip`` (what a kubelet would report)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/pause:1"}]},
    }
    kube.apply([doc])
    status = {
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
        }
    }
    kube.kubectl(
        "patch",
        "pod",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def _withdraw_everywhere(kube: ControlPlane, nodes: tuple[str, ...]) -> None:
    """Remove the entries of ``nodes`` from every policy, as their agents would: an apply without them (and
    without ``status``, which also drops the manager's managedFields record; ``status: {}`` leaves one)."""
    listed = json.loads(kube.kubectl("get", ",".join(RESOURCES.values()), "-o", "json").stdout)
    for doc in listed["items"]:
        kind, name = doc["kind"], doc["metadata"]["name"]
        for node in entries(doc).keys() & set(nodes):
            path = kubestatus.status_path(kind, name)
            query = f"?fieldManager={policy_status.field_manager(node)}&force=true"
            body = {"apiVersion": API, "kind": kind, "metadata": {"name": name}}
            try:
                kube.request("PATCH", path + query, body, kubestatus.APPLY_CONTENT_TYPE)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise


@pytest.fixture
def plane(
    kube: ControlPlane, namespace: str, topology: Topology, tmp_path: Path, harness_sweep: None
) -> Iterator[Plane]:
    suffix = uuid.uuid4().hex[:6]
    nodes = (f"ps-a-{suffix}", f"ps-b-{suffix}")
    _apply_crds(kube)
    docs = _policies(suffix, namespace)
    p = Plane(
        kube,
        topology,
        namespace,
        nodes,
        policies={d["kind"]: d["metadata"]["name"] for d in docs},
        lrp_pods={node: f"dns-{i}" for i, node in enumerate(nodes)},
    )
    try:
        kube.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}} for n in nodes])
        kube.apply(_services(namespace))
        for i, node in enumerate(nodes):
            dns = {"k8s-app": f"node-local-dns-{suffix}"}
            ingress = {
                "app.kubernetes.io/name": f"ingress-nginx-{suffix}",
                "app.kubernetes.io/component": "controller",
            }
            _pod(kube, namespace, p.lrp_pods[node], node, dns, f"10.244.91.{10 + i}")
            _pod(kube, namespace, f"ingress-{i}", node, ingress, f"10.244.91.{20 + i}")
        kube.apply(docs)
        controller = [sys.executable, "-m", "balancing", "controller", "--listen", f"127.0.0.1:{free_port()}"]
        controller += ["--kubeconfig", str(kube.kubeconfig)]
        p.controller = topology.spawn(controller, label="controller")
        for node in nodes:
            agent = AgentProcess(topology, tmp_path, node, extra=["--kubeconfig", str(kube.kubeconfig)])
            p.agents[node] = agent
            agent.start(manifests_flag=False, wait=False)
        for agent in p.agents.values():
            agent.wait_ready(60)
        yield p
    finally:
        for agent in p.agents.values():
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()
        if p.controller is not None:
            topology.stop(p.controller)
        for kind, name in p.policies.items():
            kube.kubectl("delete", RESOURCES[kind], name, "--ignore-not-found", "--wait=false", check=False)
        _withdraw_everywhere(kube, nodes)
        kube.kubectl("delete", "node", *nodes, "--ignore-not-found", "--wait=false", check=False)


# --- the cases ---------------------------------------------------------------------------------------------


def test_each_writer_owns_its_part(plane: Plane) -> None:
    plane.settled()
    a, b = plane.nodes
    for kind, name in plane.policies.items():
        doc = shown(plane.kube, kind, name)
        # Every agent's entry says what its model computed (its /state), under its own name.
        found = entries(doc)
        assert found.keys() == {a, b}
        for node, agent in plane.agents.items():
            model = next(
                s for s in agent.get("/state")[1]["policies"] if (s["kind"], s["name"]) == (kind, name)
            )
            entry = found[node]
            assert entry.pop("lastUpdateTime")
            assert entry == {
                "nodeName": node,
                "backends": model["backends"],
                "ready": True,
                "reason": "Ready",
            }
        if kind == LRP:  # its one local pod, on port 53 (UDP and TCP)
            assert [found[n]["backends"] for n in (a, b)] == [1, 1]
        else:  # both pods, wherever they run, on ports 80 and 443
            assert [found[n]["backends"] for n in (a, b)] == [4, 4]
        condition = ready(doc)
        assert condition.pop("lastTransitionTime")
        assert condition == {
            "type": "Ready",
            "status": "True",
            "reason": "Programmed",
            "message": "backends on at least one reporting node",
            "observedGeneration": doc["metadata"]["generation"],
        }
        assert doc["status"]["observedGeneration"] == doc["metadata"]["generation"]
        # managedFields: each agent owns exactly its entry, the controller Ready and observedGeneration.
        managers = status_managers(doc)
        agent_a, agent_b = (policy_status.field_manager(n) for n in (a, b))
        assert managers.keys() == {agent_a, agent_b, controller_status.FIELD_MANAGER}
        assert {m: r["operation"] for m, r in managers.items()} == dict.fromkeys(managers, "Apply")
        assert owned_entries(managers[agent_a]) == {a}
        assert owned_entries(managers[agent_b]) == {b}
        assert managers[agent_a]["fieldsV1"]["f:status"].keys() == {"f:nodes"}
        controller = managers[controller_status.FIELD_MANAGER]["fieldsV1"]["f:status"]
        assert controller.keys() == {"f:conditions", "f:observedGeneration"}
        assert controller["f:conditions"].keys() == {'k:{"type":"Ready"}'}
    # Restarted, an agent reads its entries back from the objects: nothing changed, nothing written.
    versions = {kind: (plane.get(kind) or {})["metadata"]["resourceVersion"] for kind in plane.policies}
    plane.agents[b].stop()
    plane.agents[b].start(manifests_flag=False)
    time.sleep(kubestatus.WriterTiming().delay + 1.0)  # a write would have been made by now
    assert {
        kind: (plane.get(kind) or {})["metadata"]["resourceVersion"] for kind in plane.policies
    } == versions
    assert status_writes(plane.agents[b]) == 0
    assert status_writes(plane.agents[a]) >= 2  # the one running since the start wrote both entries


def status_writes(agent: AgentProcess) -> float:
    """The agent's attempts to write policy status, whatever their result."""
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(r"^balancing_policy_status_writes_total\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(v) for v in found)


def test_departed_node_entries_are_removed(plane: Plane) -> None:
    plane.settled()
    a, b = plane.nodes
    before = {kind: shown(plane.kube, kind, name) for kind, name in plane.policies.items()}
    plane.agents[b].stop()
    plane.kube.kubectl("delete", "node", b)

    def pruned() -> bool:
        return all(entries(plane.get(kind)).keys() == {a} for kind in plane.policies)

    plane.wait(pruned, f"the controller to remove {b}'s entries")
    for kind, name in plane.policies.items():
        doc = shown(plane.kube, kind, name)
        assert entries(doc)[a] == entries(before[kind])[a]  # not rewritten
        assert ready(doc)["status"] == "True"  # a still has backends
        managers = status_managers(doc)
        # The departed agent owns nothing any more; the JSON patch, which only removed, left no record.
        assert managers.keys() == {policy_status.field_manager(a), controller_status.FIELD_MANAGER}
        assert owned_entries(managers[policy_status.field_manager(a)]) == {a}
        assert (
            managers[policy_status.field_manager(a)]
            == status_managers(before[kind])[policy_status.field_manager(a)]
        )


def test_changed_entry_is_rewritten_alone(plane: Plane) -> None:
    plane.settled()
    a, b = plane.nodes
    before = {kind: shown(plane.kube, kind, name) for kind, name in plane.policies.items()}
    # a's only local backend goes (forced: no kubelet finishes a graceful deletion).
    plane.kube.kubectl(
        "delete", "pod", plane.lrp_pods[a], "-n", plane.namespace, "--grace-period=0", "--force"
    )

    def lost() -> bool:
        entry = entries(plane.get(LRP)).get(a, {})
        return (entry.get("backends"), entry.get("ready"), entry.get("reason")) == (0, False, "NoBackends")

    plane.wait(lost, f"{a}'s entry to show no backends")
    doc = shown(plane.kube, LRP, plane.policies[LRP])
    assert entries(doc)[b] == entries(before[LRP])[b]
    fm_a, fm_b = policy_status.field_manager(a), policy_status.field_manager(b)
    managers, old = status_managers(doc), status_managers(before[LRP])
    assert managers[fm_b] == old[fm_b]  # b's record untouched (its time included)
    assert owned_entries(managers[fm_a]) == {a}
    assert ready(doc)["status"] == "True"  # b still serves
    # The BalancingPolicy selects other pods: nothing changed there.
    assert entries(shown(plane.kube, BP, plane.policies[BP])) == entries(before[BP])
