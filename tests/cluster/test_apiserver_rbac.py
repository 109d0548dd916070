"""The chart's RBAC against the real API server (authorization mode RBAC): least privilege, both ways.

A release of the chart is applied as the admin (``helpers.chart``); the agent and the controller then run
with bound tokens (TokenRequest) of the rendered ServiceAccounts, as their pods would:

- the controller (a local process, as in test_apiserver_webhooks.py) follows the policies and the Nodes,
  writes each policy's Ready condition (server-side apply on the status subresource) and removes a departed
  node's entry (JSON patch on the status subresource), and its log holds no refusal;
- the agent (a real ``balancing agent``, one Topology node cgroup, ``kernel``) lists and watches every
  collection it follows, the label-selector Pod watches of a BalancingPolicy's ``serviceEndpoint`` (all
  namespaces, and one namespace) included, and writes its ``status.nodes`` entry, with no refusal;
- calls outside the roles are refused: ``kubectl auth can-i`` with their kubeconfigs, and real requests
  answered 403.

The verbs and resources the code uses (``sources.kube.resources_for``, ``controller.policyindex``'s filter
of them, ``sources.kubestatus``'s status patches, the pod watches of ``sources.selected_pods``) are compared
with the rendered ClusterRoles in both directions: nothing missing, nothing more.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balancing.controller import policyindex
from balancing.model import objects
from balancing.sources import kube as kube_source
from balancing.sources import kubestatus
from balancing.sources.selected_pods import PodQuery
from balancing_testkit.topology import Topology
from helpers import chart
from helpers.controlplane import ControlPlane
from helpers.support import AgentProcess, node

Rules = dict[tuple[str, str], set[str]]  # (apiGroup, resource) -> verbs


@dataclass
class Rbac:
    kube: ControlPlane
    release: chart.Release
    agent_token: str
    agent_kubeconfig: Path
    controller_token: str
    controller_kubeconfig: Path
    controller: chart.ControllerProcess
    node: str


@pytest.fixture(scope="module")
def rbac(kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rbac]:
    workdir = tmp_path_factory.mktemp("rbac")
    release = chart.install(kube)
    node_name = f"rbac-{uuid.uuid4().hex[:6]}"
    controller: chart.ControllerProcess | None = None
    try:
        kube.apply([node(node_name, ["10.200.0.1"])])
        host, external_name = chart.webhook_address()
        release.serve_webhooks_locally(external_name)
        agent_token = kube.token(release.agent_account, release.namespace)
        agent_kc = kube.kubeconfig_for(agent_token, workdir / "agent.kubeconfig")
        controller_token = kube.token(release.controller_account, release.namespace)
        controller_kc = kube.kubeconfig_for(controller_token, workdir / "controller.kubeconfig")
        controller = chart.ControllerProcess(release, workdir, host, controller_kc).start()
        yield Rbac(
            kube, release, agent_token, agent_kc, controller_token, controller_kc, controller, node_name
        )
    finally:
        if controller is not None:
            controller.stop()
        for plural in kubestatus.PLURALS.values():
            kube.kubectl("delete", plural, "-l", f"test-release={release.name}", "--wait=false", check=False)
        kube.kubectl("delete", "node", node_name, "--ignore-not-found", check=False)
        release.uninstall()


# --- what the code uses and what the chart grants ------------------------------------------------------


def _collection(path: str) -> tuple[str, str]:
    """``(apiGroup, resource)`` of a collection path (``/api/v1/pods``, ``/apis/G/V/R``, namespaced too)."""
    m = re.fullmatch(
        r"/api/v1(?:/namespaces/[^/]+)?/([a-z]+)|/apis/([^/]+)/[^/]+(?:/namespaces/[^/]+)?/([a-z]+)", path
    )
    assert m is not None, path
    return ("", m.group(1)) if m.group(1) else (m.group(2), m.group(3))


def _status_patches() -> Rules:
    group = objects.POLICY_API_VERSION.split("/")[0]
    return {(group, f"{plural}/status"): {"patch"} for plural in kubestatus.PLURALS.values()}


def agent_needs() -> Rules:
    """Every collection the agent lists and watches (its own node's Pods by field selector, the Pods a
    BalancingPolicy selects in all namespaces or one), and the status patches (``sources.kubestatus``)."""
    paths = [r.path for r in kube_source.resources_for("node")]
    paths += [PodQuery("", "app=web").path, PodQuery("ns", "app=web").path]
    needs: Rules = {_collection(p): {"list", "watch"} for p in paths}
    return needs | _status_patches()


def controller_needs() -> Rules:
    """What ``controller.policyindex`` follows (the agent's collections narrowed to its kinds) and the
    status writes (the Ready condition by apply, departed nodes' entries by JSON patch: both PATCH)."""
    followed = [r for r in kube_source.resources_for("") if r.kind in policyindex.FOLLOWED_KINDS]
    needs: Rules = {_collection(r.path): {"list", "watch"} for r in followed}
    return needs | _status_patches()


def granted(role: dict[str, Any]) -> Rules:
    rules: Rules = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_chart_roles_are_exactly_what_the_code_uses(rbac: Rbac) -> None:
    release = rbac.release
    roles = {r["metadata"]["name"]: r for r in release.of_kind("ClusterRole")}
    assert granted(roles[release.agent_account]) == agent_needs()
    assert granted(roles[release.controller_account]) == controller_needs()
    for binding in release.of_kind("ClusterRoleBinding"):
        [subject] = binding["subjects"]
        assert (subject["kind"], subject["namespace"]) == ("ServiceAccount", release.namespace)
        assert binding["roleRef"]["name"] == subject["name"]  # each account its own role
    # and the server holds them as rendered
    for name, role in roles.items():
        assert granted(rbac.kube.get("clusterrole", name)) == granted(role)


# --- what the server allows and refuses ----------------------------------------------------------------

ALLOWED_AGENT = [
    ("list", "services"), ("watch", "endpointslices.discovery.k8s.io"), ("list", "pods"), ("watch", "nodes"),
    ("list", "namespaces"), ("watch", "localredirectpolicies.balancing.elf.io"),
    ("list", "balancingpolicies.balancing.elf.io"), ("patch", "balancingpolicies.balancing.elf.io/status"),
    ("patch", "localredirectpolicies.balancing.elf.io/status"),
]  # fmt: skip
ALLOWED_CONTROLLER = [
    ("list", "localredirectpolicies.balancing.elf.io"), ("watch", "balancingpolicies.balancing.elf.io"),
    ("list", "nodes"), ("patch", "localredirectpolicies.balancing.elf.io/status"),
    ("patch", "balancingpolicies.balancing.elf.io/status"),
]  # fmt: skip
REFUSED_BOTH = [
    ("list", "secrets"), ("get", "secrets"), ("patch", "services"),
    ("update", "localredirectpolicies.balancing.elf.io"), ("patch", "balancingpolicies.balancing.elf.io"),
    ("update", "balancingpolicies.balancing.elf.io/status"),
    ("create", "balancingpolicies.balancing.elf.io"), ("delete", "localredirectpolicies.balancing.elf.io"),
    ("get", "pods"), ("get", "nodes"), ("create", "events"), ("list", "configmaps"),
]  # fmt: skip
REFUSED_CONTROLLER_ONLY = [
    ("list", "pods"),
    ("list", "services"),
    ("watch", "endpointslices.discovery.k8s.io"),
]


def _can_i(kube: ControlPlane, kubeconfig: Path, verb: str, resource: str) -> bool:
    sub = []
    if resource.endswith("/status"):
        resource, sub = resource.removesuffix("/status"), ["--subresource=status"]
    res = kube.kubectl(
        "auth", "can-i", verb, resource, *sub, "--all-namespaces", kubeconfig=kubeconfig, check=False
    )
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {answer} {res.stderr}"
    return answer == "yes"


@pytest.mark.parametrize("who", ["agent", "controller"])
def test_can_i(rbac: Rbac, who: str) -> None:
    kubeconfig = rbac.agent_kubeconfig if who == "agent" else rbac.controller_kubeconfig
    allowed = ALLOWED_AGENT if who == "agent" else ALLOWED_CONTROLLER
    refused = REFUSED_BOTH + (REFUSED_CONTROLLER_ONLY if who == "controller" else [])
    wrong = [f"{v} {r}: no" for v, r in allowed if not _can_i(rbac.kube, kubeconfig, v, r)]
    wrong += [f"{v} {r}: yes" for v, r in refused if _can_i(rbac.kube, kubeconfig, v, r)]
    assert not wrong, wrong


def test_real_requests_outside_the_roles_are_403(rbac: Rbac) -> None:
    kube, ns, svc = rbac.kube, rbac.release.namespace, rbac.release.controller_service
    doc = _policy(rbac, "BalancingPolicy")
    kube.apply([doc])
    policy = f"/apis/balancing.elf.io/v1beta1/balancingpolicies/{doc['metadata']['name']}"
    merge, labels = "application/merge-patch+json", {"metadata": {"labels": {"x": "y"}}}
    stored = kube.get("balancingpolicies", doc["metadata"]["name"])
    cases = [
        (rbac.agent_token, "GET", "/api/v1/secrets", None, "", 'cannot list resource "secrets"'),
        (rbac.agent_token, "GET", f"/api/v1/namespaces/{ns}/pods/x", None, "", 'cannot get resource "pods"'),
        (rbac.agent_token, "PATCH", policy, labels, merge, 'cannot patch resource "balancingpolicies"'),
        (rbac.agent_token, "PUT", f"{policy}/status", stored, "application/json",
         'cannot update resource "balancingpolicies/status"'),
        (rbac.controller_token, "GET", "/api/v1/pods", None, "", 'cannot list resource "pods"'),
        (rbac.controller_token, "PATCH", f"/api/v1/namespaces/{ns}/services/{svc}", labels, merge,
         'cannot patch resource "services"'),
        (rbac.controller_token, "PATCH", policy, labels, merge, 'cannot patch resource "balancingpolicies"'),
    ]  # fmt: skip
    for token, method, path, body, content_type, message in cases:
        code, answer = _request(kube, token, method, path, body, content_type)
        assert (code, answer.get("reason")) == (403, "Forbidden"), (method, path, code, answer)
        assert message in answer.get("message", ""), (method, path, answer)


# --- the controller and the agent, each with its account's token ---------------------------------------


def test_controller_does_everything_it_needs(rbac: Rbac) -> None:
    kube, controller = rbac.kube, rbac.controller
    lrp = _policy(rbac, "LocalRedirectPolicy")
    bp = _policy(rbac, "BalancingPolicy")
    kube.apply([lrp, bp])
    for doc in (lrp, bp):
        kube.wait_for(lambda d=doc: _ready(kube, d) is not None, f"the Ready condition of {doc['kind']}", 30)
    # a departed node's entry (no Node of that name): removed by the controller's JSON patch
    gone = {
        "nodeName": "departed-node",
        "backends": 1,
        "ready": True,
        "reason": "Ready",
        "lastUpdateTime": "2026-01-01T00:00:00Z",
    }
    name = bp["metadata"]["name"]
    kube.patch_status("balancingpolicies", name, {"nodes": [gone]})

    def pruned() -> bool:
        nodes = (kube.get("balancingpolicies", name).get("status") or {}).get("nodes") or []
        return not nodes

    kube.wait_for(pruned, "the controller to remove the departed node's entry", 30)
    got = controller.get("/metrics")
    assert got is not None
    metrics = chart.samples(got[1])
    assert metrics.get(("balancing_controller_policy_status_prunes_total", (("result", "ok"),)), 0) >= 1
    assert metrics.get(("balancing_controller_policy_status_writes_total", (("result", "ok"),)), 0) >= 2
    for result in ("failed", "retry"):
        assert metrics.get(("balancing_controller_policy_status_writes_total", (("result", result),))) == 0
    log = controller.text()
    assert " 403 " not in log and "Forbidden" not in log and "lacks patch" not in log, log[-3000:]


@pytest.mark.kernel
def test_agent_does_everything_it_needs(rbac: Rbac, topology: Topology, tmp_path: Path) -> None:
    kube, ns = rbac.kube, rbac.release.namespace
    lrp = _policy(rbac, "LocalRedirectPolicy")
    bp_all = _policy(rbac, "BalancingPolicy")  # selects pods in every namespace
    bp_one = _policy(rbac, "BalancingPolicy")
    bp_one["spec"]["backend"]["serviceEndpoint"]["endpointSelector"]["matchLabels"][
        "io.kubernetes.pod.namespace"
    ] = ns
    kube.apply([lrp, bp_all, bp_one])
    agent = AgentProcess(topology, tmp_path, rbac.node, extra=["--kubeconfig", str(rbac.agent_kubeconfig)])
    agent.start(manifests_flag=False, wait=False)
    try:
        agent.wait_ready(timeout=30)
        for doc in (lrp, bp_all, bp_one):
            kube.wait_for(
                lambda d=doc: _entry(kube, d, rbac.node) is not None,
                f"{rbac.node}'s entry in {doc['metadata']['name']}",
                30,
            )
        metrics = chart.samples(_get_text(agent.metrics_port))
        lists = _labelled(metrics, "balancing_kube_lists_total")
        initial = {labels["resource"] for labels, v in lists if labels["reason"] == "initial" and v > 0}
        kinds = {r.kind for r in kube_source.resources_for(rbac.node)}
        assert kinds <= initial, f"not listed: {kinds - initial}"
        pod_lists = sum(
            v for labels, v in lists if (labels["resource"], labels["reason"]) == ("Pod", "initial")
        )
        assert pod_lists >= 3, "this node's pods, the pods of bp_all (every namespace) and of bp_one (one)"
        bad = [(labels, v) for labels, v in lists if labels["reason"] in ("retry", "unserved") and v]
        assert not bad, bad
        writes = {
            labels["result"]: v for labels, v in _labelled(metrics, "balancing_policy_status_writes_total")
        }
        assert writes.get("ok", 0) >= 3 and not writes.get("failed") and not writes.get("retry"), writes
    finally:
        stderr = agent.stop()
    assert "403" not in stderr and "Forbidden" not in stderr, stderr[-3000:]


# --- helpers -------------------------------------------------------------------------------------------


def _policy(rbac: Rbac, kind: str) -> dict[str, Any]:
    return chart.policy(rbac.release, kind, prefix="rbac")


def _ready(kube: ControlPlane, doc: dict[str, Any]) -> dict[str, Any] | None:
    status = kube.get(kubestatus.PLURALS[doc["kind"]], doc["metadata"]["name"]).get("status") or {}
    found = [c for c in status.get("conditions") or [] if c["type"] == "Ready"]
    return found[0] if found else None


def _entry(kube: ControlPlane, doc: dict[str, Any], node_name: str) -> dict[str, Any] | None:
    status = kube.get(kubestatus.PLURALS[doc["kind"]], doc["metadata"]["name"]).get("status") or {}
    found = [e for e in status.get("nodes") or [] if e["nodeName"] == node_name]
    return found[0] if found else None


def _request(
    kube: ControlPlane, token: str, method: str, path: str, body: Any, content_type: str
) -> tuple[int, dict[str, Any]]:
    """One request with a ServiceAccount's bearer token: ``(HTTP status, decoded answer)``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(kube.server + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    ctx = ssl.create_default_context(cafile=str(kube.ca))
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _labelled(metrics: dict[chart.Sample, float], name: str) -> list[tuple[dict[str, str], float]]:
    """The samples called ``name``: (labels, value)."""
    return [(dict(labels), v) for (sample, labels), v in metrics.items() if sample == name]


def _get_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body: bytes = r.read()
        return body.decode()
