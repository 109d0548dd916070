"""ClusterStore: incremental recomputation, change sets, conflicts, and order independence (hypothesis)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancing.model import frontends as frontends_module
from balancing.model import objects, policies
from balancing.model.config import ModelConfig, parse_cidrs
from balancing.model.desired import Backend, Frontend, FrontendChanges, FrontendKey, FrontendKind, Protocol
from balancing.model.store import ClusterStore, HealthCheck

# --- builders ------------------------------------------------------------------------------------


def svc(
    name: str = "web",
    ip: str = "10.96.0.10",
    *,
    ns: str = "default",
    created: str = "",
    port: int = 80,
    selector: dict[str, str] | None = None,
    itp: str = "Cluster",
    annotations: dict[str, str] | None = None,
    type: str = "ClusterIP",
    node_port: int | None = None,
    etp: str = "Cluster",
    external_ips: tuple[str, ...] = (),
    lb_ips: tuple[str, ...] = (),
    hcnp: int | None = None,
) -> objects.Service:
    meta = {"name": name, "namespace": ns, "creationTimestamp": created, "annotations": annotations or {}}
    ports = [{"name": "http", "port": port, "targetPort": 8080, "nodePort": node_port}]
    spec = {"clusterIPs": [ip], "ports": ports,
            "selector": selector, "internalTrafficPolicy": itp, "type": type, "externalTrafficPolicy": etp,
            "externalIPs": list(external_ips), "healthCheckNodePort": hcnp}  # fmt: skip
    status = {"loadBalancer": {"ingress": [{"ip": a} for a in lb_ips]}}
    return objects.Service.model_validate({"metadata": meta, "spec": spec, "status": status})


def eps(
    name: str,
    service: str,
    *addrs: str,
    ns: str = "default",
    ready: bool = True,
    zone_hint: str | None = None,
    node_name: str | None = None,
) -> objects.EndpointSlice:
    family = "IPv6" if addrs and ":" in addrs[0] else "IPv4"
    hints = {"forZones": [{"name": zone_hint}]} if zone_hint else None
    endpoints = [{"addresses": [a], "conditions": {"ready": ready}, "hints": hints, "nodeName": node_name}
                 for a in addrs]  # fmt: skip
    doc = {"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
           "addressType": family, "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080}]}  # fmt: skip
    return objects.EndpointSlice.model_validate(doc)


def pod(
    name: str, ip: str, *, ns: str = "default", app: str = "web", ready: bool = True, node_name: str = ""
) -> objects.Pod:
    doc = {"metadata": {"name": name, "namespace": ns, "labels": {"app": app}, "uid": f"{ns}-{name}"},
           "spec": {"nodeName": node_name},
           "status": {"phase": "Running", "podIP": ip,
                      "conditions": [{"type": "Ready", "status": str(ready)}]}}  # fmt: skip
    return objects.Pod.model_validate(doc)


def node(name: str, zone: str | None, *addresses: str, hostname: bool = False) -> objects.Node:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    typed = [{"type": "InternalIP", "address": a} for a in addresses]
    if hostname:
        typed.append({"type": "Hostname", "address": name})
    return objects.Node.model_validate({"metadata": {"name": name, "labels": labels},
                                        "status": {"addresses": typed}})  # fmt: skip


def key(ip: str = "10.96.0.10", port: int = 80) -> FrontendKey:
    return FrontendKey(ipaddress.ip_address(ip), port, Protocol.TCP)


def addrs(frontend: Frontend) -> list[str]:
    return [str(b) for b in frontend.backends]


def loaded(*objs: objects.KubeObject, config: ModelConfig | None = None) -> ClusterStore:
    store = ClusterStore(config or "node-1")
    for obj in objs:
        store.upsert(obj)
    return store


# --- basic behaviour ----------------------------------------------------------------------------


def test_desired_from_service_and_slice() -> None:
    store = loaded(svc(), eps("web-1", "web", "10.0.0.1", "10.0.0.2"))
    frontends = store.desired().frontends
    assert list(frontends) == [key()]
    assert addrs(frontends[key()]) == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert str(frontends[key()].owner) == "Service default/web:http"


def test_first_take_has_everything_then_nothing() -> None:
    store = loaded(svc(), eps("web-1", "web", "10.0.0.1"))
    first = store.take_changes()
    assert list(first.upsert) == [key()] and not first.remove
    assert not store.take_changes()


def test_endpoint_change_upserts_only_its_frontend() -> None:
    store = loaded(
        svc(), svc("db", "10.96.0.11"), eps("web-1", "web", "10.0.0.1"), eps("db-1", "db", "10.0.1.1")
    )
    store.take_changes()
    store.upsert(eps("web-1", "web", "10.0.0.1", "10.0.0.2"))
    changes = store.take_changes()
    assert list(changes.upsert) == [key()] and not changes.remove
    assert addrs(changes.upsert[key()]) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_service_delete_removes_its_frontends() -> None:
    store = loaded(svc(), eps("web-1", "web", "10.0.0.1"))
    store.take_changes()
    store.delete(("Service", "default", "web"))
    assert store.take_changes() == FrontendChanges({}, frozenset({key()}))


def test_last_slice_deleted_leaves_an_empty_frontend() -> None:
    store = loaded(svc(), eps("web-1", "web", "10.0.0.1"))
    store.take_changes()
    store.delete(("EndpointSlice", "default", "web-1"))
    assert store.take_changes().upsert[key()].backends == ()


def test_identical_upsert_and_absent_delete_are_no_ops() -> None:
    store = loaded(svc(), eps("web-1", "web", "10.0.0.1"), pod("p", "10.0.2.1"), node("node-1", "zone-a"))
    store.take_changes()
    before = store.recomputed
    for obj in (svc(), eps("web-1", "web", "10.0.0.1"), pod("p", "10.0.2.1"), node("node-1", "zone-a")):
        store.upsert(obj)
    for ref in [
        ("Service", "default", "nope"),
        ("EndpointSlice", "x", "y"),
        ("Pod", "x", "y"),
        ("Node", "", "n"),
    ]:
        store.delete(ref)
    assert not store.take_changes()
    assert store.recomputed == before


def test_change_and_revert_before_take_reports_nothing() -> None:
    store = loaded(svc(), eps("web-1", "web", "10.0.0.1"))
    store.take_changes()
    store.upsert(eps("web-1", "web", "10.0.0.9"))
    store.upsert(eps("web-1", "web", "10.0.0.1"))
    assert not store.take_changes()


def test_slice_relabelled_moves_to_the_other_service() -> None:
    store = loaded(svc(), svc("db", "10.96.0.11"), eps("s", "web", "10.0.0.1"))
    store.take_changes()
    store.upsert(eps("s", "db", "10.0.0.1"))
    changes = store.take_changes()
    assert changes.upsert[key()].backends == ()
    assert addrs(changes.upsert[key("10.96.0.11")]) == ["10.0.0.1:8080"]


# --- what a change recomputes -------------------------------------------------------------------


def test_pod_change_recomputes_only_selecting_pod_services() -> None:
    store = loaded(
        svc("web", "10.96.0.10", selector={"app": "web"}),
        svc("db", "10.96.0.11", selector={"app": "db"}),
        svc("sliced", "10.96.0.12", selector={"app": "web"}),
        eps("sliced-1", "sliced", "10.0.0.1"),
        svc("other-ns", "10.96.0.13", ns="other", selector={"app": "web"}),
    )
    store.take_changes()
    before = store.recomputed
    store.upsert(pod("p", "10.0.2.1"))
    changes = store.take_changes()
    assert store.recomputed - before == 1
    assert addrs(changes.upsert[key()]) == ["10.0.2.1:8080"]


def test_pod_relabel_dirties_services_of_old_and_new_labels() -> None:
    store = loaded(svc("web", selector={"app": "web"}), svc("db", "10.96.0.11", selector={"app": "db"}))
    store.upsert(pod("p", "10.0.2.1"))
    store.take_changes()
    before = store.recomputed
    store.upsert(pod("p", "10.0.2.1", app="db"))
    changes = store.take_changes()
    assert store.recomputed - before == 2
    assert changes.upsert[key()].backends == ()
    assert addrs(changes.upsert[key("10.96.0.11")]) == ["10.0.2.1:8080"]


def test_first_slice_switches_a_service_from_pods_to_slices() -> None:
    store = loaded(svc(selector={"app": "web"}), pod("p", "10.0.2.1"))
    assert addrs(store.desired().frontends[key()]) == ["10.0.2.1:8080"]
    store.upsert(eps("web-1", "web", "10.0.0.1"))
    assert addrs(store.desired().frontends[key()]) == ["10.0.0.1:8080"]
    before = store.recomputed
    store.upsert(pod("q", "10.0.2.2"))
    store.take_changes()
    assert store.recomputed == before  # slices exist, so pods no longer matter


def test_own_node_zone_change_recomputes_all_other_nodes_nothing() -> None:
    store = loaded(
        svc(),  # no opt-in needed: kube-proxy honours hints whenever every ready endpoint has them
        eps("a", "web", "10.0.0.1", zone_hint="zone-a"),
        eps("b", "web", "10.0.0.2", zone_hint="zone-b"),
        svc("db", "10.96.0.11"),
    )
    assert addrs(store.desired().frontends[key()]) == ["10.0.0.1:8080", "10.0.0.2:8080"]  # zone unknown
    before = store.recomputed
    store.upsert(node("node-2", "zone-b"))
    store.take_changes()
    assert store.recomputed == before
    store.upsert(node("node-1", "zone-b"))
    assert addrs(store.take_changes().upsert[key()]) == ["10.0.0.2:8080"]
    assert store.recomputed - before == 1  # db has no topology hints: the zone does not matter to it


# --- conflicts ----------------------------------------------------------------------------------


def test_older_service_wins_and_the_conflict_is_reported() -> None:
    store = loaded(
        svc("new", created="2024-05-01T00:00:00Z"),
        eps("new-1", "new", "10.0.0.2"),
        svc("old", created="2024-01-01T00:00:00Z"),
        eps("old-1", "old", "10.0.0.1"),
    )
    assert store.desired().frontends[key()].owner.name == "old"
    assert store.conflicts() == [
        "frontend 10.96.0.10:80/TCP is claimed by Service default/old:http and Service default/new:http; "
        "Service default/old:http wins (older: 2024-01-01T00:00:00Z)"
    ]
    store.take_changes()
    store.delete(("Service", "default", "old"))
    changes = store.take_changes()
    assert changes.upsert[key()].owner.name == "new" and addrs(changes.upsert[key()]) == ["10.0.0.2:8080"]
    assert store.conflicts() == []


def test_conflict_tie_is_broken_by_namespace_then_name() -> None:
    store = loaded(svc("b", ns="x"), svc("a", ns="y"), svc("c", ns="x"))
    assert store.desired().frontends[key()].owner.name == "b"
    assert "Service x/b:http and Service x/c:http, Service y/a:http" in store.conflicts()[0]


# --- scale --------------------------------------------------------------------------------------


def test_ten_thousand_services_one_endpoint_change_recomputes_one() -> None:
    store = ClusterStore("node-1")
    for i in range(10_000):
        name = f"svc-{i}"
        store.upsert(svc(name, f"10.96.{i // 250}.{i % 250 + 1}"))
        store.upsert(eps(f"{name}-1", name, *(f"10.{i // 250 + 1}.{i % 250}.{j + 1}" for j in range(10))))
    assert len(store.take_changes().upsert) == 10_000
    assert store.recomputed == 10_000
    store.upsert(eps("svc-1234-1", "svc-1234", "10.99.0.1"))
    changes = store.take_changes()
    assert store.recomputed == 10_001
    assert [str(k) for k in changes.upsert] == ["10.96.4.235:80/TCP"] and not changes.remove
    assert len(store.desired().frontends) == 10_000


# --- properties ---------------------------------------------------------------------------------

NAMESPACES = ["a", "b"]
NAMES = ["s1", "s2", "s3"]
CLUSTER_IPS = ["10.96.0.1", "10.96.0.2", "fd00::1"]
CREATED = ["", "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"]


@st.composite
def services(draw: st.DrawFn) -> objects.Service:
    selector = draw(st.sampled_from([None, {"app": "web"}, {"app": "db"}]))
    annotations = {"service.kubernetes.io/topology-mode": "Auto"} if draw(st.booleans()) else {}
    return svc(draw(st.sampled_from(NAMES)), draw(st.sampled_from(CLUSTER_IPS)),
               ns=draw(st.sampled_from(NAMESPACES)), created=draw(st.sampled_from(CREATED)),
               port=draw(st.sampled_from([80, 443])), selector=selector,
               itp=draw(st.sampled_from(["Cluster", "Local"])), annotations=annotations,
               type=draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"])),
               node_port=draw(st.sampled_from([None, 30080, 30081])),
               etp=draw(st.sampled_from(["Cluster", "Local"])),
               external_ips=draw(st.sampled_from([(), ("192.168.0.1",), ("198.51.100.1", "fd00:1::1")])),
               lb_ips=draw(st.sampled_from([(), ("198.51.100.1",)])),
               hcnp=draw(st.sampled_from([None, 32000])))  # fmt: skip


@st.composite
def slices(draw: st.DrawFn) -> objects.EndpointSlice:
    v6 = draw(st.booleans())
    ips = draw(st.lists(st.integers(1, 4), max_size=3))
    doc: dict[str, Any] = {
        "metadata": {"name": draw(st.sampled_from(["e1", "e2", "e3"])),
                     "namespace": draw(st.sampled_from(NAMESPACES)),
                     "labels": {"kubernetes.io/service-name": draw(st.sampled_from(NAMES))}},
        "addressType": "IPv6" if v6 else "IPv4",
        "endpoints": [{"addresses": [f"fd00::{i}" if v6 else f"10.0.0.{i}"],
                       "nodeName": draw(st.sampled_from(["node-1", "node-2"])),
                       "conditions": {"ready": draw(st.booleans()), "serving": True,
                                      "terminating": draw(st.booleans())},
                       "hints": {"forZones": [{"name": draw(st.sampled_from(["zone-a", "zone-b"]))}]}}
                      for i in ips],
        "ports": [{"name": "http", "port": 8080}],
    }  # fmt: skip
    return objects.EndpointSlice.model_validate(doc)


pods = st.builds(pod, st.sampled_from(["p1", "p2", "p3"]),
                 st.sampled_from(["10.0.1.1", "10.0.1.2", "fd00::5"]),
                 ns=st.sampled_from(NAMESPACES), app=st.sampled_from(["web", "db"]),
                 ready=st.booleans(),
                 node_name=st.sampled_from(["", "node-1", "node-1", "node-2"]))  # fmt: skip
NODE_ADDRESSES = ["192.168.0.1", "192.168.0.2", "fd00:1::1", "10.1.1.1"]
nodes = st.builds(lambda name, zone, addresses: node(name, zone, *addresses),
                  st.sampled_from(["node-1", "node-2", "node-3"]),
                  st.sampled_from([None, "zone-a", "zone-b"]),
                  st.lists(st.sampled_from(NODE_ADDRESSES), max_size=2, unique=True))  # fmt: skip
CONFIGS = [
    ModelConfig("node-1"),
    ModelConfig("node-1", parse_cidrs(["192.168.0.0/24", "::1/128"]), external_ips_local_only=True),
    ModelConfig("node-1", external_client=True),
]
configs = st.sampled_from(CONFIGS)


@st.composite
def policy_objects(draw: st.DrawFn) -> objects.KubeObject:
    """Random valid policies over the same names, addresses and labels as the other objects."""
    kind = draw(st.sampled_from(["LocalRedirectPolicy", "BalancingPolicy"]))
    http = {"port": "80", "protocol": "TCP", "name": "http"}
    if draw(st.booleans()):
        matcher: dict[str, Any] = {
            "serviceName": draw(st.sampled_from(NAMES)),
            "namespace": draw(st.sampled_from(NAMESPACES)),
        }
        if draw(st.booleans()):
            matcher["toPorts"] = [http]
        frontend = {"serviceMatcher": matcher}
    else:
        frontend = {
            "addressMatcher": {
                "ip": draw(st.sampled_from([*CLUSTER_IPS, "169.254.0.1", "192.168.0.1"])),
                "toPorts": [http],
            }
        }
    back_ports = [{"port": draw(st.sampled_from(["8080", "9090"])), "protocol": "TCP", "name": "http"}]
    selector = {"matchLabels": {"app": draw(st.sampled_from(["web", "db"]))}}
    likely = st.sampled_from([True, True, True, False])
    config: dict[str, Any] = {"enableOutCluster": draw(likely)}
    if not draw(likely):
        config["nodeLabelSelector"] = {"matchLabels": {"topology.kubernetes.io/zone": "zone-a"}}
    spec: dict[str, Any] = {"frontend": frontend, "config": config, "enabled": draw(likely)}
    if kind == "LocalRedirectPolicy":
        spec["backend"] = {"endpointSelector": selector, "toPorts": back_ports}
        spec["skipRedirectFromBackend"] = draw(st.booleans())
        config["qosLimit"] = draw(st.sampled_from([0, 100]))
    elif draw(st.booleans()):
        spec["backend"] = {
            "serviceEndpoint": {
                "endpointSelector": selector,
                "toPorts": back_ports,
                "redirectMode": draw(st.sampled_from(policies.REDIRECT_MODES)),
            }
        }
    else:
        spec["backend"] = {
            "addressEndpoint": {
                "addresses": draw(
                    st.lists(
                        st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]), min_size=1, max_size=2
                    )
                ),
                "toPorts": back_ports,
            }
        }
    doc = {
        "apiVersion": "balancing.elf.io/v1beta1",
        "kind": kind,
        "metadata": {
            "name": draw(st.sampled_from(["r1", "r2", "r3"])),
            "creationTimestamp": draw(st.sampled_from(CREATED)),
        },
        "spec": spec,
    }
    return objects.parse_object(doc)


kube_objects = st.one_of(services(), slices(), pods, nodes, policy_objects())
CLUSTER_SCOPED = ("Node", "LocalRedirectPolicy", "BalancingPolicy")
refs = st.tuples(st.sampled_from(["Service", "EndpointSlice", "Pod", "Node", "LocalRedirectPolicy",
                                  "BalancingPolicy"]),
                 st.sampled_from([*NAMESPACES, ""]),
                 st.sampled_from([*NAMES, "e1", "e2", "p1", "p2", "node-1", "node-2", "node-3", "r1",
                                  "r2"])).map(
    lambda r: (r[0], "" if r[0] in CLUSTER_SCOPED else r[1], r[2]))  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(kube_objects, unique_by=objects.ref, max_size=14), configs, st.data())
def test_same_objects_in_any_order_give_the_same_state(
    objs: list[objects.KubeObject], config: ModelConfig, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(objs))
    first, second = loaded(*objs, config=config), loaded(*shuffled, config=config)
    assert first.desired() == second.desired()
    assert first.conflicts() == second.conflicts()
    assert first.health_checks() == second.health_checks()
    assert first.policy_status() == second.policy_status()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.lists(st.one_of(kube_objects, refs), max_size=5), st.booleans()), max_size=8),
    configs,
)
def test_changes_sum_to_the_diff_and_match_a_fresh_store(
    steps: list[tuple[list[Any], bool]], config: ModelConfig
) -> None:
    store = ClusterStore(config)
    truth: dict[objects.ObjectRef, objects.KubeObject] = {}
    applied: dict[FrontendKey, Frontend] = {}
    for ops, take in steps:
        for op in ops:
            if isinstance(op, tuple):
                store.delete(op)
                truth.pop(op, None)
            else:
                store.upsert(op)
                truth[objects.ref(op)] = op
        if take:
            apply(applied, store.take_changes())
            assert applied == store.desired().frontends
    apply(applied, store.take_changes())
    fresh = loaded(*truth.values(), config=config)
    assert applied == store.desired().frontends == fresh.desired().frontends
    assert store.conflicts() == fresh.conflicts()
    assert store.health_checks() == fresh.health_checks()
    assert store.policy_status() == fresh.policy_status()


def apply(applied: dict[FrontendKey, Frontend], changes: FrontendChanges) -> None:
    """What the datapath writer does; also checks the change set has no redundant entries."""
    assert changes.remove <= applied.keys()
    assert not changes.remove & changes.upsert.keys()
    for k, frontend in changes.upsert.items():
        assert applied.get(k) != frontend, f"redundant upsert of {k}"
        applied[k] = frontend
    for k in changes.remove:
        del applied[k]


def test_backend_type_is_the_contract_type() -> None:
    store = loaded(svc(), eps("web-1", "web", "10.0.0.1"))
    assert store.desired().frontends[key()].backends == (Backend(ipaddress.ip_address("10.0.0.1"), 8080),)


# === configuration, frontend kinds, Node changes, health checks ====================================


def test_store_takes_a_node_name_or_a_config() -> None:
    assert ClusterStore("node-a").config == ModelConfig("node-a")
    config = ModelConfig("node-a", parse_cidrs(["10.0.0.0/8"]), external_ips_local_only=True)
    assert ClusterStore(config).config is config


# --- a changed Service gives exactly its new frontends ------------------------------------------

BASE_SPEC: dict[str, Any] = {"clusterIPs": ["10.96.0.10"],
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}  # fmt: skip
HTTP_NP = {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}
NP_SPEC = {**BASE_SPEC, "type": "NodePort", "ports": [HTTP_NP]}
LB_SPEC = {**NP_SPEC, "type": "LoadBalancer"}
LB_STATUS = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
DUAL = {"clusterIPs": ["10.96.0.10", "fd00:96::10"]}
CLUSTER_KEYS = {"10.96.0.10:80/TCP"}
NODE_PORT_KEYS = {"127.0.0.1:30080/TCP", "192.168.0.1:30080/TCP", "192.168.0.2:30080/TCP"}
NODE_PORT_KEYS_V6 = {"[::1]:30080/TCP", "[fd00:1::1]:30080/TCP"}


def service(spec: dict[str, Any], status: dict[str, Any] | None = None) -> objects.Service:
    return objects.Service.model_validate(
        {"metadata": {"name": "web", "namespace": "default"}, "spec": spec, "status": status or {}}
    )


def with_nodes(*objs: objects.KubeObject) -> ClusterStore:
    return loaded(node("node-1", "zone-a", "192.168.0.1", "fd00:1::1"),
                  node("node-2", "zone-b", "192.168.0.2"),
                  eps("web-1", "web", "10.0.0.1"), *objs)  # fmt: skip


@dataclass
class ChangeCase:
    name: str
    before: objects.Service
    after: objects.Service
    keys_before: set[str]
    keys_after: set[str]


CHANGE_CASES = [
    ChangeCase("ClusterIP to NodePort adds node frontends", service(BASE_SPEC), service(NP_SPEC),
               CLUSTER_KEYS, CLUSTER_KEYS | NODE_PORT_KEYS),
    ChangeCase("NodePort to ClusterIP removes every node frontend", service(NP_SPEC), service(BASE_SPEC),
               CLUSTER_KEYS | NODE_PORT_KEYS, CLUSTER_KEYS),
    ChangeCase("LoadBalancer to NodePort removes the load-balancer IP", service(LB_SPEC, LB_STATUS),
               service(NP_SPEC, LB_STATUS), CLUSTER_KEYS | NODE_PORT_KEYS | {"198.51.100.1:80/TCP"},
               CLUSTER_KEYS | NODE_PORT_KEYS),
    ChangeCase("LoadBalancer to ClusterIP removes load-balancer IP and NodePorts",
               service(LB_SPEC, LB_STATUS),
               service(BASE_SPEC, LB_STATUS), CLUSTER_KEYS | NODE_PORT_KEYS | {"198.51.100.1:80/TCP"},
               CLUSTER_KEYS),
    ChangeCase("load-balancer ingress switched to ipMode Proxy", service(LB_SPEC, LB_STATUS),
               service(LB_SPEC, {"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "Proxy"}]}}),
               CLUSTER_KEYS | NODE_PORT_KEYS | {"198.51.100.1:80/TCP"}, CLUSTER_KEYS | NODE_PORT_KEYS),
    ChangeCase("NodePort to ExternalName removes everything", service(NP_SPEC),
               service({**NP_SPEC, "type": "ExternalName"}), CLUSTER_KEYS | NODE_PORT_KEYS, set()),
    ChangeCase("port added", service(NP_SPEC),
               service({**NP_SPEC, "ports": [HTTP_NP, {"name": "s", "port": 443, "nodePort": 30443}]}),
               CLUSTER_KEYS | NODE_PORT_KEYS,
               CLUSTER_KEYS | NODE_PORT_KEYS | {"10.96.0.10:443/TCP"}
               | {k.replace("30080", "30443") for k in NODE_PORT_KEYS}),
    ChangeCase("port removed",
               service({**NP_SPEC, "ports": [HTTP_NP, {"name": "s", "port": 443, "nodePort": 30443}]}),
               service(NP_SPEC), CLUSTER_KEYS | NODE_PORT_KEYS | {"10.96.0.10:443/TCP"}
               | {k.replace("30080", "30443") for k in NODE_PORT_KEYS}, CLUSTER_KEYS | NODE_PORT_KEYS),
    ChangeCase("port renumbered", service(NP_SPEC), service({**NP_SPEC, "ports": [{**HTTP_NP, "port": 81}]}),
               CLUSTER_KEYS | NODE_PORT_KEYS, {"10.96.0.10:81/TCP"} | NODE_PORT_KEYS),
    ChangeCase("nodePort renumbered", service(NP_SPEC),
               service({**NP_SPEC, "ports": [{**HTTP_NP, "nodePort": 30081}]}),
               CLUSTER_KEYS | NODE_PORT_KEYS,
               CLUSTER_KEYS | {k.replace("30080", "30081") for k in NODE_PORT_KEYS}),
    ChangeCase("UDP added on the same port", service(NP_SPEC),
               service({**NP_SPEC, "ports": [HTTP_NP, {**HTTP_NP, "name": "u", "protocol": "UDP"}]}),
               CLUSTER_KEYS | NODE_PORT_KEYS,
               {k.replace("TCP", p) for k in CLUSTER_KEYS | NODE_PORT_KEYS for p in ("TCP", "UDP")}),
    ChangeCase("protocol changed from TCP to UDP", service(NP_SPEC),
               service({**NP_SPEC, "ports": [{**HTTP_NP, "protocol": "UDP"}]}), CLUSTER_KEYS | NODE_PORT_KEYS,
               {k.replace("TCP", "UDP") for k in CLUSTER_KEYS | NODE_PORT_KEYS}),
    ChangeCase("IPv6 family added", service(NP_SPEC), service({**NP_SPEC, **DUAL}),
               CLUSTER_KEYS | NODE_PORT_KEYS,
               CLUSTER_KEYS | NODE_PORT_KEYS | {"[fd00:96::10]:80/TCP"} | NODE_PORT_KEYS_V6),
    ChangeCase("IPv6 family removed", service({**NP_SPEC, **DUAL}), service(NP_SPEC),
               CLUSTER_KEYS | NODE_PORT_KEYS | {"[fd00:96::10]:80/TCP"} | NODE_PORT_KEYS_V6,
               CLUSTER_KEYS | NODE_PORT_KEYS),
    ChangeCase("externalIP replaced", service({**BASE_SPEC, "externalIPs": ["198.51.100.7"]}),
               service({**BASE_SPEC, "externalIPs": ["198.51.100.8"]}),
               CLUSTER_KEYS | {"198.51.100.7:80/TCP"},
               CLUSTER_KEYS | {"198.51.100.8:80/TCP"}),
    ChangeCase("session affinity added: same keys, all upserted", service(NP_SPEC),
               service({**NP_SPEC, "sessionAffinity": "ClientIP"}), CLUSTER_KEYS | NODE_PORT_KEYS,
               CLUSTER_KEYS | NODE_PORT_KEYS),
]  # fmt: skip


@pytest.mark.parametrize("case", CHANGE_CASES, ids=[c.name for c in CHANGE_CASES])
def test_changed_service_gives_exactly_the_new_frontends(case: ChangeCase) -> None:
    store = with_nodes(case.before)
    applied: dict[FrontendKey, Frontend] = {}
    apply(applied, store.take_changes())
    assert {str(k) for k in applied} == case.keys_before
    store.upsert(case.after)
    changes = store.take_changes()
    apply(applied, changes)
    assert {str(k) for k in changes.remove} == case.keys_before - case.keys_after
    assert {str(k) for k in applied} == case.keys_after
    assert applied == with_nodes(case.after).desired().frontends
    if case.keys_before == case.keys_after:
        assert {str(k) for k in changes.upsert} == case.keys_after


def test_frontend_kinds_and_affinity_in_the_store() -> None:
    spec = {**LB_SPEC, "externalIPs": ["198.51.100.7"], "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}}}  # fmt: skip
    state = with_nodes(service(spec, LB_STATUS)).desired().frontends
    kinds = {str(k): f.kind for k, f in state.items()}
    assert kinds == {
        "10.96.0.10:80/TCP": FrontendKind.CLUSTER_IP,
        "198.51.100.7:80/TCP": FrontendKind.EXTERNAL_IP,
        "198.51.100.1:80/TCP": FrontendKind.LOAD_BALANCER,
        **dict.fromkeys(NODE_PORT_KEYS, FrontendKind.NODE_PORT),
    }
    assert {f.affinity_timeout for f in state.values()} == {300}
    assert {addrs(f)[0] for f in state.values()} == {"10.0.0.1:8080"}


# --- what a Node change recomputes --------------------------------------------------------------

NODE_SERVICES: list[objects.KubeObject] = [
    svc("plain", "10.96.0.1"),
    svc("np", "10.96.0.2", type="NodePort", node_port=30080),
    svc("topo", "10.96.0.3"),
    eps("topo-1", "topo", "10.0.3.1", zone_hint="zone-a"),  # zone hints make it read this node's zone
    svc("eip", "10.96.0.4", external_ips=("192.168.0.1", "198.51.100.7")),
]
NODE_1 = node("node-1", "zone-a", "192.168.0.1", hostname=True)
NODE_2 = node("node-2", "zone-b", "192.168.0.2")
LOCAL_EIPS = ModelConfig("node-1", external_ips_local_only=True)


@dataclass
class NodeChangeCase:
    name: str
    change: objects.Node | objects.ObjectRef
    recomputed: set[str]
    removed: set[str] = field(default_factory=set)
    added: set[str] = field(default_factory=set)
    config: ModelConfig = field(default_factory=lambda: ModelConfig("node-1"))


NODE_CHANGE_CASES = [
    NodeChangeCase("identical Node: nothing", NODE_2, set()),
    NodeChangeCase("another node's address added: NodePort services only",
                   node("node-2", "zone-b", "192.168.0.2", "192.168.0.22"), {"np"},
                   added={"192.168.0.22:30080/TCP"}),
    NodeChangeCase("another node's zone changed: nothing", node("node-2", "zone-c", "192.168.0.2"), set()),
    NodeChangeCase("another node deleted: its NodePort frontends go", ("Node", "", "node-2"), {"np"},
                   removed={"192.168.0.2:30080/TCP"}),
    NodeChangeCase("a new node: NodePort frontends on its addresses", node("node-3", None, "192.168.0.3"),
                   {"np"}, added={"192.168.0.3:30080/TCP"}),
    NodeChangeCase("a new node without addresses: nothing", node("node-3", "zone-a"), set()),
    NodeChangeCase("a Hostname address dropped: nothing", node("node-1", "zone-a", "192.168.0.1"), set()),
    NodeChangeCase("own zone changed: topology services only", node("node-1", "zone-b", "192.168.0.1",
                   hostname=True), {"topo"}),
    NodeChangeCase("own address changed, externalIPs everywhere: NodePort services only",
                   node("node-1", "zone-a", "192.168.0.11"), {"np"},
                   removed={"192.168.0.1:30080/TCP"}, added={"192.168.0.11:30080/TCP"}),
    NodeChangeCase("own address changed, externalIPs local only: externalIP services too",
                   node("node-1", "zone-a", "192.168.0.11"), {"np", "eip"},
                   removed={"192.168.0.1:30080/TCP", "192.168.0.1:80/TCP"}, added={"192.168.0.11:30080/TCP"},
                   config=LOCAL_EIPS),
    NodeChangeCase("own Node deleted: NodePort and topology services", ("Node", "", "node-1"), {"np", "topo"},
                   removed={"192.168.0.1:30080/TCP"}),
    NodeChangeCase("address outside nodeport_cidrs: nothing",
                   node("node-2", "zone-b", "192.168.0.2", "10.1.1.1"),
                   set(), config=ModelConfig("node-1", parse_cidrs(["192.168.0.0/24"]))),
    NodeChangeCase("external client: another node's address added", node("node-2", None, "192.168.0.2",
                   "192.168.0.22"), {"np"}, added={"192.168.0.22:30080/TCP"},
                   config=ModelConfig("node-1", external_client=True)),
]  # fmt: skip


@pytest.mark.parametrize("case", NODE_CHANGE_CASES, ids=[c.name for c in NODE_CHANGE_CASES])
def test_node_change_recomputes_only_its_users(case: NodeChangeCase, monkeypatch: pytest.MonkeyPatch) -> None:
    store = loaded(NODE_1, NODE_2, *NODE_SERVICES, config=case.config)
    store.take_changes()
    seen: list[str] = []
    real = frontends_module.compute_service

    def spy(service: objects.Service, *args: Any) -> Any:
        seen.append(service.metadata.name)
        return real(service, *args)

    monkeypatch.setattr(frontends_module, "compute_service", spy)
    if isinstance(case.change, tuple):
        store.delete(case.change)
    else:
        store.upsert(case.change)
    changes = store.take_changes()
    assert set(seen) == case.recomputed and len(seen) == len(case.recomputed)
    assert {str(k) for k in changes.remove} == case.removed
    assert case.added <= {str(k) for k in changes.upsert}
    monkeypatch.undo()
    objs: list[objects.KubeObject] = [NODE_1, NODE_2, *NODE_SERVICES]
    if isinstance(case.change, tuple):
        objs = [o for o in objs if objects.ref(o) != case.change]
    else:
        objs = [o for o in objs if objects.ref(o) != objects.ref(case.change)] + [case.change]
    assert store.desired() == loaded(*objs, config=case.config).desired()


def test_slice_change_of_a_node_port_service_recomputes_only_it() -> None:
    store = loaded(NODE_1, NODE_2, *NODE_SERVICES, eps("np-1", "np", "10.0.0.1"))
    store.take_changes()
    before = store.recomputed
    store.upsert(eps("np-1", "np", "10.0.0.1", "10.0.0.2"))
    changes = store.take_changes()
    assert store.recomputed - before == 1
    assert {str(k) for k in changes.upsert} == {"10.96.0.2:80/TCP", "127.0.0.1:30080/TCP",
                                                "192.168.0.1:30080/TCP", "192.168.0.2:30080/TCP"}  # fmt: skip


# --- conflicts between external frontends -------------------------------------------------------


def test_same_external_ip_and_port_older_wins() -> None:
    store = loaded(
        svc("new", "10.96.0.1", created="2024-05-01T00:00:00Z", external_ips=("198.51.100.7",)),
        svc("old", "10.96.0.2", created="2024-01-01T00:00:00Z", external_ips=("198.51.100.7",)),
    )
    assert store.desired().frontends[key("198.51.100.7")].owner.name == "old"
    assert store.conflicts() == [
        "frontend 198.51.100.7:80/TCP is claimed by Service default/old:http and Service default/new:http; "
        "Service default/old:http wins (older: 2024-01-01T00:00:00Z)"
    ]


def test_same_node_port_older_wins_on_every_node_address() -> None:
    store = loaded(
        NODE_1,
        NODE_2,
        svc("new", "10.96.0.1", created="2024-05-01T00:00:00Z", type="NodePort", node_port=30080),
        svc("old", "10.96.0.2", created="2024-01-01T00:00:00Z", type="NodePort", node_port=30080),
    )
    owners = {str(k): f.owner.name for k, f in store.desired().frontends.items() if k.port == 30080}
    assert owners == dict.fromkeys(NODE_PORT_KEYS, "old")
    assert [m.split(" is ")[0] for m in store.conflicts()] == [
        "frontend 127.0.0.1:30080/TCP",
        "frontend 192.168.0.1:30080/TCP",
        "frontend 192.168.0.2:30080/TCP",
    ]
    store.take_changes()
    store.delete(("Service", "default", "old"))
    changes = store.take_changes()
    assert {str(k) for k, f in changes.upsert.items() if f.owner.name == "new"} == NODE_PORT_KEYS


# --- health check node ports --------------------------------------------------------------------


def lb(name: str = "web", ip: str = "10.96.0.10", *, hcnp: int | None = 32000, created: str = "",
       etp: str = "Local", type: str = "LoadBalancer") -> objects.Service:  # fmt: skip
    return svc(name, ip, type=type, node_port=30080, etp=etp, hcnp=hcnp, created=created)


@dataclass
class HealthStoreCase:
    name: str
    objs: list[objects.KubeObject]
    expect: dict[int, HealthCheck]
    config: ModelConfig = field(default_factory=lambda: ModelConfig("node-1"))


LOCAL_SLICE = eps("web-1", "web", "10.0.0.1", "10.0.0.2", node_name="node-1")
HEALTH_STORE_CASES = [
    HealthStoreCase("LoadBalancer eTP Local: ready local endpoints by port", [lb(), LOCAL_SLICE],
                    {32000: HealthCheck("default", "web", 2)}),
    HealthStoreCase("NodePort eTP Local", [lb(type="NodePort"), LOCAL_SLICE],
                    {32000: HealthCheck("default", "web", 2)}),
    HealthStoreCase("no local endpoints: 0", [lb(), eps("web-1", "web", "10.0.0.1", node_name="node-2")],
                    {32000: HealthCheck("default", "web", 0)}),
    HealthStoreCase("not-ready local endpoints: 0",
                    [lb(), eps("web-1", "web", "10.0.0.1", node_name="node-1", ready=False)],
                    {32000: HealthCheck("default", "web", 0)}),
    HealthStoreCase("eTP Cluster: none", [lb(etp="Cluster"), LOCAL_SLICE], {}),
    HealthStoreCase("ClusterIP type: none", [lb(type="ClusterIP"), LOCAL_SLICE], {}),
    HealthStoreCase("two services, two ports", [lb(), LOCAL_SLICE, lb("db", "10.96.0.11", hcnp=32001)],
                    {32000: HealthCheck("default", "web", 2), 32001: HealthCheck("default", "db", 0)}),
    HealthStoreCase("same port: the older service wins",
                    [lb(created="2024-05-01T00:00:00Z"), LOCAL_SLICE,
                     lb("db", "10.96.0.11", created="2024-01-01T00:00:00Z")],
                    {32000: HealthCheck("default", "db", 0)}),
    HealthStoreCase("external client: none served", [lb(), LOCAL_SLICE], {},
                    ModelConfig("node-1", external_client=True)),
]  # fmt: skip


@pytest.mark.parametrize("case", HEALTH_STORE_CASES, ids=[c.name for c in HEALTH_STORE_CASES])
def test_health_checks(case: HealthStoreCase) -> None:
    assert loaded(*case.objs, config=case.config).health_checks() == case.expect


def test_health_checks_follow_changes_without_recomputing() -> None:
    store = loaded(lb(), LOCAL_SLICE, svc("other", "10.96.0.12"))
    assert store.health_checks() == {32000: HealthCheck("default", "web", 2)}
    before = store.recomputed
    assert store.health_checks() == {32000: HealthCheck("default", "web", 2)}
    assert store.recomputed == before
    store.upsert(eps("web-1", "web", "10.0.0.1", node_name="node-1"))
    assert store.health_checks() == {32000: HealthCheck("default", "web", 1)}
    assert store.recomputed == before + 1
    store.upsert(lb(etp="Cluster"))
    assert store.health_checks() == {}
    store.upsert(lb(hcnp=32005))
    assert store.health_checks() == {32005: HealthCheck("default", "web", 1)}
    store.delete(("Service", "default", "web"))
    assert store.health_checks() == {}


def test_health_check_port_conflict_is_reported() -> None:
    store = loaded(lb("b", "10.96.0.11"), lb("a", "10.96.0.10"))
    assert store.conflicts()[-1:] == [
        "health check node port 32000 is claimed by Service default/a and Service default/b; "
        "Service default/a wins (older: no creationTimestamp)"
    ]
    assert store.health_checks() == {32000: HealthCheck("default", "a", 0)}


def test_no_local_endpoints_counts_local_policies_without_a_local_endpoint() -> None:
    from balancing.model import objects
    from balancing.model.store import ClusterStore

    def svc(name: str, itp: str, etp: str, kind: str = "NodePort") -> objects.Service:
        return objects.Service.model_validate(
            {
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {
                    "type": kind,
                    "clusterIPs": [f"10.96.0.{len(name)}"],
                    "internalTrafficPolicy": itp,
                    "externalTrafficPolicy": etp,
                    "ports": [{"name": "p", "port": 80, "targetPort": 8080, "nodePort": 30000 + len(name)}],
                },
            }
        )

    def eps(name: str, node: str) -> objects.EndpointSlice:
        return objects.EndpointSlice.model_validate(
            {
                "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080}],
                "endpoints": [{"addresses": ["10.244.9.9"], "nodeName": node}],
            }
        )

    st = ClusterStore("n1")
    for obj in (
        svc("a", "Local", "Cluster"),
        eps("a", "n2"),
        svc("bb", "Cluster", "Local"),
        eps("bb", "n2"),
        svc("ccc", "Local", "Local"),
        eps("ccc", "n1"),
        svc("dddd", "Local", "Local"),
    ):
        st.upsert(obj)
    assert st.no_local_endpoints() == {"internal": 1, "external": 1}  # dddd has no endpoints anywhere
