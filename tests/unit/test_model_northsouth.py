"""North-south in the model: which frontends are external, what outside clients get, and source ranges.

With ``ModelConfig.north_south`` a frontend that clients outside the cluster reach through this node is
marked ``external`` (``frontends.compute_service``): load-balancer IPs, programmed externalIPs and the
NodePorts on this node's own addresses. Tables of named cases for the external set, the backends
(externalTrafficPolicy Cluster and Local, terminating fallback, none), ``local_backends`` and
``loadBalancerSourceRanges`` (parsing, per family, /0, the annotation kube-proxy ignores, invalid entries
reported at the field); then properties (hypothesis): north-south only adds to what the model computes
without it, and the same objects in any order, or applied incrementally, give the same frontends.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from balancing.model import frontends, objects
from balancing.model.config import ModelConfig, parse_cidrs
from balancing.model.desired import Backend, Frontend, FrontendKey, FrontendKind
from balancing.model.fielderrors import field_errors
from balancing.model.store import ClusterStore
from balancing.sources.manifests import parse_manifest

NS = ModelConfig("node-1", north_south=True)
OFF = ModelConfig("node-1")
NP_PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]
LB_STATUS = {"loadBalancer": {"ingress": [
    {"ip": "198.51.100.1"}, {"ip": "198.51.100.3", "ipMode": "Proxy"}, {"hostname": "lb.example"},
    {"ip": "2001:db8::1"},
]}}  # fmt: skip
RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"


def service_doc(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A dual-stack LoadBalancer with an externalIP, changed by ``spec``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "annotations": annotations or {}},
        "spec": {
            "type": "LoadBalancer",
            "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ports": NP_PORTS,
            "externalIPs": ["198.51.100.7"],
            **spec,
        },
        "status": LB_STATUS,
    }


def svc(annotations: dict[str, str] | None = None, **spec: Any) -> objects.Service:
    return objects.Service.model_validate(service_doc(annotations, **spec))


def ep(addr: str, node: str | None, **conditions: bool) -> dict[str, Any]:
    found: dict[str, Any] = {"addresses": [addr], "conditions": conditions}
    if node is not None:
        found["nodeName"] = node
    return found


def eps(*endpoints: dict[str, Any], name: str = "web-1", family: str = "IPv4") -> objects.EndpointSlice:
    return objects.EndpointSlice.model_validate({
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": family,
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080}],
    })  # fmt: skip


def node(name: str, *addresses: str | tuple[str, str]) -> objects.Node:
    typed = [a if isinstance(a, tuple) else ("InternalIP", a) for a in addresses]
    return objects.Node.model_validate(
        {"metadata": {"name": name}, "status": {"addresses": [{"type": t, "address": a} for t, a in typed]}}
    )


NODES = [
    node("node-1", "192.168.0.1", ("ExternalIP", "203.0.113.1"), "fd00:1::1"),
    node("node-2", "192.168.0.2", "fd00:1::2"),
]
TERMINATING = {"ready": False, "serving": True, "terminating": True}
# node-1 (this node): 10.0.0.1 ready, 10.0.0.6 serving-terminating; node-2: 10.0.0.2 ready; node-3: 10.0.0.3
# serving-terminating; 10.0.0.4 ready on no node.
SPREAD = eps(ep("10.0.0.1", "node-1"), ep("10.0.0.6", "node-1", **TERMINATING), ep("10.0.0.2", "node-2"),
             ep("10.0.0.3", "node-3", **TERMINATING), ep("10.0.0.4", None))  # fmt: skip
SPREAD6 = eps(ep("fd00::1", "node-1"), ep("fd00::2", "node-2"), name="web-6", family="IPv6")


def compute(
    service: objects.Service,
    slices: list[objects.EndpointSlice] | None = None,
    config: ModelConfig = NS,
    nodes: list[objects.Node] | None = None,
    pods: list[objects.Pod] | None = None,
) -> dict[str, Frontend]:
    ctx = frontends.node_context(config, NODES if nodes is None else nodes)
    found = frontends.service_frontends(
        service, [SPREAD, SPREAD6] if slices is None else slices, pods or [], ctx
    )
    return {str(k): f for k, f in found.items()}


def octets(backends: tuple[Backend, ...] | frozenset[Backend] | None) -> set[str] | None:
    """The last part of each backend's address: "1" for 10.0.0.1:8080 (None stays None)."""
    if backends is None:
        return None
    return {str(b.ip).replace(":", ".").rsplit(".", 1)[1] for b in backends}


def nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


# --- which frontends are external ---------------------------------------------------------------------

LB_V4, LB_V6, EXT_IP = "198.51.100.1:80/TCP", "[2001:db8::1]:80/TCP", "198.51.100.7:80/TCP"
OWN_NODE_PORTS = {"192.168.0.1:30080/TCP", "203.0.113.1:30080/TCP", "[fd00:1::1]:30080/TCP"}
EVERY_EXTERNAL = {LB_V4, LB_V6, EXT_IP, *OWN_NODE_PORTS}


@dataclass
class ExternalCase:
    name: str
    expect: set[str]
    spec: dict[str, Any] = field(default_factory=dict)
    config: ModelConfig = NS
    nodes: list[objects.Node] | None = None


EXTERNAL_CASES = [
    ExternalCase("load-balancer IPs, externalIPs and this node's NodePorts (not loopback, not node-2's)",
                 EVERY_EXTERNAL),
    ExternalCase("north_south off: none", set(), config=OFF),
    ExternalCase("external_client mode: never, even with north_south",
                 set(), config=ModelConfig("node-1", north_south=True, external_client=True)),
    ExternalCase("NodePort type: this node's NodePorts and the externalIP", {EXT_IP, *OWN_NODE_PORTS},
                 {"type": "NodePort"}),
    ExternalCase("ClusterIP type without externalIPs: none", set(), {"type": "ClusterIP", "externalIPs": []}),
    ExternalCase("externalIPs local only: the programmed one (this node's own address)",
                 {LB_V4, LB_V6, "203.0.113.1:80/TCP", *OWN_NODE_PORTS},
                 {"externalIPs": ["198.51.100.7", "203.0.113.1", "192.168.0.2"]},
                 ModelConfig("node-1", external_ips_local_only=True, north_south=True)),
    ExternalCase("nodeport_cidrs: only the NodePorts that exist",
                 {LB_V4, LB_V6, EXT_IP, "192.168.0.1:30080/TCP"},
                 config=ModelConfig("node-1", parse_cidrs(["192.168.0.0/24"]), north_south=True)),
    ExternalCase("no Node object for this node: no NodePort is its own", {LB_V4, LB_V6, EXT_IP},
                 nodes=[NODES[1]]),
    ExternalCase("an address node-2 also reports belongs to node-1 (first by name): external",
                 {LB_V4, LB_V6, EXT_IP, *OWN_NODE_PORTS},
                 nodes=[NODES[0], node("node-2", "192.168.0.1", "192.168.0.2")]),
    ExternalCase("an address node-0 also reports is node-0's: not external",
                 {LB_V4, LB_V6, EXT_IP, "203.0.113.1:30080/TCP", "[fd00:1::1]:30080/TCP"},
                 nodes=[*NODES, node("node-0", "192.168.0.1")]),
]  # fmt: skip


@pytest.mark.parametrize("case", EXTERNAL_CASES, ids=[c.name for c in EXTERNAL_CASES])
def test_external_frontends(case: ExternalCase) -> None:
    found = compute(svc(**case.spec), config=case.config, nodes=case.nodes)
    assert {k for k, f in found.items() if f.external} == case.expect
    assert all(f.kind is not FrontendKind.CLUSTER_IP for f in found.values() if f.external)


def test_node_context_carries_north_south() -> None:
    assert frontends.node_context(NS, NODES).north_south
    assert not frontends.node_context(OFF, NODES).north_south
    both = ModelConfig("node-1", external_client=True, north_south=True)
    assert not frontends.node_context(both, NODES).north_south


