"""Maglev lookup tables: which backend a north-south flow goes to, the same on every node.

Job: ``table(backends, size)`` builds the Maglev lookup table of Eisenbud et al., "Maglev: A Fast and
Reliable Software Network Load Balancer" (NSDI 2016, section 3.4): ``size`` entries, each an index into
``backends``. The datapath hashes a flow's 5-tuple to an entry, so any node that receives a packet of the
flow picks the same backend without sharing state, and when a backend comes or goes most flows keep theirs.

Algorithm. Each backend is an opaque identity (the caller passes its packed address and port, never a
node-local id) hashed with BLAKE2b-128 personalised with ``HASH_PERSON`` into ``h1, h2``; its preference
list is the permutation ``offset + j * skip (mod size)`` with ``offset = h1 % size`` and
``skip = h2 % (size - 1) + 1`` (a full cycle because ``size`` is prime). The backends, sorted by identity,
take turns: each takes the next free entry of its own list, until the table is full. So every backend
gets ``size // n`` or ``size // n + 1`` entries (the first ``size % n`` in identity order get one more),
and the table depends only on the set of identities and ``size``: not on the caller's order, not on
Python's per-process ``hash()``. ``HASH_PERSON`` versions the scheme; changing anything here changes
every table, and nodes of different versions would then disagree (tests/unit/test_maglev.py pins vectors).

Speed: the agent may build thousands of tables of ``abi.DEFAULT_MAGLEV_SIZE`` entries at start, in pure
Python. The population loop keeps each backend's next candidate as a position (advanced by ``+ skip``,
never as a permutation array), marks taken entries in the table list itself (``None`` is free), unrolls
the turns of up to ``UNROLL_MAX`` backends into generated code with one local per backend, and fills the
last few free entries (where probing costs ``size / free`` steps each) by modular arithmetic instead:
a backend's first free entry is the free ``e`` minimising ``(e - position) * skip^-1 (mod size)``.
bench/maglev.py measures it (a few ms a table).

Why by hand: no maintained Python library does Maglev (PyPI's ``maglev`` is an unrelated MLOps tool; its
consistent-hashing packages are ketama rings and jump hashes; Maglev crates exist for Rust and Go), and
the hash must be pinned here anyway, since every node of a cluster must compute the same table.

Neighbours: the writer builds a table from each north-south frontend's backends (``north_south_backends``
of ``model.desired``), maps the indexes to backend ids and writes it as a new inner map of
``abi.MAP_MAGLEV`` (bl_mglv_v1), swapped whole; ``TableCache`` serves the frontends that share a backend
set. bpf/nodeport.c reads ``table[hash % size]``. Imports nothing of ours.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from itertools import chain, compress, repeat
from math import isqrt
from operator import is_
from typing import cast

HASH_PERSON = b"bl-maglev-v1"  # BLAKE2b personalisation: the version of the hash, part of the wire contract
MIN_ENTRIES_PER_BACKEND = 100  # the paper's rule for an even spread: size >= 100 x backends
MAX_SIZE = 0xFFFFFFFF  # the datapath's table size and indexes are __u32
UNROLL_MAX = 16  # up to this many backends, the population loop is generated with one local per backend
TAIL_MIN_BACKENDS = 6  # from this many backends, the last free entries are found by arithmetic, not probing

# A table under construction: a backend's rank per entry, None while free.
_Entries = list[int | None]
# Fills the first ``count`` turns (backends in rank order, round after round) of ``entries``, advancing
# ``positions`` (each backend's next candidate entry) in place.
_Fill = Callable[[_Entries, list[int], Sequence[int], int, int], None]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    return all(n % f and n % (f + 2) for f in range(5, isqrt(n) + 1, 6))


def next_prime(n: int) -> int:
    """The smallest prime >= n."""
    while not is_prime(n):
        n += 1
    return n


def valid_size(size: int) -> None:
    """Raise ValueError unless ``size`` can be a Maglev table size: a prime that fits a __u32."""
    if not 2 <= size <= MAX_SIZE:
        raise ValueError(f"maglev table size {size} is out of range: it must be a prime in 2..{MAX_SIZE}")
    if not is_prime(size):
        raise ValueError(
            f"maglev table size {size} is not a prime: a backend's preference list only covers every entry"
            f" when the size is prime (the nearest larger prime is {next_prime(size)};"
            f" the default is 16381)"
        )


def check_size(size: int, backends_count: int) -> str | None:
    """A warning for the caller to log when ``size`` is below 100 x the backends, else None."""
    if size >= MIN_ENTRIES_PER_BACKEND * backends_count:
        return None
    suggestion = next_prime(MIN_ENTRIES_PER_BACKEND * backends_count)
    if size < backends_count:
        effect = f"{backends_count - size} of the backends get no entry at all (no traffic)"
    else:
        entries = size // backends_count
        imbalance = 100 / entries
        effect = f"each backend gets {entries} or {entries + 1} entries, an imbalance up to {imbalance:.1f}%"
    return (
        f"maglev table size {size} is below {MIN_ENTRIES_PER_BACKEND} x {backends_count} backends:"
        f" {effect}, and more flows move when backends change; use a prime >= {suggestion}"
    )


def offset_and_skip(identity: bytes, size: int) -> tuple[int, int]:
    """Where a backend's preference list starts and how it steps, for a table of prime ``size``."""
    digest = hashlib.blake2b(identity, digest_size=16, person=HASH_PERSON).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def table(backends: Sequence[bytes], size: int) -> array[int]:
    """The Maglev table ('I' array of ``size`` indexes into ``backends``) for these backend identities.

    Equal identities are one backend (the entries name the first of them). ValueError for an empty
    ``backends`` or a ``size`` that is not a valid table size (``valid_size``).
    """
    valid_size(size)
    order, identities = _sorted_unique(backends)
    return _as_caller_indexes(_ranks(identities, size), order)


