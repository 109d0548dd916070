"""The map I/O seam: element updates, deletes and dumps by map name.

``KernelMaps`` works on the pinned maps under a bpffs directory (batch syscalls for bulk changes, single ones
for small changes); ``FakeMaps`` is an in-memory stand-in for writer unit tests that records every element
operation, can call an observer between any two of them (the make-before-break tests) and can fail chosen
operations (the failure tests). Kernel errors are translated here into ``MapFull`` / ``MapError`` naming the
map.

The Maglev tables of north-south (``abi.MAP_MAGLEV``, a hash of maps) are maps themselves: ``create_table``
makes and fills one and returns the outer map's value naming it (its map id, as the kernel shows an outer
map's values), ``update`` of the outer map turns such ids into the fds the kernel wants, ``read_table`` reads
one back, and ``release_tables`` lets go of the tables a write made (those inserted live on in the outer map).
"""

from __future__ import annotations

import array
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from balancing import errors
from balancing.datapath import abi, libbpf

Items = Sequence[tuple[bytes, bytes]]
_ENOTSUPP = 524  # the kernel's internal "operation not supported" (no libc name)
# (operation, map name, key, whether an update would add the key) → the exception to raise instead, or None
Fault = Callable[[str, str, bytes, bool], BaseException | None]


class MapIO(Protocol):
    def update(self, map_name: str, items: Items) -> None: ...
    def delete(self, map_name: str, keys: Sequence[bytes]) -> None: ...
    def items(self, map_name: str) -> list[tuple[bytes, bytes]]: ...
    def create_table(self, values: array.array[int]) -> bytes: ...
    def read_table(self, value: bytes) -> array.array[int]: ...
    def release_tables(self) -> None: ...


class KernelMaps:
    """The pinned maps of one agent (``<bpffs>/maps``)."""

    BATCH_MIN = 32  # below this, single updates are cheaper than building a batch
    BATCH_MAX = 8192

    WRITER_MAPS = (
        abi.MAP_SERVICES,
        abi.MAP_BACKENDS,
        abi.MAP_AFFINITY_MATCH,
        abi.MAP_CLIENTS,
        abi.MAP_QOS,
        abi.MAP_SKIP,
        abi.MAP_CONFIG,  # its skip flag only (datapath.settings writes the rest)
        abi.MAP_MAGLEV,
        abi.MAP_SOURCE_RANGES,
    )

    def __init__(self, map_dir: Path, names: Sequence[str] = WRITER_MAPS) -> None:
        self.fds: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self._tables: dict[int, int] = {}  # Maglev tables made by this write: map id → fd
        try:
            for name in names:
                fd = libbpf.obj_get(str(map_dir / name))
                self.fds[name] = fd
                info = libbpf.MapInfo()
                libbpf.obj_get_info(fd, info)
                self.capacity[name] = info.max_entries
                self.sizes[name] = (info.key_size, info.value_size)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        self.release_tables()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _fail(self, map_name: str, op: str, exc: OSError) -> errors.DatapathError:
        if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
            return errors.MapFull(map=map_name, capacity=self.capacity.get(map_name, 0))
        return errors.MapError(map=map_name, op=op, errno=exc.errno or 0)

    def update(self, map_name: str, items: Items) -> None:
        fd = self.fds[map_name]
        try:
            if map_name == abi.MAP_MAGLEV:
                for key, _ in items:
                    self._hold_replaced(fd, key)
                self._insert_tables(fd, items)
                return
            if len(items) < self.BATCH_MIN:
                for key, value in items:
                    libbpf.map_update(fd, key, value)
                return
            for start in range(0, len(items), self.BATCH_MAX):
                chunk = items[start : start + self.BATCH_MAX]
                keys = b"".join(k for k, _ in chunk)
                values = b"".join(v for _, v in chunk)
                libbpf.map_update_batch(fd, keys, values, len(chunk))
        except OSError as exc:
            raise self._fail(map_name, "update", exc) from exc

    def delete(self, map_name: str, keys: Sequence[bytes]) -> None:
        fd = self.fds[map_name]
        try:
            if map_name == abi.MAP_MAGLEV and len(keys) > 1 and self._delete_tables(fd, keys):
                return
            for key in keys:  # batch delete fails whole on one missing key; singles are idempotent
                libbpf.map_delete(fd, key)
        except OSError as exc:
            raise self._fail(map_name, "delete", exc) from exc

    def items(self, map_name: str) -> list[tuple[bytes, bytes]]:
        key_size, value_size = self.sizes[map_name]
        try:
            return libbpf.map_dump(self.fds[map_name], key_size, value_size)
        except OSError as exc:
            raise self._fail(map_name, "dump", exc) from exc

    def _hold_replaced(self, outer_fd: int, key: bytes) -> None:
        """Keep the table ``key`` names now open until ``release_tables``: writing a frontend back re-inserts
        it, and the kernel frees a table (and its id) as soon as nothing holds it."""
        old = libbpf.map_lookup(outer_fd, key, 4)
        if old is not None and abi.unpack_u32(old) not in self._tables:
            self._tables[abi.unpack_u32(old)] = libbpf.map_get_fd_by_id(abi.unpack_u32(old))

    def _insert_tables(self, outer_fd: int, items: Items) -> None:
        """Put tables into the outer map ``BATCH_MAX`` at a time: an update of a map of maps waits for an RCU
        grace period (~9 ms on a 2-vCPU VM: 90 s for 10,000 tables), a batch waits once (Linux >= 6.8)."""
        for start in range(0, len(items), self.BATCH_MAX):
            chunk = items[start : start + self.BATCH_MAX]
            fds: list[int] = []
            own: list[int] = []
            try:
                for _, value in chunk:
                    fd = self._tables.get(abi.unpack_u32(value))
                    if fd is None:  # a table an earlier write inserted (writing it back)
                        fd = libbpf.map_get_fd_by_id(abi.unpack_u32(value))
                        own.append(fd)
                    fds.append(fd)
                keys = b"".join(k for k, _ in chunk)
                values = b"".join(abi.pack_u32(f) for f in fds)
                try:
                    libbpf.map_update_batch(outer_fd, keys, values, len(chunk))
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP):
                        raise
                    for (key, _), fd in zip(chunk, fds, strict=True):  # a kernel without batches here
                        libbpf.map_update(outer_fd, key, abi.pack_u32(fd))
            finally:
                for fd in own:
                    os.close(fd)

    def _delete_tables(self, outer_fd: int, keys: Sequence[bytes]) -> bool:
        """Delete from the outer map in batches (each single delete waits for an RCU grace period, like an
        update); False when a batch cannot be used (a key already gone, a kernel without batches here): the
        caller deletes one by one, idempotently."""
        try:
            for start in range(0, len(keys), self.BATCH_MAX):
                chunk = keys[start : start + self.BATCH_MAX]
                libbpf.map_delete_batch(outer_fd, b"".join(chunk), len(chunk))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP):
                return False
            raise
        return True

    def create_table(self, values: array.array[int]) -> bytes:
        """A table as ``abi.maglev_table_layout`` says: entries in pairs, its size in its name."""
        size = len(values)
        pairs = (size + 1) // 2
        padded = array.array("I", values)
        if size % 2:
            padded.append(values[-1])  # never read: an index is below the size
        try:
            fd = libbpf.map_create(
                libbpf.BPF_MAP_TYPE_ARRAY, abi.maglev_table_name(size), 4, 8, pairs, libbpf.BPF_F_INNER_MAP
            )
        except OSError as exc:
            raise self._fail(abi.MAP_MAGLEV, "create a table for", exc) from exc
        try:
            libbpf.map_update_batch(fd, array.array("I", range(pairs)).tobytes(), padded.tobytes(), pairs)
            info = libbpf.MapInfo()
            libbpf.obj_get_info(fd, info)
        except OSError as exc:
            os.close(fd)
            raise self._fail(abi.MAP_MAGLEV, "fill a table for", exc) from exc
        self._tables[info.id] = fd
        return abi.pack_u32(info.id)

    def read_table(self, value: bytes) -> array.array[int]:
        try:
            fd = libbpf.map_get_fd_by_id(abi.unpack_u32(value))
        except OSError as exc:
            raise self._fail(abi.MAP_MAGLEV, "open a table of", exc) from exc
        try:
            info = libbpf.MapInfo()
            libbpf.obj_get_info(fd, info)
            out = array.array("I")
            for _, values, _n in libbpf.map_batches(fd, 4, info.value_size):
                out.frombytes(bytes(values))
            size = abi.maglev_table_size(info.name.decode(errors="replace"))
            return out[:size] if size is not None else out
        except OSError as exc:
            raise self._fail(abi.MAP_MAGLEV, "read a table of", exc) from exc
        finally:
            os.close(fd)

    def release_tables(self) -> None:
        for fd in self._tables.values():
            os.close(fd)
        self._tables.clear()


