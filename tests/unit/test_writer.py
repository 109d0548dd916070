"""Map writer against the in-memory maps: diffing, idempotency, recovery and make-before-break.

The make-before-break property is checked between every two element operations: a reader that resolves a
frontend at that instant (master, then a slot, then the backend) must find a backend that was valid before
or after the change. The same writer runs against kernel maps in tests/kernel/test_writer_kernel.py.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps
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


def test_full_map_is_reported_and_the_writer_state_stays_true() -> None:
    maps = FakeMaps(capacity={abi.MAP_BACKENDS: 2})
    writer = MapWriter(maps)
    writer.sync(state({0: [0, 1]}))
    try:
        writer.sync(state({0: [0, 1, 2]}))
    except Exception as exc:
        assert "bl_be_v1" in str(exc)
    else:
        raise AssertionError("MapFull expected")
    assert resolve_all(maps, KEYS[0]) == {V4[0], V4[1]}
    assert writer.programmed() == MapWriter(maps).programmed()


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
