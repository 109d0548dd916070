"""The writer's bulk path against its frontend-by-frontend path on real kernel maps.

Two datapaths are loaded side by side (each in a test-owned bpffs directory, attached to a test-owned empty
cgroup: nothing runs the programs, these tests are about the maps). One writer plans runs of new plain
frontends in bulk (packed ``maps.Batch`` phases, written from their buffers by ``KernelMaps``), the other
never; they get the same writes, and the maps then hold the same entries: for random small desired states,
for a write large enough to take several batch syscalls per map, and for a write whose batch fails on a
full backend map (the same frontends fail, the record stays what the maps hold). The same comparison on
in-memory maps, with failures injected, is tests/unit/test_writer_bulk.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancing.datapath import abi, loader, maps, programmed, writer
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendKey, Owner, Protocol
from balancing_testkit.topology import owned_bpffs_dir, owned_cgroup

OBJECT = Path(__file__).resolve().parents[2] / "build/bpf/balancing.o"
OWNER = Owner("Service", "bulk", "svc")
NEVER = 1 << 62  # a bulk_min no run reaches: the plain path only
MAPS = (abi.MAP_SERVICES, abi.MAP_BACKENDS, abi.MAP_AFFINITY_MATCH)
Pair = tuple[tuple[writer.MapWriter, maps.KernelMaps], tuple[writer.MapWriter, maps.KernelMaps]]


def load_pair(stack: ExitStack, max_backends: int = 65536) -> Pair:
    """A bulk writer and a plain one, each on maps of its own."""
    pair = []
    for bulk_min in (1, NEVER):
        bpffs, cgroup = stack.enter_context(owned_bpffs_dir()), stack.enter_context(owned_cgroup())
        cfg = loader.DatapathConfig(OBJECT, bpffs, cgroup, max_services=65536, max_backends=max_backends)
        loader.load(cfg)
        stack.callback(loader.cleanup, bpffs)
        io = maps.KernelMaps(cfg.map_dir)
        stack.callback(io.close)
        w = writer.MapWriter(io)
        w.bulk_min = bulk_min
        pair.append((w, io))
    return pair[0], pair[1]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with ExitStack() as stack:
        yield load_pair(stack)


def contents(io: maps.KernelMaps) -> dict[str, set[tuple[bytes, bytes]]]:
    return {m: set(io.items(m)) for m in MAPS}


def assert_same(pair: Pair) -> None:
    (wb, ib), (wp, ip) = pair
    assert contents(ib) == contents(ip)
    assert wb.record() == wp.record()
    fresh = programmed.read_state(ib)
    assert (fresh.frontends, fresh.backend_ids) == (wb.record().frontends, wb.record().backend_ids)


def key(i: int, v6: bool = False) -> FrontendKey:
    ip = ipaddress.ip_address(f"fd00:96::{i + 1:x}" if v6 else f"10.96.{i // 250}.{i % 250 + 1}")
    return FrontendKey(ip, 80, Protocol.UDP if i % 7 == 0 else Protocol.TCP)


def backend(i: int, v6: bool = False) -> Backend:
    ip = ipaddress.ip_address(f"fd00:244::{i + 1:x}" if v6 else f"10.244.{i // 250}.{i % 250 + 1}")
    return Backend(ip, 8080)


@st.composite
def desired_states(draw: st.DrawFn) -> DesiredState:
    out = {}
    for i in draw(st.lists(st.integers(0, 19), max_size=16, unique=True)):
        v6 = i % 3 == 0
        pool = sorted({backend(b, v6) for b in draw(st.lists(st.integers(0, 30), max_size=8))})
        affinity = draw(st.sampled_from([0, 0, 0, 10800]))
        fallback = tuple(pool[:1]) if draw(st.integers(0, 5)) == 0 else None
        out[key(i, v6)] = Frontend(OWNER, tuple(pool), affinity_timeout=affinity, fallback=fallback)
    return DesiredState(out)


@settings(max_examples=30, deadline=None)
@given(st.lists(desired_states(), min_size=1, max_size=3))
def test_the_bulk_path_leaves_the_kernel_maps_the_plain_path_leaves(
    pair: Pair, states: list[DesiredState]
) -> None:
    for desired in (*states, DesiredState()):  # ends empty, for the next example
        stats = [w.sync(desired) for w, _ in pair]
        assert (stats[0].ops, stats[0].frontends_written, set(stats[0].failed)) == (
            stats[1].ops,
            stats[1].frontends_written,
            set(stats[1].failed),
        )
        assert_same(pair)


def test_a_bulk_write_of_many_batches_per_map(pair: Pair) -> None:
    spec = DesiredState(
        {key(i): Frontend(OWNER, tuple(backend(i * 10 + j) for j in range(10))) for i in range(2000)}
    )
    assert 2 * maps.KernelMaps.BATCH_MAX < 2000 * 10
    stats = [w.sync(spec) for w, _ in pair]
    assert stats[0].ops == stats[1].ops == 2000 * 21 and not stats[0].failed
    assert_same(pair)
    (_, ib), _ = pair
    assert writer.MapWriter(ib).sync(spec).ops == 0, "a restarted writer agrees"
    for w, _ in pair:
        w.sync(DesiredState())
    assert_same(pair)


def test_a_full_backend_map_fails_the_same_frontends_in_both_paths() -> None:
    with ExitStack() as stack:
        both = load_pair(stack, max_backends=100)
        # 30 frontends of 5 new backends each: the batch fails on the 101st backend, then frontend by
        # frontend the first 20 fit and the rest fail
        spec = DesiredState(
            {key(i): Frontend(OWNER, tuple(backend(i * 5 + j) for j in range(5))) for i in range(30)}
        )
        stats = [w.sync(spec) for w, _ in both]
        assert set(stats[0].failed) == set(stats[1].failed) == {key(i) for i in range(20, 30)}
        assert stats[0].ops == stats[1].ops
        assert_same(both)
