"""The map writer's north-south part against the in-memory maps: Maglev tables, flags, tiers, source ranges.

An external frontend gets ``SVC_F_EXTERNAL`` on its master and a Maglev table (an inner map of
``abi.MAP_MAGLEV``, read back through ``FakeMaps.read_table``) naming the backend ids of its north-south
backends, each equally often; externalTrafficPolicy Local adds an external tier (``SCOPE_EXTERNAL``) and
``SVC_F_ETP_LOCAL``; ``local_backends`` are backend entries of their own, flagged ``BE_F_LOCAL``;
loadBalancerSourceRanges are entries of ``abi.MAP_SOURCE_RANGES`` and ``SVC_F_SRC_RANGES``. Checked here:
what each frontend gets, that the same state costs nothing (no map operation, no table built), that a
changed backend set swaps in a new table and lets the old one go, that every node builds the same table,
make-before-break at every element operation under random changes (a master never names a table with a
missing or unasked backend, never restricts to fewer sources than before and after both allow), recovery by
a restarted writer (also with another table size), garbage of unknown frontends, and failures (a Maglev
update, a master or a table creation that fails stays with its frontend, which is left whole; random faults
keep the record true and retries converge). The checks run between operations collect their violations
(``watched``): raised inside a map operation, the writer would take one for a failed operation.
Some cases pin writer bugs these tests found (a frontend written back deleting a backend another master names,
ids of half-removed frontends handed out again, a table smaller than its backends, a backend turned local
reported removed). One file over 400 lines: the cases share the builders of desired states and the readers of
the maps (``view``, ``check_make_before_break``).

Neighbours: tests/unit/test_writer.py covers the writer's socket-LB part (slots, fallback, affinity,
clients, QoS) with the same fakes, tests/unit/test_maglev.py the table algorithm. These tests claim what
the writer writes, not what bpf/nodeport.c does with it (that is for the kernel tests).
"""

from __future__ import annotations

import array
import contextlib
import errno
import ipaddress
import itertools
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from balancing import errors
from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps, Fault
from balancing.datapath.programmed import read_state
from balancing.datapath.writer import MapWriter
from balancing.model.desired import (
    Backend,
    DesiredState,
    Frontend,
    FrontendKey,
    FrontendKind,
    IPNetwork,
    Owner,
    Protocol,
)

SIZE = 13  # a small prime table size keeps most tests fast; one test uses the default
OWNER = Owner("Service", "default", "web", "http")
NODE_PORT = FrontendKey(ipaddress.ip_address("192.0.2.10"), 30080, Protocol.TCP)
NODE_PORT_UDP = FrontendKey(ipaddress.ip_address("192.0.2.10"), 30053, Protocol.UDP)
LB_V6 = FrontendKey(ipaddress.ip_address("2001:db8::10"), 80, Protocol.TCP)
CLUSTER_IP = FrontendKey(ipaddress.ip_address("10.96.0.10"), 80, Protocol.TCP)
KEYS = [NODE_PORT, NODE_PORT_UDP, LB_V6, CLUSTER_IP]
V4 = [Backend(ipaddress.ip_address(f"10.244.0.{i}"), 8080) for i in range(1, 7)]
V6 = [Backend(ipaddress.ip_address(f"fd00:244::{i}"), 8080) for i in range(1, 7)]
RANGES_V4 = [ipaddress.ip_network(n) for n in ("203.0.113.0/24", "198.51.100.0/25", "192.0.2.128/32")]
RANGES_V6 = [ipaddress.ip_network(n) for n in ("2001:db8:1::/48", "2001:db8:2::/64", "2001:db8:3::1/128")]
NS_FLAGS = abi.SVC_F_EXTERNAL | abi.SVC_F_ETP_LOCAL | abi.SVC_F_SRC_RANGES

Entry = tuple[Backend, bool]  # a backend map entry: the backend, and whether it is flagged BE_F_LOCAL


# --- building desired states --------------------------------------------------------------------------------


def pool(key: FrontendKey) -> list[Backend]:
    return V6 if key.ip.version == 6 else V4


def range_pool(key: FrontendKey) -> list[IPNetwork]:
    return list(RANGES_V6 if key.ip.version == 6 else RANGES_V4)


def external(
    backends: Iterable[Backend],
    *,
    local_only: Iterable[Backend] | None = None,
    local: Iterable[Backend] = (),
    ranges: Iterable[IPNetwork] = (),
) -> Frontend:
    """An external frontend as the model makes it; ``local_only``: externalTrafficPolicy Local's backends."""
    return Frontend(
        OWNER,
        tuple(sorted(set(backends))),
        kind=FrontendKind.LOAD_BALANCER,
        external=True,
        external_backends=None if local_only is None else tuple(sorted(set(local_only))),
        external_local=local_only is not None,
        local_backends=frozenset(local),
        source_ranges=tuple(ranges),
    )


@dataclass(frozen=True)
class Spec:
    """One frontend of a random state, by indexes into its family's backends and ranges."""

    backends: tuple[int, ...] = ()
    external: bool = True
    local_only: tuple[int, ...] | None = None  # externalTrafficPolicy Local's backends
    local: frozenset[int] = frozenset()  # which backends are pods on this node
    ranges: frozenset[int] = frozenset()


def frontend(key: FrontendKey, spec: Spec) -> Frontend:
    backends, ranges = pool(key), range_pool(key)
    chosen = {backends[i] for i in spec.backends}
    outside = None if spec.local_only is None else {backends[i] for i in spec.local_only}
    made = external(
        chosen,
        local_only=outside,
        local={backends[i] for i in spec.local} & (chosen | (outside or set())),
        ranges=[ranges[i] for i in sorted(spec.ranges)],
    )
    return made if spec.external else replace(made, external=False, kind=FrontendKind.CLUSTER_IP)


def desired(specs: dict[FrontendKey, Spec]) -> DesiredState:
    return DesiredState({key: frontend(key, spec) for key, spec in specs.items()})


