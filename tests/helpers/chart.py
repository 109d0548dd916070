"""The Helm chart on the real control plane: ``helm template`` applied server-side, and the controller run
as a local process in place of its Deployment.

- ``install(kube)``: a release with a unique name (``balancing-<hex>``: the chart's cluster-scoped objects,
  ClusterRoles and webhook configurations, are named after it) rendered by ``helm template`` (certificate
  mode ``helm``, the server's Kubernetes version as ``--kube-version``) into a fresh namespace, applied as the
  admin: the CRDs first (and waited for until Established), then everything else. The DaemonSet and the
  Deployment are accepted but nothing runs them: the fixture has no kubelet and no scheduler.
  ``Release.uninstall()`` deletes the cluster-scoped objects and the namespace; the CRDs stay, as
  ``helm uninstall`` leaves them (and other tests of the session use them).
- ``Release.serve_webhooks_locally(address)``: the one adaptation the webhooks need here. The API server
  resolves a webhook's ``service`` reference with its ClusterIP service resolver, which for a Service of
  ``type: ExternalName`` answers ``https://<externalName>:<port of the webhook>``, and always verifies the
  serving certificate against ``<svc>.<ns>.svc``; it runs on 127.0.0.1 of the root network namespace and
  could reach no pod anyway. So the rendered controller Service is replaced by an ExternalName Service of
  the same name and port pointing at ``localhost`` (or at the loopback address the controller listens on),
  and the webhook configurations stay exactly as rendered.
- ``webhook_address()``: where the local controller can listen on port 443 (the port the chart's webhooks
  name): 127.0.0.1 when that port is free, else another loopback address.
- ``ControllerProcess``: ``balancing controller`` with the rendered Secret's certificate and key and a
  kubeconfig of the controller ServiceAccount's token (TokenRequest), its log kept for the tests.

Users: tests/cluster/test_apiserver_webhooks.py, tests/cluster/test_apiserver_rbac.py.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import k8stools
from helpers.controlplane import ControlPlane
from helpers.support import balancing_policy, local_redirect_policy

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/balancing"
WEBHOOK_PORT = 443  # clientConfig.service.port in templates/webhooks.yaml
CLUSTER_SCOPED = {
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


def server_version(kube: ControlPlane) -> str:
    """The API server's version without the ``v`` (e.g. ``1.37.2``), for ``helm template --kube-version``."""
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    return str(version).lstrip("v")


def render(
    release: str, namespace: str, *extra: str, kube_version: str | None = None
) -> list[dict[str, Any]]:
    """``helm template RELEASE deploy/helm/balancing --namespace NS --include-crds EXTRA``, parsed."""
    argv = [str(k8stools.helm()), "template", release, str(CHART), "--namespace", namespace, "--include-crds"]
    if kube_version:
        argv += ["--kube-version", kube_version]
    proc = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def webhook_address() -> tuple[str, str]:
    """``(listen host, externalName)`` for the local controller on port 443: ``127.0.0.1`` and ``localhost``
    when that port is free there; else (another process holds it, e.g. a parallel run) a random other
    loopback address, named by its IP (the API server dials the externalName as it stands)."""
    candidates = ["127.0.0.1"] + [
        f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.1" for _ in range(20)
    ]
    for host in candidates:
        with socket.socket() as s:
            try:
                s.bind((host, WEBHOOK_PORT))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
        return host, "localhost" if host == "127.0.0.1" else host
    raise RuntimeError(f"port {WEBHOOK_PORT} is taken on every loopback address tried")


Sample = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def samples(text: str) -> dict[Sample, float]:
    """Every sample of a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@dataclass
class Release:
    """One rendered and applied release of the chart."""

    kube: ControlPlane
    name: str
    namespace: str
    objects: list[dict[str, Any]]
    applied: list[str] = field(default_factory=list)  # kubectl's report, one line per object

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.objects if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} rendered {kind} {name or ''}"
        return found[0]

    @property
    def fullname(self) -> str:
        return self.name  # the release name contains the chart's name: _helpers.tpl uses it as it is

    @property
    def controller_service(self) -> str:
        return f"{self.fullname}-controller"

    @property
    def agent_account(self) -> str:
        return f"{self.fullname}-agent"

    @property
    def controller_account(self) -> str:
        return f"{self.fullname}-controller"

    def tls(self) -> dict[str, bytes]:
        """The rendered kubernetes.io/tls Secret's files (tls.crt, tls.key, ca.crt)."""
        secret = self.one("Secret", f"{self.fullname}-controller-tls")
        return {k: base64.b64decode(v) for k, v in secret["data"].items()}

    def write_tls(self, directory: Path) -> tuple[Path, Path, Path]:
        """The Secret's files in ``directory`` as the pod would mount them: (tls.crt, tls.key, ca.crt)."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, data in self.tls().items():
            path = directory / name
            path.write_bytes(data)
            path.chmod(0o600)
            paths.append(path)
        return directory / "tls.crt", directory / "tls.key", directory / "ca.crt"

    def kubeconfig_of(self, account: str, path: Path) -> Path:
        """A kubeconfig with a bound token (TokenRequest) of the release's ServiceAccount ``account``."""
        return self.kube.kubeconfig_for(self.kube.token(account, self.namespace), path)

    def serve_webhooks_locally(self, external_name: str) -> dict[str, Any]:
        """Replace the rendered controller Service by an ExternalName Service of the same name and ports
        (see the module docstring); returns the Service as stored."""
        rendered = self.one("Service", self.controller_service)
        self.kube.kubectl("delete", "service", self.controller_service, "-n", self.namespace)
        local = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": rendered["metadata"],
            "spec": {
                "type": "ExternalName",
                "externalName": external_name,
                "ports": rendered["spec"]["ports"],
            },
        }
        self.kube.apply([local])
        return self.kube.get("service", self.controller_service, self.namespace)

    def uninstall(self) -> None:
        """Delete what the release made outside its namespace (not the CRDs), then the namespace."""
        for doc in self.objects:
            if doc["kind"] in CLUSTER_SCOPED and doc["kind"] != "CustomResourceDefinition":
                self.kube.kubectl(
                    "delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found", check=False
                )
        self.kube.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)


