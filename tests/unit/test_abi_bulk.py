"""The ABI's bulk packers give, entry for entry, the bytes of its one-entry packers (both address families,
any value in range), and refuse what those refuse: a value out of range raises."""

from __future__ import annotations

import array
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancing.datapath import abi
from balancing.model.desired import Backend, FrontendKey, IPAddress, Protocol

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
ADDRESSES = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
)


def addresses(v4_only: bool) -> st.SearchStrategy[IPAddress]:
    return st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address) if v4_only else ADDRESSES


@given(
    st.booleans().flatmap(
        lambda v4: st.lists(st.tuples(addresses(v4), U16, st.sampled_from(Protocol), st.integers(0, 255)))
    )
)
def test_backend_refs(entries: list[tuple[IPAddress, int, Protocol, int]]) -> None:
    backends = [Backend(ip, port) for ip, port, _, _ in entries]
    refs = abi.pack_backend_refs(backends, [int(p) for _, _, p, _ in entries], [f for *_, f in entries])
    assert refs == [abi.pack_backend(ip, port, proto, flags) for ip, port, proto, flags in entries]


@given(st.lists(st.tuples(ADDRESSES, U16, st.sampled_from(Protocol))), st.sampled_from([0, 1, 2]))
def test_master_keys(entries: list[tuple[IPAddress, int, Protocol]], scope: int) -> None:
    keys = [FrontendKey(ip, port, proto) for ip, port, proto in entries]
    packed = abi.pack_master_keys(keys, [int(k.protocol) for k in keys], scope)
    assert packed == [abi.SvcKeyPacker(k.ip, k.port, k.protocol, scope)(abi.MASTER_SLOT) for k in keys]


@given(st.lists(st.tuples(ADDRESSES, U16, st.sampled_from(Protocol), st.integers(0, 40))))
def test_slot_keys(entries: list[tuple[IPAddress, int, Protocol, int]]) -> None:
    keys = [FrontendKey(ip, port, proto) for ip, port, proto, _ in entries]
    counts = [n for *_, n in entries]
    packed = abi.pack_slot_keys(abi.pack_master_keys(keys, [int(k.protocol) for k in keys]), counts)
    expected = b"".join(
        abi.SvcKeyPacker(k.ip, k.port, k.protocol)(slot)
        for k, n in zip(keys, counts, strict=True)
        for slot in range(1, n + 1)
    )
    assert packed.tobytes() == expected


def test_slot_numbers_run_to_a_tier_of_65535() -> None:
    master = abi.SvcKeyPacker(ipaddress.ip_address("10.0.0.1"), 80, Protocol.TCP)(0)
    packed = abi.pack_slot_keys([master], [0xFFFF]).tobytes()
    assert packed[-abi.SVC_KEY.size :] == abi.SvcKeyPacker(ipaddress.ip_address("10.0.0.1"), 80, 6)(0xFFFF)
    with pytest.raises(OverflowError):
        abi.pack_slot_keys([master], [0x10000])


@given(st.lists(U32))
def test_slot_values_and_backend_ids(ids: list[int]) -> None:
    assert abi.pack_slot_values(array.array("I", ids)).tobytes() == b"".join(map(abi.pack_slot, ids))
    assert abi.pack_backend_ids(ids).tobytes() == b"".join(map(abi.pack_backend_id, ids))


@given(st.lists(st.tuples(U32, U32)))
def test_affinity_matches(pairs: list[tuple[int, int]]) -> None:
    svc, backend = array.array("I", [s for s, _ in pairs]), array.array("I", [b for _, b in pairs])
    expected = b"".join(abi.pack_affinity_match(s, b) for s, b in pairs)
    assert abi.pack_affinity_matches(svc, backend).tobytes() == expected


@given(st.lists(st.tuples(U32, U16, U16, U32)))
def test_masters(entries: list[tuple[int, int, int, int]]) -> None:
    columns = [[e[i] for e in entries] for i in range(4)]
    assert abi.pack_masters(*columns) == [abi.master_val(*e) for e in entries]


def test_values_out_of_range_raise() -> None:
    ip = ipaddress.ip_address("10.0.0.1")
    with pytest.raises(struct.error):
        abi.pack_backend_refs([Backend(ip, 0x10000)], [6], [0])
    with pytest.raises(struct.error):
        abi.pack_masters([1], [1], [0], [2**32])
    with pytest.raises(OverflowError):
        abi.pack_backend_ids([2**32])
