"""Socket-LB exclusions without the kernel: the annotation and label, the Namespace kind, the store's set of
excluded pods (incremental, deterministic), and the writer's skip map and flag against the in-memory maps.

The kernel side (the hooks leaving an excluded pod, or with hostNamespaceOnly a pod netns, alone) is
tests/kernel/test_socket_lb_exclusions.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps
from balancing.datapath.programmed import read_state
from balancing.datapath.writer import MapWriter
from balancing.model import objects
from balancing.model.desired import DesiredState, FrontendChanges, FrontendKey, PodRef, Protocol
from balancing.model.store import ClusterStore
from balancing.sources import kube, manifests

NODE = "node-a"
DISABLED = {objects.SOCKET_LB: "disabled"}


def pod(
    name: str,
    *,
    ns: str = "default",
    node: str = NODE,
    annotations: dict[str, str] | None = None,
    uid: str | None = None,
) -> objects.Pod:
    meta = {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}" if uid is None else uid,
            "annotations": annotations or {}}  # fmt: skip
    return objects.Pod.model_validate({"metadata": meta, "spec": {"nodeName": node}})


def namespace(name: str, labels: dict[str, str] | None = None) -> objects.Namespace:
    return objects.Namespace.model_validate({"metadata": {"name": name, "labels": labels or {}}})


def ref_of(p: objects.Pod) -> PodRef:
    return PodRef(p.metadata.namespace, p.metadata.name, p.metadata.uid)


# --- the annotation, the label and the Namespace kind ----------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "label", "excluded"),
    [
        (None, None, False),
        ("disabled", None, True),
        (None, "disabled", True),
        ("disabled", "disabled", True),
        ("enabled", None, False),
        ("Disabled", None, False),  # values are exact, as label selectors read them
        ("enabled", "disabled", True),  # either one excludes: the pod cannot opt back in
        ("", "", False),
    ],
)
def test_annotation_or_namespace_label_disables_socket_lb(
    annotation: str | None, label: str | None, excluded: bool
) -> None:
    p = pod("a", annotations={} if annotation is None else {objects.SOCKET_LB: annotation})
    labels = {} if label is None else {objects.SOCKET_LB: label}
    assert objects.socket_lb_disabled(p, labels) is excluded


def test_namespace_is_a_cluster_scoped_kind_read_for_its_labels() -> None:
    doc = {"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": "mesh", "namespace": "ignored", "labels": DISABLED},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}  # fmt: skip
    ns = objects.parse_object(doc)
    assert isinstance(ns, objects.Namespace)
    assert objects.ref(ns) == ("Namespace", "", "mesh")
    assert ns.metadata.labels == DISABLED


@pytest.mark.parametrize("name", ["Mesh", "a.b", "-x", "x" * 64])
def test_a_namespace_name_is_a_dns_label(name: str) -> None:
    with pytest.raises(ValidationError, match=r"metadata\.name"):
        objects.parse_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def test_a_manifest_may_hold_namespaces(tmp_path: Path) -> None:
    text = b"""apiVersion: v1
