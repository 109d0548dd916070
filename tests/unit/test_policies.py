"""Policy validation: every rule of the two kinds, valid and invalid, with the location the error names."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from balancing.model import objects, policies
from balancing.model.desired import Protocol

API = "balancing.elf.io/v1beta1"


def port(number: Any = "53", protocol: Any = "UDP", name: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"port": number, "protocol": protocol}
    if name is not None:
        doc["name"] = name
    return doc


def lrp_doc() -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LocalRedirectPolicy",
        "metadata": {"name": "node-local-dns"},
        "spec": {
            "frontend": {"serviceMatcher": {"serviceName": "kube-dns", "namespace": "kube-system"}},
            "backend": {
                "endpointSelector": {"matchLabels": {"k8s-app": "node-local-dns"}},
                "toPorts": [port("53", "UDP", "dns"), port("53", "TCP", "dns-tcp")],
            },
        },
    }


def bp_doc() -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "BalancingPolicy",
        "metadata": {"name": "vip"},
        "spec": {
            "frontend": {"addressMatcher": {"ip": "169.254.0.90", "toPorts": [port("80", "TCP", "http")]}},
            "backend": {"serviceEndpoint": {"endpointSelector": {"matchLabels": {"app": "web"}},
                                            "toPorts": [port("8080", "TCP", "http")]}},
        },
    }  # fmt: skip


Edit = Callable[[dict[str, Any]], None]


def put(path: str, value: Any) -> Edit:
    """Set ``spec.a.b`` (dots; ``[i]`` for list items) to ``value``; ``DELETE`` removes the field."""

    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        parts = _parts(path)
        for part in parts[:-1]:
            node = node[part]
        if value is DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = copy.deepcopy(value)  # cases share values: never let one edit another's

    return edit


DELETE = object()


def _parts(path: str) -> list[str | int]:
    out: list[str | int] = []
    for piece in path.split("."):
        name, _, index = piece.partition("[")
        out.append(name)
        if index:
            out.append(int(index.rstrip("]")))
    return out


def both(*edits: Edit) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        for e in edits:
            e(doc)

    return edit


ADDRESS_LRP = both(
    put("spec.frontend", {"addressMatcher": {"ip": "169.254.20.10", "toPorts": [port("53", "UDP", "dns")]}}),
    put("spec.backend.toPorts", [port("53", "UDP", "dns")]),
)
ADDRESS_BACKEND = put("spec.backend", {"addressEndpoint": {"addresses": ["192.0.2.1", "2001:db8::1"],
                                                          "toPorts": [port("8080", "TCP")]}})  # fmt: skip


@dataclass
class Case:
    name: str
    base: Callable[[], dict[str, Any]]
    edit: Edit
    loc: str | None = None  # None: valid
    message: str = ""
    check: Callable[[policies.Policy], bool] | None = None


LRP, BP = lrp_doc, bp_doc
FRONT_PORTS = "spec.frontend.addressMatcher.toPorts"
SE = "spec.backend.serviceEndpoint"

CASES = [
    # --- valid ------------------------------------------------------------------------------------
    Case("LRP serviceMatcher without toPorts", LRP, put("metadata.name", "x"),
         check=lambda p: p.spec.frontend.ports == [] and p.spec.enabled),
    Case("LRP defaults", LRP, put("metadata.name", "x"),
         check=lambda p: isinstance(p, policies.LocalRedirectPolicy) and not p.spec.skip_redirect_from_backend
         and p.spec.config.qos_limit == 0 and p.spec.config.enable_out_cluster
         and p.spec.config.node_label_selector is None),
    Case("LRP addressMatcher", LRP, ADDRESS_LRP,
         check=lambda p: p.spec.frontend.address_matcher is not None
         and str(p.spec.frontend.address_matcher.ip) == "169.254.20.10"),
    Case("IPv6 VIP", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip", "fd00::53")),
         check=lambda p: p.spec.frontend.address_matcher is not None
         and p.spec.frontend.address_matcher.ip.version == 6),
    Case("ports as numbers", BP, both(put(f"{FRONT_PORTS}[0].port", 80), put(f"{SE}.toPorts[0].port", 8080)),
         check=lambda p: p.spec.frontend.ports[0].port == 80 and p.spec.backend.to_ports[0].port == 8080),
    Case("port strings become numbers", LRP, put("metadata.name", "x"),
         check=lambda p: [(x.port, x.protocol) for x in p.spec.backend.to_ports]
         == [(53, Protocol.UDP), (53, Protocol.TCP)]),
    Case("port 65535 and 1", BP, both(put(f"{FRONT_PORTS}[0].port", "65535"),
                                      put(f"{SE}.toPorts[0].port", "1"))),
    Case("one port each side map directly, names may differ", BP, put(f"{SE}.toPorts[0].name", "other")),
    Case("one port each side, unnamed", BP, both(put(f"{FRONT_PORTS}[0]", port("80", "TCP")),
                                                 put(f"{SE}.toPorts[0]", port("8080", "TCP")))),
    Case("several ports paired by name", BP, both(
        put(FRONT_PORTS, [port("80", "TCP", "a"), port("443", "TCP", "b")]),
        put(f"{SE}.toPorts", [port("8443", "TCP", "b"), port("8080", "TCP", "a")]))),
    Case("backend ports may share a number under two names (upstream example)", BP, both(
        put(FRONT_PORTS, [port("8080", "TCP", "p1"), port("80", "TCP", "p2")]),
        put(f"{SE}.toPorts", [port("80", "TCP", "p1"), port("80", "TCP", "p2")]))),
    Case("same number, two protocols", LRP, both(ADDRESS_LRP, put(FRONT_PORTS, [port("53", "UDP", "dns"),
         port("53", "TCP", "dns-tcp")]), put("spec.backend.toPorts", [port("53", "UDP", "dns"),
         port("53", "TCP", "dns-tcp")]))),
    Case("redirectMode default podEndpoint", BP, put("metadata.name", "x"),
         check=lambda p: isinstance(p, policies.BalancingPolicy)
         and p.spec.backend.service_endpoint is not None
         and p.spec.backend.service_endpoint.redirect_mode == "podEndpoint"),
    Case("redirectMode hostPort", BP, put(f"{SE}.redirectMode", "hostPort")),
    Case("redirectMode nodeProxy", BP, put(f"{SE}.redirectMode", "nodeProxy")),
    Case("addressEndpoint, both families", BP, ADDRESS_BACKEND,
         check=lambda p: isinstance(p, policies.BalancingPolicy)
         and p.spec.backend.address_endpoint is not None
         and [str(a) for a in p.spec.backend.address_endpoint.addresses] == ["192.0.2.1", "2001:db8::1"]),
    Case("config", LRP, put("spec.config", {"qosLimit": 100, "enableOutCluster": False,
                                            "nodeLabelSelector": {"matchLabels": {"dns": "local"}}}),
         check=lambda p: isinstance(p, policies.LocalRedirectPolicy) and p.spec.config.qos_limit == 100
         and not p.spec.config.enable_out_cluster and p.spec.config.node_label_selector is not None),
    Case("skipRedirectFromBackend", LRP, put("spec.skipRedirectFromBackend", True),
         check=lambda p: isinstance(p, policies.LocalRedirectPolicy) and p.spec.skip_redirect_from_backend),
    Case("upstream spec.enabled", LRP, put("spec.enabled", False), check=lambda p: not p.spec.enabled),
    Case("namespace dropped (cluster-scoped)", LRP, put("metadata.namespace", "kube-system"),
         check=lambda p: p.metadata.namespace == ""),
    Case("unknown fields ignored (status, upstream extras)", BP, both(put("status", {"enabled": True}),
         put(f"{SE}.serviceName", "web"), put("spec.frontend.addressMatcher.extra", 1))),
    Case("empty endpointSelector selects all", LRP, put("spec.backend.endpointSelector", {})),
    Case("qosLimit max", LRP, put("spec.config", {"qosLimit": policies.QOS_LIMIT_MAX})),
    # --- frontend ---------------------------------------------------------------------------------
    Case("no matcher", LRP, put("spec.frontend", {}), "spec.frontend",
         "exactly one of serviceMatcher or addressMatcher"),
    Case("both matchers", LRP, put("spec.frontend.addressMatcher", {"ip": "1.2.3.4", "toPorts": [port()]}),
         "spec.frontend", "exactly one of serviceMatcher or addressMatcher"),
    Case("frontend missing", LRP, put("spec.frontend", DELETE), "spec.frontend", "Field required"),
    Case("serviceName missing", LRP, put("spec.frontend.serviceMatcher.serviceName", DELETE),
         "spec.frontend.serviceMatcher.serviceName", "Field required"),
    Case("serviceName empty", LRP, put("spec.frontend.serviceMatcher.serviceName", ""),
         "spec.frontend.serviceMatcher.serviceName", "at least 1 character"),
    Case("namespace missing", LRP, put("spec.frontend.serviceMatcher.namespace", DELETE),
         "spec.frontend.serviceMatcher.namespace", "Field required"),
    Case("addressMatcher without toPorts", LRP, both(ADDRESS_LRP, put(FRONT_PORTS, DELETE)),
         FRONT_PORTS, "Field required"),
    Case("addressMatcher with empty toPorts", LRP, both(ADDRESS_LRP, put(FRONT_PORTS, [])),
         FRONT_PORTS, "at least 1 item"),
    Case("invalid VIP", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip", "10.0.0.300")),
         "spec.frontend.addressMatcher.ip", "'10.0.0.300' is not an IPv4 or IPv6 address"),
    Case("VIP with spaces", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip", " 10.0.0.1")),
         "spec.frontend.addressMatcher.ip", "is not an IPv4 or IPv6 address"),
    Case("VIP with a zone", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip", "fe80::1%eth0")),
         "spec.frontend.addressMatcher.ip", "is not an IPv4 or IPv6 address"),
    Case("VIP unspecified", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip", "0.0.0.0")),
         "spec.frontend.addressMatcher.ip", "unspecified"),
    Case("VIP a number", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip", 167772161)),
         "spec.frontend.addressMatcher.ip", "is not an IPv4 or IPv6 address"),
    Case("VIP a CIDR", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip", "10.0.0.0/8")),
         "spec.frontend.addressMatcher.ip", "is not an IPv4 or IPv6 address"),
    # --- ports ------------------------------------------------------------------------------------
    Case("port 0", BP, put(f"{FRONT_PORTS}[0].port", "0"), f"{FRONT_PORTS}[0].port", "port must be 1-65535"),
    Case("port 65536", BP, put(f"{FRONT_PORTS}[0].port", "65536"), f"{FRONT_PORTS}[0].port", "1-65535"),
    Case("port 0 as a number", BP, put(f"{FRONT_PORTS}[0].port", 0), f"{FRONT_PORTS}[0].port", "1-65535"),
    Case("negative port", BP, put(f"{SE}.toPorts[0].port", -1), f"{SE}.toPorts[0].port", "1-65535"),
    Case("port with a leading zero", BP, put(f"{FRONT_PORTS}[0].port", "080"), f"{FRONT_PORTS}[0].port",
         "1-65535"),
    Case("port a name", BP, put(f"{SE}.toPorts[0].port", "http"), f"{SE}.toPorts[0].port", "1-65535"),
    Case("port empty", BP, put(f"{SE}.toPorts[0].port", ""), f"{SE}.toPorts[0].port", "1-65535"),
    Case("port a float", BP, put(f"{SE}.toPorts[0].port", 80.0), f"{SE}.toPorts[0].port", "1-65535"),
    Case("port a bool", BP, put(f"{SE}.toPorts[0].port", True), f"{SE}.toPorts[0].port", "1-65535"),
    Case("port missing", BP, put(f"{SE}.toPorts[0].port", DELETE), f"{SE}.toPorts[0].port", "Field required"),
    Case("protocol missing", BP, put(f"{FRONT_PORTS}[0].protocol", DELETE), f"{FRONT_PORTS}[0].protocol",
         "Field required"),
    Case("protocol SCTP", BP, put(f"{FRONT_PORTS}[0].protocol", "SCTP"), f"{FRONT_PORTS}[0].protocol",
         "protocol must be TCP or UDP"),
    Case("protocol lowercase", BP, put(f"{FRONT_PORTS}[0].protocol", "tcp"), f"{FRONT_PORTS}[0].protocol",
         "protocol must be TCP or UDP"),
    Case("port name invalid", BP, put(f"{FRONT_PORTS}[0].name", "-x"), f"{FRONT_PORTS}[0].name",
         "port name '-x'"),
    Case("several frontend ports, one unnamed", BP,
         put(FRONT_PORTS, [port("80", "TCP", "a"), port("443", "TCP")]), FRONT_PORTS,
         "with more than one port every port needs a name (toPorts[1] has none)"),
    Case("several backend ports, one unnamed", LRP, put("spec.backend.toPorts[1].name", ""),
         "spec.backend.toPorts", "every port needs a name"),
    Case("duplicate frontend names", BP, put(FRONT_PORTS, [port("80", "TCP", "a"), port("443", "TCP", "a")]),
         FRONT_PORTS, "port name 'a' is used more than once"),
    Case("duplicate backend names", LRP, put("spec.backend.toPorts[1].name", "dns"), "spec.backend.toPorts",
         "port name 'dns' is used more than once"),
    Case("duplicate frontend port", BP, put(FRONT_PORTS, [port("80", "TCP", "a"), port("80", "TCP", "b")]),
         FRONT_PORTS, "port 80/TCP is listed more than once"),
    Case("duplicate serviceMatcher port", LRP, put("spec.frontend.serviceMatcher.toPorts",
         [port("53", "UDP", "dns"), port("53", "UDP", "dns-tcp")]), "spec.frontend.serviceMatcher.toPorts",
         "port 53/UDP is listed more than once"),
    Case("backend toPorts missing", LRP, put("spec.backend.toPorts", DELETE), "spec.backend.toPorts",
         "Field required"),
    Case("backend toPorts empty", BP, put(f"{SE}.toPorts", []), f"{SE}.toPorts", "at least 1 item"),
    # --- pairing ----------------------------------------------------------------------------------
    Case("frontend name without a backend port", BP, both(
        put(FRONT_PORTS, [port("80", "TCP", "a"), port("443", "TCP", "b")]),
        put(f"{SE}.toPorts", [port("8080", "TCP", "a"), port("8443", "TCP", "c")])), "spec.backend",
        "frontend port 443/TCP (b) has no backend port named 'b'"),
    Case("backend name without a frontend port", BP, both(
        put(FRONT_PORTS, [port("80", "TCP", "a"), port("443", "TCP", "b")]),
        put(f"{SE}.toPorts", [port("8080", "TCP", "a"), port("8443", "TCP", "b"), port("9", "TCP", "c")])),
        "spec.backend", "backend port 9/TCP (c) has no frontend port named 'c'"),
    Case("one frontend port, two backend ports", LRP, put("spec.frontend.serviceMatcher.toPorts",
         [port("53", "UDP", "dns")]), "spec.backend", "backend port 53/TCP (dns-tcp) has no frontend port"),
    Case("direct pair with different protocols", BP, put(f"{SE}.toPorts[0].protocol", "UDP"), "spec.backend",
         "frontend port 80/TCP (http) and backend port 8080/UDP (http) differ in protocol"),
    Case("named pair with different protocols", LRP, both(ADDRESS_LRP,
         put(FRONT_PORTS, [port("53", "UDP", "dns"), port("53", "TCP", "dns-tcp")]),
         put("spec.backend.toPorts", [port("53", "TCP", "dns"), port("53", "UDP", "dns-tcp")])),
         "spec.backend",
         "differ in protocol"),
    Case("addressEndpoint pairs too", BP, both(ADDRESS_BACKEND, put(FRONT_PORTS, [port("80", "TCP", "a"),
         port("443", "TCP", "b")]), put("spec.backend.addressEndpoint.toPorts", [port("8080", "TCP", "a"),
         port("8443", "TCP", "x")])), "spec.backend", "has no backend port named 'b'"),
    # --- backend ----------------------------------------------------------------------------------
    Case("LRP endpointSelector missing", LRP, put("spec.backend.endpointSelector", DELETE),
         "spec.backend.endpointSelector", "Field required"),
    Case("LRP backend missing", LRP, put("spec.backend", DELETE), "spec.backend", "Field required"),
    Case("LRP selector invalid", LRP, put("spec.backend.endpointSelector", {"matchExpressions": [
         {"key": "a", "operator": "Exists", "values": ["x"]}]}),
         "spec.backend.endpointSelector.matchExpressions[0]", "operator Exists takes no values"),
    Case("BP no backend kind", BP, put("spec.backend", {}), "spec.backend",
         "exactly one of serviceEndpoint or addressEndpoint"),
    Case("BP both backend kinds", BP, put("spec.backend.addressEndpoint", {"addresses": ["192.0.2.1"],
         "toPorts": [port("80", "TCP")]}), "spec.backend",
         "exactly one of serviceEndpoint or addressEndpoint"),
    Case("BP redirectMode unknown", BP, put(f"{SE}.redirectMode", "nodePort"), f"{SE}.redirectMode",
         "Input should be 'podEndpoint', 'hostPort' or 'nodeProxy'"),
    Case("BP serviceEndpoint selector missing", BP, put(f"{SE}.endpointSelector", DELETE),
         f"{SE}.endpointSelector", "Field required"),
    Case("BP serviceEndpoint selector In without values", BP, put(f"{SE}.endpointSelector",
         {"matchExpressions": [{"key": "a", "operator": "In"}]}),
         f"{SE}.endpointSelector.matchExpressions[0]",
         "operator In needs at least one value"),
    Case("addressEndpoint invalid address", BP, both(ADDRESS_BACKEND,
         put("spec.backend.addressEndpoint.addresses", ["192.0.2.1", "example.com"])),
         "spec.backend.addressEndpoint.addresses[1]", "'example.com' is not an IPv4 or IPv6 address"),
    Case("addressEndpoint unspecified address", BP, both(ADDRESS_BACKEND,
         put("spec.backend.addressEndpoint.addresses", ["::"])),
         "spec.backend.addressEndpoint.addresses[0]", "unspecified"),
    Case("addressEndpoint no addresses", BP,
         both(ADDRESS_BACKEND, put("spec.backend.addressEndpoint.addresses", [])),
         "spec.backend.addressEndpoint.addresses", "at least 1 item"),
    # --- config -----------------------------------------------------------------------------------
    Case("qosLimit negative", LRP, put("spec.config", {"qosLimit": -1}), "spec.config.qosLimit",
         "greater than or equal to 0"),
    Case("qosLimit too large", LRP, put("spec.config", {"qosLimit": 2**32}), "spec.config.qosLimit",
         "less than or equal to"),
    Case("qosLimit not a number", LRP, put("spec.config", {"qosLimit": "many"}), "spec.config.qosLimit",
         "valid integer"),
    Case("nodeLabelSelector invalid", BP, put("spec.config", {"nodeLabelSelector": {"matchExpressions": [
         {"key": "a", "operator": "Bogus"}]}}), "spec.config.nodeLabelSelector.matchExpressions[0].operator",
         "Input should be"),
    Case("enableOutCluster not a bool", BP, put("spec.config", {"enableOutCluster": "maybe"}),
         "spec.config.enableOutCluster", "valid boolean"),
    Case("spec missing", BP, put("spec", DELETE), "spec", "Field required"),
    # --- nulls count as absent (the API server prunes them); types are strict, as the CRD's -----------
    Case("null port name", BP, put(f"{FRONT_PORTS}[0].name", None),
         check=lambda p: p.spec.frontend.ports[0].name == ""),
    Case("null config", LRP, put("spec.config", None), check=lambda p: p.spec.config.enable_out_cluster),
    Case("null enabled", LRP, put("spec.enabled", None), check=lambda p: p.spec.enabled),
    Case("null serviceMatcher toPorts", LRP, put("spec.frontend.serviceMatcher.toPorts", None),
         check=lambda p: p.spec.frontend.ports == []),
    Case("null other matcher", LRP, put("spec.frontend.addressMatcher", None)),
    Case("null selector values", LRP, put("spec.backend.endpointSelector", {"matchExpressions": [
         {"key": "a", "operator": "Exists", "values": None}]})),
    Case("null port", BP, put(f"{FRONT_PORTS}[0].port", None), f"{FRONT_PORTS}[0].port", "Field required"),
    Case("qosLimit a string", LRP, put("spec.config", {"qosLimit": "100"}), "spec.config.qosLimit",
         "valid integer"),
    Case("qosLimit a fraction", LRP, put("spec.config", {"qosLimit": 1.5}), "spec.config.qosLimit",
         "valid integer"),
    Case("enableOutCluster a string", LRP, put("spec.config", {"enableOutCluster": "true"}),
         "spec.config.enableOutCluster", "valid boolean"),
    Case("skipRedirectFromBackend a string", LRP, put("spec.skipRedirectFromBackend", "yes"),
         "spec.skipRedirectFromBackend", "valid boolean"),
    Case("enabled a number", LRP, put("spec.enabled", 0), "spec.enabled", "valid boolean"),
    Case("port with a trailing newline", BP, put(f"{FRONT_PORTS}[0].port", "80\n"), f"{FRONT_PORTS}[0].port",
         "1-65535"),
    Case("port name with a trailing newline", BP, put(f"{FRONT_PORTS}[0].name", "http\n"),
         f"{FRONT_PORTS}[0].name", "port name"),
    Case("selector key with a trailing newline", LRP, put("spec.backend.endpointSelector",
         {"matchLabels": {"app\n": "x"}}), "spec.backend.endpointSelector.matchLabels", "label key"),
    Case("selector value with a trailing newline", LRP, put("spec.backend.endpointSelector",
         {"matchLabels": {"app": "x\n"}}), "spec.backend.endpointSelector.matchLabels", "label value"),
    Case("VIP with a trailing newline", LRP, both(ADDRESS_LRP, put("spec.frontend.addressMatcher.ip",
         "10.0.0.1\n")), "spec.frontend.addressMatcher.ip", "is not an IPv4 or IPv6 address"),
    Case("64 ports", BP, both(put(FRONT_PORTS, [port(str(p), "TCP", f"p{p}") for p in range(1, 65)]),
         put(f"{SE}.toPorts", [port(str(p), "TCP", f"p{p}") for p in range(1, 65)]))),
    Case("65 ports", BP, put(FRONT_PORTS, [port(str(p), "TCP", f"p{p}") for p in range(1, 66)]), FRONT_PORTS,
         "at most 64 items"),
    Case("65 matchLabels", LRP, put("spec.backend.endpointSelector", {"matchLabels": {f"k{i}": "v"
         for i in range(65)}}), "spec.backend.endpointSelector.matchLabels", "at most 64 items"),
    Case("65 matchExpressions", LRP, put("spec.backend.endpointSelector", {"matchExpressions": [
         {"key": f"k{i}", "operator": "Exists"} for i in range(65)]}),
         "spec.backend.endpointSelector.matchExpressions", "at most 64 items"),
    Case("name missing", BP, put("metadata.name", DELETE), "metadata.name", "Field required"),
]  # fmt: skip


def loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text = f"{text}[{part}]" if isinstance(part, int) else f"{text}.{part}" if text else str(part)
    return text


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_validation(case: Case) -> None:
    doc = copy.deepcopy(case.base())
    case.edit(doc)
    if case.loc is None:
        obj = objects.parse_object(doc)
        assert isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy)
        assert case.check is None or case.check(obj)
        return
    with pytest.raises(ValidationError) as info:
        objects.parse_object(doc)
    found = {loc_text(e["loc"]): e["msg"] for e in info.value.errors()}
    assert case.loc in found, found
    assert case.message in found[case.loc], found


def test_kinds_are_registered_under_the_upstream_api_version() -> None:
    assert objects.KINDS[API, "LocalRedirectPolicy"] is policies.LocalRedirectPolicy
    assert objects.KINDS[API, "BalancingPolicy"] is policies.BalancingPolicy
    assert objects.POLICY_API_VERSION == API
    with pytest.raises(objects.UnknownKind):
        objects.parse_object({**lrp_doc(), "apiVersion": "balancing.elf.io/v1"})


def test_ref_is_cluster_scoped() -> None:
    doc = lrp_doc()
    doc["metadata"]["namespace"] = "somewhere"
    assert objects.ref(objects.parse_object(doc)) == ("LocalRedirectPolicy", "", "node-local-dns")
    assert objects.ref(objects.parse_object(bp_doc())) == ("BalancingPolicy", "", "vip")


def test_policies_are_immutable_and_comparable() -> None:
    a, b = objects.parse_object(lrp_doc()), objects.parse_object(lrp_doc())
    assert isinstance(a, policies.LocalRedirectPolicy)
    assert a == b
    with pytest.raises(ValidationError):
        a.spec.enabled = False


@pytest.mark.parametrize(
    ("front", "back", "pairs", "problems"),
    [
        ([("53", "UDP", "")], [("5353", "UDP", "x")], [(53, 5353)], []),
        ([("53", "UDP", "a"), ("53", "TCP", "b")], [("1", "TCP", "b"), ("2", "UDP", "a")],
         [(53, 2), (53, 1)], []),
        ([("53", "UDP", "a"), ("80", "TCP", "")], [("1", "UDP", "a"), ("2", "TCP", "b")], [(53, 1)],
         ["frontend port 80/TCP has no backend port for an unnamed port"]),
        ([("53", "UDP", "")], [("53", "TCP", "")], [], ["frontend port 53/UDP and backend port 53/TCP differ "
                                                         "in protocol"]),
    ],
)  # fmt: skip
def test_pair_ports(
    front: list[tuple[str, str, str]], back: list[tuple[str, str, str]], pairs: list[tuple[int, int]],
    problems: list[str],
) -> None:  # fmt: skip
    def ports(raw: list[tuple[str, str, str]]) -> list[policies.PolicyPort]:
        return [policies.PolicyPort.model_validate(port(*p)) for p in raw]

    found, why = policies.pair_ports(ports(front), ports(back))
    assert [(f.port, b.port) for f, b in found] == pairs
    assert why == problems


def test_frontend_text() -> None:
    lrp = objects.parse_object(lrp_doc())
    assert isinstance(lrp, policies.LocalRedirectPolicy)
    assert str(lrp.spec.frontend) == "Service kube-system/kube-dns all ports"
    bp = objects.parse_object(bp_doc())
    assert isinstance(bp, policies.BalancingPolicy)
    assert str(bp.spec.frontend) == "address 169.254.0.90 80/TCP (http)"


# --- random policies: validation raises ValidationError or gives a policy, nothing else ---------------

KEYS = ["frontend", "backend", "serviceMatcher", "addressMatcher", "serviceName", "namespace", "toPorts",
        "port", "protocol", "name", "ip", "endpointSelector", "matchLabels", "matchExpressions", "key",
        "operator", "values", "serviceEndpoint", "addressEndpoint", "addresses", "redirectMode", "config",
        "qosLimit", "nodeLabelSelector", "enableOutCluster", "skipRedirectFromBackend",
        "enabled"]  # fmt: skip
SCALARS = (
    st.none() | st.booleans() | st.integers(-2, 70000) | st.floats(allow_nan=True)
    | st.sampled_from(["53", "0", "65536", "TCP", "UDP", "SCTP", "tcp", "In", "NotIn", "Exists",
                       "DoesNotExist",
                       "10.0.0.1", "fd00::1", "::", "300.1.1.1", "podEndpoint", "hostPort", "nodeProxy", "a",
                       "", "dns", "-x", "k8s-app"])
    | st.text(max_size=6)
)  # fmt: skip
json_docs = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=25,
)


def plausible_port() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"port": st.sampled_from(["53", "80", 8080, "0", "x"]),
         "protocol": st.sampled_from(["TCP", "UDP", "sctp"])},
        optional={"name": st.sampled_from(["a", "b", "dns", "", "-"])},
    )  # fmt: skip


def plausible_spec() -> st.SearchStrategy[dict[str, Any]]:
    ports = st.lists(plausible_port(), max_size=3)
    selector = st.fixed_dictionaries(
        {}, optional={"matchLabels": st.dictionaries(st.sampled_from(["app", "k8s-app", "a b"]),
                                                     st.sampled_from(["web", "", "-"]), max_size=2),
                      "matchExpressions": st.lists(st.fixed_dictionaries(
                          {"key": st.sampled_from(["app", "tier"]),
                           "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Bad"])},
                          optional={"values": st.lists(st.sampled_from(["a", "b", "!"]), max_size=2)}),
                          max_size=2)})  # fmt: skip
    matcher = st.one_of(
        st.fixed_dictionaries({"serviceMatcher": st.fixed_dictionaries(
            {"serviceName": st.sampled_from(["web", ""]), "namespace": st.just("default")},
            optional={"toPorts": ports})}),
        st.fixed_dictionaries({"addressMatcher": st.fixed_dictionaries(
            {"ip": st.sampled_from(["10.0.0.1", "fd00::1", "bad", "0.0.0.0"]), "toPorts": ports})}),
        json_docs,
    )  # fmt: skip
    backend = st.fixed_dictionaries(
        {},
        optional={"endpointSelector": selector, "toPorts": ports,
                  "serviceEndpoint": st.fixed_dictionaries({"endpointSelector": selector, "toPorts": ports},
                                                           optional={"redirectMode": SCALARS}),
                  "addressEndpoint": st.fixed_dictionaries(
                      {"addresses": st.lists(st.sampled_from(["10.0.0.1", "fd00::2", "x"]), max_size=2),
                       "toPorts": ports})},
    )  # fmt: skip
    return st.fixed_dictionaries(
        {"frontend": matcher, "backend": backend},
        optional={"config": json_docs | st.fixed_dictionaries({}, optional={"qosLimit": SCALARS,
                                                                           "enableOutCluster": SCALARS}),
                  "skipRedirectFromBackend": SCALARS, "enabled": SCALARS},
    )  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["LocalRedirectPolicy", "BalancingPolicy"]), st.one_of(plausible_spec(), json_docs),
       st.one_of(st.just({"name": "p"}), json_docs))  # fmt: skip
def test_random_policies_validate_or_raise_validation_error(kind: str, spec: Any, metadata: Any) -> None:
    doc = {"apiVersion": API, "kind": kind, "metadata": metadata, "spec": spec}
    try:
        obj = objects.parse_object(doc)
    except ValidationError as exc:
        for error in exc.errors():
            assert error["msg"]
        return
    assert isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy)
    frontend = obj.spec.frontend
    assert (frontend.service_matcher is None) != (frontend.address_matcher is None)
    for p in [*frontend.ports, *obj.spec.backend.to_ports]:
        assert 1 <= p.port <= 65535 and p.protocol in (Protocol.TCP, Protocol.UDP)
    if frontend.address_matcher is not None:
        assert isinstance(frontend.address_matcher.ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    if frontend.ports:
        pairs, problems = policies.pair_ports(frontend.ports, obj.spec.backend.to_ports)
        assert not problems and len(pairs) == len(frontend.ports)
