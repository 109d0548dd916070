"""The store's fast path against the plain one (hypothesis): the same desired state whatever it reuses.

``ClusterStore`` keeps EndpointSlices parsed (``frontends.SliceView``: deduplicated, sorted, columns),
recomputes nothing for an update that changes nothing it reads, layers an uncontested frontend while
recomputing its Service, and gives the common Service its slice's backends without a selection
(``frontends._ready_backends``). Here random sequences of
upserts and deletes (objects with and without resourceVersions, the same content under a new one, slices
with duplicates, bad or foreign addresses, hints, several ports, FQDN and headless ones) must give:

- incrementally (changes taken as they come) what a fresh store fed the same objects gives;
- and what a fresh store gives when every slice is read the plain way, endpoint by endpoint from the
  objects themselves (``plain_candidates``: the candidates as the model made them before it kept views),
  and every Service takes the general way (no ``_ready_backends`` shortcut).

Neighbours: test_store.py (behaviour, and order independence over every kind), test_frontends.py (one
Service's frontends), bench/scale.py (the speed this buys).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancing.model import desired, endpoints, objects
from balancing.model import frontends as frontends_module
from balancing.model.config import ModelConfig
from balancing.model.desired import Frontend, FrontendChanges, FrontendKey
from balancing.model.store import ClusterStore

NAMESPACES = ["default", "other"]
SERVICES = ["web", "db"]
SLICES = ["s1", "s2", "s3"]
ADDRESSES = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.10",
    "10.0.1.1",
    "fd00::1",
    "fd00::0:2",  # the same address as "fd00::2", written otherwise
    "fd00::2",
    "::ffff:10.0.0.1",  # IPv4-mapped: an IPv6 address
    "not-an-ip",
    "10.0.0.1 ",
    "fe80::1%eth0",
]
CONFIGS = st.sampled_from(
    [
        ModelConfig("node-1"),
        ModelConfig("node-1", north_south=True),
        ModelConfig("node-1", external_client=True),
    ]
)


def _revision(doc: dict[str, Any], api: bool) -> str:
    """A resourceVersion that, as the API server's, names exactly one content ("" for a manifest)."""
    return str(zlib.crc32(json.dumps(doc, sort_keys=True).encode())) if api else ""


@st.composite
def services(draw: st.DrawFn) -> objects.Service:
    name, ns = draw(st.sampled_from(SERVICES)), draw(st.sampled_from(NAMESPACES))
    ports = [{"name": "http", "port": 80, "targetPort": draw(st.sampled_from([8080, "http", None]))}]
    if draw(st.booleans()):
        ports.append({"name": "alt", "port": 81, "protocol": draw(st.sampled_from(["TCP", "UDP"]))})
    ips = draw(st.sampled_from([["10.96.0.10"], ["10.96.0.11"], ["fd96::10"], ["10.96.0.10", "fd96::10"]]))
    spec: dict[str, Any] = {
        "clusterIPs": ips,
        "ports": ports,
        "internalTrafficPolicy": draw(st.sampled_from(["Cluster", "Cluster", "Local"])),
        "selector": draw(st.sampled_from([None, {"app": "web"}])),
    }
    if draw(st.booleans()):
        spec |= {"type": "NodePort", "externalTrafficPolicy": draw(st.sampled_from(["Cluster", "Local"]))}
        for i, port in enumerate(ports):
            port["nodePort"] = 30080 + i + 10 * SERVICES.index(name)
    meta = {
        "name": name,
        "namespace": ns,
        "creationTimestamp": draw(st.sampled_from(["", "2024-01-01T00:00:00Z"])),
    }
    doc = {"metadata": meta, "spec": spec}
    meta |= {"uid": f"svc-{ns}-{name}", "resourceVersion": _revision(doc, draw(st.booleans()))}
    return objects.Service.model_validate(doc)


@st.composite
def endpoint_docs(draw: st.DrawFn) -> dict[str, Any]:
    def maybe(values: Sequence[Any]) -> Any:
        return draw(st.sampled_from([None, *values]))

    address = draw(st.sampled_from(ADDRESSES[:4]) | st.sampled_from(ADDRESSES))  # valid IPv4 ones often
    doc: dict[str, Any] = {"addresses": [address]}
    conditions = {k: maybe([True, False]) for k in ("ready", "serving", "terminating")}
    doc["conditions"] = {k: v for k, v in conditions.items() if v is not None}
    for key, values in (("nodeName", ["node-1", "node-2"]), ("zone", ["zone-a", "zone-b"])):
        value = maybe(values)
        if value is not None:
            doc[key] = value
    if draw(st.integers(0, 3)) == 0:
        hints = {
            "forZones": [
                {"name": z} for z in draw(st.lists(st.sampled_from(["zone-a", "zone-b"]), unique=True))
            ]
        }
        if draw(st.booleans()):
            hints["forNodes"] = [
                {"name": n} for n in draw(st.lists(st.sampled_from(["node-1", "node-2"]), unique=True))
            ]
        doc["hints"] = hints
    return doc


