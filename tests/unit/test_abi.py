"""The Python mirror (datapath/abi.py) against the BTF of the compiled objects.

``balancing.o`` (the datapath), ``nodeport.o`` (north-south, which shares the datapath's frontend, backend,
counter, event, Maglev and source-range maps and carries its own), ``sockterm.o`` (socket termination,
which reuses the datapath's connected-socket storage and carries its own doomed map) and ``sockmigrate.o``
(the upgrade from 0.3: its cookie-keyed reverse map into the socket storage): struct sizes and
offsets, the C enums' values against abi's constants, which maps each object carries and the capacity each
is declared with (none for socket storage). Reads BTF with ``bpftool btf dump -j``; needs only the built
objects (``make bpf``), not the kernel.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from balancing.datapath import abi
from balancing.model.desired import Protocol

BUILD = Path(__file__).resolve().parents[2] / "build/bpf"
DATAPATH, SOCKTERM, NODEPORT = BUILD / "balancing.o", BUILD / "sockterm.o", BUILD / "nodeport.o"
SOCKMIGRATE = BUILD / "sockmigrate.o"

pytestmark = pytest.mark.skipif(
    not all(o.is_file() for o in (DATAPATH, SOCKTERM, NODEPORT, SOCKMIGRATE))
    or shutil.which("bpftool") is None,
    reason="needs `make bpf` and bpftool",
)
Btf = list[dict[str, Any]]


def _dump(obj: Path) -> Btf:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj)], check=True, capture_output=True, text=True
    ).stdout
    types: Btf = json.loads(out)["types"]
    return types


@pytest.fixture(scope="module")
def btf() -> Btf:
    return _dump(DATAPATH)


@pytest.fixture(scope="module")
def sockterm_btf() -> Btf:
    return _dump(SOCKTERM)


@pytest.fixture(scope="module")
def nodeport_btf() -> Btf:
    return _dump(NODEPORT)


@pytest.fixture(scope="module")
def sockmigrate_btf() -> Btf:
    return _dump(SOCKMIGRATE)


def _check_layout(btf: Btf, layout: abi.Layout) -> None:
    found = [t for t in btf if t.get("kind") == "STRUCT" and t.get("name") == layout.c_name]
    assert found, f"struct {layout.c_name} is not in the object's BTF"
    assert found[0]["size"] == layout.size
    assert {m["name"]: m["bits_offset"] // 8 for m in found[0]["members"]} == layout.offsets()


def _by_id(btf: Btf) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in btf}


def _map_vars(btf: Btf) -> dict[str, dict[str, Any]]:
    """The object's maps (the variables of its ``.maps`` section): name -> the struct defining the map."""
    by_id = _by_id(btf)
    sections = [t for t in btf if t.get("kind") == "DATASEC" and t.get("name") == ".maps"]
    assert len(sections) == 1, "the object has no .maps section"
    return {by_id[v["type_id"]]["name"]: by_id[by_id[v["type_id"]]["type_id"]] for v in sections[0]["vars"]}


def _declared_maps(btf: Btf) -> set[str]:
    return set(_map_vars(btf))


def _uint_member(btf: Btf, definition: dict[str, Any], name: str) -> int | None:
    """``__uint(name, N)`` is a member of type ``int (*)[N]``: N is the array's length (None: no member)."""
    by_id = _by_id(btf)
    member = next((m for m in definition["members"] if m["name"] == name), None)
    if member is None:
        return None
    pointer = by_id[member["type_id"]]
    array = by_id[pointer["type_id"]]
    assert pointer["kind"] == "PTR" and array["kind"] == "ARRAY"
    return int(array["nr_elems"])


def _max_entries(btf: Btf, definition: dict[str, Any]) -> int:
    """The declared capacity; 0 for a map declared without one (socket storage is sized by the sockets)."""
    return _uint_member(btf, definition, "max_entries") or 0


def _pointee(btf: Btf, definition: dict[str, Any], name: str) -> str:
    """The type name of a ``__type(name, T)`` member (a ``T *``)."""
    by_id = _by_id(btf)
    member = next(m for m in definition["members"] if m["name"] == name)
    return str(by_id[by_id[member["type_id"]]["type_id"]]["name"])


def _enum(btf: Btf, name: str) -> dict[str, int]:
    found = [t for t in btf if t.get("kind") == "ENUM" and t.get("name") == name]
    assert found, f"enum {name} is not in the object's BTF"
    return {v["name"]: v["val"] for v in found[0]["values"]}


