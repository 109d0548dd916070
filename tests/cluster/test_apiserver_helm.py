"""The Helm chart installed, upgraded and uninstalled by a real ``helm`` against the real API server: the
commands a user types (``helm install --create-namespace``, ``helm upgrade``, ``helm uninstall``, admin
kubeconfig), each test with its own release name and namespace.

tests/unit/test_helm.py proves helm mode's certificate reuse and rotation with ``helm template
--dry-run=server`` against a small stub that only answers GETs; here helm's ``lookup`` reads the Secret the
release itself stored, and helm (v4: server-side apply, field manager ``helm``) writes the result:

- install: every object of the release's manifest is stored (nothing runs the DaemonSet or the Deployment:
  no kubelet, no scheduler, no Deployment controller; no ``--wait``), the CRDs of ``crds/`` exist, and the
  stored Secret, caBundles and checksum annotation agree (the caBundle's CA signed the Secret's certificate
  for the controller Service's names);
- an upgrade with unchanged values reuses the stored Secret byte for byte: the same caBundle, the same
  checksum, the controller Deployment's generation unchanged (no rollout);
- a stale Secret (expiring within renewBeforeDays, made for other DNS names) or a deleted one (the documented
  way to rotate by hand) is replaced on upgrade by a new CA and certificate for the Service's names; the
  caBundle trusts the new CA and the previous one for that upgrade only, and the pod template's checksum
  changes (a rollout: a new generation);
- uninstall removes every object of the release and helm's release records, leaves the CRDs (helm never
  deletes them), and the namespace can then be deleted.

Both webhooks use failurePolicy Ignore (the validating one set explicitly; the mutating one always is): no
controller runs, and while a release exists other policy writes must never be blocked by it. Every release is
uninstalled afterwards even on failure, and the teardown checks that no webhook configuration of it remains.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from helpers import chart, k8stools
from helpers.controlplane import ControlPlane

VALUES = ["--set", "webhooks.certificate.mode=helm,webhooks.failurePolicy=Ignore"]
WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
NOT_AFTER = "balancing.elf.io/not-after"
DNS_NAMES = "balancing.elf.io/dns-names"
RENEW_BEFORE_DAYS = 30  # values.yaml: webhooks.certificate.helm.renewBeforeDays
VALIDITY_DAYS = 365  # values.yaml: webhooks.certificate.helm.validityDays
DAY = 86400
PARTS = ("agent", "controller")  # the chart's ClusterRoles and ClusterRoleBindings: <release>-<part>


@dataclass
class Snapshot:
    """What helm mode's certificate touches, as stored."""

    secret: dict[str, Any]
    deployment: dict[str, Any]
    webhooks: list[dict[str, Any]]  # of both configurations

    @property
    def ca_bundles(self) -> set[str]:
        return {hook["clientConfig"]["caBundle"] for hook in self.webhooks}

    @property
    def checksum(self) -> str:
        annotations = self.deployment["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/webhook-tls"])

    def state(self) -> dict[str, Any]:
        """What stays put on an upgrade that reuses the Secret (the Secret's data as stored: base64)."""
        annotations = self.secret["metadata"]["annotations"]
        return {
            **self.secret["data"],
            "annotations": {k: annotations[k] for k in (NOT_AFTER, DNS_NAMES)},
            "bundle": self.ca_bundles,
            "checksum": self.checksum,
            "generation": self.deployment["metadata"]["generation"],
        }