specs = st.builds(
    Spec,
    backends=st.lists(st.integers(0, 5), max_size=5).map(tuple),
    external=st.sampled_from([True, True, False]),
    local_only=st.none() | st.lists(st.integers(0, 5), max_size=3).map(tuple),
    local=st.frozensets(st.integers(0, 5), max_size=3),
    ranges=st.frozensets(st.integers(0, 2), max_size=2),
)
states = st.dictionaries(st.sampled_from(KEYS), specs, max_size=len(KEYS))


# --- reading the maps as the datapath would -----------------------------------------------------------------


def master(maps: FakeMaps, key: FrontendKey, scope: int = abi.SCOPE_PRIMARY) -> abi.SvcVal | None:
    raw = maps.data.get(abi.MAP_SERVICES, {}).get(
        abi.svc_key(key.ip, key.port, key.protocol, abi.MASTER_SLOT, scope).pack()
    )
    return None if raw is None else abi.SvcVal.unpack(raw)


def slot_ids(maps: FakeMaps, key: FrontendKey, scope: int = abi.SCOPE_PRIMARY) -> list[int]:
    """The backend ids of a tier's slots 1..count (every slot must be there)."""
    head = master(maps, key, scope)
    assert head is not None, f"{key}: no master in scope {scope}"
    svc = maps.data[abi.MAP_SERVICES]
    ids = []
    for slot in range(1, head.count + 1):
        raw = svc.get(abi.svc_key(key.ip, key.port, key.protocol, slot, scope).pack())
        assert raw is not None, f"{key}: slot {slot} of scope {scope} missing"
        ids.append(abi.slot_backend_id(raw))
    return ids


def entry(maps: FakeMaps, backend_id: int) -> Entry:
    raw = maps.data.get(abi.MAP_BACKENDS, {}).get(abi.pack_backend_id(backend_id))
    assert raw is not None, f"backend id {backend_id} is named but not in the backend map"
    be = abi.BackendVal.unpack(raw)
    return Backend(abi.unpack_addr(be.addr), be.port), bool(be.flags & abi.BE_F_LOCAL)


def reach(maps: FakeMaps, backend_ids: Iterable[int]) -> frozenset[Entry]:
    return frozenset(entry(maps, backend_id) for backend_id in set(backend_ids))


def maglev_value(maps: FakeMaps, svc_id: int) -> bytes | None:
    return maps.data.get(abi.MAP_MAGLEV, {}).get(abi.pack_maglev_key(svc_id))


def table(maps: FakeMaps, svc_id: int) -> array.array[int] | None:
    value = maglev_value(maps, svc_id)
    return None if value is None else maps.read_table(value)


def source_ranges(maps: FakeMaps, svc_id: int) -> set[IPNetwork]:
    found = (abi.unpack_source_range(raw) for raw in maps.data.get(abi.MAP_SOURCE_RANGES, {}))
    return {network for owner, network in found if owner == svc_id}


def svc_id(maps: FakeMaps, key: FrontendKey) -> int:
    head = master(maps, key)
    assert head is not None, f"{key} is not programmed"
    return head.svc_id


@dataclass(frozen=True)
class View:
    """What a frontend's north-south packets meet in the maps (None parts: absent)."""

    flags: int  # the master's north-south flags
    primary: frozenset[Entry]
    maglev: frozenset[Entry] | None  # what the Maglev table names
    external: frozenset[Entry] | None  # the external tier's backends
    ranges: frozenset[IPNetwork]


def view(maps: FakeMaps, key: FrontendKey) -> View | None:
    head = master(maps, key)
    if head is None:
        return None
    entries = table(maps, head.svc_id)
    tier = master(maps, key, abi.SCOPE_EXTERNAL)
    return View(
        head.flags & NS_FLAGS,
        reach(maps, slot_ids(maps, key)),
        None if entries is None else reach(maps, entries),
        None if tier is None else reach(maps, slot_ids(maps, key, abi.SCOPE_EXTERNAL)),
        frozenset(source_ranges(maps, head.svc_id)),
    )


def as_entries(f: Frontend, backends: Iterable[Backend]) -> frozenset[Entry]:
    return frozenset((b, b in f.local_backends) for b in backends)


def expected(f: Frontend | None) -> View | None:
    """The view of a frontend programmed as ``f`` asks."""
    if f is None:
        return None
    ext = f.external
    flags = (
        (abi.SVC_F_EXTERNAL if ext else 0)
        | (abi.SVC_F_ETP_LOCAL if ext and f.external_local else 0)
        | (abi.SVC_F_SRC_RANGES if ext and f.source_ranges else 0)
    )
    return View(
        flags,
        as_entries(f, f.backends),
        as_entries(f, f.north_south_backends) if ext and f.north_south_backends else None,
        as_entries(f, f.external_backends) if ext and f.external_backends is not None else None,
        frozenset(f.source_ranges) if ext else frozenset(),
    )