def _mirrored(prefix: str) -> dict[str, int]:
    return {n: v for n, v in vars(abi).items() if n.startswith(prefix) and isinstance(v, int)}


@pytest.mark.parametrize("layout", abi.LAYOUTS, ids=lambda lay: lay.c_name)
def test_struct_layout_matches_btf(btf: Btf, layout: abi.Layout) -> None:
    _check_layout(btf, layout)


@pytest.mark.parametrize("layout", (*abi.SOCKTERM_LAYOUTS, abi.SOCK_REV), ids=lambda lay: lay.c_name)
def test_sockterm_struct_layout_matches_btf(sockterm_btf: Btf, layout: abi.Layout) -> None:
    _check_layout(sockterm_btf, layout)


@pytest.mark.parametrize(
    "layout", (*abi.NODEPORT_LAYOUTS, abi.EVENT, abi.SRCR_KEY), ids=lambda lay: lay.c_name
)
def test_nodeport_struct_layout_matches_btf(nodeport_btf: Btf, layout: abi.Layout) -> None:
    _check_layout(nodeport_btf, layout)


def test_every_map_the_object_defines_is_mirrored(btf: Btf) -> None:
    assert _declared_maps(btf) == set(abi.ALL_MAPS)


def test_nodeport_declares_the_shared_maps_and_its_own(nodeport_btf: Btf) -> None:
    assert _declared_maps(nodeport_btf) == {*abi.SHARED_MAPS, *abi.NODEPORT_MAPS}
    assert set(abi.SHARED_MAPS) <= set(abi.ALL_MAPS)
    assert not set(abi.NODEPORT_MAPS) & set(abi.ALL_MAPS)  # pinned by the north-south loader only


def test_sockterm_declares_exactly_its_mirrored_maps(sockterm_btf: Btf) -> None:
    assert _declared_maps(sockterm_btf) == set(abi.SOCKTERM_MAPS)
    assert abi.MAP_DOOMED not in abi.ALL_MAPS  # the datapath object does not define it


def test_doom_key_packing() -> None:
    key = abi.pack_doom_key(
        ipaddress.ip_address("10.96.0.10"), 53, ipaddress.ip_address("fd00::1"), 8053, Protocol.UDP
    )
    offsets = abi.DOOM_KEY.offsets()
    assert len(key) == abi.DOOM_KEY.size == 40
    front = key[offsets["frontend_addr"] : offsets["frontend_addr"] + 16]
    assert front == b"\0" * 10 + b"\xff\xff" + bytes([10, 96, 0, 10])
    assert key[offsets["backend_port"] : offsets["backend_port"] + 2] == (8053).to_bytes(2, "big")
    assert key[offsets["proto"]] == 17


@pytest.mark.parametrize("obj", ["datapath", "sockterm", "nodeport", "sockmigrate"])
def test_maps_are_declared_with_the_mirrored_capacities(
    btf: Btf, sockterm_btf: Btf, nodeport_btf: Btf, sockmigrate_btf: Btf, obj: str
) -> None:
    types = {
        "datapath": btf,
        "sockterm": sockterm_btf,
        "nodeport": nodeport_btf,
        "sockmigrate": sockmigrate_btf,
    }[obj]
    declared = {name: _max_entries(types, d) for name, d in _map_vars(types).items()}
    assert declared == {name: abi.DEFAULT_ENTRIES[name] for name in declared}


BPF_MAP_TYPE_SK_STORAGE = 24  # enum bpf_map_type (linux/bpf.h)


@pytest.mark.parametrize("obj", ["datapath", "sockterm"])
def test_the_connected_socket_reverse_map_is_socket_storage(btf: Btf, sockterm_btf: Btf, obj: str) -> None:
    """bl_sks_v1 is socket storage keyed (from userspace) by a socket fd and holding a ``bl_sock_rev``, in
    both objects that carry it; the only map declared without a capacity."""
    types = {"datapath": btf, "sockterm": sockterm_btf}[obj]
    definitions = _map_vars(types)
    sks = definitions[abi.MAP_SOCK_REVERSE]
    assert _uint_member(types, sks, "type") == BPF_MAP_TYPE_SK_STORAGE
    key, value = abi.MAP_LAYOUTS[abi.MAP_SOCK_REVERSE]
    assert (_pointee(types, sks, "key"), _pointee(types, sks, "value")) == (key.c_name, value.c_name)
    assert [n for n, d in definitions.items() if _uint_member(types, d, "max_entries") is None] == [
        abi.MAP_SOCK_REVERSE
    ]


