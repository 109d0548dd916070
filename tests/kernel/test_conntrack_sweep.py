"""``datapath.conntrack.sweep`` on a real LRU map with ``bl_ct_v1``'s layout: which flows it expires.

A test-owned bpffs directory holds the map (created by the kernel, pinned where ``nodeport.o``'s loader pins
it); flows are written as ``bpf/nodeport.c`` writes them (both entries, the reply's key being the
translated packet reversed), with ``seen_ns`` in the past; ``sweep`` runs with the real clock.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancing.datapath import abi, conntrack, libbpf

MAP_TYPE_LRU_HASH = 9
NODE, FRONT = "192.0.2.11", "192.0.2.11:30080"
TIMEOUTS = conntrack.Timeouts(tcp=3600, closing=10, new=60, other=60)


@pytest.fixture
def map_dir(bpffs_dir: Path) -> Iterator[Path]:
    fd = libbpf.map_create(MAP_TYPE_LRU_HASH, abi.MAP_CONNTRACK, abi.CT_KEY.size, abi.CT_VAL.size, 1024)
    try:
        libbpf.obj_pin(fd, str(bpffs_dir / abi.MAP_CONNTRACK))
        yield bpffs_dir
    finally:
        os.close(fd)


def _ep(text: str) -> tuple[bytes, bytes]:
    host, _, port = text.rpartition(":")
    return abi.pack_addr(ipaddress.ip_address(host)), abi.pack_port(int(port))


def _write_flow(map_dir: Path, client: str, backend: str, proto: int, state: int, idle_s: float) -> bytes:
    """A SNAT flow client -> FRONT -> backend, last seen ``idle_s`` ago; returns its flow key."""
    seen = time.monotonic_ns() - int(idle_s * 1e9)
    (c, cp), (f, fp), (b, bp) = _ep(client), _ep(FRONT), _ep(backend)
    snat = _ep(f"{NODE}:{61000 + int(cp.hex(), 16) % 1000}")
    key = abi.CT_KEY.packer.pack(c, f, cp, fp, proto, 0, 0)
    val = abi.CT_VAL.packer.pack(snat[0], b, snat[1], bp, 7, 3, abi.CT_F_SNAT, state, 0, seen, seen)
    rkey = conntrack.reply_key(key, val)
    rval = abi.CT_VAL.packer.pack(f, c, fp, cp, 7, 3, abi.CT_F_SNAT | abi.CT_F_REPLY, 0, 0, seen, seen)
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONNTRACK))
    try:
        libbpf.map_update(fd, key, val)
        libbpf.map_update(fd, rkey, rval)
    finally:
        os.close(fd)
    return key


def _keys(map_dir: Path) -> set[bytes]:
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONNTRACK))
    try:
        return set(libbpf.map_keys(fd, abi.CT_KEY.size))
    finally:
        os.close(fd)


def test_ended_and_idle_flows_go_with_both_entries_live_ones_stay(map_dir: Path) -> None:
    tcp, udp = 6, 17
    live = [
        _write_flow(map_dir, "203.0.113.10:40001", "10.244.2.11:8080", tcp, abi.CT_ESTABLISHED, 1000),
        _write_flow(map_dir, "203.0.113.10:40002", "10.244.2.11:8080", tcp, abi.CT_CLOSING, 5),
        _write_flow(map_dir, "203.0.113.10:40003", "10.244.2.11:8080", udp, abi.CT_ESTABLISHED, 30),
        _write_flow(map_dir, "203.0.113.10:40004", "10.244.2.11:8080", tcp, abi.CT_NEW, 30),
    ]
    gone = [
        _write_flow(map_dir, "203.0.113.10:40011", "10.244.2.11:8080", tcp, abi.CT_ESTABLISHED, 4000),
        _write_flow(map_dir, "203.0.113.10:40012", "10.244.2.11:8080", tcp, abi.CT_CLOSING, 11),
        _write_flow(map_dir, "203.0.113.10:40013", "10.244.2.11:8080", udp, abi.CT_ESTABLISHED, 61),
        _write_flow(map_dir, "203.0.113.10:40014", "10.244.2.11:8080", tcp, abi.CT_NEW, 61),
    ]
    assert len(_keys(map_dir)) == 16
    stats = conntrack.sweep(map_dir, TIMEOUTS)
    keys = _keys(map_dir)
    assert stats.entries == 16 and stats.flows_expired == 4 and stats.orphans_expired == 0
    assert len(keys) == 8
    assert all(k in keys for k in live) and not any(k in keys for k in gone)
    assert conntrack.sweep(map_dir, TIMEOUTS).flows_expired == 0  # nothing more to do


def test_a_reply_entry_without_its_flow_goes_once_older_than_any_timeout(map_dir: Path) -> None:
    old = _write_flow(map_dir, "203.0.113.10:40021", "10.244.2.11:8080", 6, abi.CT_ESTABLISHED, 7200)
    young = _write_flow(map_dir, "203.0.113.10:40022", "10.244.2.11:8080", 6, abi.CT_ESTABLISHED, 5)
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONNTRACK))
    try:
        for key in (old, young):  # the LRU took the flow entries, the replies stay
            libbpf.map_delete(fd, key)
    finally:
        os.close(fd)
    stats = conntrack.sweep(map_dir, TIMEOUTS)
    assert stats.orphans_expired == 1 and len(_keys(map_dir)) == 1
