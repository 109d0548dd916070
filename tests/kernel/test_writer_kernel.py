"""The map writer against real kernel maps: a failure stays with its frontend, and the record stays true.

The loader creates the maps (with a deliberately small backend map) in a test-owned bpffs directory; its
programs are attached to a test-owned, empty cgroup, so nothing runs them: these tests are about the maps.
A frontend that needs more room than the backend map has fails alone (``MapFull``, in the batch and again on
its own), the others in the same write are written, a fresh read of the maps agrees with the writer, and a
later write converges once there is room. A frontend whose master fails after its Maglev table was swapped
gets its old table back (the kernel frees a table nothing holds at once: the in-memory maps cannot show
it). The unit tests in tests/unit/test_writer.py cover the same writer on in-memory maps with injected
faults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancing import errors
from balancing.datapath import abi, loader, maps, programmed, writer
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendKey, Owner, Protocol

OBJECT = Path(__file__).resolve().parents[2] / "build/bpf/balancing.o"
BACKENDS = 40  # the backend map's capacity here
OWNER = Owner("Service", "test", "svc")


def key(n: int, port: int = 80) -> FrontendKey:
    return FrontendKey(ipaddress.ip_address(f"10.96.0.{n}"), port, Protocol.TCP)


def backends(first: int, count: int) -> tuple[Backend, ...]:
    return tuple(
        Backend(ipaddress.ip_address(f"10.244.{i // 250}.{i % 250 + 1}"), 8080)
        for i in range(first, first + count)
    )


@pytest.fixture
def kernel_maps(cgroup_dir: Path, bpffs_dir: Path) -> Iterator[maps.KernelMaps]:
    cfg = loader.DatapathConfig(
        OBJECT,
        bpffs_dir,
        cgroup_dir,
        max_services=1024,
        max_backends=BACKENDS,
        max_reverse=1024,
        max_affinity=1024,
        max_clients=64,
        max_qos=64,
        max_stats=1024,
    )
    loader.load(cfg)
    try:
        io = maps.KernelMaps(cfg.map_dir)
        try:
            yield io
        finally:
            io.close()
    finally:
        loader.cleanup(bpffs_dir)


def resolved(io: maps.KernelMaps) -> dict[FrontendKey, set[Backend]]:
    """Every programmed frontend and the backends its slots name; a missing slot or backend fails."""
    out = {}
    for fkey, frontend in programmed.read_state(io).frontends.items():
        assert None not in frontend.slots, f"{fkey}: a slot or its backend is missing"
        out[fkey] = {programmed.backend_of(r) for r in frontend.slots if r is not None}
    return out


def assert_record_true(w: writer.MapWriter, io: maps.KernelMaps) -> None:
    mine, theirs = w.record(), programmed.read_state(io)
    assert mine.frontends == theirs.frontends
    assert mine.backend_ids == theirs.backend_ids
    assert {m: set(k) for m, k in mine.garbage.items() if k} == {
        m: set(k) for m, k in theirs.garbage.items() if k
    }


def desired(spec: dict[FrontendKey, tuple[Backend, ...]]) -> DesiredState:
    return DesiredState({k: Frontend(OWNER, tuple(sorted(v))) for k, v in spec.items()})


def test_a_full_backend_map_fails_one_frontend_the_others_are_written_and_a_retry_converges(
    kernel_maps: maps.KernelMaps,
) -> None:
    w = writer.MapWriter(kernel_maps)
    w.sync(desired({key(1): backends(0, 10)}))
    # 10 programmed + 25 (key 2: batched, > KernelMaps.BATCH_MIN) + 20 (key 3) + 2 (key 4) do not fit in 40:
    # the batch fails part-way, then each frontend alone: 2 and 4 fit, 3 does not
    wanted = {
        key(1): backends(0, 10),
        key(2): backends(10, 25),
        key(3): backends(35, 20),
        key(4): backends(55, 2),
    }
    stats = w.sync(desired(wanted))
    assert set(stats.failed) == {key(3)}
    error = stats.failed[key(3)]
    assert isinstance(error, errors.FrontendWriteError)
    assert (error.frontend, error.map) == (str(key(3)), abi.MAP_BACKENDS)
    assert f"BPF map {abi.MAP_BACKENDS} is full ({BACKENDS} entries)" in str(error)
    assert resolved(kernel_maps) == {k: set(v) for k, v in wanted.items() if k != key(3)}
    assert_record_true(w, kernel_maps)
    assert len(kernel_maps.items(abi.MAP_BACKENDS)) == 37, "the failed frontend's new backends are gone"

    # the same write again changes nothing and fails 3 again: what is programmed stays
    again = w.sync(desired(wanted))
    assert set(again.failed) == {key(3)}
    assert resolved(kernel_maps) == {k: set(v) for k, v in wanted.items() if k != key(3)}
    assert_record_true(w, kernel_maps)

    # room: 2 goes; its backends are deleted at the end of that write, so 3 is in by the next one
    del wanted[key(2)]
    w.sync(desired(wanted))
    assert not w.sync(desired(wanted)).failed
    assert resolved(kernel_maps) == {k: set(v) for k, v in wanted.items()}
    assert_record_true(w, kernel_maps)
    assert w.sync(desired(wanted)).ops == 0
    assert writer.MapWriter(kernel_maps).sync(desired(wanted)).ops == 0, "a restarted writer agrees"


def test_a_frontend_whose_values_do_not_fit_the_maps_fails_alone(kernel_maps: maps.KernelMaps) -> None:
    w = writer.MapWriter(kernel_maps)
    w.sync(desired({key(1): backends(0, 2)}))
    huge = tuple(
        Backend(ipaddress.ip_address(0x0A000000 + i), 80) for i in range(writer.MAX_TIER_BACKENDS + 1)
    )
    spec = desired({key(1): backends(0, 3), key(2): backends(0, 1)})
    spec.frontends[key(3)] = Frontend(OWNER, huge)
    spec.frontends[key(4)] = Frontend(OWNER, backends(5, 1), qos_limit=2**32)
    stats = w.sync(spec)
    assert set(stats.failed) == {key(3), key(4)}
    assert stats.failed[key(3)].map == abi.MAP_SERVICES
    assert resolved(kernel_maps) == {key(1): set(backends(0, 3)), key(2): set(backends(0, 1))}
    assert_record_true(w, kernel_maps)


class _FailingMasters(maps.KernelMaps):
    """Kernel maps whose next ``fail`` updates naming ``master`` (a master key) fail with EIO."""

    master = b""
    fail = 0

    def update(self, map_name: str, items: maps.Items) -> None:
        if map_name == abi.MAP_SERVICES and self.fail and any(k == self.master for k, _ in items):
            self.fail -= 1
            raise errors.MapError(map=map_name, op="update", errno=5)
        super().update(map_name, items)


def test_a_frontend_whose_master_fails_after_its_maglev_swap_gets_its_old_table_back(
    kernel_maps: maps.KernelMaps, bpffs_dir: Path
) -> None:
    """The kernel frees a table as soon as nothing holds it: the writer holds the one it swaps out until the
    write ends, so a frontend whose master then fails is written back to its old table, not left on the new
    one under its old master."""
    front = FrontendKey(ipaddress.ip_address("192.0.2.10"), 30080, Protocol.TCP)
    io = _FailingMasters(bpffs_dir / "maps")
    try:
        io.master = abi.svc_key(front.ip, front.port, front.protocol, abi.MASTER_SLOT).pack()
        w = writer.MapWriter(io, maglev_size=13)
        w.sync(DesiredState({front: Frontend(OWNER, backends(0, 3), external=True)}))
        before = dict(io.items(abi.MAP_MAGLEV))
        io.fail = 2  # the batch, then the frontend alone
        stats = w.sync(DesiredState({front: Frontend(OWNER, backends(2, 4), external=True)}))
        assert set(stats.failed) == {front}
        assert dict(io.items(abi.MAP_MAGLEV)) == before
        assert_record_true(w, io)
        assert not w.sync(DesiredState({front: Frontend(OWNER, backends(2, 4), external=True)})).failed
        table = io.read_table(next(iter(dict(io.items(abi.MAP_MAGLEV)).values())))
        record = w.record()
        assert len(table) == 13
        assert set(table) == {record.backend_ids[r] for r in record.frontends[front].slots if r is not None}
    finally:
        io.close()
