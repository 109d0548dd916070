"""Map writer against the in-memory maps: diffing, idempotency, recovery, make-before-break and failures.

The make-before-break property is checked between every two element operations: a reader that resolves a
frontend at that instant (master, then a slot, then the backend) must find a backend that was valid before
or after the change. Failures are injected through ``FakeMaps.fault`` and capacities (and values the maps
cannot hold): the frontend that fails ends whole at its old state (or, failing after its switch, its new
one), the others are written, the writer's record equals a fresh read of the maps, and a retry converges.
The same writer runs against kernel maps in tests/kernel/test_writer_kernel.py.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from balancing import errors
from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps, Fault
from balancing.datapath.programmed import read_state
from balancing.datapath.writer import MapWriter, assign_slots
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendKey, Owner, Protocol

OWNER = Owner("Service", "default", "web", "http")
KEYS = [
    FrontendKey(ipaddress.ip_address("10.96.0.1"), 80, Protocol.TCP),
    FrontendKey(ipaddress.ip_address("10.96.0.1"), 80, Protocol.UDP),
    FrontendKey(ipaddress.ip_address("fd00:96::1"), 80, Protocol.TCP),
]
V4 = [Backend(ipaddress.ip_address(f"10.244.0.{i}"), 8080) for i in range(1, 7)]
V6 = [Backend(ipaddress.ip_address(f"fd00:244::{i}"), 8080) for i in range(1, 7)]


def state(
    spec: dict[int, list[int]], affinity: int = 0, fallback: list[int] | None = None, qos: int = 0
) -> DesiredState:
    """{key index: backend indexes} → DesiredState (v6 keys get v6 backends); ``fallback`` for every key."""
    out = {}
    for k, idx in spec.items():
        pool = V6 if KEYS[k].ip.version == 6 else V4
        out[KEYS[k]] = Frontend(
            OWNER,
            tuple(sorted(pool[i] for i in set(idx))),
            affinity_timeout=affinity,
            fallback=None if fallback is None else tuple(sorted(pool[i] for i in set(fallback))),
            qos_limit=qos,
        )
    return DesiredState(out)


def resolve_fallback(maps: FakeMaps, key: FrontendKey) -> set[Backend] | None:
    """Backends a connect that skips the primary tier could reach now; None when there is no fallback."""
    svc = maps.data.get(abi.MAP_SERVICES, {})
    master_raw = svc.get(abi.svc_key(key.ip, key.port, key.protocol, 0).pack())
    if master_raw is None or not abi.SvcVal.unpack(master_raw).flags & abi.SVC_F_FALLBACK:
        return None
    fb_raw = svc.get(abi.svc_key(key.ip, key.port, key.protocol, 0, abi.SCOPE_FALLBACK).pack())
    assert fb_raw is not None, f"{key}: the fallback flag is set but the fallback tier is missing"
    reached = set()
    for slot in range(1, abi.SvcVal.unpack(fb_raw).count + 1):
        slot_raw = svc.get(abi.svc_key(key.ip, key.port, key.protocol, slot, abi.SCOPE_FALLBACK).pack())
        assert slot_raw is not None, f"{key}: fallback slot {slot} missing"
        be_raw = maps.data[abi.MAP_BACKENDS].get(abi.pack_backend_id(abi.SvcVal.unpack(slot_raw).backend_id))
        assert be_raw is not None, f"{key}: fallback slot {slot} names a missing backend"
        be = abi.BackendVal.unpack(be_raw)
        reached.add(Backend(abi.unpack_addr(be.addr), be.port))
    return reached


def affinity_targets(maps: FakeMaps, key: FrontendKey) -> set[Backend] | None:
    """Backends an affinity record could send a client to now; None when affinity is off."""
    svc, bes = maps.data.get(abi.MAP_SERVICES, {}), maps.data.get(abi.MAP_BACKENDS, {})
    master_raw = svc.get(abi.svc_key(key.ip, key.port, key.protocol, 0).pack())
    if master_raw is None or not abi.SvcVal.unpack(master_raw).flags & abi.SVC_F_AFFINITY:
        return None
    svc_id = abi.SvcVal.unpack(master_raw).svc_id
    out = set()
    for raw in maps.data.get(abi.MAP_AFFINITY_MATCH, {}):
        match_svc, backend_id = abi.unpack_affinity_match(raw)
        if match_svc == svc_id:
            be_raw = bes.get(abi.pack_backend_id(backend_id))
            assert be_raw is not None, f"{key}: affinity match names a missing backend"
            be = abi.BackendVal.unpack(be_raw)
            out.add(Backend(abi.unpack_addr(be.addr), be.port))
    return out


def resolve_all(maps: FakeMaps, key: FrontendKey) -> set[Backend] | None:
    """Every backend a connect could reach now; None when the frontend is not programmed."""
    svc, bes = maps.data.get(abi.MAP_SERVICES, {}), maps.data.get(abi.MAP_BACKENDS, {})
    master_raw = svc.get(abi.svc_key(key.ip, key.port, key.protocol, 0).pack())
    if master_raw is None:
        return None
    master = abi.SvcVal.unpack(master_raw)
    reached = set()
    for slot in range(1, master.count + 1):
        slot_raw = svc.get(abi.svc_key(key.ip, key.port, key.protocol, slot).pack())
        assert slot_raw is not None, f"{key}: slot {slot} of {master.count} missing"
        be_raw = bes.get(abi.pack_backend_id(abi.SvcVal.unpack(slot_raw).backend_id))
        assert be_raw is not None, f"{key}: slot {slot} names a missing backend"
        be = abi.BackendVal.unpack(be_raw)
        reached.add(Backend(abi.unpack_addr(be.addr), be.port))
    return reached


def test_same_state_twice_costs_nothing() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    first = writer.sync(state({0: [0, 1, 2], 1: [3], 2: [0, 1]}))
    assert first.ops > 0
    assert writer.sync(state({0: [0, 1, 2], 1: [3], 2: [0, 1]})).ops == 0


def test_one_endpoint_removed_costs_a_few_operations() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1, 2, 3, 4, 5]}))
    maps.ops.clear()
    writer.sync(state({0: [0, 1, 3, 4, 5]}))
    # slot of backend 2 takes the tail backend, count shrinks, the tail slot and the backend go
    assert [op for op, _, _ in maps.ops] == ["update", "update", "delete", "delete"]


def test_frontend_without_backends_is_programmed_with_count_zero() -> None:
    maps = FakeMaps()
    MapWriter(maps).sync(state({0: []}))
    assert resolve_all(maps, KEYS[0]) == set()


def test_recovery_reads_the_maps_back_and_converges_without_flushing() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1, 2], 2: [1]}))
    ids = {k: writer.svc_id(k) for k in (KEYS[0], KEYS[2])}
    restarted = MapWriter(maps)
    assert restarted.programmed() == writer.programmed()
    assert {k: restarted.svc_id(k) for k in ids} == ids
    assert restarted.sync(state({0: [0, 1, 2], 2: [1]})).ops == 0
    assert restarted.sync(state({0: [0, 1, 2]})).frontends_removed == 1


def test_recovery_collects_garbage_a_crash_could_leave() -> None:
    maps = FakeMaps()
    MapWriter(maps).sync(state({0: [0, 1]}))
    key = KEYS[0]
    orphan_slot = abi.svc_key(key.ip, key.port, key.protocol, 7).pack()
    orphan_backend = abi.pack_backend_id(999)
    maps.update(abi.MAP_SERVICES, [(orphan_slot, abi.SvcVal(backend_id=1).pack())])
    maps.update(abi.MAP_BACKENDS, [(orphan_backend, abi.BackendVal(abi.pack_addr(V4[5].ip), 1, 6).pack())])
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1]}))
    assert orphan_slot not in maps.data[abi.MAP_SERVICES]
    assert orphan_backend not in maps.data[abi.MAP_BACKENDS]
    assert resolve_all(maps, key) == {V4[0], V4[1]}


def test_frontend_whose_master_vanished_is_rebuilt_on_its_old_slot_keys() -> None:
    maps = FakeMaps()
    MapWriter(maps).sync(state({0: [0, 1, 2]}))
    key = KEYS[0]
    del maps.data[abi.MAP_SERVICES][abi.svc_key(key.ip, key.port, key.protocol, 0).pack()]
    writer = MapWriter(maps)  # recovery: the three slots and backends are now garbage
    writer.sync(state({0: [0, 1, 2]}))
    assert resolve_all(maps, key) == {V4[0], V4[1], V4[2]}
    assert writer.programmed() == MapWriter(maps).programmed()


def test_backend_shared_by_two_frontends_stays_while_one_uses_it() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1], 1: [0]}))
    writer.sync(state({1: [0]}))
    assert resolve_all(maps, KEYS[1]) == {V4[0]}
    assert len(maps.data[abi.MAP_BACKENDS]) == 1


def assert_record_true(writer: MapWriter, maps: FakeMaps) -> None:
    """What the writer holds to be programmed is what a fresh read of the maps finds."""
    mine, theirs = writer.record(), read_state(maps)
    assert mine.frontends == theirs.frontends
    assert mine.backend_ids == theirs.backend_ids
    assert {m: set(k) for m, k in mine.garbage.items() if k} == {
        m: set(k) for m, k in theirs.garbage.items() if k
    }


def test_full_map_fails_the_frontend_that_needs_room_and_a_retry_converges() -> None:
    maps = FakeMaps(capacity={abi.MAP_BACKENDS: 2})
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1]}))
    stats = writer.sync(state({0: [0, 1, 2]}))
    error = stats.failed[KEYS[0]]
    assert isinstance(error, errors.DatapathError)
    assert (error.frontend, error.map) == (str(KEYS[0]), abi.MAP_BACKENDS)
    assert "bl_be_v1 is full" in str(error) and str(KEYS[0]) in str(error)
    assert resolve_all(maps, KEYS[0]) == {V4[0], V4[1]}
    assert writer.programmed() == MapWriter(maps).programmed()
    assert_record_true(writer, maps)
    maps.capacity[abi.MAP_BACKENDS] = 3
    stats = writer.sync(state({0: [0, 1, 2]}))
    assert not stats.failed and stats.frontends_written == 1
    assert resolve_all(maps, KEYS[0]) == {V4[0], V4[1], V4[2]}


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_a_frontend_that_does_not_fit_leaves_the_others_written(order: list[int]) -> None:
    maps = FakeMaps(capacity={abi.MAP_BACKENDS: 4})
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1]}))
    spec = {0: [0, 1, 5], 1: [2, 3, 4], 2: [0]}  # 1 needs three more backends, 0 and 2 one each: 4 fit
    stats = writer.sync(state({k: spec[k] for k in order}))
    assert set(stats.failed) == {KEYS[1]}
    assert resolve_all(maps, KEYS[0]) == {V4[0], V4[1], V4[5]}
    assert resolve_all(maps, KEYS[1]) is None
    assert resolve_all(maps, KEYS[2]) == {V6[0]}
    assert_record_true(writer, maps)
    assert stats.frontends_written == 2
    # 0 and 2 go: their backends are deleted last, so 1 finds the room on the next write (the agent's retry)
    assert set(writer.sync(state({1: [2, 3, 4]})).failed) <= {KEYS[1]}
    assert not writer.sync(state({1: [2, 3, 4]})).failed
    assert resolve_all(maps, KEYS[1]) == {V4[2], V4[3], V4[4]}
    assert_record_true(writer, maps)


def test_values_the_maps_cannot_hold_fail_their_frontend_before_any_write() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0], 1: [0]}))
    maps.ops.clear()
    many = tuple(
        Backend(ipaddress.ip_address(int(ipaddress.ip_address("10.0.0.0")) + i), 80) for i in range(70000)
    )
    desired = state({0: [0, 1], 1: [1], 2: [1]})
    desired.frontends[KEYS[0]] = replace(desired.frontends[KEYS[0]], backends=many)
    desired.frontends[KEYS[1]] = replace(desired.frontends[KEYS[1]], qos_limit=2**32)
    stats = writer.sync(desired)
    assert set(stats.failed) == {KEYS[0], KEYS[1]}
    assert stats.failed[KEYS[0]].map == abi.MAP_SERVICES
    assert "70000 primary backends" in str(stats.failed[KEYS[0]])
    assert stats.failed[KEYS[1]].map == ""
    assert isinstance(stats.failed[KEYS[1]].__cause__, struct.error)
    assert resolve_all(maps, KEYS[0]) == {V4[0]} and resolve_all(maps, KEYS[1]) == {V4[0]}
    assert resolve_all(maps, KEYS[2]) == {V6[1]}
    assert {k for _, m, k in maps.ops if m == abi.MAP_SERVICES} <= {
        abi.svc_key(KEYS[2].ip, 80, Protocol.TCP, slot).pack() for slot in (0, 1)
    }
    assert_record_true(writer, maps)


def test_a_pod_cgroup_resolver_that_fails_fails_only_its_frontend() -> None:
    from balancing.model.desired import BackendPod, PodRef

    pod = PodRef("default", "p", "uid-1")

    def cgroups(_pod: PodRef) -> list[int]:
        raise OSError("cgroup scan failed")

    maps = FakeMaps()
    writer = MapWriter(maps, cgroups)
    desired = state({0: [0, 1], 2: [1]})
    desired.frontends[KEYS[0]] = replace(desired.frontends[KEYS[0]], backend_pods=(BackendPod(pod, V4[0]),))
    stats = writer.sync(desired)
    assert set(stats.failed) == {KEYS[0]} and "cgroup scan failed" in str(stats.failed[KEYS[0]])
    assert resolve_all(maps, KEYS[0]) is None and resolve_all(maps, KEYS[2]) == {V6[1]}
    assert_record_true(writer, maps)
    writer.pod_cgroups = lambda _pod: [2**64]  # does not fit a u64: refresh_clients fails it alone
    stats = writer.sync(desired)
    assert set(stats.failed) == {KEYS[0]}
    writer.pod_cgroups = lambda _pod: [7]
    assert not writer.sync(desired).failed
    writer.pod_cgroups = lambda _pod: [-1]
    assert set(writer.refresh_clients().failed) == {KEYS[0]}
    assert_record_true(writer, maps)


def fail_keys(
    keys: set[bytes], exc: Callable[[], BaseException], op: str = "update", times: int = 1_000_000
) -> Fault:
    """A fault that fails the first ``times`` ``op``s on these keys."""
    left = [times]

    def fault(o: str, _map: str, key: bytes, _adds: bool) -> BaseException | None:
        if o == op and key in keys and left[0] > 0:
            left[0] -= 1
            return exc()
        return None

    return fault


@pytest.mark.parametrize(
    "exc",
    [
        lambda: errors.MapError(abi.MAP_SERVICES, "update", errno.EINVAL),
        lambda: struct.error("boom"),
        lambda: RuntimeError("boom"),
    ],
)
def test_a_failed_frontend_is_written_back_whole_and_located(exc: Callable[[], BaseException]) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1, 2], 1: [3]}, fallback=[4]))
    before = {k: (resolve_all(maps, k), resolve_fallback(maps, k)) for k in KEYS}
    # 0 fails writing its new master (after its slots and fallback tier changed), in the batch and alone; 1
    # is written anyway
    maps.fault = fail_keys({abi.svc_key(KEYS[0].ip, 80, Protocol.TCP, 0).pack()}, exc, times=2)
    stats = writer.sync(state({0: [0, 5], 1: [3, 5]}, fallback=[1]))
    assert set(stats.failed) == {KEYS[0]}
    assert stats.failed[KEYS[0]].map == abi.MAP_SERVICES and str(KEYS[0]) in str(stats.failed[KEYS[0]])
    assert (resolve_all(maps, KEYS[0]), resolve_fallback(maps, KEYS[0])) == before[KEYS[0]]
    assert (resolve_all(maps, KEYS[1]), resolve_fallback(maps, KEYS[1])) == ({V4[3], V4[5]}, {V4[1]})
    assert_record_true(writer, maps)
    maps.fault = None
    assert not writer.sync(state({0: [0, 5], 1: [3, 5]}, fallback=[1])).failed
    assert resolve_all(maps, KEYS[0]) == {V4[0], V4[5]}
    assert_record_true(writer, maps)


def test_a_failure_after_the_switch_keeps_the_new_state_and_the_next_write_cleans_up() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1, 2]}, affinity=30))
    stale_slot = abi.svc_key(KEYS[0].ip, 80, Protocol.TCP, 3).pack()
    maps.fault = fail_keys(
        {stale_slot}, lambda: errors.MapError(abi.MAP_SERVICES, "delete", errno.EPERM), "delete"
    )
    stats = writer.sync(state({0: [0, 1], 1: [4]}, affinity=30))
    assert set(stats.failed) == {KEYS[0]}
    assert resolve_all(maps, KEYS[0]) == {V4[0], V4[1]}  # switched: the new state
    targets = affinity_targets(maps, KEYS[0])
    assert targets is not None and targets <= {
        V4[0],
        V4[1],
        V4[2],
    }
    assert resolve_all(maps, KEYS[1]) == {V4[4]}
    assert_record_true(writer, maps)
    maps.fault = None
    writer.sync(state({0: [0, 1], 1: [4]}, affinity=30))
    assert stale_slot not in maps.data[abi.MAP_SERVICES]
    assert affinity_targets(maps, KEYS[0]) == {V4[0], V4[1]}
    assert len(maps.data[abi.MAP_BACKENDS]) == 3
    assert_record_true(writer, maps)


def test_when_writing_back_fails_too_the_write_raises_a_located_error_and_rereads() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1, 2]}))
    slot1 = abi.svc_key(KEYS[0].ip, 80, Protocol.TCP, 1).pack()  # rewritten in place, then cannot be restored
    master = abi.svc_key(KEYS[0].ip, 80, Protocol.TCP, 0).pack()
    failing = {master}

    def fault(op: str, _m: str, key: bytes, _adds: bool) -> BaseException | None:
        if key in failing:
            failing.add(slot1)
            return errors.MapError(abi.MAP_SERVICES, op, errno.EIO)
        return None

    maps.fault = fault
    with pytest.raises(errors.FrontendWriteError) as info:
        writer.sync(state({0: [3, 1]}))
    assert info.value.frontend == str(KEYS[0]) and "writing it back failed too" in str(info.value)
    assert_record_true(writer, maps)
    reachable = resolve_all(maps, KEYS[0])
    assert reachable is not None and reachable <= {V4[0], V4[1], V4[2], V4[3]}
    maps.fault = None
    assert not writer.sync(state({0: [3, 1]})).failed
    assert resolve_all(maps, KEYS[0]) == {V4[1], V4[3]}
    assert_record_true(writer, maps)


def test_a_failure_no_frontend_owns_raises_a_datapath_error_with_the_record_true() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1, 2]}))
    gone = abi.pack_backend_id(writer.record().backend_ids[abi.pack_backend(V4[2].ip, 8080, Protocol.TCP)])
    maps.fault = fail_keys({gone}, lambda: ValueError("boom"), "delete")
    with pytest.raises(errors.MapError) as info:
        writer.sync(state({0: [0, 1]}))
    assert info.value.map == abi.MAP_BACKENDS
    assert resolve_all(maps, KEYS[0]) == {V4[0], V4[1]}
    assert_record_true(writer, maps)
    maps.fault = None
    writer.sync(state({0: [0, 1]}))
    assert gone not in maps.data[abi.MAP_BACKENDS]


@given(
    old=st.lists(st.integers(0, 9), unique=True, max_size=8),
    new=st.lists(st.integers(0, 9), unique=True, max_size=8),
)
def test_slot_assignment_keeps_survivors_and_stays_dense(old: list[int], new: list[int]) -> None:
    refs = [(Backend(ipaddress.ip_address(f"10.0.0.{i}"), 1), 6) for i in range(10)]
    old_slots = [refs[i] for i in old]
    slots = assign_slots(list(old_slots), [refs[i] for i in new])
    assert sorted(slots) == sorted(refs[i] for i in new)
    for i, ref in enumerate(old_slots):
        if ref in slots and i < len(slots):
            assert slots[i] == ref, "a surviving backend inside the new range keeps its slot"


specs = st.dictionaries(st.integers(0, 2), st.lists(st.integers(0, 5), max_size=6), max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            specs,
            st.sampled_from([0, 0, 30]),
            st.none() | st.lists(st.integers(0, 5), max_size=4),
            st.sampled_from([0, 0, 100]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_every_instant_resolves_to_a_backend_valid_before_or_after(
    steps: list[tuple[dict[int, list[int]], int, list[int] | None, int]],
) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    before = DesiredState()
    for spec, affinity, fallback, qos in steps:
        after = state(spec, affinity, fallback, qos)

        def check(before: DesiredState = before, after: DesiredState = after) -> None:
            for key in KEYS:
                reached = resolve_all(maps, key)
                old, new = before.frontends.get(key), after.frontends.get(key)
                if reached is None:
                    assert old is None or new is None, f"{key} vanished while it exists before and after"
                    continue
                allowed = set(old.backends if old else ()) | set(new.backends if new else ())
                assert reached <= allowed, f"{key} reaches {reached - allowed}"
                sticky = affinity_targets(maps, key)
                assert sticky is None or sticky <= allowed, f"{key}: affinity may reach {sticky - allowed}"
                fell = resolve_fallback(maps, key)
                fb_allowed = set((old.fallback or ()) if old else ()) | set(
                    (new.fallback or ()) if new else ()
                )
                assert fell is None or fell <= fb_allowed, f"{key}: fallback reaches {fell - fb_allowed}"
                if not reached:
                    assert (old is None or not old.backends) or (new is None or not new.backends)

        maps.observer = check
        writer.sync(after)
        maps.observer = None
        for key in KEYS:
            want = after.frontends.get(key)
            assert resolve_all(maps, key) == (set(want.backends) if want else None)
            assert affinity_targets(maps, key) == (set(want.backends) if want and affinity else None)
            want_fb = None if want is None or want.fallback is None else set(want.fallback)
            assert resolve_fallback(maps, key) == want_fb
        assert writer.sync(after).ops == 0
        assert MapWriter(maps).sync(after).ops == 0, "a restarted writer agrees with the maps"
        before = after


def test_affinity_toggles_rewrite_the_master_and_the_match_entries() -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1]}))
    assert affinity_targets(maps, KEYS[0]) is None
    writer.sync(state({0: [0, 1]}, affinity=10800))
    assert affinity_targets(maps, KEYS[0]) == {V4[0], V4[1]}
    writer.sync(state({0: [1, 2]}, affinity=10800))
    assert affinity_targets(maps, KEYS[0]) == {V4[1], V4[2]}
    writer.sync(state({0: [1, 2]}))
    assert affinity_targets(maps, KEYS[0]) is None
    assert maps.data[abi.MAP_AFFINITY_MATCH] == {}


def test_client_rules_follow_backend_pods_and_their_cgroups() -> None:
    from balancing.model.desired import BackendPod, PodRef

    pod = PodRef("kube-system", "node-local-dns-x", "uid-1")
    cgroups: dict[PodRef, list[int]] = {pod: [101, 102]}
    maps = FakeMaps()
    writer = MapWriter(maps, lambda p: cgroups.get(p, []))
    base = state({0: [0, 1]}, fallback=[2]).frontends[KEYS[0]]

    def with_pods(skip: bool) -> DesiredState:
        from dataclasses import replace

        return DesiredState(
            {KEYS[0]: replace(base, backend_pods=(BackendPod(pod, V4[0]),), skip_redirect_from_backends=skip)}
        )

    def rules() -> dict[int, tuple[int, int]]:
        out = {}
        for raw_key, raw_val in maps.data.get(abi.MAP_CLIENTS, {}).items():
            _, cgroup_id = abi.unpack_client_key(raw_key)
            out[cgroup_id] = abi.CLIENT_VAL.packer.unpack(raw_val)
        return out

    writer.sync(with_pods(False))
    own = abi.slot_backend_id(
        maps.data[abi.MAP_SERVICES][abi.svc_key(KEYS[0].ip, 80, Protocol.TCP, 1).pack()]
    )
    assert rules() == {101: (own, 0), 102: (own, 0)}
    writer.sync(with_pods(True))
    assert rules() == {101: (0, abi.CLIENT_F_SKIP), 102: (0, abi.CLIENT_F_SKIP)}
    cgroups[pod] = [103]  # the container restarted: new cgroup
    writer.refresh_clients()
    assert rules() == {103: (0, abi.CLIENT_F_SKIP)}
    assert MapWriter(maps, lambda p: cgroups.get(p, [])).sync(with_pods(True)).ops == 0
    writer.sync(state({0: [0, 1]}))
    assert rules() == {}
    master = abi.SvcVal.unpack(
        maps.data[abi.MAP_SERVICES][abi.svc_key(KEYS[0].ip, 80, Protocol.TCP, 0).pack()]
    )
    assert master.flags == 0


def expected(want: Frontend | None) -> tuple[set[Backend] | None, set[Backend] | None, set[Backend] | None]:
    """What a frontend at this complete state resolves to: (backends, fallback, affinity targets)."""
    if want is None:
        return None, None, None
    return (
        set(want.backends),
        None if want.fallback is None else set(want.fallback),
        set(want.backends) if want.affinity_timeout else None,
    )


def resolved(maps: FakeMaps, key: FrontendKey) -> tuple[set[Backend] | None, ...]:
    return resolve_all(maps, key), resolve_fallback(maps, key), affinity_targets(maps, key)


EXCEPTIONS: list[Callable[[str, str], BaseException]] = [
    lambda op, m: errors.MapError(m, op, errno.EINVAL),
    lambda op, m: errors.MapFull(m, 1),
    lambda _op, _m: struct.error("boom"),
    lambda _op, _m: RuntimeError("boom"),
]
faults = st.fixed_dictionaries(
    {
        "nth": st.sets(
            st.integers(0, 60), max_size=3
        ),  # element operations (from the write's start) that fail
        "exc": st.sampled_from(range(len(EXCEPTIONS))),
        "capacity": st.fixed_dictionaries(
            {},
            optional={abi.MAP_BACKENDS: st.integers(0, 10), abi.MAP_SERVICES: st.integers(0, 16)},
        ),
        "poison": st.sets(st.integers(0, 2), max_size=1),  # frontends given a value the maps cannot hold
    }
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            specs,
            st.sampled_from([0, 0, 30]),
            st.none() | st.lists(st.integers(0, 5), max_size=4),
            st.sampled_from([0, 0, 100]),
            faults,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_injected_failures_leave_every_frontend_whole_the_record_true_and_retries_converge(
    steps: list[tuple[dict[int, list[int]], int, list[int] | None, int, dict[str, Any]]],
) -> None:
    maps = FakeMaps()
    writer = MapWriter(maps)
    for spec, affinity, fallback, qos, fault in steps:
        after = state(spec, affinity, fallback, qos)
        asked = DesiredState(dict(after.frontends))
        for k in fault["poison"]:
            if KEYS[k] in asked.frontends:
                asked.frontends[KEYS[k]] = replace(asked.frontends[KEYS[k]], affinity_timeout=2**32)
        was = {key: resolved(maps, key) for key in KEYS}
        count = itertools.count()

        def fail(
            op: str,
            map_name: str,
            _key: bytes,
            _adds: bool,
            fault: dict[str, Any] = fault,
            count: Iterator[int] = count,
        ) -> Any:
            return EXCEPTIONS[fault["exc"]](op, map_name) if next(count) in fault["nth"] else None

        def check(
            was: dict[FrontendKey, tuple[set[Backend] | None, ...]] = was, asked: DesiredState = asked
        ) -> None:
            for key in KEYS:  # at every instant: within what was programmed and what is asked
                now, new = resolved(maps, key), expected(asked.frontends.get(key))
                for reached, before, wanted in zip(now, was[key], new, strict=True):
                    if reached is not None:
                        assert reached <= (before or set()) | (wanted or set()), key
                if now[0] is None:
                    assert was[key][0] is None or new[0] is None, f"{key} vanished"

        maps.fault, maps.capacity, maps.observer = fail, dict(fault["capacity"]), check
        try:
            stats = writer.sync(asked)
        except errors.DatapathError:
            stats = None  # a failure no frontend owns (or writing one back failed too): still true below
            event("the write raised")
        finally:
            maps.fault, maps.capacity, maps.observer = None, {}, None
        assert_record_true(writer, maps)
        if stats is not None:
            for key in KEYS:
                now, new = resolved(maps, key), expected(asked.frontends.get(key))
                if key in stats.failed:
                    assert isinstance(stats.failed[key], errors.DatapathError)
                    event("a frontend failed")
                    if now != was[key]:  # not written back: switched, with what it failed to delete left
                        event("a frontend failed after its switch")
                        assert now[:2] == new[:2], f"{key} is neither old nor new: {now}"
                        assert now[2] is None or now[2] <= (was[key][2] or set()) | (new[2] or set())
                else:
                    assert now == new, key
            assert {KEYS[k] for k in fault["poison"]} & asked.frontends.keys() <= stats.failed.keys()
        retry = writer.sync(after)
        assert not retry.failed
        assert {key: resolved(maps, key) for key in KEYS} == {
            key: expected(after.frontends.get(key)) for key in KEYS
        }
        assert_record_true(writer, maps)
        assert not read_state(maps).garbage or writer.sync(after).ops > 0
        assert writer.sync(after).ops == 0
        assert MapWriter(maps).sync(after).ops == 0, "a restarted writer agrees with the maps"


def test_a_failed_client_refresh_is_planned_again_by_the_next_sync() -> None:
    """A container restarted into a new cgroup whose client rule did not fit: once there is room, the next
    full sync writes it (the failed frontend is not taken as programmed as asked)."""
    from balancing.model.desired import BackendPod, PodRef

    pod = PodRef("default", "p", "uid-1")
    cgroups = [7]
    maps = FakeMaps(capacity={abi.MAP_CLIENTS: 1})
    writer = MapWriter(maps, lambda _pod: list(cgroups))
    desired = state({0: [0, 1]})
    desired.frontends[KEYS[0]] = replace(desired.frontends[KEYS[0]], backend_pods=(BackendPod(pod, V4[0]),))
    assert not writer.sync(desired).failed
    cgroups[:] = [7, 8]  # a second container: its rule does not fit
    assert set(writer.refresh_clients().failed) == {KEYS[0]}
    assert_record_true(writer, maps)
    maps.capacity[abi.MAP_CLIENTS] = 4  # room again
    stats = writer.sync(desired)
    assert not stats.failed and stats.ops
    assert {abi.unpack_client_key(k)[1] for k in maps.data[abi.MAP_CLIENTS]} == {7, 8}
    assert_record_true(writer, maps)
