"""One read of the pinned datapath for a scrape: per-CPU counters summed, map usage, links.

``KernelReader.read()`` opens every pin under ``<bpffs>/maps`` and ``<bpffs>/links`` afresh (a reload or a
``cleanup`` replaces pins, so no file descriptor is kept between scrapes) and returns a ``Snapshot``: plain
data a collector turns into metric families and unit tests build by hand.

Cost per scrape: the resolution counters are dumped in batches (their key count is their entry count);
entries of the other hash maps are counted at most once per ``entries_every`` seconds and cached per map id,
since counting walks the whole map (a few hundred batched syscalls for a million entries). Arrays and the
ring buffer report no usage: an array is always "full" and a ring buffer's capacity is bytes.

North-south (``nodeport.o``'s pins, ``abi.NODEPORT_MAPS``) is read only where its connection-tracking map is
pinned; a node without it reports none of it (``Snapshot.northsouth`` is None) and no error. Its conntrack
map is walked once per ``entries_every`` like the other hash maps, counting the entries and, from each
value's flags byte picked out of the batch buffer, the client-direction entries holding a SNAT port
(measured on a 2-vCPU VM: 20-55 ms for 100k entries, ~100 ms for 262,144, the default capacity); its
per-CPU counters are summed at every scrape.
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
# bl_nsstat_v1 index → the counter's name in ``NorthSouth.counters`` (and in its metric's name).
NSSTAT_NAMES = {
    abi.NSSTAT_SNAT_ALLOCATED: "snat_allocations",
    abi.NSSTAT_SNAT_RETRIES: "snat_retries",
    abi.NSSTAT_CT_CREATED: "flows",
    abi.NSSTAT_BACKEND_GONE: "backend_gone",
}
_CT_FLAGS = abi.CT_VAL.offsets()["flags"]
# flags byte → 1 for a client-direction entry that holds a SNAT port, else 0 (for bytes.translate)
_SNAT_CLIENT = bytes(int(f & (abi.CT_F_SNAT | abi.CT_F_REPLY) == abi.CT_F_SNAT) for f in range(256))


@dataclass(frozen=True)
class MapUsage:
    type: str  # HASH_TYPES name; "lru_*" maps evict instead of failing when full
    entries: int
    capacity: int


@dataclass
class NorthSouth:
    """North-south's pins at one scrape; a part that could not be read is None (and named in the errors)."""

    conntrack_entries: int | None = None  # both directions of every flow
    conntrack_capacity: int | None = None
    snat_ports_in_use: int | None = None  # client-direction entries with CT_F_SNAT: one port each
    snat_port_range: int | None = None  # bl_nscfg_v1's snat_min..snat_max, inclusive, per backend (0: none)
    counters: dict[str, int] = field(default_factory=dict)  # NSSTAT_NAMES → summed over CPUs


@dataclass
class Snapshot:
    """What one scrape read; a part that could not be read is missing and named in ``errors``."""

    resolutions: dict[StatKey, int] = field(default_factory=dict)  # summed over CPUs
    events_lost: int | None = None
    maps: dict[str, MapUsage] = field(default_factory=dict)
    programs_loaded: int = 0  # link pins whose program is loaded
    programs_attached: int = 0  # ... and still attached to a live cgroup
    northsouth: NorthSouth | None = None  # None: north-south does not run here
    errors: list[str] = field(default_factory=list)


def conntrack_fill(fd: int, key_size: int, value_size: int) -> tuple[int, int]:
    """(entries, client-direction entries holding a SNAT port) of a conntrack map, in one batched walk."""
    entries = snat = 0
    for _keys, values, n in percpu.batches(fd, key_size, value_size):
        entries += n
        snat += bytes(values[_CT_FLAGS::value_size]).translate(_SNAT_CLIENT).count(1)
    return entries, snat


def snat_port_range(raw_config: bytes | None) -> int:
    """How many SNAT source ports bl_nscfg_v1 allows towards each backend (0: none, as nodeport.c sees it)."""
    if raw_config is None:
        return 0
    _size, low, high = abi.unpack_ns_config(raw_config)
    return high - low + 1 if low and high >= low else 0


class KernelReader:
    """Reads the datapath pinned under ``bpffs`` (one agent's ``--bpffs``)."""

    def __init__(
        self, bpffs: Path, *, entries_every: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bpffs = bpffs
        self.entries_every = entries_every
        self._clock = clock
        self._counted: dict[str, tuple[int, float, int]] = {}  # map → (map id, when, entries)
        self._ct_counted: tuple[int, float, tuple[int, int]] | None = None  # (map id, when, conntrack_fill)

    def read(self) -> Snapshot:
        snap = Snapshot()
        for name in abi.ALL_MAPS:
            self._with_map(name, snap, self._read_map)
        self._read_links(snap)
        if (self.bpffs / "maps" / abi.MAP_CONNTRACK).exists():
            snap.northsouth = NorthSouth()
            for name in abi.NODEPORT_MAPS:
                self._with_map(name, snap, self._read_northsouth_map)
        return snap

    def _with_map(self, name: str, snap: Snapshot, read: Callable[[str, int, Snapshot], None]) -> None:
        """``read`` the pin ``name`` (opened for this call only); a failure goes to ``snap.errors``."""
        try:
            fd = libbpf.obj_get(str(self.bpffs / "maps" / name))
        except OSError as exc:
            snap.errors.append(f"{name}: {exc}")
            return
        try:
            read(name, fd, snap)
        except OSError as exc:
            snap.errors.append(f"{name}: {exc}")
        finally:
            os.close(fd)

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

    def _read_northsouth_map(self, name: str, fd: int, snap: Snapshot) -> None:
        ns = snap.northsouth
        assert ns is not None
        if name == abi.MAP_NS_STATS:
            for index, counter in NSSTAT_NAMES.items():
                ns.counters[counter] = percpu.sum_u64(fd, _U32.pack(index)) or 0
            return
        info = libbpf.MapInfo()
        libbpf.obj_get_info(fd, info)
        if name == abi.MAP_NS_CONFIG:
            ns.snat_port_range = snat_port_range(libbpf.map_lookup(fd, abi.CONFIG_KEY, info.value_size))
        elif name == abi.MAP_CONNTRACK:
            entries, ns.snat_ports_in_use = self._conntrack_fill(fd, info)
            ns.conntrack_entries, ns.conntrack_capacity = entries, info.max_entries
            snap.maps[name] = MapUsage(HASH_TYPES.get(info.type, str(info.type)), entries, info.max_entries)
        else:
            self._read_map(name, fd, snap)

    def _conntrack_fill(self, fd: int, info: libbpf.MapInfo) -> tuple[int, int]:
        now = self._clock()
        cached = self._ct_counted
        if cached and cached[0] == info.id and now - cached[1] < self.entries_every:
            return cached[2]
        fill = conntrack_fill(fd, info.key_size, info.value_size)
        self._ct_counted = (info.id, now, fill)
        return fill

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
