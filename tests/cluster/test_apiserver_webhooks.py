"""The Helm chart and the admission webhooks against the real API server.

``helm template`` of the chart (certificate mode ``helm``) is applied server-side as the admin into a fresh
namespace (``helpers.chart``): every object is accepted, the CRDs first. The webhook configurations stay
exactly as rendered (``service:`` references to ``<release>-controller`` port 443, the caBundle of the
rendered Secret), and ``balancing controller`` runs as a local process with that Secret's certificate and
the controller ServiceAccount's token, listening on 127.0.0.1:443 (another loopback address if that port is
taken: ``chart.webhook_address``).

The one adaptation: the rendered controller Service (ClusterIP, selecting the Deployment's pods, which no
kubelet runs here) is replaced by ``type: ExternalName, externalName: localhost`` with the same port. In
k8s.io/apiserver v0.37.2, ``pkg/util/webhook/client.go`` builds a service reference's client with the TLS
server name ``<svc>.<ns>.svc`` and dials what the service resolver answers; kube-apiserver's resolver
(``buildServiceResolver``: ``NewClusterIPServiceResolver`` without ``--enable-aggregator-routing``) calls
``proxy.ResolveCluster`` (``pkg/util/proxy/proxy.go``), which for an ExternalName Service answers
``https://<externalName>:<the webhook's port>``. So the API server really calls the rendered webhooks and
really verifies the chart's certificate against the Service's name; it only dials the local process.

What the real server shows (the fake API server has no admission at all):
- it calls both webhooks on CREATE and UPDATE of both policy kinds, never on DELETE, never for the status
  subresource (the controller's own decision counter tells);
- its structural schema validation (OpenAPI and CEL of the CRDs) runs after the mutating webhook and
  before the validating one: a policy the CRD refuses never reaches the validating webhook, so the model's
  messages reach a user only for what the CRD cannot check, the older-wins conflict; those denials carry
  the model's message as ``admission.validate`` makes it;
- a CREATE reaches the validating webhook with the server's ``creationTimestamp`` (whole seconds) already
  set: ranked by (timestamp, name), a newcomer created in an existing policy's second could win by name, so
  the webhook takes a CREATE as younger than every existing policy (the conflict case names it so);
- the CRDs' structural defaults are applied when the request is decoded, before mutating admission: the
  mutating webhook receives policies that already carry every default it would add, and the stored object
  has the same defaults with the controller stopped;
- with the controller stopped (failurePolicy Ignore for both), creates, updates and deletes go through.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from balancing.controller import admission
from balancing.model import objects, policies
from helpers import chart
from helpers.controlplane import ControlPlane

KINDS = ("LocalRedirectPolicy", "BalancingPolicy")
PLURALS = {"LocalRedirectPolicy": "localredirectpolicies", "BalancingPolicy": "balancingpolicies"}
VALIDATING = "validating.policies.balancing.elf.io"
Decisions = dict[tuple[str, str, str, str], float]


@dataclass
class Webhooks:
    kube: ControlPlane
    release: chart.Release
    controller: chart.ControllerProcess
    external_name: str

    def restart_controller(self) -> None:
        self.controller.stop()
        self.controller.start()


@pytest.fixture(scope="module")
def webhooks(kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhooks]:
    workdir = tmp_path_factory.mktemp("webhooks")
    release = chart.install(kube)
    controller: chart.ControllerProcess | None = None
    try:
        host, external_name = chart.webhook_address()
        release.serve_webhooks_locally(external_name)
        kubeconfig = release.kubeconfig_of(release.controller_account, workdir / "controller.kubeconfig")
        controller = chart.ControllerProcess(release, workdir, host, kubeconfig).start()
        yield Webhooks(kube, release, controller, external_name)
    finally:
        if controller is not None:
            controller.stop()
        for plural in PLURALS.values():
            kube.kubectl("delete", plural, "-l", f"test-release={release.name}", "--wait=false", check=False)
        release.uninstall()  # the webhook configurations go: later tests of the session see none


def policy(webhooks: Webhooks, kind: str, name: str = "") -> dict[str, Any]:
    """``chart.policy`` for this module's release."""
    return chart.policy(webhooks.release, kind, name, prefix="wh")


