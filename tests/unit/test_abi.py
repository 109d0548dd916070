"""The Python mirror (datapath/abi.py) against the BTF of the compiled objects: names, sizes, offsets.

``balancing.o`` (the datapath) and ``sockterm.o`` (socket termination, which reuses the datapath's reverse
map and declares its own doomed map). Reads BTF with ``bpftool btf dump -j``; needs only the built objects
(``make bpf``), not the kernel.
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
DATAPATH, SOCKTERM = BUILD / "balancing.o", BUILD / "sockterm.o"

pytestmark = pytest.mark.skipif(
    not DATAPATH.is_file() or not SOCKTERM.is_file() or shutil.which("bpftool") is None,
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


def _check_layout(btf: Btf, layout: abi.Layout) -> None:
    found = [t for t in btf if t.get("kind") == "STRUCT" and t.get("name") == layout.c_name]
    assert found, f"struct {layout.c_name} is not in the object's BTF"
    assert found[0]["size"] == layout.size
    assert {m["name"]: m["bits_offset"] // 8 for m in found[0]["members"]} == layout.offsets()


def _declared_maps(btf: Btf) -> set[str]:
    return {v["name"] for v in btf if v.get("kind") == "VAR" and v.get("name", "").startswith("bl_")}


@pytest.mark.parametrize("layout", abi.LAYOUTS, ids=lambda lay: lay.c_name)
def test_struct_layout_matches_btf(btf: Btf, layout: abi.Layout) -> None:
    _check_layout(btf, layout)


@pytest.mark.parametrize("layout", (*abi.SOCKTERM_LAYOUTS, abi.SOCK_REV), ids=lambda lay: lay.c_name)
def test_sockterm_struct_layout_matches_btf(sockterm_btf: Btf, layout: abi.Layout) -> None:
    _check_layout(sockterm_btf, layout)


def test_every_map_the_object_defines_is_mirrored(btf: Btf) -> None:
    assert [t for t in btf if t.get("kind") == "DATASEC" and t.get("name") == ".maps"]
    assert _declared_maps(btf) == set(abi.ALL_MAPS)


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
