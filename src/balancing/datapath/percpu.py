"""Bulk reads for metrics: per-CPU counter sums and entry counts of BPF maps, batched, at scrape time.

A per-CPU map holds one value per *possible* CPU (``libbpf_num_possible_cpus()``), each rounded up to 8 bytes,
and a lookup or batch dump fills ``possible_cpus * round_up(value_size, 8)`` bytes per key; the counters are
summed here so nothing above sees CPUs. Entry counts use batched lookups too, but only count the entries
each batch returned instead of slicing every key and value into Python objects: counting a map of a million
entries is a few hundred syscalls (the GIL is released in each) and almost no Python work.

Why not ``libbpf.map_dump``: it materialises every (key, value) pair, which is the right thing for the
writer's recovery but the wrong cost for a scrape; both iterate ``libbpf.map_batches``.
Errors are ``OSError`` naming the call, as in ``libbpf``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from balancing.datapath import libbpf

# enum bpf_map_type values of the per-CPU kinds (their values are per possible CPU).
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_PERCPU_HASH = 10
PERCPU_TYPES = frozenset({MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH})


def possible_cpus() -> int:
    return libbpf.possible_cpus()


def value_bytes(map_type: int, value_size: int) -> int:
    """Bytes one key's value takes in a lookup or dump buffer: all CPUs' slots for per-CPU maps."""
    if map_type in PERCPU_TYPES:
        return ((value_size + 7) // 8 * 8) * possible_cpus()
    return value_size


def batches(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, memoryview, int]]:
    """(keys, values, count) per batched lookup; see ``libbpf.map_batches``."""
    return libbpf.map_batches(fd, key_size, value_size)


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