def create(kube: ControlPlane, doc: dict[str, Any], check: bool = True) -> tuple[int, str]:
    res = kube.kubectl("create", "-f", "-", input=json.dumps(doc), check=check)
    return res.returncode, res.stderr


def delta(before: Decisions, after: Decisions) -> Decisions:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def called_for_update(before: Decisions, after: Decisions, kind: str) -> None:
    """Both webhooks called for an UPDATE of ``kind``, each at least once: the API server retries a patch
    whose object changed meanwhile (here: the controller's own status write) and runs admission again on
    every try, which is why webhooks must give the same answer twice."""
    got = delta(before, after)
    assert got.keys() == calls(kind, "UPDATE").keys(), got
    assert all(1.0 <= n <= 5.0 for n in got.values()), got


def calls(kind: str, operation: str, allowed: str = "true") -> Decisions:
    """One call of each webhook for ``kind`` and ``operation`` (the mutating one always allows)."""
    return {(kind, operation, "validate", allowed): 1.0, (kind, operation, "mutate", "true"): 1.0}


# --- the chart -----------------------------------------------------------------------------------------


def test_every_rendered_object_is_accepted(webhooks: Webhooks) -> None:
    release, kube = webhooks.release, webhooks.kube
    kinds = {d["kind"] for d in release.objects}
    assert {"CustomResourceDefinition", "DaemonSet", "Deployment", "Secret", "ClusterRole"} <= kinds
    assert len(release.applied) == len(release.objects), release.applied
    assert all(line.endswith("serverside-applied") for line in release.applied), release.applied
    as_list = json.dumps({"apiVersion": "v1", "kind": "List", "items": release.objects})
    listed = json.loads(kube.kubectl("get", "-f", "-", "-o", "json", input=as_list).stdout)["items"]
    stored = {_key(d) for d in listed}
    assert stored == {_key(d) for d in release.objects}
    for crd in release.of_kind("CustomResourceDefinition"):
        conditions = kube.get("crd", crd["metadata"]["name"])["status"]["conditions"]
        established = [c for c in conditions if c["type"] == "Established"]
        assert established and established[0]["status"] == "True"
    # nothing runs the workloads: no kubelet, no scheduler, no Deployment controller
    agent = kube.get("daemonset", f"{release.fullname}-agent", release.namespace)
    assert agent["status"].get("numberReady", 0) == 0


def test_webhook_configurations_as_rendered(webhooks: Webhooks) -> None:
    release, kube = webhooks.release, webhooks.kube
    ca = release.tls()["ca.crt"]
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        rendered = release.one(kind)
        stored = kube.get(kind.lower(), release.fullname)
        [hook] = stored["webhooks"]
        # as rendered, plus the two selectors the server defaults to "everything"
        assert hook == {**rendered["webhooks"][0], "namespaceSelector": {}, "objectSelector": {}}
        service = hook["clientConfig"]["service"]
        assert (service["name"], service["namespace"], service["port"]) == (
            release.controller_service,
            release.namespace,
            chart.WEBHOOK_PORT,
        )
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
        assert hook["matchConditions"] == [
            {"name": "not-being-deleted", "expression": "!has(object.metadata.deletionTimestamp)"}
        ]
    svc = kube.get("service", release.controller_service, release.namespace)
    assert svc["spec"]["type"] == "ExternalName" and svc["spec"]["externalName"] == webhooks.external_name
    assert [p["port"] for p in svc["spec"]["ports"]] == [chart.WEBHOOK_PORT]
    # the serving certificate verifies under the Service's name against the caBundle alone
    assert webhooks.controller.get("/readyz") == (200, '{"ready": true}')