class TableCache:
    """Tables by (backend identities, size), least recently used out first, within ``max_bytes``.

    Many frontends of one Service (its NodePort, load-balancer and external IPs) share a backend set;
    they share one build. Tables are kept in rank order with the narrowest item type that fits
    (16 KiB for a table of 16381 entries and up to 256 backends); ``table`` returns a fresh 'I' array in the
    caller's indexes, as the module's ``table`` does.
    """

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._tables: OrderedDict[tuple[tuple[bytes, ...], int], array[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tables)

    def table(self, backends: Sequence[bytes], size: int) -> array[int]:
        valid_size(size)
        order, identities = _sorted_unique(backends)
        key = (tuple(identities), size)
        ranks = self._tables.get(key)
        if ranks is None:
            self.misses += 1
            ranks = array(_narrowest_typecode(len(identities)), _ranks(identities, size))
            self._remember(key, ranks)
        else:
            self.hits += 1
            self._tables.move_to_end(key)
        return _as_caller_indexes(ranks, order)

    def clear(self) -> None:
        self._tables.clear()
        self.bytes = 0

    def _remember(self, key: tuple[tuple[bytes, ...], int], ranks: array[int]) -> None:
        self._tables[key] = ranks
        self.bytes += _table_bytes(ranks)
        while self.bytes > self.max_bytes and self._tables:
            _key, old = self._tables.popitem(last=False)
            self.bytes -= _table_bytes(old)


def _table_bytes(ranks: array[int]) -> int:
    return len(ranks) * ranks.itemsize


def _narrowest_typecode(backends_count: int) -> str:
    if backends_count <= 1 << 8:
        return "B"
    return "H" if backends_count <= 1 << 16 else "I"


def _sorted_unique(backends: Sequence[bytes]) -> tuple[list[int], list[bytes]]:
    """The caller's index of each distinct identity in identity order (the first of equals), and them."""
    if not backends:
        raise ValueError("a maglev table needs at least one backend")
    order: list[int] = []
    identities: list[bytes] = []
    for index in sorted(range(len(backends)), key=backends.__getitem__):
        identity = backends[index]
        if not identities or identity != identities[-1]:
            order.append(index)
            identities.append(identity)
    return order, identities


def _as_caller_indexes(ranks: Iterable[int], order: list[int]) -> array[int]:
    if all(index == rank for rank, index in enumerate(order)):
        return array("I", ranks)
    return array("I", map(order.__getitem__, ranks))


def _ranks(identities: Sequence[bytes], size: int) -> list[int]:
    """The table as ranks of ``identities`` (distinct, sorted): the classic population loop."""
    if len(identities) == 1:
        return [0] * size
    offsets, skips = zip(*(offset_and_skip(identity, size) for identity in identities), strict=True)
    entries: _Entries = [None] * size
    positions = list(offsets)
    count = len(positions)
    tail = isqrt(size) // 2 if count >= TAIL_MIN_BACKENDS else 0
    fill = _unrolled_fill(count) if count <= UNROLL_MAX else _fill_turns
    fill(entries, positions, skips, size, size - tail)
    if tail:
        _fill_tail(entries, positions, skips, size, (size - tail) % count)
    return cast(list[int], entries)


def _fill_turns(entries: _Entries, positions: list[int], skips: Sequence[int], size: int, count: int) -> None:
    backends = len(positions)
    rounds, rest = divmod(count, backends)
    for rank in chain(chain.from_iterable(repeat(range(backends), rounds)), range(rest)):
        position = positions[rank]
        skip = skips[rank]
        while entries[position] is not None:
            position = (position + skip) % size
        entries[position] = rank
        positions[rank] = (position + skip) % size


def _fill_tail(entries: _Entries, positions: list[int], skips: Sequence[int], size: int, first: int) -> None:
    """The last free entries, turns from backend ``first`` on: each takes the first free entry of its list.

    Every entry between a backend's position and its next free one is taken, so the number of steps to a
    free entry, ``(entry - position) * inverse(skip) mod size``, is least for the one it would probe to;
    a position left behind by an earlier turn in the tail only adds taken entries in between.
    """
    free = list(compress(range(size), map(is_, entries, repeat(None))))
    backends = len(positions)
    rank = first
    while free:
        position = positions[rank]
        inverse = pow(skips[rank], -1, size)
        steps = [(entry - position) * inverse % size for entry in free]
        nearest = steps.index(min(steps))
        entries[free[nearest]] = rank
        free[nearest] = free[-1]
        free.pop()
        rank = rank + 1 if rank + 1 < backends else 0


def _probe_lines(rank: int, indent: str) -> list[str]:
    p, s = f"p{rank}", f"s{rank}"
    return [
        f"{indent}while entries[{p}] is not None:",
        f"{indent}    {p} = ({p} + {s}) % size",
        f"{indent}entries[{p}] = {rank}",
        f"{indent}{p} = ({p} + {s}) % size",
    ]


@cache
def _unrolled_fill(backends: int) -> _Fill:
    """``_fill_turns`` for exactly ``backends`` backends, with a local per backend: about twice as fast."""
    ps = "".join(f"p{rank}, " for rank in range(backends))
    ss = "".join(f"s{rank}, " for rank in range(backends))
    lines = [
        "def fill(entries, positions, skips, size, count):",
        f"    {ps}= positions",
        f"    {ss}= skips",
        f"    rounds, rest = divmod(count, {backends})",
        "    for _ in range(rounds):",
    ]
    for rank in range(backends):
        lines += _probe_lines(rank, " " * 8)
    for rank in range(backends - 1):
        lines.append(f"    if rest > {rank}:")
        lines += _probe_lines(rank, " " * 8)
    lines.append(f"    positions[:] = ({ps})")
    namespace: dict[str, object] = {}
    exec(compile("\n".join(lines), f"<maglev fill {backends}>", "exec"), namespace)
    return cast(_Fill, namespace["fill"])