def assert_even(entries: array.array[int], backend_ids: Iterable[int], size: int) -> None:
    """A full table naming exactly these backend ids, each ``size // n`` or ``size // n + 1`` times."""
    ids = set(backend_ids)
    counts = Counter(entries)
    assert len(entries) == size
    assert set(counts) == ids
    assert set(counts.values()) <= {size // len(ids), -(-size // len(ids))}


def assert_tables_sized_and_none_leaked(maps: FakeMaps, size: int) -> None:
    named = {abi.unpack_u32(v) for v in maps.data.get(abi.MAP_MAGLEV, {}).values()}
    assert set(maps.tables) == named, "a table no outer entry names was kept"
    assert all(len(maps.tables[i]) == size for i in named)


def assert_record_true(writer: MapWriter, maps: FakeMaps) -> None:
    """What the writer holds to be programmed is what a fresh read of the maps finds."""
    mine, theirs = writer.record(), read_state(maps)
    assert mine.frontends == theirs.frontends
    assert mine.backend_ids == theirs.backend_ids
    assert {m: set(k) for m, k in mine.garbage.items() if k} == {
        m: set(k) for m, k in theirs.garbage.items() if k
    }


@contextlib.contextmanager
def watched(maps: FakeMaps, check: Callable[[], None]) -> Iterator[None]:
    """Run ``check`` after every map operation of the body, and raise its first violation at the end (raised
    inside a map operation, the writer would take it for a failed operation)."""
    violations: list[AssertionError] = []

    def observe() -> None:
        if not violations:
            try:
                check()
            except AssertionError as exc:
                violations.append(exc)

    maps.observer = observe
    try:
        yield
    finally:
        maps.observer = None
    if violations:
        raise violations[0]


class Creates:
    """A ``FakeMaps.fault`` that fails nothing and counts the Maglev tables made."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, op: str, _map: str, _key: bytes, _adds: bool) -> BaseException | None:
        self.count += op == "create"
        return None


# --- what a frontend gets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [13, 101])
@pytest.mark.parametrize("key", [NODE_PORT, LB_V6])
def test_an_external_frontend_gets_the_flag_and_an_even_table_of_its_primary_backends(
    key: FrontendKey, size: int
) -> None:
    maps = FakeMaps()
    MapWriter(maps, maglev_size=size).sync(DesiredState({key: external(pool(key)[:4])}))
    head = master(maps, key)
    assert head is not None and head.flags & NS_FLAGS == abi.SVC_F_EXTERNAL
    entries = table(maps, head.svc_id)
    assert entries is not None
    assert_even(entries, slot_ids(maps, key), size)
    assert reach(maps, entries) == {(b, False) for b in pool(key)[:4]}
    assert master(maps, key, abi.SCOPE_EXTERNAL) is None, "eTP Cluster has no external tier"
    assert list(maps.data[abi.MAP_MAGLEV]) == [abi.pack_maglev_key(head.svc_id)]
    assert_tables_sized_and_none_leaked(maps, size)


@settings(max_examples=50, deadline=None)
@given(
    count=st.integers(1, 6),
    size=st.sampled_from([7, 13, 101]),
    local=st.frozensets(st.integers(0, 5)),
)
def test_every_north_south_backend_gets_its_share_of_the_table(
    count: int, size: int, local: frozenset[int]
) -> None:
    maps = FakeMaps()
    chosen = V4[:count]
    MapWriter(maps, maglev_size=size).sync(
        DesiredState({NODE_PORT: external(chosen, local={V4[i] for i in local if i < count})})
    )
    entries = table(maps, svc_id(maps, NODE_PORT))
    assert entries is not None
    assert_even(entries, slot_ids(maps, NODE_PORT), size)


def test_the_default_table_size_spreads_evenly() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    assert writer.maglev_size == abi.DEFAULT_MAGLEV_SIZE == 16381
    writer.sync(DesiredState({NODE_PORT: external(V4)}))
    entries = table(maps, svc_id(maps, NODE_PORT))
    assert entries is not None
    assert_even(entries, slot_ids(maps, NODE_PORT), abi.DEFAULT_MAGLEV_SIZE)
    assert writer.sync(DesiredState({NODE_PORT: external(V4)})).ops == 0


def test_a_cluster_ip_has_no_north_south_part_and_external_adds_and_removes_it() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    inside = Frontend(OWNER, tuple(V4[:3]), source_ranges=(RANGES_V4[0],))  # ranges count only external
    writer.sync(DesiredState({CLUSTER_IP: inside}))
    assert view(maps, CLUSTER_IP) == View(0, frozenset((b, False) for b in V4[:3]), None, None, frozenset())
    assert not maps.data.get(abi.MAP_MAGLEV) and not maps.tables and not maps.data.get(abi.MAP_SOURCE_RANGES)

    writer.sync(DesiredState({CLUSTER_IP: replace(inside, external=True)}))
    assert view(maps, CLUSTER_IP) == expected(replace(inside, external=True))
    assert len(maps.tables) == 1

    maps.ops.clear()
    writer.sync(DesiredState({CLUSTER_IP: inside}))
    assert view(maps, CLUSTER_IP) == expected(inside)
    assert not maps.data[abi.MAP_MAGLEV] and not maps.tables and not maps.data[abi.MAP_SOURCE_RANGES]
    # the master drops the flag before the table goes
    ops = [(op, m) for op, m, _ in maps.ops]
    assert ops.index(("update", abi.MAP_SERVICES)) < ops.index(("delete", abi.MAP_MAGLEV))


@pytest.mark.parametrize("outside", [[1], [1, 4]], ids=["a subset", "one not in backends"])
def test_etp_local_gets_an_external_tier_and_a_table_of_it(outside: list[int]) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    local = [V4[i] for i in outside]
    writer.sync(DesiredState({NODE_PORT: external(V4[:3], local_only=local, local=local)}))
    head, tier = master(maps, NODE_PORT), master(maps, NODE_PORT, abi.SCOPE_EXTERNAL)
    assert head is not None and tier is not None
    assert head.flags & NS_FLAGS == abi.SVC_F_EXTERNAL | abi.SVC_F_ETP_LOCAL
    assert (tier.svc_id, tier.count) == (head.svc_id, len(local))
    assert reach(maps, slot_ids(maps, NODE_PORT, abi.SCOPE_EXTERNAL)) == {(b, True) for b in local}
    assert reach(maps, slot_ids(maps, NODE_PORT)) == {(b, b in local) for b in V4[:3]}
    entries = table(maps, head.svc_id)
    assert entries is not None
    assert_even(entries, slot_ids(maps, NODE_PORT, abi.SCOPE_EXTERNAL), SIZE)

    writer.sync(DesiredState({NODE_PORT: external(V4[:3], local_only=[])}))  # no local endpoint: dropped
    head, tier = master(maps, NODE_PORT), master(maps, NODE_PORT, abi.SCOPE_EXTERNAL)
    assert head is not None and head.flags & NS_FLAGS == abi.SVC_F_EXTERNAL | abi.SVC_F_ETP_LOCAL
    assert tier is not None and tier.count == 0
    assert maglev_value(maps, head.svc_id) is None and not maps.tables

    writer.sync(DesiredState({NODE_PORT: external(V4[:3])}))  # back to eTP Cluster
    assert view(maps, NODE_PORT) == expected(external(V4[:3]))
    assert not [k for k in maps.data[abi.MAP_SERVICES] if abi.SvcKey.unpack(k).scope == abi.SCOPE_EXTERNAL]
    assert len(maps.data[abi.MAP_BACKENDS]) == 3, "the external tier's backends went with it"
    assert_tables_sized_and_none_leaked(maps, SIZE)
    assert_record_true(writer, maps)


def test_every_node_builds_the_same_table_whatever_its_ids_order_and_local_pods() -> None:
    """A flow hashed to an entry goes to the same backend whichever node it arrives at."""
    node_a, node_b = FakeMaps(), FakeMaps()
    MapWriter(node_a, maglev_size=SIZE).sync(DesiredState({NODE_PORT: external(V4[:5], local=[V4[0]])}))
    writer_b = MapWriter(node_b, maglev_size=SIZE)
    writer_b.sync(DesiredState({CLUSTER_IP: Frontend(OWNER, (V4[4], V4[3]))}))  # other ids on this node
    writer_b.sync(
        DesiredState(
            {
                CLUSTER_IP: Frontend(OWNER, (V4[4], V4[3])),
                NODE_PORT: replace(
                    external(V4[:5], local=[V4[2]]), backends=(V4[3], V4[1], V4[4], V4[0], V4[2])
                ),
            }
        )
    )

    def backends_by_entry(maps: FakeMaps) -> list[Backend]:
        entries = table(maps, svc_id(maps, NODE_PORT))
        assert entries is not None
        return [entry(maps, backend_id)[0] for backend_id in entries]

    assert slot_ids(node_a, NODE_PORT) != slot_ids(node_b, NODE_PORT)
    assert backends_by_entry(node_a) == backends_by_entry(node_b)


def test_local_backends_are_flagged_entries_of_their_own() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    writer.sync(
        DesiredState(
            {
                NODE_PORT: external(V4[:2], local=[V4[0]]),
                CLUSTER_IP: Frontend(OWNER, (V4[0],)),
            }
        )
    )
    flags = Counter(
        (abi.BackendVal.unpack(raw).addr, abi.BackendVal.unpack(raw).flags)
        for raw in maps.data[abi.MAP_BACKENDS].values()
    )
    v0, v1 = (abi.pack_addr(b.ip) for b in V4[:2])
    assert flags == {(v0, abi.BE_F_LOCAL): 1, (v0, 0): 1, (v1, 0): 1}
    assert reach(maps, slot_ids(maps, CLUSTER_IP)) == {(V4[0], False)}
    entries = table(maps, svc_id(maps, NODE_PORT))
    assert entries is not None and reach(maps, entries) == {(V4[0], True), (V4[1], False)}


# --- source ranges ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [NODE_PORT, LB_V6])
def test_source_ranges_are_entries_and_a_flag_added_before_and_removed_after_the_master(
    key: FrontendKey,
) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    a, b, c = range_pool(key)
    backends = pool(key)[:2]
    writer.sync(DesiredState({key: external(backends)}))
    sid = svc_id(maps, key)
    master_key = abi.svc_key(key.ip, key.port, key.protocol, abi.MASTER_SLOT).pack()

    def order() -> dict[tuple[str, bytes], int]:
        return {(op, k): i for i, (op, _, k) in enumerate(maps.ops)}

    maps.ops.clear()
    writer.sync(DesiredState({key: external(backends, ranges=[a, b])}))
    assert {abi.unpack_source_range(k) for k in maps.data[abi.MAP_SOURCE_RANGES]} == {(sid, a), (sid, b)}
    head = master(maps, key)
    assert head is not None and head.flags & abi.SVC_F_SRC_RANGES
    pos = order()
    for n in (a, b):
        assert pos[("update", abi.pack_source_range(sid, n))] < pos[("update", master_key)]

    maps.ops.clear()
    writer.sync(DesiredState({key: external(backends, ranges=[b, c])}))
    assert source_ranges(maps, sid) == {b, c}
    pos = order()
    assert pos[("update", abi.pack_source_range(sid, c))] < pos[("delete", abi.pack_source_range(sid, a))]
    assert ("update", master_key) not in pos, "the flag stays: the master is not rewritten"

    maps.ops.clear()
    writer.sync(DesiredState({key: external(backends)}))
    assert not maps.data[abi.MAP_SOURCE_RANGES]
    head = master(maps, key)
    assert head is not None and not head.flags & abi.SVC_F_SRC_RANGES
    pos = order()
    for n in (b, c):
        assert pos[("update", master_key)] < pos[("delete", abi.pack_source_range(sid, n))]

    writer.sync(DesiredState({key: external(backends, ranges=[a])}))
    maps.ops.clear()
    writer.sync(DesiredState())
    assert not maps.data[abi.MAP_SOURCE_RANGES] and not maps.data[abi.MAP_MAGLEV] and not maps.tables
    pos = order()
    assert pos[("delete", master_key)] < pos[("delete", abi.pack_source_range(sid, a))]


# --- costs: the same state, a changed set -------------------------------------------------------------------


def rich_state() -> DesiredState:
    """One frontend of each north-south kind, and a ClusterIP sharing a backend."""
    return DesiredState(
        {
            NODE_PORT: external(V4[:4], local=[V4[1]]),
            NODE_PORT_UDP: external(V4[:4], local_only=[V4[1], V4[5]], local=[V4[1], V4[5]]),
            LB_V6: external(V6[:3], ranges=RANGES_V6[:2]),
            CLUSTER_IP: Frontend(OWNER, tuple(V4[:2])),
        }
    )


def test_the_same_state_twice_costs_no_operation_and_builds_no_table() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    assert writer.sync(rich_state()).ops > 0
    tables = {i: list(t) for i, t in maps.tables.items()}
    assert len(tables) == 3
    creates = Creates()
    maps.fault, ops = creates, len(maps.ops)
    assert writer.sync(rich_state()).ops == 0  # equal Frontends, new objects
    state = rich_state()
    assert writer.sync(state).ops == writer.sync(state).ops == 0  # the very same objects
    assert len(maps.ops) == ops and creates.count == 0
    assert {i: list(t) for i, t in maps.tables.items()} == tables


def test_a_changed_backend_set_swaps_in_a_new_table_and_lets_the_old_one_go() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    writer.sync(DesiredState({NODE_PORT: external(V4[:3])}))
    sid = svc_id(maps, NODE_PORT)
    old = maglev_value(maps, sid)
    creates = Creates()
    maps.fault = creates
    writer.sync(DesiredState({NODE_PORT: external(V4[1:4])}))
    new = maglev_value(maps, sid)
    assert creates.count == 1 and new is not None and new != old
    assert old not in maps.data[abi.MAP_MAGLEV].values()
    assert old is not None and abi.unpack_u32(old) not in maps.tables
    entries = table(maps, sid)
    assert entries is not None and reach(maps, entries) == {(b, False) for b in V4[1:4]}

    maps.ops.clear()
    reordered = replace(external(V4[1:4]), backends=(V4[3], V4[1], V4[2]))
    assert writer.sync(DesiredState({NODE_PORT: reordered})).ops == 0
    local_only = external(V4[:2], local_only=[V4[4], V4[5]])
    writer.sync(DesiredState({NODE_PORT: local_only}))
    made = creates.count
    assert (
        writer.sync(DesiredState({NODE_PORT: replace(local_only, external_backends=(V4[5], V4[4]))})).ops == 0
    )
    assert writer.sync(DesiredState({NODE_PORT: external(V4[:2], local_only=[V4[4], V4[5]])})).ops == 0
    assert creates.count == made

    writer.sync(DesiredState({NODE_PORT: external(V4[:2], local_only=[V4[4], V4[5]], local=[V4[4]])}))
    assert creates.count == made + 1, "a backend flagged local is another entry: another table"


def test_frontends_with_the_same_backends_share_one_table_until_one_changes() -> None:
    """A Service's NodePort and load-balancer frontends: one table, built once (by a restarted writer too)."""
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    creates = Creates()
    maps.fault = creates
    lb = replace(NODE_PORT, ip=ipaddress.ip_address("198.51.100.1"), port=80)
    both = {NODE_PORT: external(V4[:3]), lb: external(V4[:3], ranges=RANGES_V4[:1])}
    writer.sync(DesiredState(both))
    assert creates.count == 1 and len(set(maps.data[abi.MAP_MAGLEV].values())) == 1

    writer.sync(DesiredState({**both, NODE_PORT: external(V4[:4])}))
    assert creates.count == 2 and maglev_value(maps, svc_id(maps, NODE_PORT)) != maglev_value(
        maps, svc_id(maps, lb)
    )
    assert view(maps, lb) == expected(both[lb]) and view(maps, NODE_PORT) == expected(external(V4[:4]))
    assert_tables_sized_and_none_leaked(maps, SIZE)

    third = replace(lb, port=443)
    restarted = MapWriter(maps, maglev_size=SIZE)
    restarted.sync(DesiredState({**both, NODE_PORT: external(V4[:4]), third: external(V4[:4])}))
    assert creates.count == 2, "the table read back is shared"
    assert maglev_value(maps, svc_id(maps, third)) == maglev_value(maps, svc_id(maps, NODE_PORT))
    restarted.sync(DesiredState({third: external(V4[:4])}))
    assert_tables_sized_and_none_leaked(maps, SIZE)
    assert len(maps.tables) == 1 and creates.count == 2
    restarted.sync(DesiredState())
    assert not maps.tables and not maps.data[abi.MAP_MAGLEV]
    assert_record_true(restarted, maps)


# --- make-before-break --------------------------------------------------------------------------------------


def check_make_before_break(maps: FakeMaps, before: DesiredState, after: DesiredState) -> None:
    """At this instant every external master's table names backends that exist and that before or after
    asks; and a master that restricts sources allows at least what before and after both allow."""
    for key in {*KEYS, *before.frontends, *after.frontends}:
        head = master(maps, key)
        if head is None:
            continue
        states = [f for f in (before.frontends.get(key), after.frontends.get(key)) if f is not None]
        assert states, f"{key} is programmed in neither state"
        outside = [f for f in states if f.external]
        flags = head.flags
        if flags & abi.SVC_F_EXTERNAL:
            assert outside, f"{key} is external in neither state"
            entries = table(maps, head.svc_id)
            if entries is None:
                assert any(not f.north_south_backends for f in outside), f"{key}: external without a table"
            else:
                allowed = frozenset().union(*(as_entries(f, f.north_south_backends) for f in outside))
                reached = reach(maps, entries)  # asserts every id is in the backend map
                assert reached <= allowed, f"{key}: the table names {reached - allowed}"
        if flags & abi.SVC_F_ETP_LOCAL:
            assert any(f.external_local for f in outside), f"{key}: eTP Local in neither state"
        present = source_ranges(maps, head.svc_id)
        wanted = [set(f.source_ranges) if f.external else set() for f in states]
        assert present <= set().union(*wanted), f"{key}: ranges {present} asked by neither state"
        if flags & abi.SVC_F_SRC_RANGES:
            assert present >= set.intersection(*wanted), f"{key}: a range both states allow is missing"
            assert present, f"{key} restricts to no source at all"
        elif all(wanted):
            raise AssertionError(f"{key}: both states restrict sources, the master does not")


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(states, min_size=1, max_size=5))
def test_every_instant_names_only_backends_and_ranges_valid_before_or_after(
    steps: list[dict[FrontendKey, Spec]],
) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    before = DesiredState()
    for step in steps:
        after = desired(step)

        def check(before: DesiredState = before, after: DesiredState = after) -> None:
            check_make_before_break(maps, before, after)

        with watched(maps, check):
            stats = writer.sync(after)
        assert not stats.failed
        assert {key: view(maps, key) for key in KEYS} == {
            key: expected(after.frontends.get(key)) for key in KEYS
        }
        assert_tables_sized_and_none_leaked(maps, SIZE)
        assert_record_true(writer, maps)
        assert writer.sync(after).ops == 0
        assert MapWriter(maps, maglev_size=SIZE).sync(after).ops == 0, "a restarted writer agrees"
        before = after


