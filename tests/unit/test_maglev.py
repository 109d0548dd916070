"""Maglev tables (``datapath.maglev``): the paper's loop, exact shares, little disruption, pinned hash.

The fast population loop (unrolled turns, arithmetic tail) is compared with the paper's loop written plainly
here; every node must compute the same table for the same backend set whatever the order it lists them in,
and across versions (pinned vectors: changing them breaks mixed-version clusters).
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancing.datapath import abi, maglev

SIZE = abi.DEFAULT_MAGLEV_SIZE
SMALL_PRIMES = [2, 3, 5, 7, 13, 31, 101, 251, 1009]


def identity(address: str, port: int) -> bytes:
    """What the writer passes: the 16-byte address (v4 mapped into v6) and the port, big-endian."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip.packed + port.to_bytes(2, "big")


def backends(n: int, port: int = 8080) -> list[bytes]:
    return [identity(f"10.244.{i // 250}.{i % 250 + 1}", port) for i in range(n)]


def as_identities(backend_list: Sequence[bytes], size: int) -> list[bytes]:
    return [backend_list[i] for i in maglev.table(backend_list, size)]


def papers_table(backend_list: Sequence[bytes], size: int) -> list[bytes]:
    """Maglev's population loop as the paper writes it (permutation[i][next[i]]), over sorted identities."""
    ids = sorted(set(backend_list))
    perms = [maglev.offset_and_skip(b, size) for b in ids]
    nexts = [0] * len(ids)
    entries = [-1] * size
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(perms):
            c = (offset + nexts[i] * skip) % size
            while entries[c] >= 0:
                nexts[i] += 1
                c = (offset + nexts[i] * skip) % size
            entries[c] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                return [ids[r] for r in entries]


def moved(before: list[bytes], after: list[bytes], exempt: bytes) -> int:
    """Entries that changed backend, besides those that had to (from or to ``exempt``)."""
    return sum(1 for a, b in zip(before, after, strict=True) if a != b and exempt not in (a, b))


identity_lists = st.lists(st.binary(min_size=1, max_size=18), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(identity_lists, st.sampled_from(SMALL_PRIMES))
def test_the_table_is_the_papers(ids: list[bytes], size: int) -> None:
    assert as_identities(ids, size) == papers_table(ids, size)


@pytest.mark.parametrize("n", [2, 3, 7, 16, 17, 100])
def test_the_table_is_the_papers_at_the_default_size(n: int) -> None:
    ids = backends(n)
    assert as_identities(ids, SIZE) == papers_table(ids, SIZE)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10, 16, 17, 100, 163, 1000])
