"""Balancing agents on the north-south topology: one per node namespace, north-south on the node's uplink.

``NsCluster`` puts an agent in each node of a ``balancing_testkit.nstopology.NsTopology`` (started with
``nsenter --net`` into the node's namespace, so its TC programs attach to that node's ``uplink0`` and its
health and state ports are the node's loopback), all reading one manifest directory with the two Node objects,
and writes Services and EndpointSlices for the topology's pods. Requests to an agent's ports are made from a
thread switched into the node's namespace. Neighbours: ``balancing_testkit.nstopology`` (the namespaces, the
client and the pods' servers), ``helpers.support`` (``AgentProcess``, manifests).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from balancing_testkit.nstopology import NsNode, NsTopology
from balancing_testkit.topology import in_netns
from helpers.support import (
    AgentProcess,
    endpoint,
    endpoint_slice,
    service,
    wait_until,
    write_manifest,
)

Doc = dict[str, Any]
NODE_PORT = 30080


class NsAgent(AgentProcess):
    """``balancing agent`` inside a node's network namespace, north-south on its uplink."""

    def __init__(self, ns: NsTopology, node: NsNode, manifests: Path, extra: Sequence[str] = ()) -> None:
        super().__init__(ns.topo, manifests, node.name, extra=["--nodeport-devices", node.uplink, *extra])
        self.ns, self.ns_node = ns, node

    def start(self, *, wait: bool = True, manifests_flag: bool = True) -> NsAgent:
        argv = [*self.argv(manifests_flag=manifests_flag), "--no-terminate-udp-sockets"]
        self.proc = self.topo.spawn(argv, netns=self.ns_node.netns, label=f"agent-{self.node}")
        if wait:
            self.wait_ready()
        return self

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        port = self.state_port if path == "/state" else self.port
        with in_netns(self.ns_node.netns):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    return r.status, json.load(r)
            except urllib.error.HTTPError as exc:
                return exc.code, json.load(exc)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with in_netns(self.ns_node.netns), urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())

    def run_cli(self, *args: str) -> str:
        """``balancing ARGS --bpffs <this agent's>`` in the node's namespace; its stdout."""
        argv = [sys.executable, "-m", "balancing", *args, "--bpffs", str(self.bpffs)]
        return self.ns.run(self.ns_node, argv).stdout


def node_object(node: NsNode) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.ip4},
                {"type": "InternalIP", "address": node.ip6},
                {"type": "Hostname", "address": node.name},
            ]
        },
    }


def external_service(
    name: str,
    cluster_ips: Sequence[str],
    ports: Iterable[tuple[str, int, str, int, int]],
    *,
    kind: str = "NodePort",
    local: bool = False,
    lb_ips: Sequence[str] = (),
    external_ips: Sequence[str] = (),
    source_ranges: Sequence[str] = (),
) -> Doc:
    """A Service reachable from outside. ports: (name, port, protocol, targetPort, nodePort)."""
    doc = service(name, cluster_ips, [(n, p, pr, t) for n, p, pr, t, _ in ports])
    spec = doc["spec"]
    spec["type"] = kind
    spec["ipFamilies"] = sorted({"IPv6" if ":" in ip else "IPv4" for ip in cluster_ips})
    spec["ipFamilyPolicy"] = "PreferDualStack" if len(cluster_ips) > 1 else "SingleStack"
    for entry, (_n, _p, _pr, _t, node_port) in zip(spec["ports"], ports, strict=True):
        entry["nodePort"] = node_port
    spec["externalTrafficPolicy"] = "Local" if local else "Cluster"
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    if lb_ips:
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return doc


def slices(name: str, pods: Iterable[Any], ports: Iterable[tuple[str, int, str]]) -> list[Doc]:
    """IPv4 and IPv6 EndpointSlices of ``pods`` (balancing_testkit.nstopology pods: name, ip4, ip6, node)."""
    chosen = list(pods)
    ports = list(ports)
    return [
        endpoint_slice(name, [endpoint(p.ip4, node=p.node) for p in chosen], ports, name=f"{name}-v4"),
        endpoint_slice(name, [endpoint(p.ip6, node=p.node) for p in chosen], ports, name=f"{name}-v6"),
    ]


class NsCluster:
    """The topology, a manifest directory with its Nodes, and one agent per node."""

    def __init__(self, ns: NsTopology, manifests: Path, extra: Sequence[str] = ()) -> None:
        self.ns, self.manifests = ns, manifests
        manifests.mkdir(parents=True, exist_ok=True)
        write_manifest(manifests, "nodes.yaml", [node_object(n) for n in ns.nodes])
        self.agents = {n.name: NsAgent(ns, n, manifests, extra) for n in ns.nodes}

    def start(self) -> NsCluster:
        for agent in self.agents.values():
            agent.start(wait=False)
        for agent in self.agents.values():
            agent.wait_ready()
        return self

    def apply(self, name: str, docs: list[Doc]) -> None:
        write_manifest(self.manifests, f"{name}.yaml", docs)

    def wait_programmed(self, keys: Iterable[str], timeout: float = 10.0) -> None:
        """Until every agent's maps hold frontends ``keys`` (``ip:port/PROTO``, as in ``frontends()``)."""
        wanted = set(keys)
        for agent in self.agents.values():
            wait_until(partial(_holds, agent, wanted), timeout, f"{wanted} on {agent.node}")


def _holds(agent: NsAgent, keys: set[str]) -> bool:
    return keys <= set(agent.frontends())