# --- recovery and garbage -----------------------------------------------------------------------------------


def test_a_restarted_writer_reads_back_the_same_record_and_converges_for_free() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    writer.sync(rich_state())
    restarted = MapWriter(maps, maglev_size=SIZE)
    assert restarted.record() == writer.record()
    udp = restarted.record().frontends[NODE_PORT_UDP]
    assert udp.external is not None and udp.maglev_size == SIZE and len(udp.maglev_ids) == 2
    assert len(restarted.record().frontends[LB_V6].source_ranges) == 2
    creates = Creates()
    maps.fault = creates
    assert restarted.sync(rich_state()).ops == 0 and creates.count == 0


def test_a_restarted_writer_with_another_table_size_rebuilds_every_table_once() -> None:
    maps = FakeMaps()
    MapWriter(maps, maglev_size=SIZE).sync(rich_state())
    creates = Creates()
    maps.fault = creates
    resized = MapWriter(maps, maglev_size=101)
    stats = resized.sync(rich_state())
    assert creates.count == 3 and stats.ops == 3, "one outer-map update per table, nothing else"
    assert_tables_sized_and_none_leaked(maps, 101)
    assert {key: view(maps, key) for key in KEYS} == {
        key: expected(f) for key, f in rich_state().frontends.items()
    }
    assert resized.sync(rich_state()).ops == 0 and creates.count == 3
    assert MapWriter(maps, maglev_size=101).sync(rich_state()).ops == 0