kind: Namespace
metadata: {name: vms, namespace: x, labels: {balancing.elf.io/socket-lb: disabled}}
"""
    found, problems = manifests.parse_manifest(tmp_path / "ns.yaml", text)
    assert problems == []
    assert [objects.ref(o) for o in found] == [("Namespace", "", "vms")]


def test_the_agent_follows_namespaces() -> None:
    assert ("/api/v1/namespaces", "Namespace") in {(r.path, r.kind) for r in kube.resources_for(NODE)}


# --- the store -------------------------------------------------------------------------------------------


def test_an_annotated_pod_on_this_node_is_excluded() -> None:
    store = ClusterStore(NODE)
    mesh, plain = pod("mesh", annotations=DISABLED), pod("plain")
    elsewhere = pod("far", node="node-b", annotations=DISABLED)  # its cgroups are on another node
    no_uid = pod("no-uid", uid="", annotations=DISABLED)  # nothing to find its cgroups by
    for p in (mesh, plain, elsewhere, no_uid):
        store.upsert(p)
    assert store.desired().excluded_pods == frozenset({ref_of(mesh)})
    assert store.take_changes().excluded_pods == frozenset({ref_of(mesh)})
    store.upsert(pod("mesh"))  # annotation removed
    assert store.take_changes().excluded_pods == frozenset()
    assert store.desired().excluded_pods == frozenset()


def test_a_labelled_namespace_excludes_its_pods_on_this_node() -> None:
    store = ClusterStore(NODE)
    vm1, vm2, other = pod("vm-1", ns="vms"), pod("vm-2", ns="vms"), pod("web")
    far = pod("vm-far", ns="vms", node="node-b")
    for p in (vm1, vm2, other, far):
        store.upsert(p)
    store.upsert(namespace("vms", DISABLED))
    store.upsert(namespace("default"))
    assert store.take_changes().excluded_pods == frozenset({ref_of(vm1), ref_of(vm2)})
    vm3 = pod("vm-3", ns="vms")  # a pod created in the namespace later
    store.upsert(vm3)
    assert store.take_changes().excluded_pods == frozenset({ref_of(vm1), ref_of(vm2), ref_of(vm3)})
    store.delete(objects.ref(vm1))
    assert store.take_changes().excluded_pods == frozenset({ref_of(vm2), ref_of(vm3)})
    store.upsert(namespace("vms", {"team": "virt"}))  # label removed
    assert store.take_changes().excluded_pods == frozenset()
    store.upsert(namespace("vms", DISABLED))
    assert store.take_changes().excluded_pods == frozenset({ref_of(vm2), ref_of(vm3)})
    store.delete(("Namespace", "", "vms"))  # its pods go with it; until then they are translated
    assert store.take_changes().excluded_pods == frozenset()


def test_a_recreated_pod_is_excluded_by_its_new_uid() -> None:
    store = ClusterStore(NODE)
    store.upsert(pod("mesh", uid="one", annotations=DISABLED))
    store.upsert(pod("mesh", uid="two", annotations=DISABLED))
    assert store.desired().excluded_pods == frozenset({PodRef("default", "mesh", "two")})


def test_take_changes_reports_the_excluded_set_only_when_it_changes() -> None:
    store = ClusterStore(NODE)
    store.upsert(pod("plain"))
    assert store.take_changes() == FrontendChanges({}, frozenset())  # nothing excluded, as at the start
    store.upsert(pod("mesh", annotations=DISABLED))
    changes = store.take_changes()
    assert changes and changes.excluded_pods == frozenset({PodRef("default", "mesh", "uid-default-mesh")})
    store.upsert(pod("mesh", annotations={**DISABLED, "other": "x"}))  # still excluded
    assert not store.take_changes()
    store.upsert(namespace("default", {"team": "web"}))  # a label that is not ours
    assert not store.take_changes()


def test_namespaces_are_held_objects() -> None:
    store = ClusterStore(NODE)
    store.upsert(namespace("vms", DISABLED))
    assert ("Namespace", "", "vms") in store.refs()
    store.delete(("Namespace", "", "vms"))
    assert store.refs() == []


Obj = objects.Pod | objects.Namespace
_POOL: list[Obj] = [
    pod("a", ns="vms"),
    pod("b", ns="vms", annotations=DISABLED),
    pod("c", annotations=DISABLED),
    pod("c"),
    pod("d", ns="vms", node="node-b"),
    namespace("vms", DISABLED),
    namespace("vms"),
    namespace("default", DISABLED),
]


def _final(ops: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    last: dict[tuple[str, str, str], Obj] = {}
    for obj in ops:
        last[objects.ref(obj)] = obj
    return last


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_POOL), max_size=10), st.randoms())
def test_the_excluded_set_depends_on_the_objects_not_their_order(ops: list[Obj], rnd: Any) -> None:
    """Fed one at a time, with changes taken in between, the set is what the final objects say, in any
    order they arrive."""
    store = ClusterStore(NODE)
    for obj in ops:
        store.upsert(obj)
        store.take_changes()
    final = list(_final(ops).values())
    shuffled = ClusterStore(NODE)
    rnd.shuffle(final)
    for obj in final:
        shuffled.upsert(obj)
    labels = {o.metadata.name: o.metadata.labels for o in final if isinstance(o, objects.Namespace)}
    expected = {
        ref_of(p)
        for p in final
        if isinstance(p, objects.Pod)
        and p.spec.node_name == NODE
        and objects.socket_lb_disabled(p, labels.get(p.metadata.namespace, {}))
    }
    assert store.desired().excluded_pods == shuffled.desired().excluded_pods == expected


# --- the writer: skip map and flag -----------------------------------------------------------------------

MESH, VM = PodRef("default", "mesh", "u-mesh"), PodRef("vms", "vm", "u-vm")
CGROUPS = {MESH.uid: (101, 102), VM.uid: (201,)}


def cgroups(p: PodRef) -> tuple[int, ...]:
    return CGROUPS.get(p.uid, ())


def skip_map(maps: FakeMaps) -> set[int]:
    return {abi.unpack_skip_key(k) for k in maps.data.get(abi.MAP_SKIP, {})}


def flags(maps: FakeMaps) -> int:
    return abi.config_flags(maps.data.get(abi.MAP_CONFIG, {}).get(abi.CONFIG_KEY))


def test_excluded_pods_cgroups_go_into_the_skip_map_and_the_flag_follows() -> None:
    maps = FakeMaps()
    settings_value = abi.pack_config(abi.EVENTS_ALL, 1, 4096, True, 77, abi.CFG_F_HOST_NS_ONLY)
    maps.update(abi.MAP_CONFIG, [(abi.CONFIG_KEY, settings_value)])
    w = MapWriter(maps, cgroups)
    assert w.sync(DesiredState({}, frozenset({MESH, VM}))).ops == 4  # three cgroups, one flag
    assert skip_map(maps) == {101, 102, 201}
    assert flags(maps) == abi.CFG_F_HOST_NS_ONLY | abi.CFG_F_SKIP
    unchanged = maps.data[abi.MAP_CONFIG][abi.CONFIG_KEY]
    assert unchanged[: abi.CONFIG.offsets()["flags"]] == settings_value[: abi.CONFIG.offsets()["flags"]]
    assert w.sync(DesiredState({}, frozenset({MESH, VM}))).ops == 0  # idempotent
    assert w.record() == read_state(maps)

    maps.ops.clear()
    w.apply(FrontendChanges({}, frozenset(), frozenset()))
    assert skip_map(maps) == set() and flags(maps) == abi.CFG_F_HOST_NS_ONLY
    # the flag is cleared before the map empties: the hooks never look up a map that is being emptied
    assert [(op, m) for op, m, _ in maps.ops] == [("update", abi.MAP_CONFIG)] + [("delete", abi.MAP_SKIP)] * 3


def test_entries_are_written_before_the_flag_is_set() -> None:
    maps = FakeMaps()
    w = MapWriter(maps, cgroups)
    w.apply(FrontendChanges({}, frozenset(), frozenset({VM})))
    assert [(op, m) for op, m, _ in maps.ops] == [("update", abi.MAP_SKIP), ("update", abi.MAP_CONFIG)]


def test_an_unchanged_set_costs_an_incremental_write_nothing() -> None:
    maps = FakeMaps()
    w = MapWriter(maps, cgroups)
    w.sync(DesiredState({}, frozenset({MESH})))
    CGROUPS["u-later"] = (301,)
    try:
        later = PodRef("default", "later", "u-later")
        assert w.apply(FrontendChanges({}, frozenset())).ops == 0
        assert w.apply(FrontendChanges({}, frozenset(), frozenset({MESH, later}))).ops == 1
        assert skip_map(maps) == {101, 102, 301}
    finally:
        del CGROUPS["u-later"]


def test_new_containers_are_excluded_when_the_cgroups_are_rescanned() -> None:
    maps = FakeMaps()
    found: dict[str, tuple[int, ...]] = {}
    w = MapWriter(maps, lambda p: found.get(p.uid, ()))
    w.sync(DesiredState({}, frozenset({MESH})))
    assert skip_map(maps) == set() and flags(maps) == 0  # no cgroup yet: nothing to look up
    found[MESH.uid] = (101,)
    w.refresh_clients()
    assert skip_map(maps) == {101} and flags(maps) == abi.CFG_F_SKIP
    found[MESH.uid] = (103,)  # the container restarted
    w.refresh_clients()
    assert skip_map(maps) == {103}


def test_a_restarted_writer_converges_from_what_is_programmed() -> None:
    maps = FakeMaps()
    MapWriter(maps, cgroups).sync(DesiredState({}, frozenset({MESH, VM})))
    restarted = MapWriter(maps, cgroups)
    assert restarted.record().skip == {101, 102, 201} and restarted.record().skip_flag
    assert restarted.sync(DesiredState({}, frozenset({VM}))).ops == 2
    assert skip_map(maps) == {201} and flags(maps) == abi.CFG_F_SKIP


def test_a_failed_skip_write_re_reads_and_raises_before_any_frontend() -> None:
    maps = FakeMaps(capacity={abi.MAP_SKIP: 2})
    w = MapWriter(maps, cgroups)
    with pytest.raises(Exception, match=abi.MAP_SKIP):
        w.sync(DesiredState({}, frozenset({MESH, VM})))
    assert w.record() == read_state(maps)


def test_a_change_less_failed_frontends_keeps_the_excluded_set() -> None:
    key = FrontendKey(ipaddress.ip_address("10.96.0.10"), 80, Protocol.TCP)
    changes = FrontendChanges({}, frozenset({key}), frozenset({MESH}))
    assert changes.without({key}) == FrontendChanges({}, frozenset(), frozenset({MESH}))
