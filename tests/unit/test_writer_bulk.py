"""The writer's bulk path (runs of new plain frontends planned at once) against its frontend-by-frontend path.

Two writers get the same writes on in-memory maps, one planning every run of new plain frontends in bulk
(``bulk_min`` 1), one never (the plain path): after each write the maps hold the same entries (ids
included), the records and the stats agree, and the record is what a fresh read of the maps says. That
holds for random desired states mixing the shapes the bulk path takes with those it leaves to the plain
path, and when the batch fails part-way (a full map: the bulk run is then written frontend by frontend). A
reader between any two element operations of a bulk write finds every master's slots and backends. The same
comparison on kernel maps is in tests/kernel/test_writer_bulk_kernel.py; ``maps.Batch`` is checked here too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancing import errors
from balancing.datapath import abi
from balancing.datapath.maps import Batch, FakeMaps
from balancing.datapath.programmed import read_state
from balancing.datapath.writer import MapWriter, WriteStats
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendKey, Owner, Protocol

OWNER = Owner("Service", "bulk", "svc")
NEVER = 1 << 62  # a bulk_min no run reaches: the plain path only


def backend(i: int, v6: bool) -> Backend:
    ip = ipaddress.ip_address(f"fd00:244::{i + 1:x}" if v6 else f"10.244.{i // 200}.{i % 200 + 1}")
    return Backend(ip, 8080 + i % 3)


def key(i: int, v6: bool, protocol: Protocol = Protocol.TCP) -> FrontendKey:
    ip = ipaddress.ip_address(f"fd00:96::{i + 1:x}" if v6 else f"10.96.{i // 200}.{i % 200 + 1}")
    return FrontendKey(ip, 80 + i % 2, protocol)


@st.composite
def frontends(draw: st.DrawFn) -> Frontend:
    """A frontend of the bulk shape mostly, now and then one the plain path takes (fallback, QoS, a local
    backend or affinity on the bulk shape); backends from a small pool, so frontends share some."""
    v6 = draw(st.booleans())
    pool = sorted({backend(i, v6) for i in draw(st.lists(st.integers(0, 40), max_size=12))})
    shape = draw(st.sampled_from(["plain"] * 6 + ["affinity", "local", "host_only", "fallback", "qos"]))
    return Frontend(
        OWNER,
        tuple(pool),
        affinity_timeout=10800 if shape == "affinity" else 0,
        local_backends=frozenset(pool[:1]) if shape == "local" else frozenset(),
        host_only=shape == "host_only",
        fallback=tuple(pool[:2]) if shape == "fallback" else None,
        qos_limit=5 if shape == "qos" else 0,
    )


@st.composite
def desired_states(draw: st.DrawFn) -> DesiredState:
    """Up to 24 frontends over 30 keys (of both families, TCP and UDP): writes in a row add, change and
    remove some."""
    out: dict[FrontendKey, Frontend] = {}
    for i in draw(st.lists(st.integers(0, 29), max_size=24, unique=True)):
        frontend = draw(frontends())
        v6 = bool(frontend.backends) and frontend.backends[0].ip.version == 6
        out[key(i, v6, Protocol.UDP if i % 5 == 0 else Protocol.TCP)] = frontend
    return DesiredState(out)


def writers(capacity: dict[str, int] | None = None) -> tuple[tuple[MapWriter, FakeMaps], ...]:
    pairs = []
    for bulk_min in (1, NEVER):
        io = FakeMaps(dict(capacity or {}))
        w = MapWriter(io)
        w.bulk_min = bulk_min
        pairs.append((w, io))
    return tuple(pairs)


def summary(stats: WriteStats) -> tuple[int, int, int, set[FrontendKey]]:
    return stats.ops, stats.frontends_written, stats.frontends_removed, set(stats.failed)


def assert_same(bulk: tuple[MapWriter, FakeMaps], plain: tuple[MapWriter, FakeMaps]) -> None:
    (wb, ib), (wp, ip) = bulk, plain
    assert {m: d for m, d in ib.data.items() if d} == {m: d for m, d in ip.data.items() if d}
    assert wb.record() == wp.record()
    fresh = read_state(ib)
    assert (fresh.frontends, fresh.backend_ids) == (wb.record().frontends, wb.record().backend_ids)


@settings(max_examples=150, deadline=None)
@given(st.lists(desired_states(), min_size=1, max_size=4))
def test_the_bulk_path_leaves_the_maps_the_plain_path_leaves(states: list[DesiredState]) -> None:
    bulk, plain = writers()
    for desired in states:
        assert summary(bulk[0].sync(desired)) == summary(plain[0].sync(desired))
        assert_same(bulk, plain)
        assert bulk[0].sync(desired).ops == 0, "converged"


@settings(max_examples=100, deadline=None)
@given(desired_states(), desired_states(), st.integers(1, 60))
def test_a_full_backend_map_fails_the_same_frontends_in_both_paths(
    first: DesiredState, second: DesiredState, room: int
) -> None:
    bulk, plain = writers({abi.MAP_BACKENDS: room})
    for desired in (first, second):
        stats = bulk[0].sync(desired), plain[0].sync(desired)
        assert summary(stats[0]) == summary(stats[1])
        for failed in stats[0].failed.values():
            assert isinstance(failed, errors.FrontendWriteError)
        assert_same(bulk, plain)


def test_a_run_with_a_value_the_maps_cannot_hold_is_planned_frontend_by_frontend() -> None:
    """A bulk run packs every value before it changes anything: one out of range sends the run to the plain
    path, which fails that frontend alone."""
    spec = {key(i, False): Frontend(OWNER, (backend(i, False),)) for i in range(20)}
    spec[key(7, False)] = Frontend(OWNER, (backend(7, False),), affinity_timeout=2**32)
    bulk, plain = writers()
    stats = [w.sync(DesiredState(spec)) for w, _ in (bulk, plain)]
    assert set(stats[0].failed) == set(stats[1].failed) == {key(7, False)}
    assert_same(bulk, plain)


def test_every_master_of_a_bulk_write_finds_its_slots_and_backends_at_every_instant() -> None:
    (w, io), _ = writers()
    seen: list[int] = []

    def check() -> None:
        svc, backends = io.data.get(abi.MAP_SERVICES, {}), io.data.get(abi.MAP_BACKENDS, {})
        for raw_key, raw_val in svc.items():
            k = abi.SvcKey.unpack(raw_key)
            if k.slot != abi.MASTER_SLOT:
                continue
            for slot in range(1, abi.SvcVal.unpack(raw_val).count + 1):
                slot_val = svc.get(abi.SvcKey(k.addr, k.port, k.proto, slot, k.scope).pack())
                assert slot_val is not None, f"slot {slot} missing under a written master"
                assert abi.pack_backend_id(abi.slot_backend_id(slot_val)) in backends
        seen.append(len(svc))

    io.observer = check
    spec = {
        key(i, i % 2 == 1): Frontend(OWNER, tuple(backend(j, i % 2 == 1) for j in range(i % 5)))
        for i in range(30)
    }
    stats = w.sync(DesiredState(spec))
    assert stats.frontends_written == 30 and not stats.failed
    assert len(seen) == stats.ops


def test_a_batch_is_a_sequence_of_entries() -> None:
    batch = Batch(2, 3)
    batch.append((b"k1", b"v01"))
    batch.extend([(b"k2", b"v02"), (b"k3", b"v03")])
    batch.extend_packed(b"k4k5", b"v04v05")
    assert len(batch) == 5 and list(batch) == [(b"k%d" % i, b"v0%d" % i) for i in range(1, 6)]
    assert batch[1] == (b"k2", b"v02") and batch[-1] == (b"k5", b"v05")
    part = batch[1:3]
    assert isinstance(part, Batch) and list(part) == [(b"k2", b"v02"), (b"k3", b"v03")]
    other = Batch(2, 3)
    other.extend(part)
    assert other == part == [(b"k2", b"v02"), (b"k3", b"v03")]
    del batch[3:]
    assert list(batch) == [(b"k1", b"v01"), (b"k2", b"v02"), (b"k3", b"v03")]
    batch.clear()
    assert not batch and list(batch) == []
    assert Batch.of(abi.MAP_SERVICES).key_size == abi.SVC_KEY.size
    assert Batch.of(abi.MAP_BACKENDS).value_size == abi.BACKEND.size


@pytest.mark.parametrize(
    "bad",
    [
        lambda b: b.append((b"k", b"v01")),
        lambda b: b.extend_packed(b"k1k", b"v01"),
        lambda b: b.extend_packed(b"k1k2", b"v01"),
        lambda b: b[0],
        lambda b: b[::2],
    ],
)
def test_a_batch_refuses_what_is_not_whole_entries(bad: Callable[[Batch], object]) -> None:
    with pytest.raises((ValueError, IndexError)):
        bad(Batch(2, 3))