@dataclass
class HelmRelease:
    """One release of the chart, driven by the helm binary with the admin kubeconfig."""

    kube: ControlPlane
    name: str
    namespace: str
    home: Path  # helm's HOME: its cache and configuration stay in the test's directory

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kubeconfig = str(self.kube.kubeconfig)
        argv = [str(k8stools.helm()), *args, "--namespace", self.namespace, "--kubeconfig", kubeconfig]
        env = {**os.environ, "HOME": str(self.home), "KUBECACHEDIR": str(self.home / "kube-cache")}
        env.pop("KUBECONFIG", None)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env)
        if check:
            assert res.returncode == 0, f"helm {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr}"
        return res

    def install(self) -> None:
        self.helm("install", self.name, str(chart.CHART), "--create-namespace", *VALUES)

    def upgrade(self) -> None:
        self.helm("upgrade", self.name, str(chart.CHART), *VALUES)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.helm("status", self.name, "-o", "json").stdout)
        return out

    def manifest(self) -> list[dict[str, Any]]:
        """The release's objects as helm recorded them (``crds/`` is not part of it)."""
        return [d for d in yaml.safe_load_all(self.helm("get", "manifest", self.name).stdout) if d]

    @property
    def service(self) -> str:
        return f"{self.name}-controller"

    @property
    def secret_name(self) -> str:
        return f"{self.name}-controller-tls"

    def dns_names(self) -> list[str]:
        """The names the certificate must cover: the controller Service's, as the API server may use them."""
        svc, ns = self.service, self.namespace
        return [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]

    def secret(self) -> dict[str, Any]:
        return self.kube.get("secret", self.secret_name, self.namespace)

    def snapshot(self) -> Snapshot:
        """The stored Secret, controller Deployment and both webhook configurations (one request)."""
        names = [f"secret/{self.secret_name}", f"deployment/{self.service}"]
        names += [f"{kind.lower()}/{self.name}" for kind in WEBHOOK_KINDS]
        listed = self.kube.kubectl("get", *names, "-n", self.namespace, "-o", "json").stdout
        by_kind = {d["kind"]: d for d in json.loads(listed)["items"]}
        hooks = [hook for kind in WEBHOOK_KINDS for hook in by_kind[kind]["webhooks"]]
        return Snapshot(by_kind["Secret"], by_kind["Deployment"], hooks)

    def webhook_configurations(self) -> list[str]:
        """The stored webhook configurations of this release, by name or by the chart's instance label."""
        kinds = ",".join(kind.lower() for kind in WEBHOOK_KINDS)
        found = []
        for item in json.loads(self.kube.kubectl("get", kinds, "-o", "json").stdout)["items"]:
            meta = item["metadata"]
            if self.name in (meta["name"], meta.get("labels", {}).get("app.kubernetes.io/instance")):
                found.append(f"{item['kind']}/{meta['name']}")
        return found

    def remove(self) -> list[str]:
        """``helm uninstall`` (a no-op when the test did it), then whatever could remain outside the
        namespace deleted by name, then the namespace (not waited for). Returns the webhook configurations
        found after the uninstall, before they were deleted by name."""
        self.helm("uninstall", self.name, "--ignore-not-found", check=False)
        leftovers = self.webhook_configurations()
        names = [f"{kind.lower()}/{self.name}" for kind in WEBHOOK_KINDS]
        names += [
            f"{kind}/{self.name}-{part}" for kind in ("clusterrole", "clusterrolebinding") for part in PARTS
        ]
        self.kube.kubectl("delete", *names, "--ignore-not-found", check=False)
        self.kube.kubectl(
            "delete", "namespace", self.namespace, "--ignore-not-found", "--wait=false", check=False
        )
        return leftovers


@pytest.fixture
def release(kube: ControlPlane, tmp_path: Path) -> Iterator[HelmRelease]:
    """A freshly installed release (helm mode, failurePolicy Ignore), always uninstalled afterwards."""
    suffix = uuid.uuid4().hex[:6]
    rel = HelmRelease(kube, f"balancing-{suffix}", f"helm-{suffix}", tmp_path / "home")
    rel.home.mkdir()
    try:
        rel.install()
        yield rel
    finally:
        leftovers = rel.remove()
    assert leftovers == [], f"webhook configurations left after helm uninstall: {leftovers}"


# --- install and uninstall -----------------------------------------------------------------------------


def test_install_stores_every_object_and_uninstall_removes_all_but_the_crds(release: HelmRelease) -> None:
    kube = release.kube
    status = release.status()
    assert status["info"]["status"] == "deployed" and status["version"] == 1
    objects = release.manifest()
    kinds = {d["kind"] for d in objects}
    assert {"Secret", "Deployment", "DaemonSet", "Service", "ClusterRole", *WEBHOOK_KINDS} <= kinds
    assert "CustomResourceDefinition" not in kinds, "crds/ is installed apart and never part of a release"
    stored = _stored(kube, objects)
    assert {_key(d) for d in stored} == {_key(d) for d in objects}
    for doc in stored:  # owned by the release: helm refuses to adopt objects without these
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm", _key(doc)
        annotations = doc["metadata"]["annotations"]
        assert annotations["meta.helm.sh/release-name"] == release.name, _key(doc)
        assert annotations["meta.helm.sh/release-namespace"] == release.namespace, _key(doc)
    for crd in _chart_crds():
        conditions = kube.get("crd", crd)["status"]["conditions"]
        assert any(c["type"] == "Established" and c["status"] == "True" for c in conditions), crd
    snapshot = release.snapshot()
    assert [hook["failurePolicy"] for hook in snapshot.webhooks] == ["Ignore", "Ignore"]
    _check_certificate(release, snapshot)
    assert _release_records(release), "helm keeps the release in a Secret of its namespace"

    release.helm("uninstall", release.name)
    assert _stored(kube, objects) == [], "every object of the release is deleted"
    assert release.webhook_configurations() == []
    assert _release_records(release) == []
    assert json.loads(release.helm("list", "-o", "json").stdout) == []  # releases in any status
    for crd in _chart_crds():
        assert kube.exists("crd", crd), f"helm uninstall deleted {crd}"
    # --create-namespace made it and uninstall leaves it; nothing left in it holds its deletion
    kube.kubectl("delete", "namespace", release.namespace, "--timeout=60s")
    assert not kube.exists("namespace", release.namespace)


# --- upgrades: helm mode's certificate -----------------------------------------------------------------


