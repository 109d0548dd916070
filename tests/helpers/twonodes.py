"""A two-node cluster on one kernel for the Service conformance cases, and the manifests they write.

Layout (built by the ``two_nodes`` fixture in ``tests/conformance/conftest.py``)::

    node-a (cgroup node-a, zone zone-a)            node-b (cgroup node-b, zone zone-b)
      host-a   netns 10.244.2.1 / fd00:244::2:1      host-b   netns 10.244.2.2 / fd00:244::2:2
               = node-a's InternalIPs                         = node-b's InternalIPs
               ExternalIP 192.0.2.11 (routed nowhere)         ExternalIP 192.0.2.12
      pod-a1, pod-a2   backends "pod-a1", "pod-a2"    pod-b1, pod-b2   backends "pod-b1", "pod-b2"
                       on TCP+UDP 8080                                  on TCP+UDP 8080
      pause-a  a client pod                           pause-b  a client pod
      agent    balancing agent --node-name node-a     agent    balancing agent --node-name node-b
               own cgroup, own bpffs,                          own cgroup, own bpffs,
               healthCheckNodePorts on 127.0.0.2               healthCheckNodePorts on 127.0.0.3

Both agents read the SAME manifest directory (as two kube-proxies watch the same API server). Every process
of a pod or host netns runs in its node's cgroup, so its ``connect()``/``sendmsg()`` is translated by that
node's agent: "a pod on node-b" is a netns whose processes run in cgroup node-b. A host netns plays the
node's host network namespace (hostNetwork pods, kubelet, ``curl`` on the node): its addresses are the
InternalIPs in the Node objects, and ``127.0.0.1`` inside it is the node's loopback.

Translation happens in the client's kernel at ``connect()``; a VIP that is not translated hits an
``unreachable`` route (EHOSTUNREACH) and an unknown address ENETUNREACH, so any answer proves translation.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import pytest

from balancing_testkit.topology import Client, Host, Pod, Topology
from helpers.support import AgentProcess, Conditions, endpoint, endpoint_slice, wait_until, write_manifest
from helpers.support import pod as support_pod
from helpers.support import service as _service

NODES = ("node-a", "node-b")
ZONES = {"node-a": "zone-a", "node-b": "zone-b"}
HEALTHCHECK_ADDRESS = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}
# the nodes' ExternalIPs (RFC 5737): routed nowhere here, so an answer proves a NodePort translation
EXTERNAL_IPS = {"node-a": "192.0.2.11", "node-b": "192.0.2.12"}
BACKEND_PORT = 8080

Doc = dict[str, Any]
Frontends = dict[str, list[str]]


# --- the agent's command line ------------------------------------------------------------------------------


@functools.cache
def agent_flags() -> frozenset[str]:
    """The long options ``balancing agent`` accepts (features are being added while this suite is written)."""
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "balancing", "agent", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    ).stdout
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", out))


def require_flags(*flags: str) -> None:
    """Fail (not skip: a missing feature is a conformance gap) when the agent lacks one of ``flags``."""
    missing = [f for f in flags if f not in agent_flags()]
    if missing:
        pytest.fail(f"`balancing agent` has no {', '.join(missing)} option (yet)", pytrace=False)


# --- manifests ---------------------------------------------------------------------------------------------


def node_object(name: str, host: Host) -> Doc:
    """A Node whose InternalIPs are ``host``'s addresses (and an ExternalIP), labelled with its zone."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": ZONES[name]},
        },
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": host.ip4},
                {"type": "InternalIP", "address": host.ip6},
                {"type": "ExternalIP", "address": EXTERNAL_IPS[name]},
                {"type": "Hostname", "address": name},
            ]
        },
    }


def service(
    name: str,
    ips: Iterable[str],
    ports: Iterable[tuple[str, int, str, int | str]],
    *,
    node_ports: dict[str, int] | None = None,
    labels: dict[str, str] | None = None,
    selector: dict[str, str] | None = None,
    **spec: Any,
) -> Doc:
    """``support.service`` plus any other ``spec`` field (camelCase keyword arguments, e.g. ``type=``,
    ``sessionAffinity=``, ``externalTrafficPolicy=``) and ``node_ports`` {port name: nodePort}.
    A ``status`` keyword becomes the Service's status (load-balancer ingress)."""
    doc = _service(name, ips, ports, labels=labels, selector=selector)
    status = spec.pop("status", None)
    doc["spec"].update(spec)
    for port in doc["spec"]["ports"]:
        if node_ports and port["name"] in node_ports:
            port["nodePort"] = node_ports[port["name"]]
    if status is not None:
        doc["status"] = status
    return doc


def affinity(timeout: int | None = None) -> dict[str, Any]:
    """Spec fields for ``sessionAffinity: ClientIP`` (with ``timeoutSeconds`` if given)."""
    spec: dict[str, Any] = {"sessionAffinity": "ClientIP"}
    if timeout is not None:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}
    return spec


