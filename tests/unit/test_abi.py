"""The Python mirror (datapath/abi.py) against the BTF of the compiled object: names, sizes, offsets.

Reads BTF with ``bpftool btf dump -j``; needs only the built object (``make bpf``), not the kernel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from balancing.datapath import abi

OBJECT = Path(__file__).resolve().parents[2] / "build/bpf/balancing.o"

pytestmark = pytest.mark.skipif(
    not OBJECT.is_file() or shutil.which("bpftool") is None, reason="needs `make bpf` and bpftool"
)


@pytest.fixture(scope="module")
def btf() -> list[dict[str, Any]]:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(OBJECT)], check=True, capture_output=True, text=True
    ).stdout
    types: list[dict[str, Any]] = json.loads(out)["types"]
    return types


def _struct(btf: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [t for t in btf if t.get("kind") == "STRUCT" and t.get("name") == name]
    assert found, f"struct {name} is not in the object's BTF"
    return found[0]


@pytest.mark.parametrize("layout", [lay for lay in abi.LAYOUTS], ids=lambda lay: lay.c_name)
def test_struct_layout_matches_btf(btf: list[dict[str, Any]], layout: abi.Layout) -> None:
    struct = _struct(btf, layout.c_name)
    assert struct["size"] == layout.size
    btf_offsets = {m["name"]: m["bits_offset"] // 8 for m in struct["members"]}
    assert btf_offsets == layout.offsets()


def test_every_map_the_object_defines_is_mirrored(btf: list[dict[str, Any]]) -> None:
    maps_sec = [t for t in btf if t.get("kind") == "DATASEC" and t.get("name") == ".maps"]
    assert maps_sec
    names = {v["name"] for v in btf if v.get("kind") == "VAR" and v.get("name", "").startswith("bl_")}
    assert names == set(abi.ALL_MAPS)