# --- the API server calls the webhooks -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_create_and_update_call_both_webhooks(webhooks: Webhooks, kind: str) -> None:
    kube, controller = webhooks.kube, webhooks.controller
    doc = policy(webhooks, kind)
    before = controller.decisions()
    create(kube, doc)
    assert delta(before, controller.decisions()) == calls(kind, "CREATE")

    stored = kube.get(PLURALS[kind], doc["metadata"]["name"])
    spec = stored["spec"]
    assert spec["enabled"] is True and spec["config"] == {"enableOutCluster": True}
    if kind == "LocalRedirectPolicy":
        assert spec["skipRedirectFromBackend"] is False
    else:
        assert spec["backend"]["serviceEndpoint"]["redirectMode"] == "podEndpoint"
    # the API server applied the CRD's defaults before calling the mutating webhook: nothing left to add
    assert admission.mutate({"operation": "CREATE", "object": stored}) == []

    before = controller.decisions()
    kube.kubectl("label", PLURALS[kind], doc["metadata"]["name"], "touched=yes")
    called_for_update(before, controller.decisions(), kind)
    before = controller.decisions()
    edited = copy.deepcopy(doc)
    _back_ports(edited)[0]["port"] = "5353"
    kube.apply([edited])  # server-side apply: an UPDATE (PATCH) for admission
    called_for_update(before, controller.decisions(), kind)
    assert _back_ports(kube.get(PLURALS[kind], doc["metadata"]["name"]))[0]["port"] == "5353"


@pytest.mark.parametrize("kind", KINDS)
def test_conflict_denied_with_the_model_message(webhooks: Webhooks, kind: str) -> None:
    kube, controller = webhooks.kube, webhooks.controller
    # Precedence is (creationTimestamp, name), and the API server sets creationTimestamp (whole seconds)
    # before the validating webhook sees a CREATE: the newcomer's name sorts first, so only the rule that a
    # CREATE is younger than every existing policy refuses it when both fall in the same second.
    base = f"wh-{kind.lower()[:3]}-{uuid.uuid4().hex[:6]}"
    older = policy(webhooks, kind, f"{base}-1-older")
    create(kube, older)
    stored_older = kube.get(PLURALS[kind], older["metadata"]["name"])
    kube.wait_for(lambda: _indexed(webhooks, stored_older), "the controller's index to hold the older policy")

    newer = policy(webhooks, kind, f"{base}-0-newer")
    newer["spec"]["frontend"] = copy.deepcopy(older["spec"]["frontend"])
    expected = _model_denial(newer, [stored_older])
    before = controller.decisions()
    code, stderr = create(kube, newer, check=False)
    assert code != 0
    assert f'admission webhook "{VALIDATING}" denied the request: {expected}' in stderr, stderr
    assert "is already claimed by the older" in expected
    assert delta(before, controller.decisions()) == calls(kind, "CREATE", allowed="false")
    assert not kube.exists(PLURALS[kind], newer["metadata"]["name"])

    # an UPDATE that moves a policy onto the older one's frontend is refused the same way
    other = policy(webhooks, kind, f"{base}-3-other")
    create(kube, other)
    moved = copy.deepcopy(other)
    moved["spec"]["frontend"] = copy.deepcopy(older["spec"]["frontend"])
    res = kube.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(moved), check=False
    )
    assert res.returncode != 0 and "is already claimed by the older" in res.stderr, res.stderr


def test_schema_errors_are_the_api_servers_and_never_reach_the_webhook(webhooks: Webhooks) -> None:
    """The CRD refuses what the model refuses before the validating webhook runs: the user sees the API
    server's message, not the model's (which is what the webhook would say)."""
    kube, controller = webhooks.kube, webhooks.controller
    doc = policy(webhooks, "LocalRedirectPolicy")
    doc["spec"]["backend"]["toPorts"] = [
        {"port": "53", "protocol": "UDP", "name": "dns"},
        {"port": "53", "protocol": "TCP", "name": "dns"},
    ]
    model_message = _model_denial(doc, [])
    assert "port name 'dns' is used more than once" in model_message
    before = controller.decisions()
    code, stderr = create(kube, doc, check=False)
    assert code != 0 and "is invalid" in stderr and VALIDATING not in stderr, stderr
    assert "port name 'dns'" not in stderr, "the CRD's message, not the model's"
    # mutating admission comes before the schema validation, validating admission after it
    assert delta(before, controller.decisions()) == {("LocalRedirectPolicy", "CREATE", "mutate", "true"): 1.0}


