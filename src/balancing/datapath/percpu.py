"""Bulk reads for metrics: per-CPU counter sums and entry counts of BPF maps, batched, at scrape time.

A per-CPU map holds one value per *possible* CPU (``libbpf_num_possible_cpus()``), each rounded up to 8 bytes,
and a lookup or batch dump fills ``possible_cpus * round_up(value_size, 8)`` bytes per key; the counters are
summed here so nothing above sees CPUs. Entry counts use batched lookups too, but only count the entries
each batch returned instead of slicing every key and value into Python objects: counting a map of a million
entries is a few hundred syscalls (the GIL is released in each) and almost no Python work.

Why not ``libbpf.map_dump``: it materialises every (key, value) pair, which is the right thing for the
writer's recovery but the wrong cost for a scrape. This module therefore binds the two libbpf calls it
needs itself (``libbpf_num_possible_cpus``, ``bpf_map_lookup_batch``) and uses ``libbpf`` for the rest.
Errors are ``OSError`` naming the call, as in ``libbpf``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Iterator

from balancing.datapath import libbpf

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_num_possible_cpus = _lib.libbpf_num_possible_cpus
_num_possible_cpus.restype = ctypes.c_int
_num_possible_cpus.argtypes = []
_lookup_batch = _lib.bpf_map_lookup_batch
_lookup_batch.restype = ctypes.c_int
_lookup_batch.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.c_void_p,
]

# enum bpf_map_type values of the per-CPU kinds (their values are per possible CPU).
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_PERCPU_HASH = 10
PERCPU_TYPES = frozenset({MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH})
CHUNK_BYTES = 1 << 20  # value bytes per batch: bounds the buffers whatever the CPU count


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


@functools.cache
def possible_cpus() -> int:
    """The number of possible CPUs (not online ones: per-CPU maps have a slot for each possible CPU)."""
    n = int(_num_possible_cpus())
    if n <= 0:
        raise OSError(-n or errno.EINVAL, f"libbpf_num_possible_cpus: {os.strerror(-n or errno.EINVAL)}")
    return n


def value_bytes(map_type: int, value_size: int) -> int:
    """Bytes one key's value takes in a lookup or dump buffer: all CPUs' slots for per-CPU maps."""
    if map_type in PERCPU_TYPES:
        return ((value_size + 7) // 8 * 8) * possible_cpus()
    return value_size


def batches(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, memoryview, int]]:
    """(keys, values, count) per batched lookup of a hash map, ``value_size`` as ``value_bytes`` gives it.

    The buffers are reused between batches: consume each before asking for the next.
    """
    chunk = max(64, CHUNK_BYTES // max(value_size, 1))
    in_batch = ctypes.create_string_buffer(max(key_size, 8))
    out_batch = ctypes.create_string_buffer(max(key_size, 8))
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
    first = True
    while True:
        n = ctypes.c_uint32(chunk)
        ctypes.set_errno(0)
        ret = _lookup_batch(
            fd, None if first else in_batch, out_batch, keys, values, ctypes.byref(n), ctypes.byref(opts)
        )
        err = ctypes.get_errno() if ret < 0 else 0
        if ret < 0 and err != errno.ENOENT:
            err = err or -ret
            raise OSError(err, f"bpf_map_lookup_batch: {os.strerror(err)}")
        if n.value:
            yield keys.raw[: n.value * key_size], memoryview(values)[: n.value * value_size], n.value
        if err == errno.ENOENT:
            return
        ctypes.memmove(in_batch, out_batch, len(out_batch))
        first = False


def count(fd: int, key_size: int, value_size: int) -> int:
    """Entries in a hash map (a snapshot: concurrent updates may or may not be counted)."""
    return sum(n for _keys, _values, n in batches(fd, key_size, value_size))


def sum_u64_all(fd: int, key_size: int) -> dict[bytes, int]:
    """Every key of a per-CPU hash map of ``__u64`` counters with its value summed over all CPUs."""
    per_key = struct.Struct(f"={possible_cpus()}Q")
    out: dict[bytes, int] = {}
    for keys, values, _n in batches(fd, key_size, per_key.size):
        out.update(
            zip(
                (keys[i : i + key_size] for i in range(0, len(keys), key_size)),
                map(sum, per_key.iter_unpack(values)),
                strict=True,
            )
        )
    return out


def sum_u64(fd: int, key: bytes) -> int | None:
    """One per-CPU ``__u64`` counter summed over all CPUs; None when the key is not in the map."""
    cpus = possible_cpus()
    raw = libbpf.map_lookup(fd, key, 8 * cpus)
    return None if raw is None else sum(memoryview(raw).cast("Q"))
