"""Frontends of one Service: which objects count, ports, families, protocols, slices and pods."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from balancing.model import frontends, objects
from balancing.model.config import ModelConfig, parse_cidrs
from balancing.model.desired import Backend, Frontend, FrontendKey, FrontendKind, Owner, Protocol
from balancing.model.frontends import NodeContext, NodeIP
from balancing.model.healthcheck import HealthCheck

NODE = NodeContext("node-1", "zone-a")


def svc(
    name: str = "web",
    *,
    ips: tuple[str, ...] = ("10.96.0.10",),
    ports: tuple[dict[str, Any], ...] = ({"name": "http", "port": 80, "targetPort": 8080},),
    labels: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> objects.Service:
    doc = {
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"clusterIPs": list(ips), "ports": list(ports), **spec},
        "status": status or {},
    }
    return objects.Service.model_validate(doc)


def ep(addr: str, node: str = "node-2", **conditions: bool) -> dict[str, Any]:
    return {"addresses": [addr], "nodeName": node, "conditions": conditions}


def eps(
    name: str,
    *endpoints: dict[str, Any],
    ports: list[dict[str, Any]] | None = None,
    family: str = "IPv4",
    service: str = "web",
    labels: dict[str, str] | None = None,
) -> objects.EndpointSlice:
    doc = {
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service, **(labels or {})}},
        "addressType": family,
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080}] if ports is None else ports,
    }  # fmt: skip
    return objects.EndpointSlice.model_validate(doc)


def pod(
    name: str,
    ip: str,
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    namespace: str = "default",
    ports: tuple[dict[str, Any], ...] = (),
) -> objects.Pod:
    doc = {
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app": "web"} if labels is None else labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": list(ports)}]},
        "status": {"phase": phase, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip
    return objects.Pod.model_validate(doc)


def key(addr: str, port: int = 80, proto: Protocol = Protocol.TCP) -> FrontendKey:
    return FrontendKey(ipaddress.ip_address(addr), port, proto)


def backends(*addrs: str) -> tuple[Backend, ...]:
    parsed = [a.rsplit(":", 1) for a in addrs]
    return tuple(sorted(Backend(ipaddress.ip_address(h.strip("[]")), int(p)) for h, p in parsed))


@dataclass
class Case:
    name: str
    service: objects.Service
    slices: list[objects.EndpointSlice] = field(default_factory=list)
    pods: list[objects.Pod] = field(default_factory=list)
    expect: dict[FrontendKey, tuple[Backend, ...]] = field(default_factory=dict)


ONE = eps("web-1", ep("10.0.0.1"), ep("10.0.0.2"))
WEB = {key("10.96.0.10"): backends("10.0.0.1:8080", "10.0.0.2:8080")}
SELECTOR: dict[str, Any] = {"selector": {"app": "web"}}
NAMED = ({"name": "http", "port": 80, "targetPort": "web"},)

CASES = [
    Case("one port, one slice", svc(), [ONE], expect=WEB),
    Case("no slices: frontend with empty backends", svc(), expect={key("10.96.0.10"): ()}),
    Case("headless clusterIP None is ignored", svc(ips=("None",)), [ONE]),
    Case("no cluster IP at all is ignored", svc(ips=()), [ONE]),
    Case("ExternalName is ignored", svc(type="ExternalName"), [ONE]),
    Case("service-proxy-name label is ignored",
         svc(labels={"service.kubernetes.io/service-proxy-name": "other"}), [ONE]),
    Case("service headless label is ignored", svc(labels={"service.kubernetes.io/headless": ""}), [ONE]),
    Case("slice headless label is ignored", svc(),
         [eps("web-1", ep("10.0.0.1"), labels={"service.kubernetes.io/headless": ""})],
         expect={key("10.96.0.10"): ()}),
    Case("FQDN slice is ignored", svc(), [eps("web-1", ep("db.example.com"), family="FQDN")],
         expect={key("10.96.0.10"): ()}),
    Case("slice family must match the frontend family", svc(), [eps("web-1", ep("fd00::1"), family="IPv6")],
         expect={key("10.96.0.10"): ()}),
    Case("dual stack: each family from its own slices",
         svc(ips=("10.96.0.10", "fd00:96::10")),
         [ONE, eps("web-6", ep("fd00::1"), family="IPv6")],
         expect={**WEB, key("fd00:96::10"): backends("[fd00::1]:8080")}),
    Case("dual stack: a family without endpoints fails on its own",
         svc(ips=("10.96.0.10", "fd00:96::10")), [ONE], expect={**WEB, key("fd00:96::10"): ()}),
    Case("endpoints of several slices merged and deduplicated", svc(),
         [ONE, eps("web-2", ep("10.0.0.2"), ep("10.0.0.3"))],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080")}),
    Case("duplicate endpoint keeps its ready copy", svc(),
         [eps("a", ep("10.0.0.1", ready=False)), eps("b", ep("10.0.0.1"))],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080")}),
    Case("only the first address of an endpoint is used", svc(),
         [eps("web-1", {"addresses": ["10.0.0.1", "10.0.0.9"]})],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080")}),
    Case("TCP, UDP and SCTP on one port number are separate frontends",
         svc(ports=({"name": "t", "port": 53}, {"name": "u", "port": 53, "protocol": "UDP"},
                    {"name": "s", "port": 53, "protocol": "SCTP"})),
         [eps("dns", ep("10.0.0.1"), ports=[{"name": "t", "port": 53},
                                             {"name": "u", "port": 53, "protocol": "UDP"},
                                             {"name": "s", "port": 53, "protocol": "SCTP"}])],
         expect={key("10.96.0.10", 53, p): backends("10.0.0.1:53") for p in Protocol}),
    Case("slice port protocol must match", svc(), [eps("web-1", ep("10.0.0.1"), ports=[
         {"name": "http", "port": 8080, "protocol": "UDP"}])], expect={key("10.96.0.10"): ()}),
    Case("slice port name must match", svc(),
         [eps("web-1", ep("10.0.0.1"), ports=[{"name": "other", "port": 1}])],
         expect={key("10.96.0.10"): ()}),
    Case("unnamed service port matches slice port name None", svc(ports=({"port": 80, "targetPort": 8080},)),
         [eps("web-1", ep("10.0.0.1"), ports=[{"name": None, "port": 8080}])],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080")}),
    Case("slice without ports: numeric targetPort used directly", svc(),
         [eps("web-1", ep("10.0.0.1"), ports=[])], expect={key("10.96.0.10"): backends("10.0.0.1:8080")}),
    Case("slice without ports: missing targetPort means port", svc(ports=({"name": "http", "port": 80},)),
         [eps("web-1", ep("10.0.0.1"), ports=[])], expect={key("10.96.0.10"): backends("10.0.0.1:80")}),
    Case("the slice's port number wins over a numeric targetPort (as kube-proxy)", svc(),
         [eps("web-1", ep("10.0.0.1"), ports=[{"name": "http", "port": 9090}])],
         expect={key("10.96.0.10"): backends("10.0.0.1:9090")}),
    Case("named targetPort resolved per slice", svc(ports=NAMED),
         [eps("a", ep("10.0.0.1"), ports=[{"name": "http", "port": 8080}]),
          eps("b", ep("10.0.0.2"), ports=[{"name": "http", "port": 9090}])],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080", "10.0.0.2:9090")}),
    Case("named targetPort and a slice without ports: no endpoints", svc(ports=NAMED),
         [eps("a", ep("10.0.0.1"), ports=[])], expect={key("10.96.0.10"): ()}),
    Case("unparseable address is skipped", svc(), [eps("web-1", ep("not-an-ip"), ep("10.0.0.2"))],
         expect={key("10.96.0.10"): backends("10.0.0.2:8080")}),
    Case("not-ready endpoints are not used", svc(), [eps("web-1", ep("10.0.0.1", ready=False))],
         expect={key("10.96.0.10"): ()}),
    Case("terminating fallback when nothing is ready", svc(),
         [eps("web-1", ep("10.0.0.1", ready=False, serving=True, terminating=True),
              ep("10.0.0.2", ready=False))],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080")}),
    Case("internalTrafficPolicy Local keeps this node's endpoints", svc(internalTrafficPolicy="Local"),
         [eps("web-1", ep("10.0.0.1", node="node-1"), ep("10.0.0.2"))],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080")}),
    Case("zone hints with topology-mode Auto",
         svc().model_copy(update={"metadata": objects.ObjectMeta(
             name="web", namespace="default", annotations={"service.kubernetes.io/topology-mode": "Auto"})}),
         [eps("web-1", {**ep("10.0.0.1"), "hints": {"forZones": [{"name": "zone-a"}]}},
              {**ep("10.0.0.2"), "hints": {"forZones": [{"name": "zone-b"}]}})],
         expect={key("10.96.0.10"): backends("10.0.0.1:8080")}),
    # --- pods (a selector and no EndpointSlice) ---------------------------------------------------
    Case("pods matching the selector", svc(**SELECTOR),
         pods=[pod("a", "10.0.1.1"), pod("b", "10.0.1.2"), pod("c", "10.0.1.3", labels={"app": "db"})],
         expect={key("10.96.0.10"): backends("10.0.1.1:8080", "10.0.1.2:8080")}),
    Case("pods: Succeeded and Failed are skipped", svc(**SELECTOR),
         pods=[pod("a", "10.0.1.1", phase="Succeeded"), pod("b", "10.0.1.2", phase="Failed"),
               pod("c", "10.0.1.3", phase="Pending")],
         expect={key("10.96.0.10"): backends("10.0.1.3:8080")}),
    Case("pods: not ready are not used", svc(**SELECTOR), pods=[pod("a", "10.0.1.1", ready=False)],
         expect={key("10.96.0.10"): ()}),
    Case("pods: publishNotReadyAddresses makes them ready", svc(**SELECTOR, publishNotReadyAddresses=True),
         pods=[pod("a", "10.0.1.1", ready=False)], expect={key("10.96.0.10"): backends("10.0.1.1:8080")}),
    Case("pods: other namespaces are skipped", svc(**SELECTOR),
         pods=[pod("a", "10.0.1.1", namespace="other")], expect={key("10.96.0.10"): ()}),
    Case("pods: named targetPort from container ports", svc(ports=NAMED, **SELECTOR),
         pods=[pod("a", "10.0.1.1", ports=({"name": "web", "containerPort": 8081},)),
               pod("b", "10.0.1.2", ports=({"name": "web", "containerPort": 8082},)),
               pod("c", "10.0.1.3", ports=({"name": "web", "containerPort": 8083, "protocol": "UDP"},)),
               pod("d", "10.0.1.4")],
         expect={key("10.96.0.10"): backends("10.0.1.1:8081", "10.0.1.2:8082")}),
    Case("pods: ignored once any EndpointSlice exists", svc(**SELECTOR), [ONE], pods=[pod("a", "10.0.1.1")],
         expect=WEB),
    Case("pods: ignored without a selector", svc(), pods=[pod("a", "10.0.1.1")],
         expect={key("10.96.0.10"): ()}),
    Case("pods: empty selector selects nothing", svc(selector={}), pods=[pod("a", "10.0.1.1")],
         expect={key("10.96.0.10"): ()}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_service_frontends(case: Case) -> None:
    result = frontends.service_frontends(case.service, case.slices, case.pods, NODE)
    assert {k: f.backends for k, f in result.items()} == case.expect


def test_owner_and_reason() -> None:
    result = frontends.service_frontends(svc(), [ONE], [], NODE)
    assert result == {
        key("10.96.0.10"): Frontend(
            Owner("Service", "default", "web", "http"), WEB[key("10.96.0.10")], "ready"
        )
    }


def test_reason_says_endpoints_come_from_pods() -> None:
    result = frontends.service_frontends(svc(**SELECTOR), [], [pod("a", "10.0.1.1", ready=False)], NODE)
    reason = "from pods (no EndpointSlice): no usable endpoint (1 neither ready nor serving-terminating)"
    assert result[key("10.96.0.10")].reason == reason


def test_slice_order_does_not_matter() -> None:
    slices = [eps("a", ep("10.0.0.1", ready=False)), eps("b", ep("10.0.0.1", ready=False, serving=True,
                                                                       terminating=True))]  # fmt: skip
    forward = frontends.service_frontends(svc(), slices, [], NODE)
    assert frontends.service_frontends(svc(), slices[::-1], [], NODE) == forward


def test_default_frontend_is_cluster_ip_without_affinity() -> None:
    (frontend,) = frontends.service_frontends(svc(), [ONE], [], NODE).values()
    assert frontend.kind is FrontendKind.CLUSTER_IP and frontend.affinity_timeout == 0


@pytest.mark.parametrize(
    ("service", "reason"),
    [
        (svc(), None),
        (svc(ips=("None",)), "headless (no cluster IP)"),
        (svc(type="ExternalName"), "type ExternalName"),
        (
            svc(labels={"service.kubernetes.io/service-proxy-name": "x"}),
            "labelled service.kubernetes.io/service-proxy-name=x",
        ),
    ],
)
def test_service_ignored_says_why(service: objects.Service, reason: str | None) -> None:
    assert frontends.service_ignored(service) == reason


def test_selector_matches() -> None:
    assert frontends.selector_matches({"app": "web"}, {"app": "web", "tier": "x"})
    assert not frontends.selector_matches({"app": "web"}, {"app": "db"})
    assert not frontends.selector_matches({}, {"app": "web"})
    assert not frontends.selector_matches(None, {"app": "web"})


# === node addresses, frontend kinds, selection per kind, affinity, health checks ======================


def node(name: str, *addresses: str | tuple[str, str], zone: str | None = None) -> objects.Node:
    """A Node; an address is "ip" (InternalIP) or (type, address)."""
    typed = [a if isinstance(a, tuple) else ("InternalIP", a) for a in addresses]
    return objects.Node.model_validate({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone} if zone else {}},
        "status": {"addresses": [{"type": t, "address": a} for t, a in typed]},
    })  # fmt: skip


NODES = [
    node("node-1", "192.168.0.1", ("ExternalIP", "203.0.113.1"), "fd00:1::1", ("Hostname", "node-1"),
         zone="zone-a"),
    node("node-2", "192.168.0.2", "fd00:1::2", zone="zone-b"),
    node("node-3", "192.168.0.3"),
    node("node-4", "192.168.0.4"),
]  # fmt: skip


def context(config: ModelConfig | None = None, nodes: list[objects.Node] | None = None) -> NodeContext:
    return frontends.node_context(config or ModelConfig("node-1"), NODES if nodes is None else nodes)


def nip(ip: str, owner: str = "") -> NodeIP:
    return NodeIP(ipaddress.ip_address(ip), owner)


@dataclass
class NodePortCase:
    name: str
    expect: list[NodeIP]
    config: ModelConfig = field(default_factory=lambda: ModelConfig("node-1"))
    nodes: list[objects.Node] = field(default_factory=lambda: NODES)


V4_NODES = [nip("192.168.0.1", "node-1"), nip("192.168.0.2", "node-2"), nip("192.168.0.3", "node-3"),
            nip("192.168.0.4", "node-4"), nip("203.0.113.1", "node-1")]  # fmt: skip
V6_NODES = [nip("fd00:1::1", "node-1"), nip("fd00:1::2", "node-2")]
NODE_PORT_CASES = [
    NodePortCase("every node's InternalIP and ExternalIP, plus loopback (Hostname ignored)",
                 [nip("127.0.0.1"), *V4_NODES, nip("::1"), *V6_NODES]),
    NodePortCase("no Node objects: loopback only", [nip("127.0.0.1"), nip("::1")], nodes=[]),
    NodePortCase("unparseable and InternalDNS addresses are skipped", [nip("10.0.0.1", "n"), nip("127.0.0.1"),
                 nip("::1")], nodes=[node("n", "bogus", ("InternalDNS", "n.example"), "10.0.0.1")]),
    NodePortCase("nodeport_cidrs filter node addresses and drop loopback they do not contain",
                 [nip("192.168.0.1", "node-1"), nip("192.168.0.2", "node-2")],
                 ModelConfig("node-1", parse_cidrs(["192.168.0.0/31", "192.168.0.2/32"]))),
    NodePortCase("nodeport_cidrs containing 127.0.0.0/8 keep IPv4 loopback only",
                 [nip("127.0.0.1"), *V6_NODES],
                 ModelConfig("node-1", parse_cidrs(["127.0.0.0/8", "fd00::/16"]))),
    NodePortCase("nodeport_cidrs with ::1/128 keep IPv6 loopback",
                 [nip("::1")], ModelConfig("node-1", parse_cidrs(["::1/128"]))),
    NodePortCase("external_client: node addresses but no loopback", [*V4_NODES, *V6_NODES],
                 ModelConfig("host", external_client=True)),
    NodePortCase("an address two Nodes report belongs to the first by name",
                 [nip("10.0.0.1", "a"), nip("127.0.0.1"), nip("::1")],
                 nodes=[node("b", "10.0.0.1"), node("a", "10.0.0.1")]),
]  # fmt: skip


@pytest.mark.parametrize("case", NODE_PORT_CASES, ids=[c.name for c in NODE_PORT_CASES])
def test_node_port_addresses(case: NodePortCase) -> None:
    assert list(frontends.node_context(case.config, case.nodes).node_ports) == case.expect


def test_node_context_zone_and_own_addresses() -> None:
    ctx = context(ModelConfig("node-1", external_ips_local_only=True))
    assert ctx.zone == "zone-a" and ctx.external_ips_local_only and not ctx.external_client
    assert ctx.own_addresses == {ipaddress.ip_address(a) for a in ("192.168.0.1", "203.0.113.1", "fd00:1::1")}
    assert context(ModelConfig("elsewhere")).zone == ""


def test_parse_cidrs_names_the_bad_entry() -> None:
    assert parse_cidrs(["10.0.0.1/8", " ", "fd00::/64"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/64"),
    )
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not a CIDR"):
        parse_cidrs(["10.0.0.0/33"])


def test_model_config_lists_become_tuples() -> None:
    config = ModelConfig("n", [ipaddress.ip_network("10.0.0.0/8")])  # type: ignore[arg-type]
    assert config.nodeport_cidrs == (ipaddress.ip_network("10.0.0.0/8"),) and hash(config)


# --- frontend kinds: which addresses exist --------------------------------------------------------

NP = ({"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},)
LB_STATUS = {"loadBalancer": {"ingress": [
    {"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "VIP"},
    {"ip": "198.51.100.3", "ipMode": "Proxy"}, {"hostname": "lb.example"}, {"ip": "2001:db8::1"},
]}}  # fmt: skip
CIP, NPK, LBK, EIP = (FrontendKind.CLUSTER_IP, FrontendKind.NODE_PORT, FrontendKind.LOAD_BALANCER,
                      FrontendKind.EXTERNAL_IP)  # fmt: skip
V4_NODE_PORT_IPS = ("127.0.0.1", "192.168.0.1", "192.168.0.2", "192.168.0.3", "192.168.0.4", "203.0.113.1")
NODE_PORTS_V4 = {f"{a}:30080/TCP": NPK for a in V4_NODE_PORT_IPS}
NODE_PORTS_V6 = {f"[{a}]:30080/TCP": NPK for a in ("::1", "fd00:1::1", "fd00:1::2")}
CLUSTER = {"10.96.0.10:80/TCP": CIP}


@dataclass
class KindCase:
    name: str
    service: objects.Service
    expect: dict[str, FrontendKind]
    config: ModelConfig = field(default_factory=lambda: ModelConfig("node-1"))


KIND_CASES = [
    KindCase("ClusterIP type: cluster IPs only", svc(), CLUSTER),
    KindCase("NodePort type: every node address and loopback of the service's family",
             svc(type="NodePort", ports=NP), {**CLUSTER, **NODE_PORTS_V4}),
    KindCase("NodePort type, dual stack: node addresses of both families",
             svc(type="NodePort", ports=NP, ips=("10.96.0.10", "fd00:96::10")),
             {**CLUSTER, "[fd00:96::10]:80/TCP": CIP, **NODE_PORTS_V4, **NODE_PORTS_V6}),
    KindCase("ipFamilies adds a family without a cluster IP of it",
             svc(type="NodePort", ports=NP, ipFamilies=["IPv4", "IPv6"]),
             {**CLUSTER, **NODE_PORTS_V4, **NODE_PORTS_V6}),
    KindCase("IPv6-only NodePort: only IPv6 node addresses",
             svc(type="NodePort", ports=NP, ips=("fd00:96::10",)),
             {"[fd00:96::10]:80/TCP": CIP, **NODE_PORTS_V6}),
    KindCase("nodePort on a ClusterIP-type service is ignored", svc(ports=NP), CLUSTER),
    KindCase("NodePort with UDP protocol", svc(type="NodePort", ports=({**NP[0], "protocol": "UDP"},)),
             {"10.96.0.10:80/UDP": CIP, **{k.replace("TCP", "UDP"): v for k, v in NODE_PORTS_V4.items()}}),
    KindCase("nodeport_cidrs restrict NodePort addresses", svc(type="NodePort", ports=NP),
             {**CLUSTER, "203.0.113.1:30080/TCP": NPK},
             ModelConfig("node-1", parse_cidrs(["203.0.113.0/24"]))),
    KindCase("external_client: no loopback NodePort", svc(type="NodePort", ports=NP),
             {**CLUSTER, **{k: v for k, v in NODE_PORTS_V4.items() if not k.startswith("127.")}},
             ModelConfig("node-1", external_client=True)),
    KindCase("LoadBalancer: ingress IPs (not Proxy, not hostname, of its family) and NodePorts",
             svc(type="LoadBalancer", ports=NP, status=LB_STATUS),
             {**CLUSTER, "198.51.100.1:80/TCP": LBK, "198.51.100.2:80/TCP": LBK, **NODE_PORTS_V4}),
    KindCase("LoadBalancer without nodePort (allocateLoadBalancerNodePorts false)",
             svc(type="LoadBalancer", status=LB_STATUS),
             {**CLUSTER, "198.51.100.1:80/TCP": LBK, "198.51.100.2:80/TCP": LBK}),
    KindCase("LoadBalancer dual stack: IPv6 ingress too",
             svc(type="LoadBalancer", status=LB_STATUS, ips=("10.96.0.10", "fd00:96::10")),
             {**CLUSTER, "[fd00:96::10]:80/TCP": CIP, "198.51.100.1:80/TCP": LBK, "198.51.100.2:80/TCP": LBK,
              "[2001:db8::1]:80/TCP": LBK}),
    KindCase("load-balancer status of a ClusterIP-type service is ignored", svc(status=LB_STATUS), CLUSTER),
    KindCase("externalIPs on a ClusterIP service (other family skipped)",
             svc(externalIPs=["198.51.100.7", "2001:db8::7"]), {**CLUSTER, "198.51.100.7:80/TCP": EIP}),
    KindCase("externalIPs local only: just this node's own addresses",
             svc(externalIPs=["198.51.100.7", "203.0.113.1", "192.168.0.2"]),
             {**CLUSTER, "203.0.113.1:80/TCP": EIP}, ModelConfig("node-1", external_ips_local_only=True)),
    KindCase("externalIPs local only on a host that is no Node: none",
             svc(externalIPs=["203.0.113.1"]), CLUSTER, ModelConfig("host", external_ips_local_only=True)),
    KindCase("externalIP equal to a load-balancer IP: one frontend, externalIP first",
             svc(type="LoadBalancer", status=LB_STATUS, externalIPs=["198.51.100.1"]),
             {**CLUSTER, "198.51.100.1:80/TCP": EIP, "198.51.100.2:80/TCP": LBK}),
    KindCase("ExternalName with nodePort and externalIPs: nothing",
             svc(type="ExternalName", ports=NP, externalIPs=["198.51.100.7"]), {}),
    KindCase("headless NodePort-looking service: nothing", svc(ips=("None",), type="NodePort", ports=NP), {}),
    KindCase("service-proxy-name label with LoadBalancer: nothing",
             svc(type="LoadBalancer", ports=NP, status=LB_STATUS,
                 labels={"service.kubernetes.io/service-proxy-name": "x"}), {}),
]  # fmt: skip


@pytest.mark.parametrize("case", KIND_CASES, ids=[c.name for c in KIND_CASES])
def test_frontend_kinds(case: KindCase) -> None:
    result = frontends.service_frontends(case.service, [ONE], [], context(case.config))
    assert {str(k): f.kind for k, f in result.items()} == case.expect


# --- endpoint selection per frontend kind --------------------------------------------------------

# node-1 (this node): 10.0.0.1 ready; node-2: 10.0.0.2 ready, 10.0.0.5 terminating; node-3: only
# 10.0.0.3 serving-terminating; node-4: none; 10.0.0.4 ready on no node.
SPREAD = eps("web-1", ep("10.0.0.1", node="node-1"), ep("10.0.0.2", node="node-2"),
             ep("10.0.0.5", node="node-2", ready=False, serving=True, terminating=True),
             ep("10.0.0.3", node="node-3", ready=False, serving=True, terminating=True),
             {"addresses": ["10.0.0.4"]})  # fmt: skip
ALL_EXTERNAL = dict(type="LoadBalancer", ports=NP, status=LB_STATUS, externalIPs=["198.51.100.7"])
FRONTENDS = {  # label → frontend key
    "ClusterIP": "10.96.0.10:80/TCP", "NodePort node-1": "192.168.0.1:30080/TCP",
    "NodePort node-1 external": "203.0.113.1:30080/TCP", "NodePort node-2": "192.168.0.2:30080/TCP",
    "NodePort node-3": "192.168.0.3:30080/TCP", "NodePort node-4": "192.168.0.4:30080/TCP",
    "NodePort loopback": "127.0.0.1:30080/TCP", "LoadBalancer": "198.51.100.1:80/TCP",
    "ExternalIP": "198.51.100.7:80/TCP",
}  # fmt: skip
READY = {"1", "2", "4"}


@dataclass
class KindSelectionCase:
    """Expected backends per frontend label, as the last octets of the 10.0.0.x endpoints."""

    name: str
    spec: dict[str, Any]
    expect: dict[str, set[str]]
    config: ModelConfig = field(default_factory=lambda: ModelConfig("node-1"))
    slices: list[objects.EndpointSlice] = field(default_factory=lambda: [SPREAD])


def everywhere(backends: set[str], *, loopback: bool = True) -> dict[str, set[str]]:
    return {label: backends for label in FRONTENDS if loopback or label != "NodePort loopback"}


NOT_READY = eps("web-1", ep("10.0.0.1", node="node-1", ready=False, serving=True, terminating=True),
                ep("10.0.0.3", node="node-3", ready=False, serving=True, terminating=True),
                ep("10.0.0.2", node="node-2", ready=False))  # fmt: skip
EXTERNAL_CLIENT = ModelConfig("node-1", external_client=True)
BARE_METAL = ModelConfig("host", external_client=True)
ETP_LOCAL_EXTERNAL = {
    "ClusterIP": READY, "NodePort node-1": {"1"}, "NodePort node-1 external": {"1"},
    "NodePort node-2": {"2"}, "NodePort node-3": {"3"}, "NodePort node-4": set(),
    "LoadBalancer": READY, "ExternalIP": READY,
}  # fmt: skip

KIND_SELECTION_CASES = [
    KindSelectionCase("policies Cluster: every frontend gets all ready endpoints", {}, everywhere(READY)),
    KindSelectionCase("iTP Local: ClusterIP gets this node's, external frontends all ready",
                      {"internalTrafficPolicy": "Local"}, {**everywhere(READY), "ClusterIP": {"1"}}),
    KindSelectionCase("iTP Local without local endpoint: ClusterIP refuses, external frontends all ready",
                      {"internalTrafficPolicy": "Local"}, {**everywhere(READY), "ClusterIP": set()},
                      ModelConfig("node-4")),
    KindSelectionCase("eTP Local, in-cluster client: every frontend gets all ready endpoints",
                      {"externalTrafficPolicy": "Local"}, everywhere(READY)),
    KindSelectionCase("eTP Local, in-cluster client on a node without endpoints: still all",
                      {"externalTrafficPolicy": "Local"}, everywhere(READY), ModelConfig("node-4")),
    KindSelectionCase("eTP and iTP Local, in-cluster: ClusterIP local, external frontends all",
                      {"externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"},
                      {**everywhere(READY), "ClusterIP": {"1"}}),
    KindSelectionCase("eTP Local, external client: NodePort uses the endpoints of the node it is on, "
                      "LB and externalIP all ready, ClusterIP unaffected",
                      {"externalTrafficPolicy": "Local"}, ETP_LOCAL_EXTERNAL, EXTERNAL_CLIENT),
    KindSelectionCase("eTP Local, external client on a host that is no Node: the same",
                      {"externalTrafficPolicy": "Local"}, ETP_LOCAL_EXTERNAL, BARE_METAL),
    KindSelectionCase("eTP Local, external client, nothing ready: per-node and cluster-wide terminating "
                      "fallbacks", {"externalTrafficPolicy": "Local"},
                      {"ClusterIP": {"1", "3"}, "NodePort node-1": {"1"}, "NodePort node-1 external": {"1"},
                       "NodePort node-2": set(), "NodePort node-3": {"3"}, "NodePort node-4": set(),
                       "LoadBalancer": {"1", "3"}, "ExternalIP": {"1", "3"}},
                      EXTERNAL_CLIENT, [NOT_READY]),
    KindSelectionCase("eTP Cluster, external client: every frontend gets all ready endpoints", {},
                      everywhere(READY, loopback=False), EXTERNAL_CLIENT),
    KindSelectionCase("iTP Local, external client on a host that is no Node: ClusterIP refuses",
                      {"internalTrafficPolicy": "Local"},
                      {**everywhere(READY, loopback=False), "ClusterIP": set()}, BARE_METAL),
    KindSelectionCase("no endpoints at all: every frontend refuses", {"externalTrafficPolicy": "Local"},
                      everywhere(set()), slices=[]),
]  # fmt: skip


@pytest.mark.parametrize("case", KIND_SELECTION_CASES, ids=[c.name for c in KIND_SELECTION_CASES])
def test_selection_per_frontend_kind(case: KindSelectionCase) -> None:
    service = svc(**{**ALL_EXTERNAL, **case.spec})
    result = {
        str(k): f
        for k, f in frontends.service_frontends(service, case.slices, [], context(case.config)).items()
    }
    got = {label: {str(b.ip).rsplit(".", 1)[1] for b in result[k].backends}
           for label, k in FRONTENDS.items() if k in result}  # fmt: skip
    assert got == case.expect


TOPO = {"service.kubernetes.io/topology-mode": "Auto"}
HINTED = eps("web-1", {**ep("10.0.0.1", node="node-1"), "hints": {"forZones": [{"name": "zone-a"}]}},
             {**ep("10.0.0.2", node="node-2"), "hints": {"forZones": [{"name": "zone-b"}]}})  # fmt: skip


@pytest.mark.parametrize(
    ("config", "etp", "expect"),
    [
        (ModelConfig("node-1"), "Cluster", {"1"}),
        (ModelConfig("node-2"), "Local", {"2"}),  # in-cluster short-circuit: the cluster set, with hints
        (ModelConfig("node-1", external_client=True), "Local", {"1", "2"}),  # traffic policy Local: no hints
    ],
    ids=["hints apply to NodePort", "eTP Local in-cluster: hints apply", "eTP Local external: hints ignored"],
)
def test_topology_hints_on_external_frontends(config: ModelConfig, etp: str, expect: set[str]) -> None:
    service = svc(type="LoadBalancer", status=LB_STATUS, externalTrafficPolicy=etp)
    service = service.model_copy(
        update={"metadata": service.metadata.model_copy(update={"annotations": TOPO})}
    )
    result = frontends.service_frontends(service, [HINTED], [], context(config))
    frontend = result[key("198.51.100.1")]
    assert {str(b.ip).rsplit(".", 1)[1] for b in frontend.backends} == expect


REASON_CASES = [
    ("ClusterIP", {}, ModelConfig("node-1"), "ready"),
    ("NodePort node-2", {}, ModelConfig("node-1"), "ready"),
    ("NodePort node-2", {"externalTrafficPolicy": "Local"}, ModelConfig("node-1"),
     "externalTrafficPolicy Local: in-cluster client reaches all endpoints; ready"),
    ("LoadBalancer", {"externalTrafficPolicy": "Local"}, ModelConfig("node-1"),
     "externalTrafficPolicy Local: in-cluster client reaches all endpoints; ready"),
    ("ClusterIP", {"externalTrafficPolicy": "Local"}, EXTERNAL_CLIENT, "ready"),
    ("NodePort node-2", {"externalTrafficPolicy": "Local"}, EXTERNAL_CLIENT,
     "externalTrafficPolicy Local, external client via node node-2: local ready on node-2"),
    ("NodePort node-3", {"externalTrafficPolicy": "Local"}, EXTERNAL_CLIENT,
     "externalTrafficPolicy Local, external client via node node-3: local terminating fallback "
     "(no ready endpoint on node-3)"),
    ("NodePort node-4", {"externalTrafficPolicy": "Local"}, EXTERNAL_CLIENT,
     "externalTrafficPolicy Local, external client via node node-4: no endpoints on node-4"),
    ("LoadBalancer", {"externalTrafficPolicy": "Local"}, EXTERNAL_CLIENT,
     "externalTrafficPolicy Local, external client via load balancer or external IP: ready on any node"),
    ("ExternalIP", {"externalTrafficPolicy": "Local"}, EXTERNAL_CLIENT,
     "externalTrafficPolicy Local, external client via load balancer or external IP: ready on any node"),
    ("ClusterIP", {"internalTrafficPolicy": "Local"}, ModelConfig("node-4"), "no endpoints on node-4"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "spec", "config", "reason"), REASON_CASES,
                         ids=[f"{r[0]}, {r[1]}, {r[2].node_name}{' external' if r[2].external_client else ''}"
                              for r in REASON_CASES])  # fmt: skip
def test_reason_per_frontend_kind(label: str, spec: dict[str, Any], config: ModelConfig, reason: str) -> None:
    result = frontends.service_frontends(svc(**{**ALL_EXTERNAL, **spec}), [SPREAD], [], context(config))
    assert {str(k): f.reason for k, f in result.items()}[FRONTENDS[label]] == reason


def test_external_frontends_from_pods_say_so() -> None:
    service = svc(type="NodePort", ports=NP, externalTrafficPolicy="Local", **SELECTOR)
    result = frontends.service_frontends(service, [], [pod("a", "10.0.1.1")], context())
    assert result[key("192.168.0.2", 30080)].reason == (
        "from pods (no EndpointSlice): "
        "externalTrafficPolicy Local: in-cluster client reaches all endpoints; ready"
    )


# --- session affinity ---------------------------------------------------------------------------

AFFINITY_CASES = [
    ("no affinity", {}, 0),
    ("sessionAffinity None ignores a config", {"sessionAffinity": "None",
     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 0),
    ("ClientIP without config: default 10800", {"sessionAffinity": "ClientIP"}, 10800),
    ("ClientIP with empty clientIP config: default", {"sessionAffinity": "ClientIP",
     "sessionAffinityConfig": {"clientIP": {}}}, 10800),
    ("ClientIP with timeoutSeconds", {"sessionAffinity": "ClientIP",
     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 60),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "timeout"), [a[1:] for a in AFFINITY_CASES], ids=[a[0] for a in AFFINITY_CASES]
)
def test_affinity_timeout_on_every_frontend_kind(spec: dict[str, Any], timeout: int) -> None:
    result = frontends.service_frontends(svc(**{**ALL_EXTERNAL, **spec}), [SPREAD], [], context())
    assert {f.kind for f in result.values()} == set(FrontendKind)
    assert {f.affinity_timeout for f in result.values()} == {timeout}


# --- health check node port ---------------------------------------------------------------------

HC = dict(type="LoadBalancer", ports=NP, externalTrafficPolicy="Local", healthCheckNodePort=32000)
TWO_PORTS = (
    {"name": "http", "port": 80, "nodePort": 30080},
    {"name": "https", "port": 443, "nodePort": 30443},
)
TWO_PORT_SLICE = [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]


@dataclass
class HealthCase:
    name: str
    spec: dict[str, Any]
    slices: list[objects.EndpointSlice]
    expect: int | None  # local ready endpoints; None: no health check
    pods: list[objects.Pod] = field(default_factory=list)
    ips: tuple[str, ...] = ("10.96.0.10",)


HEALTH_CASES = [
    HealthCase("LoadBalancer eTP Local counts ready endpoints on this node", HC, [SPREAD], 1),
    HealthCase("NodePort eTP Local with a healthCheckNodePort", {**HC, "type": "NodePort"}, [SPREAD], 1),
    HealthCase("eTP Cluster: none", {**HC, "externalTrafficPolicy": "Cluster"}, [SPREAD], None),
    HealthCase("no healthCheckNodePort: none", {**HC, "healthCheckNodePort": None}, [SPREAD], None),
    HealthCase("ClusterIP type: none", {**HC, "type": "ClusterIP"}, [SPREAD], None),
    HealthCase("no local endpoint: 0", HC, [eps("w", ep("10.0.0.2"))], 0),
    HealthCase("terminating-only local endpoints count 0 (ready only)", HC,
               [eps("w", ep("10.0.0.1", node="node-1", ready=False, serving=True, terminating=True))], 0),
    HealthCase("ready and terminating counts as ready", HC,
               [eps("w", ep("10.0.0.1", node="node-1", ready=True, terminating=True))], 1),
    HealthCase("an address in two slices counts once", HC,
               [eps("a", ep("10.0.0.1", node="node-1")), eps("b", ep("10.0.0.1", node="node-1"),
                                                             ep("10.0.0.9", node="node-1"))], 2),
    HealthCase("an address serving two ports counts once", {**HC, "ports": TWO_PORTS},
               [eps("w", ep("10.0.0.1", node="node-1"), ep("10.0.0.9", node="node-1"),
                    ports=TWO_PORT_SLICE)], 2),
    HealthCase("an address only on the second port is counted", {**HC, "ports": TWO_PORTS},
               [eps("a", ep("10.0.0.1", node="node-1"), ports=[TWO_PORT_SLICE[0]]),
                eps("b", ep("10.0.0.9", node="node-1"), ports=[TWO_PORT_SLICE[1]])], 2),
    HealthCase("dual stack: the larger family count (a dual-stack pod counts once)", HC,
               [eps("v4", ep("10.0.0.1", node="node-1"), ep("10.0.0.9", node="node-1")),
                eps("v6", ep("fd00::1", node="node-1"), family="IPv6")], 2,
               ips=("10.96.0.10", "fd00:96::10")),
    HealthCase("endpoints from pods", {**HC, **SELECTOR}, [], 2,
               pods=[pod("a", "10.0.1.1"), pod("b", "10.0.1.2"), pod("c", "10.0.1.3", ready=False)]),
    HealthCase("ignored service: none", {**HC, "type": "ExternalName"}, [SPREAD], None),
]  # fmt: skip


@pytest.mark.parametrize("case", HEALTH_CASES, ids=[c.name for c in HEALTH_CASES])
def test_health_check(case: HealthCase) -> None:
    result = frontends.compute_service(svc(ips=case.ips, **case.spec), case.slices, case.pods, context())
    if case.expect is None:
        assert result.health_check is None
    else:
        assert result.health_check == (32000, HealthCheck("default", "web", case.expect))


def test_only_loopback_node_ports_are_host_only() -> None:
    from balancing.model import frontends as fe
    from balancing.model import objects
    from balancing.model.config import ModelConfig

    svc = objects.Service.model_validate(
        {
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            },
        }
    )
    node = objects.Node.model_validate(
        {"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}
    )
    ctx = fe.node_context(ModelConfig("n1"), [node])
    out = fe.service_frontends(svc, [], [], ctx)
    host_only = {str(k) for k, f in out.items() if f.host_only}
    assert host_only == {"127.0.0.1:30080/TCP"}
    assert {str(k) for k in out} == {"10.96.0.10:80/TCP", "10.0.0.1:30080/TCP", "127.0.0.1:30080/TCP"}
