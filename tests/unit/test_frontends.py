"""Frontends of one Service: which objects count, ports, families, protocols, slices and pods."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from balancing.model import frontends, objects
from balancing.model.desired import Backend, Frontend, FrontendKey, Owner, Protocol
from balancing.model.frontends import NodeContext

NODE = NodeContext("node-1", "zone-a")


def svc(
    name: str = "web",
    *,
    ips: tuple[str, ...] = ("10.96.0.10",),
    ports: tuple[dict[str, Any], ...] = ({"name": "http", "port": 80, "targetPort": 8080},),
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> objects.Service:
    doc = {
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"clusterIPs": list(ips), "ports": list(ports), **spec},
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
SELECTOR = {"selector": {"app": "web"}}
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