def test_a_table_smaller_than_its_backends_reads_back_as_recorded() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=3)
    state = DesiredState({NODE_PORT: external(V4[:5])})  # 2 of the 5 get no entry (the writer warns)
    writer.sync(state)
    assert_record_true(writer, maps)
    assert MapWriter(maps, maglev_size=3).sync(state).ops == 0


def test_maglev_entries_and_source_ranges_of_unknown_frontends_are_deleted_by_the_next_write() -> None:
    maps = FakeMaps()
    MapWriter(maps, maglev_size=SIZE).sync(rich_state())
    live = {m: dict(maps.data[m]) for m in (abi.MAP_MAGLEV, abi.MAP_SOURCE_RANGES)}
    stray = maps.create_table(array.array("I", [1] * SIZE))
    junk_table, junk_range = abi.pack_maglev_key(999), abi.pack_source_range(999, RANGES_V4[0])
    maps.update(abi.MAP_MAGLEV, [(junk_table, stray)])
    maps.update(abi.MAP_SOURCE_RANGES, [(junk_range, abi.SRCR_VALUE)])
    writer = MapWriter(maps, maglev_size=SIZE)
    assert writer.record().garbage == {abi.MAP_MAGLEV: [junk_table], abi.MAP_SOURCE_RANGES: [junk_range]}
    assert writer.sync(rich_state()).ops == 2
    assert {m: dict(maps.data[m]) for m in live} == live
    assert abi.unpack_u32(stray) not in maps.tables
    assert_record_true(writer, maps)