def test_store_passes_north_south_through() -> None:
    store = loaded(NS, [*NODES, svc(), SPREAD])
    external = {str(k) for k, f in store.desired().frontends.items() if f.external}
    assert external == {LB_V4, LB_V6, EXT_IP, *OWN_NODE_PORTS}
    store.upsert(node("node-1", "192.168.0.9"))  # this node's addresses change: its NodePorts follow
    external = {str(k) for k, f in store.desired().frontends.items() if f.external}
    assert external == {LB_V4, LB_V6, EXT_IP, "192.168.0.9:30080/TCP"}


# --- what external clients get --------------------------------------------------------------------------

READY = {"1", "2", "4"}


@dataclass
class BackendCase:
    """Expected sets per frontend (octets of 10.0.0.x), ``external`` None meaning "the same as backends"."""

    name: str
    spec: dict[str, Any]
    slices: list[objects.EndpointSlice]
    backends: set[str]
    external: set[str] | None
    local: set[str]
    reason: str
    config: ModelConfig = NS


ETP_LOCAL: dict[str, Any] = {"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}
BACKEND_CASES = [
    BackendCase("eTP Cluster: the cluster set, as in-cluster clients", {}, [SPREAD], READY, None, {"1"}, ""),
    BackendCase("eTP Local: this node's ready endpoints; in-cluster clients still get all", ETP_LOCAL,
                [SPREAD], READY, {"1"}, {"1"}, "externalTrafficPolicy Local: local ready on node-1"),
    BackendCase("eTP Local, no endpoint on this node: none (dropped)", ETP_LOCAL,
                [eps(ep("10.0.0.2", "node-2"))], {"2"}, set(), set(),
                "externalTrafficPolicy Local: no endpoints on node-1"),
    BackendCase("eTP Local, only terminating endpoints here: the serving-terminating fallback", ETP_LOCAL,
                [eps(ep("10.0.0.6", "node-1", **TERMINATING), ep("10.0.0.2", "node-2"))], {"2"}, {"6"}, {"6"},
                "externalTrafficPolicy Local: local terminating fallback (no ready endpoint on node-1)"),
    BackendCase("eTP Local, a local endpoint neither ready nor serving: none", ETP_LOCAL,
                [eps(ep("10.0.0.6", "node-1", ready=False), ep("10.0.0.2", "node-2"))], {"2"}, set(), set(),
                "externalTrafficPolicy Local: no usable endpoint on node-1 (1 neither ready nor "
                "serving-terminating)"),
    BackendCase("eTP Local, nothing ready anywhere: terminating fallbacks on both sides", ETP_LOCAL,
                [eps(ep("10.0.0.6", "node-1", **TERMINATING), ep("10.0.0.3", "node-3", **TERMINATING))],
                {"3", "6"}, {"6"}, {"6"},
                "externalTrafficPolicy Local: local terminating fallback (no ready endpoint on node-1)"),
    BackendCase("eTP Local, no endpoints at all", ETP_LOCAL, [], set(), set(), set(),
                "externalTrafficPolicy Local: no endpoints on node-1"),
    BackendCase("eTP Local with iTP Local: external frontends keep the cluster set for in-cluster clients",
                {**ETP_LOCAL, "internalTrafficPolicy": "Local"}, [SPREAD], READY, {"1"}, {"1"},
                "externalTrafficPolicy Local: local ready on node-1"),
    BackendCase("eTP Local on a node with no endpoint but a name others use: none", ETP_LOCAL, [SPREAD],
                READY, set(), set(), "externalTrafficPolicy Local: no endpoints on node-9",
                ModelConfig("node-9", north_south=True)),
]  # fmt: skip


@pytest.mark.parametrize("case", BACKEND_CASES, ids=[c.name for c in BACKEND_CASES])
@pytest.mark.parametrize("frontend", [LB_V4, EXT_IP, "192.168.0.1:30080/TCP"])
def test_external_backends(case: BackendCase, frontend: str) -> None:
    nodes = NODES if case.config.node_name == "node-1" else [node(case.config.node_name, "192.168.0.1")]
    found = compute(svc(**case.spec), case.slices, case.config, nodes)[frontend]
    etp_local = case.spec.get("externalTrafficPolicy") == "Local"
    assert found.external
    assert octets(found.backends) == case.backends
    assert octets(found.external_backends) == case.external
    assert found.external_local is etp_local
    assert octets(found.local_backends) == case.local
    assert found.external_reason == case.reason
    expect = case.backends if case.external is None else case.external
    assert octets(found.north_south_backends) == expect


@pytest.mark.parametrize("spec", [{}, ETP_LOCAL], ids=["eTP Cluster", "eTP Local"])
def test_frontends_not_external_keep_the_defaults(spec: dict[str, Any]) -> None:
    found = compute(svc(**spec, loadBalancerSourceRanges=["10.0.0.0/8"]))
    others = [f for k, f in found.items() if k not in EVERY_EXTERNAL]
    assert {f.kind for f in others} == {FrontendKind.CLUSTER_IP, FrontendKind.NODE_PORT}
    plain = Frontend(others[0].owner, ())
    for f in others:
        assert not f.external and not f.external_local
        assert (f.external_backends, f.local_backends, f.source_ranges, f.external_reason) == (
            plain.external_backends,
            plain.local_backends,
            plain.source_ranges,
            plain.external_reason,
        )


def test_local_backends_are_this_nodes_of_either_set() -> None:
    slices = [eps(ep("10.0.0.1", "node-1"), ep("10.0.0.2", "node-2"), ep("10.0.0.5", "node-1", ready=False))]
    found = compute(svc(**ETP_LOCAL), slices)[LB_V4]
    assert octets(found.local_backends) == {"1"}  # 10.0.0.5 is in neither set
    found = compute(svc(), [SPREAD, SPREAD6])[LB_V6]
    assert found.local_backends == {Backend(ipaddress.ip_address("fd00::1"), 8080)}


def test_a_node_without_a_name_owns_no_endpoint_and_no_loopback() -> None:
    found = compute(svc(), [SPREAD], ModelConfig("", north_south=True))
    assert {k for k, f in found.items() if f.external} == {LB_V4, LB_V6, EXT_IP}  # not 127.0.0.1, ::1
    assert octets(found[LB_V4].backends) == READY and found[LB_V4].local_backends == frozenset()


def test_endpoints_from_pods_say_so() -> None:
    pod = objects.Pod.model_validate({
        "metadata": {"name": "a", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.0.1.1"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })  # fmt: skip
    found = compute(svc(**ETP_LOCAL, selector={"app": "web"}), [], pods=[pod])[LB_V4]
    assert (
        found.external_reason
        == "from pods (no EndpointSlice): externalTrafficPolicy Local: local ready on node-1"
    )
    assert octets(found.external_backends) == octets(found.local_backends) == {"1"}


def test_health_check_unchanged_by_north_south() -> None:
    service = svc(**ETP_LOCAL)
    on = frontends.compute_service(service, [SPREAD], [], frontends.node_context(NS, NODES))
    off = frontends.compute_service(service, [SPREAD], [], frontends.node_context(OFF, NODES))
    assert on.health_check == off.health_check and on.no_local == off.no_local


# --- loadBalancerSourceRanges ---------------------------------------------------------------------------


@dataclass
class RangeCase:
    name: str
    expect_v4: tuple[str, ...]
    expect_v6: tuple[str, ...]
    ranges: list[str] | None = None
    annotations: dict[str, str] | None = None
    config: ModelConfig = NS


RANGE_CASES = [
    RangeCase("none: unrestricted", (), ()),
    RangeCase("sorted, deduplicated, host bits and surrounding spaces allowed, per family",
              ("10.0.0.0/8", "192.168.1.0/24", "192.168.2.0/24"), ("2001:db8::/64",),
              [" 192.168.2.0/24", "10.0.0.1/8 ", "2001:db8::1/64", "192.168.1.7/24", "10.0.0.0/8"]),
    RangeCase("a family without ranges is unrestricted (kube-proxy's per-family proxiers)",
              (), ("2001:db8::/64",), ["2001:db8::/64"]),
    RangeCase("a /0 lifts the restriction of its family only", (), ("2001:db8::/64",),
              ["10.0.0.0/8", "10.1.2.3/0", "2001:db8::/64"]),
    RangeCase("host routes", ("203.0.113.9/32",), ("2001:db8::9/128",),
              ["203.0.113.9/32", "2001:db8::9/128"]),
    RangeCase("an IPv4-mapped IPv6 range is IPv6", (), ("::ffff:a00:0/104",), ["::ffff:10.0.0.0/104"]),
    RangeCase("the annotation alone: unrestricted (kube-proxy reads only the field)", (), (),
              annotations={RANGES_ANNOTATION: "10.0.0.0/8"}),
    RangeCase("the field wins over the annotation", ("192.168.0.0/16",), (), ["192.168.0.0/16"],
              {RANGES_ANNOTATION: "10.0.0.0/8"}),
    RangeCase("an invalid annotation is ignored", (), (), annotations={RANGES_ANNOTATION: "nope"}),
    RangeCase("north_south off: none", (), (), ["10.0.0.0/8", "2001:db8::/64"], config=OFF),
]  # fmt: skip


@pytest.mark.parametrize("case", RANGE_CASES, ids=[c.name for c in RANGE_CASES])
def test_source_ranges(case: RangeCase) -> None:
    spec = {} if case.ranges is None else {"loadBalancerSourceRanges": case.ranges}
    found = compute(svc(case.annotations, **spec), config=case.config)
    assert found[LB_V4].source_ranges == nets(*case.expect_v4)
    assert found[LB_V6].source_ranges == nets(*case.expect_v6)
    for key, frontend in found.items():  # NodePorts and externalIPs are never restricted by them
        if key not in (LB_V4, LB_V6):
            assert frontend.source_ranges == ()


def test_source_ranges_do_not_split_frontends_of_other_ports() -> None:
    ports = [*NP_PORTS, {"name": "https", "port": 443, "targetPort": 8443, "nodePort": 30443}]
    found = compute(svc(ports=ports, loadBalancerSourceRanges=["10.0.0.0/8"]), [])
    assert found["198.51.100.1:443/TCP"].source_ranges == nets("10.0.0.0/8")
    assert found["198.51.100.7:443/TCP"].source_ranges == ()


BAD_RANGES = ["x", "10.0.0.1", "10.0.0.0/33", "fd00::/129", "10.0.0.0/255.0.0.0", "010.0.0.0/8",
              "fe80::%eth0/64", "10.0.0.0/", "10.0.0.0/+8", "", 8]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_RANGES, ids=[repr(b) for b in BAD_RANGES])
def test_invalid_source_range_is_an_error_at_its_index(bad: object) -> None:
    doc = service_doc(loadBalancerSourceRanges=["10.0.0.0/8", "2001:db8::/64", bad])
    with pytest.raises(ValidationError) as info:
        objects.parse_object(doc)
    assert field_errors(doc, info.value) == {
        "spec.loadBalancerSourceRanges[2]": [f"{bad!r} is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/64)"]
    }


def test_invalid_source_range_names_the_object_and_the_rest_of_the_file_serves() -> None:
    manifest = b"""
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
  loadBalancerSourceRanges: ["10.0.0.0/8", "2001:db8::/64", "x"]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
"""
    found, errors = parse_manifest(Path("services.yaml"), manifest)
    assert [objects.ref(o) for o in found] == [("Service", "shop", "api")]
    (error,) = errors
    text = str(error)
    assert "Service shop/web" in text
    assert "spec.loadBalancerSourceRanges[2]: 'x' is not a CIDR" in text


def test_source_ranges_on_a_service_that_is_no_load_balancer_are_ignored() -> None:
    found = compute(svc(type="NodePort", loadBalancerSourceRanges=["10.0.0.0/8"]))
    assert {f.source_ranges for f in found.values()} == {()}


# --- properties: north-south only adds; order and increments do not matter -----------------------------

SPECS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
        "externalTrafficPolicy": st.sampled_from(["Cluster", "Local"]),
        "internalTrafficPolicy": st.sampled_from(["Cluster", "Local"]),
        "externalIPs": st.lists(st.sampled_from(["198.51.100.7", "203.0.113.1", "2001:db8::7"]), unique=True),
        "loadBalancerSourceRanges": st.lists(
            st.sampled_from(["10.0.0.0/8", " 10.1.0.0/16", "0.0.0.0/0", "2001:db8::/64", "192.168.0.9/24"]),
            max_size=3,
        ),
    },
)
ENDPOINT_NODES = st.sampled_from(["node-1", "node-1", "node-2", None])
CONDITIONS = st.sampled_from([{}, {"ready": False}, TERMINATING])
ENDPOINTS = st.lists(
    st.builds(
        lambda a, n, c: ep(a, n, **c),
        st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        ENDPOINT_NODES,
        CONDITIONS,
    ),
    max_size=3,
    unique_by=lambda e: e["addresses"][0],
)
CONFIGS = st.sampled_from([
    NS, ModelConfig("node-1", external_ips_local_only=True, north_south=True),
    ModelConfig("node-2", parse_cidrs(["192.168.0.0/16", "fd00::/8"]), north_south=True),
])  # fmt: skip


def stripped(frontend: Frontend) -> Frontend:
    """The frontend without what north-south adds."""
    blank = Frontend(frontend.owner, ())
    return replace(
        frontend,
        external=blank.external,
        external_backends=blank.external_backends,
        external_local=blank.external_local,
        local_backends=blank.local_backends,
        source_ranges=blank.source_ranges,
        external_reason=blank.external_reason,
    )


@settings(max_examples=150, deadline=None)
@given(SPECS, ENDPOINTS, CONFIGS)
def test_north_south_only_adds(
    spec: dict[str, Any], endpoints: list[dict[str, Any]], config: ModelConfig
) -> None:
    service = svc(**spec)
    slices = [eps(*endpoints)]
    on = compute(service, slices, config)
    off = compute(service, slices, replace(config, north_south=False))
    assert {k: stripped(f) for k, f in on.items()} == off
    assert all(f == stripped(f) for f in off.values())
    for f in on.values():
        assert f.external_local == (f.external and spec.get("externalTrafficPolicy") == "Local")
        assert (f.external_backends is not None) == f.external_local
        assert f.local_backends <= {*f.backends, *f.north_south_backends}
        assert f.source_ranges == () or f.kind is FrontendKind.LOAD_BALANCER


OBJECTS = st.one_of(
    st.builds(lambda name, spec: objects.Service.model_validate(
        {**service_doc(**spec), "metadata": {"name": name, "namespace": "default"}}),
        st.sampled_from(["web", "api"]), SPECS),
    st.builds(lambda name, endpoints: eps(*endpoints, name=name), st.sampled_from(["web-1", "web-2"]),
              ENDPOINTS),
    st.sampled_from([*NODES, node("node-1", "192.168.0.9"), node("node-2", "192.168.0.1"), node("node-3")]),
)  # fmt: skip


def loaded(config: ModelConfig, objs: list[objects.KubeObject]) -> ClusterStore:
    store = ClusterStore(config)
    for obj in objs:
        store.upsert(obj)
    return store


@settings(max_examples=150, deadline=None)
@given(st.lists(OBJECTS, unique_by=objects.ref, max_size=8), CONFIGS, st.data())
def test_same_objects_in_any_order_give_the_same_frontends(
    objs: list[objects.KubeObject], config: ModelConfig, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(objs))
    assert loaded(config, objs).desired() == loaded(config, shuffled).desired()


@settings(max_examples=150, deadline=None)
@given(st.lists(OBJECTS, max_size=10), CONFIGS)
def test_incremental_changes_match_a_fresh_store(objs: list[objects.KubeObject], config: ModelConfig) -> None:
    store = ClusterStore(config)
    truth: dict[objects.ObjectRef, objects.KubeObject] = {}
    applied: dict[FrontendKey, Frontend] = {}
    for obj in objs:
        store.upsert(obj)
        truth[objects.ref(obj)] = obj
        changes = store.take_changes()
        applied.update(changes.upsert)
        for k in changes.remove:
            del applied[k]
    assert applied == store.desired().frontends == loaded(config, list(truth.values())).desired().frontends
