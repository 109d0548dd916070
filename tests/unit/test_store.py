"""ClusterStore: incremental recomputation, change sets, conflicts, and order independence (hypothesis)."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from balancing.model import objects
from balancing.model.desired import Backend, Frontend, FrontendChanges, FrontendKey, Protocol
from balancing.model.store import ClusterStore

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
) -> objects.Service:
    meta = {"name": name, "namespace": ns, "creationTimestamp": created, "annotations": annotations or {}}
    spec = {"clusterIPs": [ip], "ports": [{"name": "http", "port": port, "targetPort": 8080}],
            "selector": selector, "internalTrafficPolicy": itp}  # fmt: skip
    return objects.Service.model_validate({"metadata": meta, "spec": spec})


def eps(
    name: str,
    service: str,
    *addrs: str,
    ns: str = "default",
    ready: bool = True,
    zone_hint: str | None = None,
) -> objects.EndpointSlice:
    family = "IPv6" if addrs and ":" in addrs[0] else "IPv4"
    hints = {"forZones": [{"name": zone_hint}]} if zone_hint else None
    endpoints = [{"addresses": [a], "conditions": {"ready": ready}, "hints": hints} for a in addrs]
    doc = {"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
           "addressType": family, "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080}]}  # fmt: skip
    return objects.EndpointSlice.model_validate(doc)


def pod(name: str, ip: str, *, ns: str = "default", app: str = "web", ready: bool = True) -> objects.Pod:
    doc = {"metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
           "status": {"phase": "Running", "podIP": ip,
                      "conditions": [{"type": "Ready", "status": str(ready)}]}}  # fmt: skip
    return objects.Pod.model_validate(doc)


def node(name: str, zone: str | None) -> objects.Node:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return objects.Node.model_validate({"metadata": {"name": name, "labels": labels}})


def key(ip: str = "10.96.0.10", port: int = 80) -> FrontendKey:
    return FrontendKey(ipaddress.ip_address(ip), port, Protocol.TCP)


def addrs(frontend: Frontend) -> list[str]:
    return [str(b) for b in frontend.backends]


def loaded(*objs: objects.KubeObject) -> ClusterStore:
    store = ClusterStore("node-1")
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
    hinted = {"service.kubernetes.io/topology-mode": "Auto"}
    store = loaded(
        svc(annotations=hinted),
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
    assert store.recomputed - before == 2


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
               itp=draw(st.sampled_from(["Cluster", "Local"])), annotations=annotations)  # fmt: skip


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


pods = st.builds(pod, st.sampled_from(["p1", "p2", "p3"]), st.sampled_from(["10.0.1.1", "10.0.1.2"]),
                 ns=st.sampled_from(NAMESPACES), app=st.sampled_from(["web", "db"]),
                 ready=st.booleans())  # fmt: skip
nodes = st.builds(node, st.sampled_from(["node-1", "node-2"]), st.sampled_from([None, "zone-a", "zone-b"]))
kube_objects = st.one_of(services(), slices(), pods, nodes)
refs = st.tuples(st.sampled_from(["Service", "EndpointSlice", "Pod", "Node"]),
                 st.sampled_from([*NAMESPACES, ""]),
                 st.sampled_from([*NAMES, "e1", "e2", "p1", "p2", "node-1", "node-2"]))  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(kube_objects, unique_by=objects.ref, max_size=14), st.data())
def test_same_objects_in_any_order_give_the_same_state(
    objs: list[objects.KubeObject], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(objs))
    first, second = loaded(*objs), loaded(*shuffled)
    assert first.desired() == second.desired()
    assert first.conflicts() == second.conflicts()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.one_of(kube_objects, refs), max_size=5), st.booleans()), max_size=8))
def test_changes_sum_to_the_diff_and_match_a_fresh_store(steps: list[tuple[list[Any], bool]]) -> None:
    store = ClusterStore("node-1")
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
    fresh = loaded(*truth.values())
    assert applied == store.desired().frontends == fresh.desired().frontends
    assert store.conflicts() == fresh.conflicts()


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