def test_every_map_has_a_default_capacity() -> None:
    assert set(abi.DEFAULT_ENTRIES) == {
        *abi.ALL_MAPS,
        *abi.SOCKTERM_MAPS,
        *abi.NODEPORT_MAPS,
        *abi.SOCKMIGRATE_MAPS,
    }


def test_sockmigrate_declares_exactly_its_mirrored_maps(sockmigrate_btf: Btf) -> None:
    """The upgrade object carries the socket storage and 0.3's cookie-keyed map (both pointed at the pins),
    and writes the termination iterator's records."""
    assert _declared_maps(sockmigrate_btf) == set(abi.SOCKMIGRATE_MAPS)
    for layout in (abi.SOCK_REV, *abi.SOCKTERM_LAYOUTS[1:]):
        _check_layout(sockmigrate_btf, layout)


@pytest.mark.parametrize(("c_name", "prefix"), abi.ENUMS.items(), ids=list(abi.ENUMS))
def test_enum_matches_btf(btf: Btf, sockterm_btf: Btf, nodeport_btf: Btf, c_name: str, prefix: str) -> None:
    """Each C enum's enumerators are abi's constants of its prefix, by name and value (BL_RES_X is RES_X),
    the same in every object (all include the one header)."""
    in_c = _enum(btf, c_name)
    assert all(n.startswith("BL_" + prefix) for n in in_c), f"enum {c_name}: an enumerator without {prefix}"
    mirrored = _mirrored(prefix)
    if prefix == "CT_":  # CT_F_* (enum bl_ct_flags) share the prefix of CT_* (enum bl_ct_state)
        mirrored = {n: v for n, v in mirrored.items() if not n.startswith("CT_F_")}
    assert {n.removeprefix("BL_"): v for n, v in in_c.items()} == mirrored
    assert _enum(sockterm_btf, c_name) == in_c
    assert _enum(nodeport_btf, c_name) == in_c


def test_every_c_enum_is_mirrored(btf: Btf, sockterm_btf: Btf, nodeport_btf: Btf) -> None:
    for types in (btf, sockterm_btf, nodeport_btf):
        assert {t["name"] for t in types if t.get("kind") == "ENUM" and t["name"].startswith("bl_")} == set(
            abi.ENUMS
        )


def test_every_result_and_hook_has_a_name() -> None:
    """Metrics, events and traces name results and hooks through these tables: none may be missing."""
    assert set(abi.RESULTS) == set(_mirrored("RES_").values())
    assert set(abi.HOOKS) == set(_mirrored("HOOK_").values())
    assert len(set(abi.RESULTS.values())) == len(abi.RESULTS)
    assert len(set(abi.HOOKS.values())) == len(abi.HOOKS)


def test_config_flags_change_alone() -> None:
    """The writer sets the skip flag, ``datapath.settings`` the rest: each keeps what the other wrote."""
    raw = abi.pack_config(abi.EVENTS_SAMPLED, 7, 4096, True, 1234, abi.CFG_F_HOST_NS_ONLY)
    assert abi.config_flags(raw) == abi.CFG_F_HOST_NS_ONLY
    both = abi.with_config_flags(raw, abi.CFG_F_HOST_NS_ONLY | abi.CFG_F_SKIP)
    assert abi.CONFIG.packer.unpack(both) == (abi.EVENTS_SAMPLED, 7, 4096, 1, 1234, 3, 0)
    assert abi.with_config_flags(None, abi.CFG_F_SKIP) == abi.pack_config(0, 0, 0, False, 0, abi.CFG_F_SKIP)
    assert abi.config_flags(None) == 0


def test_skip_key_is_a_cgroup_id() -> None:
    key = abi.pack_skip_key(2**40 + 5)
    assert len(key) == 8 and abi.unpack_skip_key(key) == 2**40 + 5


def test_source_range_keys() -> None:
    """An LPM key's prefix length counts the frontend's 32 bits, then the address's (IPv4 as v4-mapped)."""
    v4 = abi.pack_source_range(7, ipaddress.ip_network("203.0.113.0/24"))
    assert abi.SRCR_KEY.packer.unpack(v4)[:2] == (32 + 96 + 24, 7)
    assert abi.unpack_source_range(v4) == (7, ipaddress.ip_network("203.0.113.0/24"))
    v6 = abi.pack_source_range(9, ipaddress.ip_network("2001:db8::/32"))
    assert abi.unpack_source_range(v6) == (9, ipaddress.ip_network("2001:db8::/32"))
    assert abi.source_range_svc_id(v6) == 9