def test_every_backend_gets_its_exact_share(n: int) -> None:
    """Each round every backend takes one entry: ``size // n`` each, one more for the first ``size % n``."""
    ids = backends(n)
    table = maglev.table(ids, SIZE)
    assert table.typecode == "I"
    assert len(table) == SIZE
    assert all(0 <= i < n for i in table)
    counts = Counter(table)
    by_rank = [counts[ids.index(b)] for b in sorted(ids)]
    assert by_rank == [SIZE // n + (rank < SIZE % n) for rank in range(n)]
    assert max(by_rank) - min(by_rank) <= max(1, SIZE // 100)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.binary(min_size=1, max_size=18), min_size=1, max_size=30), st.sampled_from(SMALL_PRIMES))
def test_shares_are_exact_for_any_set(ids: set[bytes], size: int) -> None:
    counts = Counter(as_identities(list(ids), size))
    n = len(ids)
    assert [counts[b] for b in sorted(ids)] == [size // n + (rank < size % n) for rank in range(n)]


@settings(max_examples=100, deadline=None)
@given(identity_lists, st.sampled_from([*SMALL_PRIMES, SIZE]), st.randoms(use_true_random=False))
def test_the_order_of_the_backends_does_not_matter(ids: list[bytes], size: int, rnd: random.Random) -> None:
    shuffled = ids[:]
    rnd.shuffle(shuffled)
    assert as_identities(shuffled, size) == as_identities(ids, size)


def test_equal_identities_are_one_backend_named_by_the_first() -> None:
    a, b = backends(2)
    table = maglev.table([b, a, b, a], 13)
    assert set(table) == {0, 1}
    assert [[b, a][i] for i in table] == as_identities([a, b], 13)


def test_one_backend_takes_every_entry() -> None:
    assert list(maglev.table(backends(1), SIZE)) == [0] * SIZE
    assert set(maglev.table(backends(1) * 3, 13)) == {0}


def test_no_backend_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one backend"):
        maglev.table([], SIZE)
    with pytest.raises(ValueError, match="at least one backend"):
        maglev.TableCache().table([], SIZE)


@pytest.mark.parametrize("n", [3, 10, 30, 100])
def test_removing_a_backend_moves_few_of_the_others_entries(n: int) -> None:
    ids = backends(n)
    before = as_identities(ids, SIZE)
    for gone in ids[:: max(1, n // 5)]:
        after = as_identities([b for b in ids if b != gone], SIZE)
        assert after.count(gone) == 0
        assert moved(before, after, gone) < 2 * SIZE / n


@pytest.mark.parametrize("n", [3, 10, 30, 100])
def test_adding_a_backend_moves_few_of_the_others_entries(n: int) -> None:
    ids = backends(n)
    before = as_identities(ids, SIZE)
    for new in backends(5, port=9090):
        after = as_identities([*ids, new], SIZE)
        assert abs(after.count(new) - SIZE / (n + 1)) <= 1
        assert moved(before, after, new) < 2 * SIZE / (n + 1)


# Pinned vectors: every node of a cluster must build the same table, whatever its version.
THREE = [identity("10.0.0.1", 80), identity("10.0.0.2", 80), identity("10.0.0.3", 80)]


def test_the_hash_is_pinned() -> None:
    assert maglev.HASH_PERSON == b"bl-maglev-v1"
    assert [maglev.offset_and_skip(b, 13) for b in THREE] == [(10, 10), (6, 1), (4, 11)]
    assert [maglev.offset_and_skip(b, SIZE) for b in THREE] == [(16256, 10222), (8035, 1405), (12384, 5303)]


def test_a_small_table_is_pinned() -> None:
    """Worked by hand from the pinned offsets and skips: backend 0 visits 10, 7, 4, 1, 11, 8, 5, 2, 12, ...
    (skip 10), backend 1 visits 6, 7, 8, ... (skip 1), backend 2 visits 4, 2, 0, 11, 9, 7, 5, ... (skip 11);
    rounds take 10 6 4 | 7 8 2 | 1 9 0 | 11 12 5 | 3, so backend 0, first in identity order, gets 5 entries.
    """
    assert list(maglev.table(THREE, 13)) == [2, 0, 2, 0, 2, 2, 1, 0, 1, 1, 0, 0, 1]
    assert list(maglev.table(THREE[::-1], 13)) == [0, 2, 0, 2, 0, 0, 1, 2, 1, 1, 2, 2, 1]


@pytest.mark.parametrize(
    ("n", "digest"),
    [
        (3, "89b383bf42733926b6c30090dd66da0ce93a44a0f2ae8916cedcd6230bf7fa26"),
        (20, "1259f987835a6cad540552fc9e66a926952c2fd57bc4e07856cc34b496486de4"),
        (500, "cf739d6884675a8455dd27bb14e27ba470f0d8f80017c84d6ba003284c4e7711"),
    ],
)
def test_default_size_tables_are_pinned(n: int, digest: str) -> None:
    text = ",".join(map(str, maglev.table(backends(n), SIZE)))
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_primes() -> None:
    sieve = [True] * 2000
    sieve[0] = sieve[1] = False
    for i in range(2, 2000):
        if sieve[i]:
            sieve[i * i :: i] = [False] * len(sieve[i * i :: i])
    assert [n for n in range(2000) if maglev.is_prime(n)] == [n for n in range(2000) if sieve[n]]
    assert not maglev.is_prime(-7)
    assert maglev.is_prime(SIZE)
    assert maglev.is_prime(65537)
    assert maglev.is_prime(4294967291)  # the largest prime below 2**32
    assert maglev.next_prime(16384) == 16411
    assert maglev.next_prime(13) == 13


@pytest.mark.parametrize("size", [2, 13, SIZE, 65537, 4294967291])
def test_valid_sizes(size: int) -> None:
    maglev.valid_size(size)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (0, "out of range"),
        (1, "out of range"),
        (-13, "out of range"),
        (1 << 32, "out of range"),
        (4, r"not a prime.*nearest larger prime is 5"),
        (16384, r"16384 is not a prime.*16411"),
        (65536, "not a prime"),
        (SIZE * 3, "not a prime"),
    ],
)
def test_invalid_sizes(size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        maglev.valid_size(size)
    with pytest.raises(ValueError, match=message):
        maglev.table(backends(2), size)


def test_check_size_warns_below_100_entries_per_backend() -> None:
    assert maglev.check_size(SIZE, 1) is None
    assert maglev.check_size(SIZE, 163) is None
    warning = maglev.check_size(SIZE, 164)
    assert warning is not None
    assert "16381 is below 100 x 164 backends" in warning
    assert "99 or 100 entries" in warning
    assert "use a prime >= 16411" in warning
    starved = maglev.check_size(13, 20)
    assert starved is not None
    assert "7 of the backends get no entry" in starved


def test_more_backends_than_entries() -> None:
    ids = backends(20)
    table = maglev.table(ids, 13)
    assert len(set(table)) == 13
    assert as_identities(ids, 13) == papers_table(ids, 13)


def test_cache_returns_the_tables_in_the_callers_order() -> None:
    cache = maglev.TableCache()
    ids = backends(5)
    assert cache.table(ids, SIZE) == maglev.table(ids, SIZE)
    reordered = [ids[3], ids[0], ids[4], ids[1], ids[2], ids[0]]
    assert cache.table(reordered, SIZE) == maglev.table(reordered, SIZE)
    assert cache.table(ids, 13) == maglev.table(ids, 13)
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    returned = cache.table(ids, SIZE)
    returned[0] = 99
    assert cache.table(ids, SIZE) == maglev.table(ids, SIZE)


def test_cache_keeps_within_its_bytes_least_recently_used_out() -> None:
    cache = maglev.TableCache(max_bytes=3 * SIZE)  # three tables of <= 256 backends (one byte an entry)
    sets = [backends(n) for n in (2, 3, 4, 5)]
    for ids in sets[:3]:
        cache.table(ids, SIZE)
    cache.table(sets[0], SIZE)  # the first is now the most recently used
    cache.table(sets[3], SIZE)  # evicts the second
    assert len(cache) == 3
    assert cache.bytes == 3 * SIZE
    misses = cache.misses
    cache.table(sets[0], SIZE)
    assert cache.misses == misses
    cache.table(sets[1], SIZE)
    assert cache.misses == misses + 1
    wide = backends(300)
    cache.table(wide, SIZE)  # two bytes an entry: evicts two
    assert cache.bytes <= 3 * SIZE
    assert cache.table(wide, SIZE) == maglev.table(wide, SIZE)
    cache.clear()
    assert (len(cache), cache.bytes) == (0, 0)