def slice_for(
    svc: str,
    endpoints: list[Doc],
    ports: Iterable[tuple[str, int, str]] = (("http", BACKEND_PORT, "TCP"),),
    *,
    name: str | None = None,
) -> Doc:
    """An EndpointSlice as the endpoint-slice controller writes it (``support.endpoint_slice``)."""
    return endpoint_slice(svc, endpoints, ports, name=name)


def ep(pod: Host, node: str | None = None, **conditions: Unpack[Conditions]) -> Doc:
    """An endpoint for ``pod`` on its node (``ready``/``serving``/``terminating`` as keyword arguments)."""
    return endpoint(pod.ip4, node=node or pod.node or "", **conditions)


def ep6(pod: Host, node: str | None = None, **conditions: Unpack[Conditions]) -> Doc:
    return endpoint(pod.ip6, node=node or pod.node or "", **conditions)


# conditions the endpoint-slice controller writes for a pod ...
READY: Conditions = {"ready": True, "serving": True, "terminating": False}
UNREADY: Conditions = {"ready": False, "serving": False, "terminating": False}  # readiness probe fails
TERMINATING: Conditions = {
    "ready": False,
    "serving": True,
    "terminating": True,
}  # deleted, still serving
TERMINATING_UNREADY: Conditions = {"ready": False, "serving": False, "terminating": True}
# ... and for the same pods when the Service has publishNotReadyAddresses (ready is forced to true)
PUBLISHED_UNREADY: Conditions = {"ready": True, "serving": False, "terminating": False}
PUBLISHED_TERMINATING_UNREADY: Conditions = {"ready": True, "serving": False, "terminating": True}


def external_name_service(name: str, target: str = "externalsvc.example.com") -> Doc:
    """A ``type: ExternalName`` Service as the API server stores it (no cluster IP: a DNS alias only)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": "ExternalName", "externalName": target},
    }


def evicted_pod(name: str, pod: Host, labels: dict[str, str]) -> Doc:
    """A Pod the kubelet evicted: phase Failed, reason Evicted, not ready."""
    doc = support_pod(name, [pod.ip4, pod.ip6], labels, [("http", BACKEND_PORT, "TCP")], node=pod.node or "")
    doc["status"].update(
        {"phase": "Failed", "reason": "Evicted", "conditions": [{"type": "Ready", "status": "False"}]}
    )
    return doc


def key(ip: str, port: int, proto: str = "TCP") -> str:
    """A frontend as ``AgentProcess.frontends()`` names it: ``10.96.0.1:80/TCP``, ``[fd00::1]:80/UDP``."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}/{proto}"


# --- the cluster -------------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    host: Client  # the node's host network namespace; its addresses are the Node's InternalIPs
    pods: list[Pod]  # backend pods
    client: Pod  # a client ("pause") pod
    agent: AgentProcess
    healthcheck_address: str

    @property
    def ip4(self) -> str:
        return self.host.ip4

    @property
    def ip6(self) -> str:
        return self.host.ip6

    @property
    def external_ip(self) -> str:
        return EXTERNAL_IPS[self.name]