@st.composite
def slices(draw: st.DrawFn) -> objects.EndpointSlice:
    name, ns = draw(st.sampled_from(SLICES)), draw(st.sampled_from(NAMESPACES))
    labels = {}
    owner = draw(st.sampled_from([*SERVICES, None]))
    if owner is not None:
        labels["kubernetes.io/service-name"] = owner
    if draw(st.integers(0, 9)) == 0:
        labels[frontends_module.HEADLESS_LABEL] = ""
    ports = draw(
        st.sampled_from(
            [
                None,
                [],
                [{"name": "http", "port": 8080}],
                [{"name": "http", "port": 8081}, {"name": "alt", "port": 9090, "protocol": "UDP"}],
                [{"name": "alt", "port": 9090}],
                [{"port": 8080}],
            ]
        )
    )
    doc: dict[str, Any] = {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "addressType": draw(st.sampled_from(["IPv4", "IPv4", "IPv6", "FQDN"])),
        "endpoints": draw(st.lists(endpoint_docs(), max_size=6)),  # often with some not ready, or hints
        "ports": ports,
    }
    if draw(st.booleans()):  # as most are: every endpoint ready, no hints
        for endpoint in doc["endpoints"]:
            endpoint.pop("hints", None)
            endpoint["conditions"] = draw(st.sampled_from([{}, {"ready": True}]))
    api = draw(st.booleans())
    if draw(st.booleans()):  # a write that changes nothing the model reads (a new revision all the same)
        doc["metadata"]["annotations"] = {"touched": draw(st.sampled_from(["1", "2"]))}
    doc["metadata"] |= {"uid": f"slice-{ns}-{name}", "resourceVersion": _revision(doc, api)}
    return objects.EndpointSlice.model_validate(doc)


def _node() -> objects.Node:
    doc = {
        "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
    }
    return objects.Node.model_validate(doc)


def _pod() -> objects.Pod:
    doc = {
        "metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1"},
        "status": {
            "phase": "Running",
            "podIP": "10.0.2.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    return objects.Pod.model_validate(doc)


kinds = st.one_of(services(), slices(), slices())
refs = st.tuples(st.sampled_from(["Service", "EndpointSlice"]), st.sampled_from(NAMESPACES),
                 st.sampled_from([*SERVICES, *SLICES]))  # fmt: skip


# --- the plain way: every endpoint read from the slice objects, as the model did before it kept views ----


def plain_candidates(
    port: objects.ServicePort, found: Sequence[objects.EndpointSlice], version: int
) -> list[endpoints.Candidate]:
    """The endpoints of every usable slice of this family (slices by name), one per address and port, a
    duplicate keeping its best conditions (the first of equals); in no particular order."""
    merged: dict[tuple[desired.IPAddress, int], endpoints.Candidate] = {}
    for endpoint_slice in sorted(found, key=lambda s: s.metadata.name):
        if endpoint_slice.address_type != {4: "IPv4", 6: "IPv6"}[version]:
            continue
        if frontends_module.HEADLESS_LABEL in endpoint_slice.metadata.labels:
            continue
        number = _plain_port(port, endpoint_slice)
        if number is None:
            continue
        for endpoint in endpoint_slice.endpoints:
            try:
                ip = desired.parse_ip(endpoint.addresses[0])
            except ValueError:
                continue
            if ip.version != version:
                continue
            cond, hints = endpoint.conditions, endpoint.hints
            candidate = endpoints.Candidate(
                ip,
                number,
                endpoint.node_name or "",
                endpoint.zone or "",
                cond.ready is not False,
                cond.serving is not False,
                cond.terminating is True,
                frozenset(z.name for z in hints.for_zones) if hints else frozenset(),
                frozenset(n.name for n in hints.for_nodes) if hints else frozenset(),
            )
            key = (ip, number)
            if key not in merged or _rank(candidate) > _rank(merged[key]):
                merged[key] = candidate
    return list(merged.values())


def _plain_port(port: objects.ServicePort, endpoint_slice: objects.EndpointSlice) -> int | None:
    declared = endpoint_slice.ports or []
    for entry in declared:
        if (entry.name or "") == port.name and entry.protocol == port.protocol and entry.port is not None:
            return entry.port
    if not declared and not isinstance(port.target_port, str):
        return port.target_port or port.port
    return None


def _rank(c: endpoints.Candidate) -> tuple[bool, bool, bool]:
    return (c.ready, c.serving, not c.terminating)


def loaded(objs: Sequence[objects.KubeObject], config: ModelConfig) -> ClusterStore:
    store = ClusterStore(config)
    for obj in objs:
        store.upsert(obj)
    return store


def apply(applied: dict[FrontendKey, Frontend], changes: FrontendChanges) -> None:
    for key in changes.remove:
        del applied[key]
    applied.update(changes.upsert)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.one_of(kinds, refs), max_size=6), st.booleans()), max_size=8), CONFIGS)
