"""Shared pieces of the kernel tests: manifest builders, a datapath loaded in-process, the agent as a process.

Manifests are plain dicts in the Kubernetes JSON shape written as YAML files, so tests exercise the same
parser an operator's files go through. ``Datapath`` loads the real BPF object into a test-owned cgroup and
bpffs directory; ``AgentProcess`` runs ``python -m balancing agent`` exactly as an operator would.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import yaml

from balancing.datapath import loader, maps, programmed, writer
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendKey, Owner, PodRef, Protocol
from balancing_testkit.topology import Topology

# The socket hooks the datapath object attaches (no program runs at close since 0.4).
SOCKET_PROGRAMS = sorted(
    f"bl_{h}{v}" for h in ("connect", "sendmsg", "recvmsg", "getpeername") for v in (4, 6)
)
ROOT = Path(__file__).resolve().parents[2]
OBJECT = ROOT / "build/bpf/balancing.o"
SMALL_MAPS = {
    "max_services": 4096,
    "max_backends": 4096,
    "max_reverse": 4096,
    "max_affinity": 4096,
}

# --- manifests -----------------------------------------------------------------------------------------


def service(
    name: str,
    ips: Iterable[str],
    ports: Iterable[tuple[str, int, str, int | str]],
    *,
    namespace: str = "default",
    selector: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    """ports: (name, port, protocol, targetPort)."""
    ips = list(ips)
    spec: dict[str, Any] = {
        "clusterIP": ips[0],
        "clusterIPs": ips,
        "ports": [{"name": n, "port": p, "protocol": pr, "targetPort": t} for n, p, pr, t in ports],
    }
    if selector is not None:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels or {},
            "creationTimestamp": created,
        },
        "spec": spec,
    }


class Conditions(TypedDict, total=False):
    """An endpoint's conditions as keyword arguments of :func:`endpoint` (None: the condition left out)."""

    ready: bool | None
    serving: bool | None
    terminating: bool | None


def endpoint(
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str = "node-a",
) -> dict[str, Any]:
    cond = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


def endpoint_slice(
    svc: str,
    endpoints: list[dict[str, Any]],
    ports: Iterable[tuple[str, int, str]],
    *,
    name: str | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """ports: (name, port, protocol). The family is taken from the first endpoint."""
    family = "IPv6" if endpoints and ":" in endpoints[0]["addresses"][0] else "IPv4"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{svc}-{family.lower()}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": family,
        "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
        "endpoints": endpoints,
    }


def pod(
    name: str,
    ips: Iterable[str],
    labels: dict[str, str],
    ports: Iterable[tuple[str, int, str]],
    *,
    ready: bool = True,
    node: str = "node-a",
    namespace: str = "default",
) -> dict[str, Any]:
    ips = list(ips)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "main",
                    "ports": [{"name": n, "containerPort": p, "protocol": pr} for n, p, pr in ports],
                }
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ips[0],
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def write_manifest(directory: Path, name: str, docs: list[dict[str, Any]]) -> Path:
    """Write atomically (temp file + rename), as editors and ConfigMap volumes do."""
    path = directory / name
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.rename(path)
    return path


# --- the datapath in-process ----------------------------------------------------------------------------


@dataclass
class Datapath:
    """The real BPF object loaded into ``cgroup``, pinned under ``bpffs``, programmed by a real writer."""

    cgroup: Path
    bpffs: Path
    object_path: Path = OBJECT
    pod_cgroups: dict[PodRef, list[Path]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=lambda: dict(SMALL_MAPS))  # DatapathConfig capacities
    report: loader.LoadReport = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = loader.DatapathConfig(self.object_path, self.bpffs, self.cgroup, **self.sizes)
        self.report = loader.load(self.cfg)
        self.io = maps.KernelMaps(self.cfg.map_dir)
        self.writer = writer.MapWriter(
            self.io, lambda pod: [p.stat().st_ino for p in self.pod_cgroups.get(pod, [])]
        )

    def program_frontends(self, frontends: dict[str, Frontend]) -> writer.WriteStats:
        return self.writer.sync(DesiredState({parse_key(k): v for k, v in frontends.items()}))

    def program(self, frontends: dict[str, list[str]], affinity: int = 0) -> writer.WriteStats:
        """{"10.96.0.10:80/TCP": ["10.244.1.1:8080", ...]} → maps (``affinity``: timeout for all, seconds)."""
        return self.writer.sync(
            DesiredState({parse_key(k): frontend(v, affinity) for k, v in frontends.items()})
        )

    def close(self) -> None:
        self.io.close()
        loader.cleanup(self.bpffs)