@dataclass
class TwoNodes:
    topo: Topology
    manifests: Path
    a: Node
    b: Node
    agent_args: list[str] = field(default_factory=list)
    _syncs: int = 0

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.a, self.b

    @property
    def agents(self) -> list[AgentProcess]:
        return [n.agent for n in self.nodes]

    def pod(self, name: str) -> Pod:
        return self.topo.pods[name]

    # -- manifests -------------------------------------------------------------------------------------

    def apply(self, name: str, docs: list[Doc]) -> None:
        """Write (atomically replace) one manifest file both agents read."""
        write_manifest(self.manifests, f"{name}.yaml", docs)

    def apply_synced(self, name: str, docs: list[Doc]) -> None:
        """``apply``, then wait until both agents have acted on that version of the file.

        For changes that leave the programmed backends as they were (the point of some steps): the file
        also holds a marker Service with a fresh cluster IP, and an agent ingests a file's objects together,
        so once the marker's frontend is in its maps, so is everything else the file says."""
        self._syncs += 1
        marker_ip = f"10.96.255.{self._syncs}"
        marker = _service(f"{name}-sync-marker", [marker_ip], [("", 1, "TCP", 1)])
        self.apply(name, [*docs, marker])
        self.wait_frontends(key(marker_ip, 1))

    def delete(self, name: str) -> None:
        (self.manifests / f"{name}.yaml").unlink()

    # -- waiting for both agents -----------------------------------------------------------------------

    def wait(self, predicate: Callable[[Frontends], bool], what: str, timeout: float = 5.0) -> None:
        """Poll until ``predicate`` holds for the maps of both agents."""
        for agent in self.agents:
            agent.wait_frontends(predicate, timeout=timeout, what=f"{what} on {agent.node}")

    def wait_frontends(self, *keys: str, backends: int | None = None, timeout: float = 5.0) -> None:
        """Both agents program every one of ``keys`` (with exactly ``backends`` backends, if given)."""

        def ok(f: Frontends) -> bool:
            return all(k in f and (backends is None or len(f[k]) == backends) for k in keys)

        n = "" if backends is None else f" with {backends} backends"
        self.wait(ok, f"{', '.join(keys)}{n}", timeout)

    def wait_on(self, node: Node, k: str, backends: int, timeout: float = 5.0) -> None:
        """``node``'s agent programs frontend ``k`` with exactly ``backends`` backends."""
        node.agent.wait_frontends(
            lambda f: k in f and len(f[k]) == backends,
            timeout=timeout,
            what=f"{k} with {backends} backends on {node.name}",
        )

    def wait_affinity(self, k: str, timeout_seconds: int, timeout: float = 5.0) -> None:
        """Both agents program frontend ``k`` with session affinity ``timeout_seconds`` (0: none)."""
        for agent in self.agents:
            wait_until(
                functools.partial(_has_affinity, agent, k, timeout_seconds),
                timeout,
                f"affinity {timeout_seconds}s on {k} on {agent.node}",
            )

    def wait_gone(self, *keys: str, timeout: float = 5.0) -> None:
        self.wait(lambda f: not any(k in f for k in keys), f"{', '.join(keys)} to be removed", timeout)

    def node_port_keys(self, port: int, proto: str = "TCP", v6: bool = False) -> list[str]:
        """The NodePort frontends of ``port``: every node's InternalIPs and ExternalIP, and loopback."""
        ips = [ip for n in self.nodes for ip in (n.ip4, n.external_ip)] + ["127.0.0.1"]
        if v6:
            ips += [n.ip6 for n in self.nodes] + ["::1"]
        return [key(ip, port, proto) for ip in ips]

    # -- agents ----------------------------------------------------------------------------------------

    def restart_agents(self, *, kill: bool = False) -> None:
        """Stop both agents (SIGTERM, or SIGKILL with ``kill``) and start new ones with the same options."""
        for node in self.nodes:
            old = node.agent
            if kill:
                old.kill()
            else:
                old.stop()
            node.agent = AgentProcess(self.topo, self.manifests, node.name, extra=old.extra)
        for node in self.nodes:
            self._start_agent(node.agent)
        for node in self.nodes:
            node.agent.wait_ready(timeout=self.agent_ready_timeout)

    agent_ready_timeout = 20.0

    def _start_agent(self, agent: AgentProcess) -> None:
        """Start ``agent`` (not waiting): in manifest mode, on the shared directory."""
        agent.start(wait=False)

    # -- traffic ---------------------------------------------------------------------------------------

    def tcp(self, src: Host, host: str, port: int, count: int = 20, **opts: Any) -> dict[str, Any]:
        """``count`` TCP connects from ``src`` (its netns, its node's cgroup); client.py's JSON result."""
        return self.run(src, "tcp", host, port, count, **opts)

    def udp(self, src: Host, host: str, port: int, count: int = 20, **opts: Any) -> dict[str, Any]:
        """``count`` UDP request/replies, each on a new connected socket."""
        return self.run(src, "udp-connected", host, port, count, **opts)

    def run(self, src: Host, mode: str, host: str, port: int, count: int, **opts: Any) -> dict[str, Any]:
        args: list[str | int] = [mode, host, port, "--count", count, "--timeout", opts.pop("timeout", 2)]
        for name, value in opts.items():
            args += [f"--{name.replace('_', '-')}", value]
        return self.topo.run_client(src, None, args)

    # -- healthCheckNodePort ---------------------------------------------------------------------------

    def healthcheck(self, node: Node, port: int) -> tuple[int, dict[str, Any] | None]:
        """GET /healthz on ``node``'s healthCheckNodePort: (status, JSON body); (0, None): no listener."""
        url = f"http://{node.healthcheck_address}:{port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)
        except OSError:
            return 0, None

    def wait_healthcheck(self, node: Node, port: int, status: int, timeout: float = 5.0) -> dict[str, Any]:
        """Poll ``node``'s healthCheckNodePort until it answers ``status`` (0: until nothing listens);
        returns the JSON body."""
        seen: list[tuple[int, dict[str, Any] | None]] = []

        def check() -> bool:
            seen.append(self.healthcheck(node, port))
            return seen[-1][0] == status

        try:
            wait_until(check, timeout, f"healthCheckNodePort {port} on {node.name} to answer {status}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer {seen[-1] if seen else None}") from None
        return seen[-1][1] or {}


def addresses_of(result: dict[str, Any]) -> list[str]:
    """The client addresses the backends saw (``seen_by_backend``), normalised."""
    return sorted(str(ipaddress.ip_address(a)) for a in result["seen_by_backend"])


def _has_affinity(agent: AgentProcess, k: str, seconds: int) -> bool:
    return affinity_of(agent.bpffs).get(k) == seconds


def affinity_of(bpffs: Path) -> dict[str, int]:
    """{frontend: session-affinity timeout in seconds (0: none)} as an agent's maps hold it."""
    from balancing.datapath import maps, programmed

    io = maps.KernelMaps(bpffs / "maps")
    try:
        state = programmed.read_state(io)
    finally:
        io.close()
    return {str(k): f.affinity_timeout for k, f in state.frontends.items()}