class FakeMaps:
    """In-memory maps with the same interface; ``observer`` runs after every element operation, ``fault``
    before each (an element it fails is left as it was, those before it in the call stay written)."""

    def __init__(self, capacity: dict[str, int] | None = None) -> None:
        self.data: dict[str, dict[bytes, bytes]] = {}
        self.capacity = capacity or {}
        self.ops: list[tuple[str, str, bytes]] = []
        self.observer: Callable[[], None] | None = None
        self.fault: Fault | None = None
        self.tables: dict[int, array.array[int]] = {}  # Maglev tables by map id
        self._next_table = 1

    def _map(self, name: str) -> dict[bytes, bytes]:
        return self.data.setdefault(name, {})

    def _check(self, op: str, name: str, key: bytes, adds: bool) -> None:
        exc = self.fault(op, name, key, adds) if self.fault else None
        if exc is not None:
            raise exc

    def _record(self, op: str, name: str, key: bytes) -> None:
        self.ops.append((op, name, key))
        if self.observer:
            self.observer()

    def update(self, map_name: str, items: Items) -> None:
        m = self._map(map_name)
        for key, value in items:
            self._check("update", map_name, key, key not in m)
            cap = self.capacity.get(map_name)
            if cap is not None and key not in m and len(m) >= cap:
                raise errors.MapFull(map=map_name, capacity=cap)
            m[key] = value
            self._record("update", map_name, key)

    def delete(self, map_name: str, keys: Sequence[bytes]) -> None:
        m = self._map(map_name)
        for key in keys:
            self._check("delete", map_name, key, False)
            m.pop(key, None)
            self._record("delete", map_name, key)

    def items(self, map_name: str) -> list[tuple[bytes, bytes]]:
        return list(self._map(map_name).items())

    def create_table(self, values: array.array[int]) -> bytes:
        self._check("create", abi.MAP_MAGLEV, b"", True)
        map_id, self._next_table = self._next_table, self._next_table + 1
        self.tables[map_id] = array.array("I", values)
        return abi.pack_u32(map_id)

    def read_table(self, value: bytes) -> array.array[int]:
        return self.tables[abi.unpack_u32(value)]

    def release_tables(self) -> None:
        """Forget the tables no outer entry names (the kernel frees them when their last fd closes)."""
        named = {abi.unpack_u32(v) for v in self._map(abi.MAP_MAGLEV).values()}
        self.tables = {i: t for i, t in self.tables.items() if i in named}