def _split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_key(text: str) -> FrontendKey:
    addr, proto = text.split("/")
    host, port = _split_host_port(addr)
    return FrontendKey(ipaddress.ip_address(host), port, Protocol[proto])


def backends_of(texts: list[str]) -> tuple[Backend, ...]:
    parsed = [_split_host_port(b) for b in texts]
    return tuple(sorted(Backend(ipaddress.ip_address(h), p) for h, p in parsed))


def frontend(backends: list[str], affinity: int = 0) -> Frontend:
    return Frontend(Owner("Service", "test", "svc"), backends_of(backends), affinity_timeout=affinity)


def programmed_frontends(bpffs: Path) -> dict[str, list[str]]:
    """What the maps under ``bpffs`` hold, as {"ip:port/PROTO": ["ip:port", ...]} (sorted)."""
    io = maps.KernelMaps(bpffs / "maps")
    try:
        state = programmed.read_state(io)
    finally:
        io.close()
    return {
        str(k): sorted(str(programmed.backend_of(r)) if r else "MISSING" for r in f.slots)
        for k, f in state.frontends.items()
    }


# --- the agent as a process -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


class AgentProcess:
    """``balancing agent`` for one simulated node, started and stopped through the harness."""

    def __init__(
        self,
        topo: Topology,
        manifests: Path,
        node: str,
        *,
        bpf_object: Path = OBJECT,
        extra: list[str] | None = None,
    ) -> None:
        self.topo, self.manifests, self.node = topo, manifests, node
        self.bpffs = topo.bpffs / node
        self.cgroup = topo.node_cgroup(node)
        self.port = free_port()
        self.state_port = free_port()
        self.metrics_port = free_port()
        self.bpf_object = bpf_object
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[str] = []

    def start(self, *, wait: bool = True, manifests_flag: bool = True) -> AgentProcess:
        self.proc = self.topo.spawn(self.argv(manifests_flag=manifests_flag), label=f"agent-{self.node}")
        if wait:
            self.wait_ready()
        return self

    def argv(self, *, manifests_flag: bool = True) -> list[str]:
        """The agent's command line: this node's cgroup, bpffs, ports, object, small maps, ``extra``."""
        return [
            sys.executable,
            "-m",
            "balancing",
            "agent",
            *(["--manifests", str(self.manifests)] if manifests_flag else []),
            "--node-name",
            self.node,
            "--cgroup",
            str(self.cgroup),
            "--bpffs",
            str(self.bpffs),
            "--health-addr",
            f"127.0.0.1:{self.port}",
            "--state-addr",
            f"127.0.0.1:{self.state_port}",
            "--bpf-object",
            str(self.bpf_object),
            "--metrics-addr",
            f"127.0.0.1:{self.metrics_port}",
            *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MAPS.items()),
            *self.extra,
        ]

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET from the agent: ``/state`` from its state address, everything else from its health port."""
        port = self.state_port if path == "/state" else self.port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                return self.get("/readyz")[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, "the agent's /readyz")

    def stderr(self) -> str:
        assert self.proc is not None
        return self.topo.logs(self.proc)[1]

    def frontends(self) -> dict[str, list[str]]:
        return programmed_frontends(self.bpffs)

    def wait_frontends(
        self, predicate: Callable[[dict[str, list[str]]], bool], timeout: float = 3.0, what: str = "the maps"
    ) -> float:
        return wait_until(lambda: predicate(self.frontends()), timeout, what)

    def stop(self) -> str:
        assert self.proc is not None
        res = self.topo.stop(self.proc)
        return res.stderr

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)


# --- policy manifests (balancing.elf.io/v1beta1) and Nodes -----------------------------------------------

POLICY_API = "balancing.elf.io/v1beta1"
PolicyPorts = Iterable[tuple[str, int, str]]  # (name, port, protocol); name "" for an unnamed port


def _policy_ports(ports: PolicyPorts) -> list[dict[str, str]]:
    out = []
    for name, port, protocol in ports:
        entry = {"port": str(port), "protocol": protocol}
        if name:
            entry["name"] = name
        out.append(entry)
    return out


def _policy_frontend(service: str | None, address: str | None, ports: PolicyPorts | None) -> dict[str, Any]:
    """``service`` "namespace/name" (serviceMatcher) or ``address`` (addressMatcher)."""
    if (service is None) == (address is None):
        raise ValueError("give exactly one of service= or address=")
    if service is not None:
        namespace, _, name = service.rpartition("/")
        matcher: dict[str, Any] = {"serviceName": name, "namespace": namespace or "default"}
        if ports is not None:
            matcher["toPorts"] = _policy_ports(ports)
        return {"serviceMatcher": matcher}
    return {"addressMatcher": {"ip": address, "toPorts": _policy_ports(ports or [])}}


def _policy_config(
    node_selector: dict[str, Any] | None, enable_out_cluster: bool | None, qos_limit: int | None = None
) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if node_selector is not None:
        config["nodeLabelSelector"] = node_selector
    if enable_out_cluster is not None:
        config["enableOutCluster"] = enable_out_cluster
    if qos_limit is not None:
        config["qosLimit"] = qos_limit
    return config


def _policy_doc(kind: str, name: str, created: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": POLICY_API,
        "kind": kind,
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": spec,
    }


def local_redirect_policy(
    name: str,
    *,
    service: str | None = None,
    address: str | None = None,
    front_ports: PolicyPorts | None = None,
    selector: dict[str, str] | dict[str, Any],
    back_ports: PolicyPorts,
    skip_redirect_from_backend: bool | None = None,
    qos_limit: int | None = None,
    node_selector: dict[str, Any] | None = None,
    enable_out_cluster: bool | None = None,
    enabled: bool | None = None,
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    """A LocalRedirectPolicy. ``selector``: matchLabels, or a full LabelSelector when it has
    ``matchLabels``/``matchExpressions`` keys. ``service`` is "namespace/name"."""
    spec: dict[str, Any] = {
        "frontend": _policy_frontend(service, address, front_ports),
        "backend": {"endpointSelector": _selector(selector), "toPorts": _policy_ports(back_ports)},
    }
    if skip_redirect_from_backend is not None:
        spec["skipRedirectFromBackend"] = skip_redirect_from_backend
    config = _policy_config(node_selector, enable_out_cluster, qos_limit)
    if config:
        spec["config"] = config
    if enabled is not None:
        spec["enabled"] = enabled
    return _policy_doc("LocalRedirectPolicy", name, created, spec)


def balancing_policy(
    name: str,
    *,
    service: str | None = None,
    address: str | None = None,
    front_ports: PolicyPorts | None = None,
    selector: dict[str, str] | dict[str, Any] | None = None,
    addresses: Iterable[str] | None = None,
    back_ports: PolicyPorts,
    mode: str | None = None,
    node_selector: dict[str, Any] | None = None,
    enable_out_cluster: bool | None = None,
    enabled: bool | None = None,
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    """A BalancingPolicy: ``selector`` (serviceEndpoint, with ``mode`` as redirectMode) or ``addresses``
    (addressEndpoint)."""
    if (selector is None) == (addresses is None):
        raise ValueError("give exactly one of selector= or addresses=")
    backend: dict[str, Any]
    if selector is not None:
        endpoint_: dict[str, Any] = {
            "endpointSelector": _selector(selector),
            "toPorts": _policy_ports(back_ports),
        }
        if mode is not None:
            endpoint_["redirectMode"] = mode
        backend = {"serviceEndpoint": endpoint_}
    else:
        assert addresses is not None
        backend = {"addressEndpoint": {"addresses": list(addresses), "toPorts": _policy_ports(back_ports)}}
    spec: dict[str, Any] = {"frontend": _policy_frontend(service, address, front_ports), "backend": backend}
    config = _policy_config(node_selector, enable_out_cluster)
    if config:
        spec["config"] = config
    if enabled is not None:
        spec["enabled"] = enabled
    return _policy_doc("BalancingPolicy", name, created, spec)


def _selector(selector: dict[str, Any]) -> dict[str, Any]:
    if "matchLabels" in selector or "matchExpressions" in selector:
        return selector
    return {"matchLabels": selector}


def node(
    name: str,
    internal_ips: Iterable[str] = (),
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node with InternalIP addresses, labels and annotations."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip} for ip in internal_ips]},
    }