class Crash(BaseException):
    """The agent dies in the middle of a write (no ``except Exception`` sees it)."""


def test_a_restart_after_a_crash_never_shows_a_new_frontend_the_leftovers_of_an_old_one() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    old = DesiredState(
        {CLUSTER_IP: Frontend(OWNER, (V4[0],)), NODE_PORT: external(V4[:2], ranges=RANGES_V4[:1])}
    )
    writer.sync(old)
    master_key = abi.svc_key(NODE_PORT.ip, NODE_PORT.port, NODE_PORT.protocol, abi.MASTER_SLOT).pack()

    def crash_after_the_master_went() -> None:
        if maps.ops[-1] == ("delete", abi.MAP_SERVICES, master_key):
            raise Crash

    maps.observer = crash_after_the_master_went
    with pytest.raises(Crash):
        writer.sync(DesiredState({CLUSTER_IP: old.frontends[CLUSTER_IP]}))
    # restarted: a new frontend, eTP Local without a local endpoint (dropped), restricted to another range
    new_key = replace(NODE_PORT, port=30081)
    new = DesiredState(
        {
            CLUSTER_IP: old.frontends[CLUSTER_IP],
            new_key: external(V4[2:3], local_only=[], ranges=RANGES_V4[1:2]),
        }
    )
    survived = DesiredState({CLUSTER_IP: old.frontends[CLUSTER_IP]})
    with watched(maps, lambda: check_make_before_break(maps, survived, new)):
        MapWriter(maps, maglev_size=SIZE).sync(new)


# --- failures -----------------------------------------------------------------------------------------------


def fail_keys(
    map_name: str,
    keys: set[bytes],
    exc: Callable[[], BaseException],
    op: str = "update",
    times: int = 1_000_000,
) -> Fault:
    """A fault that fails the first ``times`` ``op``s on these keys of ``map_name``."""
    left = [times]

    def fault(o: str, m: str, key: bytes, _adds: bool) -> BaseException | None:
        if (o, m) == (op, map_name) and key in keys and left[0] > 0:
            left[0] -= 1
            return exc()
        return None

    return fault


