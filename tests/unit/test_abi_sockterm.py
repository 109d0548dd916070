"""The Python mirror of the socket-termination ABI (datapath/abi.py) against the BTF of bpf/sockterm.o.

Like test_abi.py for the datapath object: struct sizes and offsets, and the maps the object declares. Needs
only the built object (``make bpf``) and bpftool, not the kernel.
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

OBJECT = Path(__file__).resolve().parents[2] / "build/bpf/sockterm.o"

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


@pytest.mark.parametrize("layout", (*abi.SOCKTERM_LAYOUTS, abi.SOCK_REV), ids=lambda lay: lay.c_name)
def test_struct_layout_matches_btf(btf: list[dict[str, Any]], layout: abi.Layout) -> None:
    found = [t for t in btf if t.get("kind") == "STRUCT" and t.get("name") == layout.c_name]
    assert found, f"struct {layout.c_name} is not in the object's BTF"
    assert found[0]["size"] == layout.size
    assert {m["name"]: m["bits_offset"] // 8 for m in found[0]["members"]} == layout.offsets()


def test_the_object_declares_exactly_the_mirrored_maps(btf: list[dict[str, Any]]) -> None:
    names = {v["name"] for v in btf if v.get("kind") == "VAR" and v.get("name", "").startswith("bl_")}
    assert names == set(abi.SOCKTERM_MAPS)
    assert abi.MAP_DOOMED not in abi.ALL_MAPS  # the datapath object does not define it


def test_doom_key_packing() -> None:
    key = abi.pack_doom_key(
        ipaddress.ip_address("10.96.0.10"), 53, ipaddress.ip_address("fd00::1"), 8053, Protocol.UDP
    )
    offsets = abi.DOOM_KEY.offsets()
    assert len(key) == abi.DOOM_KEY.size == 40
    assert key[offsets["frontend_addr"] : offsets["frontend_addr"] + 16] == b"\0" * 10 + b"\xff\xff" + bytes(
        [10, 96, 0, 10]
    )
    assert key[offsets["backend_port"] : offsets["backend_port"] + 2] == (8053).to_bytes(2, "big")
    assert key[offsets["proto"]] == 17