def test_incremental_fast_path_gives_what_a_plain_recompute_gives(
    steps: list[tuple[list[Any], bool]], config: ModelConfig
) -> None:
    store = loaded([_node(), _pod()], config)
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
    wanted = store.desired()
    assert applied == wanted.frontends
    assert wanted == loaded([_node(), _pod(), *truth.values()], config).desired()
    assert store.conflicts() == loaded([_node(), _pod(), *truth.values()], config).conflicts()

    # The plain way: each Service's candidates read endpoint by endpoint from the slice objects it has.
    raw = {(r[1], r[2]): o for r, o in truth.items() if isinstance(o, objects.EndpointSlice)}

    def plain(
        port: objects.ServicePort, views: Sequence[frontends_module.SliceView], version: int
    ) -> tuple[list[endpoints.Candidate], bool]:
        return plain_candidates(port, [raw[v.namespace, v.name] for v in views], version), False

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frontends_module, "_slice_candidates", plain)
        patch.setattr(frontends_module, "_ready_backends", lambda *_: None)  # every Service the general way
        assert wanted == loaded([_node(), _pod(), *truth.values()], config).desired()


@settings(max_examples=200, deadline=None)
@given(st.lists(slices(), max_size=4, unique_by=lambda s: s.metadata.name), services())
def test_slice_views_give_the_plain_candidates(
    found: list[objects.EndpointSlice], service: objects.Service
) -> None:
    views = sorted((frontends_module.slice_view(s) for s in found), key=lambda v: v.name)
    for port in service.spec.ports:
        for version in (4, 6):
            fast, ordered = frontends_module._slice_candidates(port, views, version)
            # the views keep no zone: nothing reads an endpoint's zone (topology goes by its hints)
            plain = [dataclasses.replace(c, zone="") for c in plain_candidates(port, found, version)]
            order = sorted(plain, key=lambda c: (int(c.ip), c.port))
            assert sorted(fast, key=lambda c: (int(c.ip), c.port)) == order
            assert [c.backend for c in fast] == [desired.Backend(c.ip, c.port) for c in fast]
            if ordered:  # what select_endpoints then takes as sorted, without sorting again
                assert list(fast) == order


def test_a_write_of_nothing_the_model_reads_recomputes_nothing() -> None:
    base: dict[str, Any] = {
        "metadata": {"name": "s1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"]}],
        "ports": [{"name": "http", "port": 8080}],
    }
    svc = objects.Service.model_validate(
        {"metadata": {"name": "web", "namespace": "default"},
         "spec": {"clusterIPs": ["10.96.0.10"], "ports": [{"name": "http", "port": 80}]}}
    )  # fmt: skip
    store = loaded([svc, objects.EndpointSlice.model_validate(base)], ModelConfig("node-1"))
    store.take_changes()
    before = store.recomputed
    for rv, zone in (("2", "a"), ("3", "b")):  # new revisions: an annotation, a zone (nothing reads it)
        meta = {**base["metadata"], "resourceVersion": rv, "annotations": {"note": zone}}
        endpoint = {"addresses": ["10.0.0.1"], "zone": f"zone-{zone}"}
        store.upsert(
            objects.EndpointSlice.model_validate({**base, "metadata": meta, "endpoints": [endpoint]})
        )
    assert store.recomputed == before and not store.take_changes()
    # The same resourceVersion, other endpoints (a manifest exported with one, then edited): read anyway.
    meta = {**base["metadata"], "resourceVersion": "3"}
    store.upsert(objects.EndpointSlice.model_validate({**base, "metadata": meta, "endpoints": []}))
    changed = store.take_changes().upsert
    assert store.recomputed == before + 1
    assert changed[FrontendKey(desired.parse_ip("10.96.0.10"), 80, desired.Protocol.TCP)].backends == ()