@pytest.mark.parametrize("new_frontend", [False, True], ids=["changed", "new"])
def test_a_failed_maglev_update_fails_its_frontend_alone_which_keeps_its_old_table(
    new_frontend: bool,
) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    first = rich_state()
    if new_frontend:
        del first.frontends[NODE_PORT]
    writer.sync(first)
    was = {key: view(maps, key) for key in KEYS}
    old_sid = writer.svc_id(NODE_PORT)
    old_value = None if old_sid is None else maglev_value(maps, old_sid)
    old_table = None if old_sid is None else table(maps, old_sid)
    sid = old_sid if old_sid is not None else writer.record().max_svc_id + 1
    second = DesiredState(
        {
            NODE_PORT: external(V4[2:5], ranges=RANGES_V4[:1]),
            NODE_PORT_UDP: external(V4[2:5], local_only=[V4[3]], local=[V4[3]]),
            LB_V6: external(V6[1:4]),
            CLUSTER_IP: Frontend(OWNER, tuple(V4[:2])),
        }
    )
    maps.fault = fail_keys(
        abi.MAP_MAGLEV,
        {abi.pack_maglev_key(sid)},
        lambda: errors.MapError(abi.MAP_MAGLEV, "update", errno.EINVAL),
        times=2,  # in the batch and alone; writing it back then works
    )
    stats = writer.sync(second)
    maps.fault = None
    assert set(stats.failed) == {NODE_PORT}
    assert stats.failed[NODE_PORT].map == abi.MAP_MAGLEV and str(NODE_PORT) in str(stats.failed[NODE_PORT])
    assert view(maps, NODE_PORT) == was[NODE_PORT]
    if old_value is not None and old_table is not None:
        assert maglev_value(maps, sid) == old_value
        assert list(maps.read_table(old_value)) == list(old_table)
    for key in (NODE_PORT_UDP, LB_V6, CLUSTER_IP):
        assert view(maps, key) == expected(second.frontends[key])
    assert_tables_sized_and_none_leaked(maps, SIZE)
    assert_record_true(writer, maps)
    assert not writer.sync(second).failed
    assert view(maps, NODE_PORT) == expected(second.frontends[NODE_PORT])
    assert writer.sync(second).ops == 0


def test_a_frontend_whose_master_fails_after_its_table_swapped_gets_its_old_table_back() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    first = DesiredState({NODE_PORT: external(V4[:3]), LB_V6: external(V6[:2])})
    writer.sync(first)
    was = view(maps, NODE_PORT)
    sid = svc_id(maps, NODE_PORT)
    old_value, old_table = maglev_value(maps, sid), table(maps, sid)
    assert old_value is not None and old_table is not None
    master_key = abi.svc_key(NODE_PORT.ip, NODE_PORT.port, NODE_PORT.protocol, abi.MASTER_SLOT).pack()
    second = DesiredState(
        {NODE_PORT: external(V4[2:5], ranges=RANGES_V4[:1]), LB_V6: external(V6[1:4], ranges=RANGES_V6[:1])}
    )  # the flag changes: the master is rewritten after the new table is in
    maps.fault = fail_keys(
        abi.MAP_SERVICES,
        {master_key},
        lambda: errors.MapError(abi.MAP_SERVICES, "update", errno.EIO),
        times=2,
    )
    with watched(maps, lambda: check_make_before_break(maps, first, second)):
        stats = writer.sync(second)
    maps.fault = None
    assert set(stats.failed) == {NODE_PORT}
    assert view(maps, NODE_PORT) == was
    assert maglev_value(maps, sid) == old_value
    assert list(maps.read_table(old_value)) == list(old_table)
    assert view(maps, LB_V6) == expected(second.frontends[LB_V6])
    assert_tables_sized_and_none_leaked(maps, SIZE)
    assert_record_true(writer, maps)
    assert not writer.sync(second).failed
    assert view(maps, NODE_PORT) == expected(second.frontends[NODE_PORT])


def test_a_frontend_written_back_keeps_the_new_backends_another_master_names() -> None:
    """The batch fails at the last master (the first two are in); then writing the first frontend alone
    fails too, and it is written back: the backend it shares with the second (whose master the batch wrote)
    stays."""
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    asked = DesiredState({NODE_PORT: external(V4[:1]), CLUSTER_IP: external(V4[:1]), LB_V6: external(V6[:1])})
    last_master = (abi.MAP_SERVICES, abi.svc_key(LB_V6.ip, LB_V6.port, LB_V6.protocol, 0).pack())
    shared = (abi.MAP_BACKENDS, abi.pack_backend_id(1))
    updates: Counter[tuple[str, bytes]] = Counter()

    def fault(op: str, map_name: str, key: bytes, _adds: bool) -> BaseException | None:
        if op != "update":
            return None
        updates[map_name, key] += 1
        if ((map_name, key), updates[map_name, key]) in ((last_master, 1), (shared, 2)):
            return errors.MapError(map_name, op, errno.EIO)
        return None

    maps.fault = fault
    with watched(maps, lambda: check_make_before_break(maps, DesiredState(), asked)):
        stats = writer.sync(asked)
    maps.fault = None
    assert set(stats.failed) == {NODE_PORT}
    assert view(maps, CLUSTER_IP) == expected(asked.frontends[CLUSTER_IP])