def test_upgrade_with_unchanged_values_reuses_the_secret(release: HelmRelease) -> None:
    before = release.snapshot()
    release.upgrade()
    assert release.status()["version"] == 2
    after = release.snapshot()
    assert after.state() == before.state(), "the same certificate, key, CA, caBundle and checksum; no rollout"
    _check_certificate(release, after)


@pytest.mark.parametrize("stale", ["expiring", "renamed", "deleted"])
def test_upgrade_renews_a_stale_secret(release: HelmRelease, stale: str) -> None:
    """expiring: not-after within renewBeforeDays; renamed: made for other DNS names; deleted: the
    documented way to rotate by hand. The first two keep the previous CA in the caBundle for the upgrade
    that rotates; a deleted Secret leaves no previous CA to keep."""
    before = release.snapshot().state()
    soon = int(time.time()) + (RENEW_BEFORE_DAYS - 1) * DAY  # within renewBeforeDays by a day
    if stale == "deleted":
        release.kube.kubectl("delete", "secret", release.secret_name, "-n", release.namespace)
    elif stale == "expiring":
        _reapply_as_helm(release, {NOT_AFTER: str(soon)})
    else:
        _reapply_as_helm(release, {DNS_NAMES: f"old-controller.{release.namespace}.svc"})

    started = time.time()
    release.upgrade()
    rotated = release.snapshot()
    after = rotated.state()
    previous = None if stale == "deleted" else before["ca.crt"]
    new_ca = _check_certificate(release, rotated, previous_ca=previous)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        assert after[name] != before[name], name
    assert new_ca.public_bytes(serialization.Encoding.PEM) == base64.b64decode(after["ca.crt"])
    assert int(after["annotations"][NOT_AFTER]) >= started + (VALIDITY_DAYS - 1) * DAY
    assert after["annotations"][DNS_NAMES] == ",".join(release.dns_names())
    assert after["checksum"] != before["checksum"]
    assert after["generation"] == before["generation"] + 1, "the pod template changed: the controller rolls"

    # the next upgrade reuses the new pair, and the caBundle holds the new CA alone
    release.upgrade()
    again = release.snapshot()
    assert again.state() == {**after, "bundle": {after["ca.crt"]}}
    _check_certificate(release, again)


# --- helpers -------------------------------------------------------------------------------------------


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def _stored(kube: ControlPlane, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored versions of those of ``objects`` that exist."""
    as_list = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    out = kube.kubectl("get", "-f", "-", "-o", "json", "--ignore-not-found", input=as_list).stdout
    if not out.strip():
        return []
    loaded = json.loads(out)
    items: list[dict[str, Any]] = loaded["items"] if loaded["kind"] == "List" else [loaded]
    return items


def _chart_crds() -> list[str]:
    return [
        doc["metadata"]["name"]
        for path in sorted((chart.CHART / "crds").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _release_records(release: HelmRelease) -> list[str]:
    """helm's release records (its ``secret`` storage driver: labels owner=helm, name=<release>)."""
    selector = f"owner=helm,name={release.name}"
    out = release.kube.kubectl("get", "secrets", "-n", release.namespace, "-l", selector, "-o", "name")
    return out.stdout.split()


def _reapply_as_helm(release: HelmRelease, annotations: dict[str, str]) -> None:
    """Make the stored Secret look as an earlier ``helm upgrade`` left it, with ``annotations`` changed:
    server-side apply of the whole Secret by the field manager ``helm``, as helm 4 writes it. (A hand edit,
    ``kubectl annotate``, would make ``kubectl-annotate`` own the annotation, and helm's next apply then
    fails with a field conflict instead of rotating anything.)"""
    stored = release.secret()
    meta = stored["metadata"]
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": stored["type"],
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": meta["labels"],
            "annotations": {**meta["annotations"], **annotations},
        },
        "data": stored["data"],
    }
    release.kube.kubectl("apply", "--server-side", "--field-manager=helm", "-f", "-", input=json.dumps(doc))
    assert release.secret()["metadata"]["annotations"] == doc["metadata"]["annotations"]


def _pems(b64: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(base64.b64decode(b64))


def _check_certificate(
    release: HelmRelease, snapshot: Snapshot, previous_ca: str | None = None
) -> x509.Certificate:
    """The stored Secret is a kubernetes.io/tls pair for the Service's names signed by its ca.crt; both
    webhooks' caBundle is that CA (followed by ``previous_ca`` when given); the controller's pod template
    carries the certificate's checksum. Returns the CA."""
    secret = snapshot.secret
    assert secret["type"] == "kubernetes.io/tls"
    data = secret["data"]
    (ca,) = _pems(data["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    (bundle,) = snapshot.ca_bundles
    assert _pems(bundle) == [ca, *(_pems(previous_ca) if previous_ca else [])]
    (cert,) = _pems(data["tls.crt"])
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == release.dns_names()
    key = serialization.load_pem_private_key(base64.b64decode(data["tls.key"]), password=None)
    assert key.public_key() == cert.public_key()
    assert snapshot.checksum == hashlib.sha256(data["tls.crt"].encode()).hexdigest()
    return ca
