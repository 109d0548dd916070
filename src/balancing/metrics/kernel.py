"""One read of the pinned datapath for a scrape: per-CPU counters summed, map usage, links.

``KernelReader.read()`` opens every pin under ``<bpffs>/maps`` and ``<bpffs>/links`` afresh (a reload or a
``cleanup`` replaces pins, so no file descriptor is kept between scrapes) and returns a ``Snapshot``: plain
data a collector turns into metric families and unit tests build by hand.

Cost per scrape: the resolution counters are dumped in batches (their key count is their entry count);
entries of the other hash maps are counted at most once per ``entries_every`` seconds and cached per map id,
since counting walks the whole map (a few hundred batched syscalls for a million entries). Arrays and the
ring buffer report no usage: an array is always "full" and a ring buffer's capacity is bytes.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from balancing.datapath import abi, libbpf, percpu

log = logging.getLogger(__name__)

# enum bpf_map_type → the name in the ``type`` label; only these kinds report entries and capacity.
HASH_TYPES = {1: "hash", 5: "percpu_hash", 9: "lru_hash", 10: "lru_percpu_hash"}
_U32 = struct.Struct("=I")

StatKey = tuple[int, str, int, str]  # abi.unpack_stat_key: (svc_id, result, protocol number, hook)


@dataclass(frozen=True)
class MapUsage:
    type: str  # HASH_TYPES name; "lru_*" maps evict instead of failing when full
    entries: int
    capacity: int


@dataclass
class Snapshot:
    """What one scrape read; a part that could not be read is missing and named in ``errors``."""

    resolutions: dict[StatKey, int] = field(default_factory=dict)  # summed over CPUs
    events_lost: int | None = None
    maps: dict[str, MapUsage] = field(default_factory=dict)
    programs_loaded: int = 0  # link pins whose program is loaded
    programs_attached: int = 0  # ... and still attached to a live cgroup
    errors: list[str] = field(default_factory=list)


class KernelReader:
    """Reads the datapath pinned under ``bpffs`` (one agent's ``--bpffs``)."""

    def __init__(
        self, bpffs: Path, *, entries_every: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bpffs = bpffs
        self.entries_every = entries_every
        self._clock = clock
        self._counted: dict[str, tuple[int, float, int]] = {}  # map → (map id, when, entries)

    def read(self) -> Snapshot:
        snap = Snapshot()
        for name in abi.ALL_MAPS:
            try:
                fd = libbpf.obj_get(str(self.bpffs / "maps" / name))
            except OSError as exc:
                snap.errors.append(f"{name}: {exc}")
                continue
            try:
                self._read_map(name, fd, snap)
            except OSError as exc:
                snap.errors.append(f"{name}: {exc}")
            finally:
                os.close(fd)
        self._read_links(snap)
        return snap

    def forget(self, svc_ids: set[int]) -> int:
        """Delete the counters of these frontend ids (no longer programmed, already attributed); how many
        keys went. The map is small next to the service map, so walking its keys is cheap."""
        if not svc_ids:
            return 0
        fd = libbpf.obj_get(str(self.bpffs / "maps" / abi.MAP_STATS))
        try:
            doomed = [
                k for k in libbpf.map_keys(fd, abi.STAT_KEY.size) if abi.unpack_stat_key(k)[0] in svc_ids
            ]
            return sum(libbpf.map_delete(fd, k) for k in doomed)
        finally:
            os.close(fd)

    def _read_map(self, name: str, fd: int, snap: Snapshot) -> None:
        info = libbpf.MapInfo()
        libbpf.obj_get_info(fd, info)
        entries: int | None = None
        if name == abi.MAP_STATS:
            sums = percpu.sum_u64_all(fd, info.key_size)
            snap.resolutions = {abi.unpack_stat_key(k): v for k, v in sums.items()}
            entries = len(sums)
        elif name == abi.MAP_EVENT_STATS:
            snap.events_lost = percpu.sum_u64(fd, _U32.pack(abi.EVSTAT_LOST)) or 0
        kind = HASH_TYPES.get(info.type)
        if kind is None:
            return
        if entries is None:
            entries = self._entries(name, fd, info)
        snap.maps[name] = MapUsage(kind, entries, info.max_entries)

    def _entries(self, name: str, fd: int, info: libbpf.MapInfo) -> int:
        now = self._clock()
        cached = self._counted.get(name)
        if cached and cached[0] == info.id and now - cached[1] < self.entries_every:
            return cached[2]
        n = percpu.count(fd, info.key_size, percpu.value_bytes(info.type, info.value_size))
        self._counted[name] = (info.id, now, n)
        return n

    def _read_links(self, snap: Snapshot) -> None:
        link_dir = self.bpffs / "links"
        pins = sorted(link_dir.iterdir()) if link_dir.is_dir() else []
        for pin in pins:
            try:
                fd = libbpf.obj_get(str(pin))
            except OSError as exc:
                snap.errors.append(f"link {pin.name}: {exc}")
                continue
            try:
                info = libbpf.LinkInfo()
                libbpf.obj_get_info(fd, info)
            except OSError as exc:
                snap.errors.append(f"link {pin.name}: {exc}")
                continue
            finally:
                os.close(fd)
            snap.programs_loaded += info.prog_id != 0
            snap.programs_attached += info.prog_id != 0 and info.cgroup_id != 0
