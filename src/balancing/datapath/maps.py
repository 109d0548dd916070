"""The map I/O seam: element updates, deletes and dumps by map name.

Updates come as a sequence of (key, value) pairs, or as a ``Batch``: the entries of one map packed back to
back, keys in one buffer and values in another, which a writer fills a whole run of entries at a time (see
the ``abi`` bulk packers) and ``KernelMaps`` hands to the batch syscall without touching each entry.
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
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, overload

from balancing import errors
from balancing.datapath import abi, libbpf

Items = Sequence[tuple[bytes, bytes]]
if TYPE_CHECKING:
    Buffer = bytes | bytearray | memoryview | array.array[int]
_KEY, _VALUE = operator.itemgetter(0), operator.itemgetter(1)
_ENOTSUPP = 524  # the kernel's internal "operation not supported" (no libc name)
# (operation, map name, key, whether an update would add the key) → the exception to raise instead, or None
Fault = Callable[[str, str, bytes, bool], BaseException | None]


class Batch(Sequence[tuple[bytes, bytes]]):
    """Entries of one map packed back to back: ``keys`` and ``values`` (bytearrays) as a batch syscall takes
    them. A sequence of (key, value) pairs too (slices are batches), so code that works entry by entry works
    on it unchanged; ``extend_packed`` adds many entries packed elsewhere at once."""

    __slots__ = ("key_size", "keys", "value_size", "values")

    def __init__(self, key_size: int, value_size: int) -> None:
        self.key_size, self.value_size = key_size, value_size
        self.keys, self.values = bytearray(), bytearray()

    @classmethod
    def of(cls, map_name: str) -> Batch:
        """An empty batch for ``map_name``'s entries (their sizes from ``abi.MAP_LAYOUTS``)."""
        return cls(*_entry_sizes(map_name))

    def __len__(self) -> int:
        return len(self.keys) // self.key_size

    @overload
    def __getitem__(self, index: int) -> tuple[bytes, bytes]: ...
    @overload
    def __getitem__(self, index: slice) -> Batch: ...
    def __getitem__(self, index: int | slice) -> tuple[bytes, bytes] | Batch:
        ks, vs = self.key_size, self.value_size
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("a batch is sliced with step 1 only")
            part = Batch(ks, vs)
            part.keys, part.values = self.keys[start * ks : stop * ks], self.values[start * vs : stop * vs]
            return part
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError("batch index out of range")
        return bytes(self.keys[i * ks : (i + 1) * ks]), bytes(self.values[i * vs : (i + 1) * vs])

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        ks, vs, keys, values = self.key_size, self.value_size, bytes(self.keys), bytes(self.values)
        for i in range(len(self)):
            yield keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]

    def __delitem__(self, index: slice) -> None:
        """Drop the tail from ``index.start`` on (what a plan's truncate does)."""
        start, stop, step = index.indices(len(self))
        if step != 1 or start < stop < len(self):
            raise ValueError("a batch drops its tail only")
        del self.keys[start * self.key_size :], self.values[start * self.value_size :]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Batch):
            return (self.key_size, self.keys, self.values) == (other.key_size, other.keys, other.values)
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"Batch({list(self)!r})"

    def append(self, entry: tuple[bytes, bytes]) -> None:
        key, value = entry
        if len(key) != self.key_size or len(value) != self.value_size:
            raise ValueError(
                f"a {len(key)}/{len(value)}-byte entry in a batch of {self.key_size}/{self.value_size}"
            )
        self.keys += key
        self.values += value

    def extend(self, entries: Iterable[tuple[bytes, bytes]]) -> None:
        if isinstance(entries, Batch):
            self.extend_packed(entries.keys, entries.values)
            return
        for entry in entries:
            self.append(entry)

    def extend_packed(self, keys: Buffer, values: Buffer) -> None:
        """Add the entries packed in ``keys`` and ``values`` (as many of each, in order)."""
        count, extra = divmod(len(memoryview(keys).cast("B")), self.key_size)
        vcount, vextra = divmod(len(memoryview(values).cast("B")), self.value_size)
        if extra or vextra or count != vcount:
            raise ValueError(
                f"{len(keys)} key and {len(values)} value bytes are not as many whole "
                f"{self.key_size}/{self.value_size}-byte entries"
            )
        self.keys += keys
        self.values += values

    def clear(self) -> None:
        del self.keys[:], self.values[:]


def _entry_sizes(map_name: str) -> tuple[int, int]:
    sizes = _SIZES.get(map_name)
    if sizes is None:
        key, value = abi.MAP_LAYOUTS[map_name]
        sizes = _SIZES[map_name] = (key.size, value.size)
    return sizes


_SIZES: dict[str, tuple[int, int]] = {}


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
            elif isinstance(items, Batch):
                self._update_packed(fd, items)
            else:
                for start in range(0, len(items), self.BATCH_MAX):
                    chunk = items[start : start + self.BATCH_MAX]
                    keys, values = b"".join(map(_KEY, chunk)), b"".join(map(_VALUE, chunk))
                    libbpf.map_update_batch(fd, keys, values, len(chunk))
        except OSError as exc:
            raise self._fail(map_name, "update", exc) from exc

    def _update_packed(self, fd: int, batch: Batch) -> None:
        """``BATCH_MAX`` entries a syscall from the batch's buffers (each chunk a copy: an error's traceback
        then holds the chunk, never an export that would pin the batch's own buffers)."""
        keys, values, ks, vs, total = batch.keys, batch.values, batch.key_size, batch.value_size, len(batch)
        for start in range(0, total, self.BATCH_MAX):
            stop = min(start + self.BATCH_MAX, total)
            libbpf.map_update_batch(
                fd, keys[start * ks : stop * ks], values[start * vs : stop * vs], stop - start
            )

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