def test_status_subresource_is_never_sent_to_the_webhooks(webhooks: Webhooks) -> None:
    kube, controller = webhooks.kube, webhooks.controller
    doc = policy(webhooks, "BalancingPolicy")
    create(kube, doc)
    name = doc["metadata"]["name"]
    before = controller.decisions()
    entry = {"nodeName": "node-x", "backends": 0, "ready": False, "reason": "NoBackends"}
    status = {"nodes": [{**entry, "lastUpdateTime": "2026-01-01T00:00:00Z"}]}
    kube.patch_status("balancingpolicies", name, status)
    kube.request(
        "PATCH",
        f"/apis/balancing.elf.io/v1beta1/balancingpolicies/{name}/status?fieldManager=test&force=true",
        {
            "apiVersion": "balancing.elf.io/v1beta1",
            "kind": "BalancingPolicy",
            "metadata": {"name": name},
            "status": {"observedGeneration": 1},
        },
        content_type="application/apply-patch+yaml",
    )
    stored = kube.get("balancingpolicies", name)
    assert stored["status"]["nodes"][0]["nodeName"] == "node-x"
    assert delta(before, controller.decisions()) == {}


def test_delete_is_never_blocked(webhooks: Webhooks) -> None:
    kube, controller = webhooks.kube, webhooks.controller
    doc = policy(webhooks, "LocalRedirectPolicy")
    create(kube, doc)
    before = controller.decisions()
    kube.kubectl("delete", PLURALS[doc["kind"]], doc["metadata"]["name"])
    assert delta(before, controller.decisions()) == {}, "DELETE is not in the rules"

    # with a finalizer: the UPDATE that removes it comes after deletionTimestamp: matchConditions skip it
    held = policy(webhooks, "BalancingPolicy")
    held["metadata"]["finalizers"] = ["test.balancing.elf.io/hold"]
    create(kube, held)
    name = held["metadata"]["name"]
    kube.kubectl("delete", "balancingpolicies", name, "--wait=false")
    before = controller.decisions()
    kube.kubectl(
        "patch",
        "balancingpolicies",
        name,
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/metadata/finalizers"}]',
    )
    kube.wait_for(lambda: not kube.exists("balancingpolicies", name), f"{name} to go")
    assert delta(before, controller.decisions()) == {}

    controller.stop()
    try:
        for kind in KINDS:  # failurePolicy Ignore: no controller blocks nothing
            stopped = policy(webhooks, kind)
            create(kube, stopped)
            spec = kube.get(PLURALS[kind], stopped["metadata"]["name"])["spec"]
            assert spec["config"] == {"enableOutCluster": True}, "the CRD's defaults, without the webhook"
            kube.kubectl("label", PLURALS[kind], stopped["metadata"]["name"], "touched=yes")
            kube.kubectl("delete", PLURALS[kind], stopped["metadata"]["name"])
    finally:
        webhooks.restart_controller()


# --- helpers -------------------------------------------------------------------------------------------


def _parsed(doc: dict[str, Any]) -> policies.Policy:
    obj = objects.parse_object(doc)
    assert isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy)
    return obj


def _model_denial(doc: dict[str, Any], existing: list[dict[str, Any]]) -> str:
    """What ``balancing``'s own admission decision says about creating ``doc`` next to ``existing``."""
    request = {"operation": "CREATE", "object": doc, "kind": {"kind": doc["kind"]}}
    allowed, message = admission.validate(request, lambda: [_parsed(d) for d in existing])
    assert not allowed
    return message


def _indexed(webhooks: Webhooks, stored: dict[str, Any]) -> bool:
    """The controller has seen ``stored`` (its Ready condition was written for this generation)."""
    status = webhooks.kube.get(PLURALS[stored["kind"]], stored["metadata"]["name"]).get("status") or {}
    return bool(status.get("observedGeneration") == stored["metadata"]["generation"])


def _back_ports(doc: dict[str, Any]) -> list[dict[str, Any]]:
    backend = doc["spec"]["backend"]
    ports: list[dict[str, Any]] = backend.get("serviceEndpoint", backend)["toPorts"]
    return ports


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]