def test_a_table_that_cannot_be_made_fails_its_frontend_at_planning() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    writer.sync(DesiredState({NODE_PORT: external(V4[:2]), LB_V6: external(V6[:2])}))
    was = view(maps, NODE_PORT)
    sid = svc_id(maps, NODE_PORT)
    second = DesiredState(
        {
            NODE_PORT: external(V4[:3], ranges=RANGES_V4[:1]),
            LB_V6: external(V6[:3]),
            NODE_PORT_UDP: external(V4[5:]),
        }
    )
    maps.fault = fail_keys(
        abi.MAP_MAGLEV,
        {b""},
        lambda: errors.MapError(abi.MAP_MAGLEV, "create a table for", errno.ENOMEM),
        "create",
        1,
    )
    maps.ops.clear()
    stats = writer.sync(second)  # NODE_PORT is planned first
    maps.fault = None
    assert set(stats.failed) == {NODE_PORT} and stats.failed[NODE_PORT].map == abi.MAP_MAGLEV
    mine = {abi.svc_key(NODE_PORT.ip, NODE_PORT.port, NODE_PORT.protocol, s).pack() for s in range(4)}
    mine |= {abi.pack_maglev_key(sid), abi.pack_source_range(sid, RANGES_V4[0])}
    assert not [k for _, _, k in maps.ops if k in mine], "nothing of the failed frontend was written"
    addresses = {abi.BackendVal.unpack(raw).addr for raw in maps.data[abi.MAP_BACKENDS].values()}
    assert abi.pack_addr(V4[2].ip) not in addresses, "the backend only the failed frontend wanted is not kept"
    assert len(addresses) == 6
    assert view(maps, NODE_PORT) == was
    assert view(maps, LB_V6) == expected(second.frontends[LB_V6])
    assert view(maps, NODE_PORT_UDP) == expected(second.frontends[NODE_PORT_UDP])
    assert_tables_sized_and_none_leaked(maps, SIZE)
    assert_record_true(writer, maps)
    assert not writer.sync(second).failed
    assert view(maps, NODE_PORT) == expected(second.frontends[NODE_PORT])


EXCEPTIONS: list[Callable[[str, str], BaseException]] = [
    lambda op, m: errors.MapError(m, op, errno.EINVAL),
    lambda op, m: errors.MapFull(m, 1),
    lambda _op, _m: struct.error("boom"),
    lambda _op, _m: RuntimeError("boom"),
]
faults = st.fixed_dictionaries(
    {
        "nth": st.sets(
            st.integers(0, 50), max_size=3
        ),  # fault checks (element operations, creates) that fail
        "exc": st.sampled_from(range(len(EXCEPTIONS))),
        "poison": st.sets(st.sampled_from(KEYS), max_size=1),  # given a value the maps cannot hold
    }
)


def assert_old_or_switched(now: View | None, was: View | None, want: View | None) -> None:
    """A failed frontend is at its old state, or switched to the new one with stale entries left over."""
    if now == was:
        return
    event("a frontend failed after its switch")
    if want is None or now is None:
        assert now == want, f"neither old nor new: {now}"
        return
    assert (now.flags, now.primary) == (want.flags, want.primary), f"neither old nor new: {now}"
    assert want.maglev is None or now.maglev == want.maglev
    assert want.ranges <= now.ranges <= want.ranges | (was.ranges if was else frozenset())


# The batch fails at a master, then the first frontend alone at its backend: see the test above.
WRITTEN_BACK_UNDER_ANOTHER = (
    {
        CLUSTER_IP: Spec((), local_only=(0,)),
        NODE_PORT: Spec((0, 1)),
        NODE_PORT_UDP: Spec((), local_only=(0, 1)),
        LB_V6: Spec((), local_only=(0,)),
    },
    {"nth": {24, 25}, "exc": 3, "poison": set()},
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(states, faults), min_size=1, max_size=4))
@example(steps=[WRITTEN_BACK_UNDER_ANOTHER])
def test_injected_failures_leave_every_frontend_whole_the_record_true_and_retries_converge(
    steps: list[tuple[dict[FrontendKey, Spec], dict[str, Any]]],
) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    before = DesiredState()
    for step, fault in steps:
        after = desired(step)
        asked = DesiredState(
            {
                k: replace(f, affinity_timeout=2**32) if k in fault["poison"] else f
                for k, f in after.frontends.items()
            }
        )
        was = {key: view(maps, key) for key in KEYS}
        count = itertools.count()

        def fail(
            op: str,
            map_name: str,
            _key: bytes,
            _adds: bool,
            fault: dict[str, Any] = fault,
            count: Iterator[int] = count,
        ) -> BaseException | None:
            return EXCEPTIONS[fault["exc"]](op, map_name) if next(count) in fault["nth"] else None

        def check(before: DesiredState = before, asked: DesiredState = asked) -> None:
            check_make_before_break(maps, before, asked)

        with watched(maps, check):
            maps.fault = fail
            try:
                stats = writer.sync(asked)
            except errors.DatapathError:
                stats = None  # a failure no frontend owns (or writing one back failed too)
                event("the write raised")
            finally:
                maps.fault = None
        assert_record_true(writer, maps)
        assert_tables_sized_and_none_leaked(maps, SIZE)
        if stats is not None:
            assert fault["poison"] & asked.frontends.keys() <= stats.failed.keys()
            for key in KEYS:
                now, want = view(maps, key), expected(asked.frontends.get(key))
                if key in stats.failed:
                    event("a frontend failed")
                    assert isinstance(stats.failed[key], errors.DatapathError)
                    assert_old_or_switched(now, was[key], want)
                else:
                    assert now == want, key
        assert not writer.sync(after).failed
        assert {key: view(maps, key) for key in KEYS} == {
            key: expected(after.frontends.get(key)) for key in KEYS
        }
        assert_record_true(writer, maps)
        assert writer.sync(after).ops == 0
        assert MapWriter(maps, maglev_size=SIZE).sync(after).ops == 0, "a restarted writer agrees"
        before = after


# --- UDP sockets --------------------------------------------------------------------------------------------


def test_a_udp_backend_that_becomes_local_is_not_reported_removed() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps, maglev_size=SIZE)
    writer.sync(DesiredState({NODE_PORT_UDP: external(V4[:2])}))
    stats = writer.sync(DesiredState({NODE_PORT_UDP: external(V4[:2], local=[V4[0]])}))
    assert stats.udp_backends_removed == {}, "its connected UDP sockets would be destroyed for nothing"
    stats = writer.sync(DesiredState({NODE_PORT_UDP: external(V4[1:2], local=[V4[0]])}))
    assert stats.udp_backends_removed == {NODE_PORT_UDP: frozenset({V4[0]})}