def install(kube: ControlPlane, *extra: str) -> Release:
    """Render a fresh release into a fresh namespace and apply it (see the module docstring). The caller
    calls ``uninstall()``."""
    namespace = kube.create_namespace("chart")
    name = f"balancing-{uuid.uuid4().hex[:6]}"
    objects = render(name, namespace, *extra, kube_version=server_version(kube))
    release = Release(kube, name, namespace, objects)
    try:
        crds = release.of_kind("CustomResourceDefinition")
        rest = [d for d in objects if d["kind"] != "CustomResourceDefinition"]
        if crds:
            release.applied += _apply(kube, crds)
            names = [f"crd/{d['metadata']['name']}" for d in crds]
            kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
        release.applied += _apply(kube, rest)
    except BaseException:
        release.uninstall()
        raise
    return release


def _apply(kube: ControlPlane, docs: list[dict[str, Any]]) -> list[str]:
    text = "\n---\n".join(json.dumps(d) for d in docs)
    res = kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=text)
    return res.stdout.splitlines()


class ControllerProcess:
    """``balancing controller`` as a local process: HTTPS on ``host:443`` with the release's certificate,
    following the API server with ``kubeconfig``."""

    def __init__(self, release: Release, workdir: Path, host: str, kubeconfig: Path) -> None:
        self.release, self.host, self.kubeconfig = release, host, kubeconfig
        self.cert, self.key, self.ca = release.write_tls(workdir / "tls")
        self.log = workdir / "controller.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def server_name(self) -> str:
        """The name the API server checks the serving certificate against."""
        return f"{self.release.controller_service}.{self.release.namespace}.svc"

    def start(self, timeout: float = 30.0) -> ControllerProcess:
        argv = [
            sys.executable,
            "-m",
            "balancing",
            "controller",
            "--listen",
            f"{self.host}:{WEBHOOK_PORT}",
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
            "--kubeconfig",
            str(self.kubeconfig),
            "--log-level",
            "debug",
        ]
        self._out = self.log.open("ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while (self.get("/readyz") or (0, ""))[0] != 200:
            if self.popen.poll() is not None:
                raise AssertionError(f"the controller exited {self.popen.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the controller was not ready within {timeout}s:\n{self.text()}")
            time.sleep(0.1)
        return self

    def get(self, path: str) -> tuple[int, str] | None:
        """``(status, body)`` of GET ``path``, the certificate verified as the API server verifies it:
        against the CA of the caBundle, for the name ``<svc>.<ns>.svc`` (None: no answer)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        request = f"GET {path} HTTP/1.1\r\nHost: {self.server_name}\r\nConnection: close\r\n\r\n"
        try:
            with (
                socket.create_connection((self.host, WEBHOOK_PORT), timeout=2) as raw,
                ctx.wrap_socket(raw, server_hostname=self.server_name) as tls,
            ):
                tls.sendall(request.encode())
                answer = tls.makefile("rb").read().decode(errors="replace")
        except OSError:  # ssl.SSLError too
            return None
        head, _, body = answer.partition("\r\n\r\n")
        parts = head.split(maxsplit=2)
        return (int(parts[1]), body) if len(parts) > 1 and parts[1].isdigit() else None

    def decisions(self) -> dict[tuple[str, str, str, str], float]:
        """The controller's admission decision counter: ``(kind, operation, webhook, allowed) -> count``."""
        got = self.get("/metrics")
        assert got is not None and got[0] == 200, f"/metrics: {got}"
        counts: dict[tuple[str, str, str, str], float] = {}
        for (name, labels), value in samples(got[1]).items():
            if name == "balancing_controller_admission_decisions_total":
                d = dict(labels)
                counts[(d["kind"], d["operation"], d["webhook"], d["allowed"])] = value
        return counts

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.popen = None
        if self._out is not None:
            self._out.close()
            self._out = None


def policy(release: Release, kind: str, name: str = "", prefix: str = "pol") -> dict[str, Any]:
    """A valid policy of ``kind`` (by default named ``<prefix>-<kind>-<random>``), its frontend a Service of
    ``release``'s namespace (no other test's policy claims it), labelled with the release, and without any
    field the defaults fill."""
    name = name or f"{prefix}-{kind.lower()[:3]}-{uuid.uuid4().hex[:6]}"
    service = f"{release.namespace}/svc-{name}"
    if kind == "LocalRedirectPolicy":
        doc = local_redirect_policy(
            name, service=service, selector={"app": "dns"}, back_ports=[("", 53, "UDP")]
        )
    else:
        doc = balancing_policy(name, service=service, selector={"app": "web"}, back_ports=[("", 8080, "TCP")])
    doc["metadata"] = {"name": name, "labels": {"test-release": release.name}}
    return doc
