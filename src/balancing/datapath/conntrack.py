"""Expire north-south connection tracking: delete the entries of flows that ended or went idle.

The TC programs (``bpf/nodeport.c``) create two entries per flow in ``bl_ct_v1`` and never delete them: the
map is an LRU, so a full map makes room, but a flow's SNAT port stays taken as long as its reply entry
exists, and the SNAT range towards one backend (a few thousand ports) would run out long before the map
fills. ``sweep`` walks the map (batched reads, only the fields it needs decoded) and deletes both entries of
every flow past its timeout, measured from the flow's last packet (``seen_ns``, which the programs write at
most once a second): a closing TCP flow after ``closing`` seconds, one that never saw a reply after
``new``, an established TCP flow after ``tcp`` and any other after ``other`` (kube-proxy's conntrack and
Cilium's defaults). A reply entry whose flow entry is gone (the LRU took it) goes once it is as old.
The agent runs it on a timer (``agent.lifecycle``). Neighbours: ``abi`` (the layout), ``libbpf``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from balancing.datapath import abi, libbpf

__all__ = ["SweepStats", "Timeouts", "sweep"]

_KEY, _VAL = abi.CT_KEY, abi.CT_VAL
_V = _VAL.offsets()
_K = _KEY.offsets()
_FLAGS = _V["flags"]
_SEEN = struct.Struct("=Q")
_NS = 1_000_000_000


@dataclass(frozen=True)
class Timeouts:
    """Idle seconds after which a flow's entries go, by what the programs last saw of it."""

    tcp: float = 6 * 3600.0  # established TCP
    closing: float = 10.0  # a FIN or RST was seen
    new: float = 60.0  # no reply seen yet (a SYN, a first datagram)
    other: float = 60.0  # established UDP


@dataclass
class SweepStats:
    entries: int = 0  # entries read
    flows_expired: int = 0  # flows whose entries were deleted
    orphans_expired: int = 0  # reply entries without their flow entry, deleted
    seconds: float = 0.0


def reply_key(raw_key: bytes, raw_val: bytes) -> bytes:
    """The key of a flow's reply entry, from its flow entry (the translated packet, reversed)."""
    val = _VAL.packer.unpack(raw_val)
    src, dst, sport, dport = val[0], val[1], val[2], val[3]
    proto = raw_key[_K["proto"]]
    return _KEY.packer.pack(dst, src, dport, sport, proto, 0, 0)


def sweep(map_dir: Path, timeouts: Timeouts = Timeouts(), now_ns: int | None = None) -> SweepStats:
    """Delete the entries of expired flows from the pinned ``bl_ct_v1`` under ``map_dir``."""
    started = time.perf_counter()
    now = time.monotonic_ns() if now_ns is None else now_ns  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
    stats = SweepStats()
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONNTRACK))
    try:
        flows: list[tuple[bytes, bytes]] = []
        replies: dict[bytes, int] = {}  # reply key → seen_ns
        for keys, values, n in libbpf.map_batches(fd, _KEY.size, _VAL.size):
            stats.entries += n
            raw_values = bytes(values)
            for i in range(n):
                raw_key = keys[i * _KEY.size : (i + 1) * _KEY.size]
                raw_val = raw_values[i * _VAL.size : (i + 1) * _VAL.size]
                if raw_val[_FLAGS] & abi.CT_F_REPLY:
                    replies[raw_key] = _SEEN.unpack_from(raw_val, _V["seen_ns"])[0]
                else:
                    flows.append((raw_key, raw_val))
        for raw_key, raw_val in flows:
            reply = reply_key(raw_key, raw_val)
            reply_seen = replies.pop(reply, 0)
            seen = max(reply_seen, _SEEN.unpack_from(raw_val, _V["seen_ns"])[0])
            if now - seen > _timeout(raw_key[_K["proto"]], raw_val, timeouts) * _NS:
                libbpf.map_delete(fd, reply)
                libbpf.map_delete(fd, raw_key)
                stats.flows_expired += 1
        oldest = max(timeouts.tcp, timeouts.other, timeouts.new, timeouts.closing) * _NS
        for raw_key, seen in replies.items():
            if now - seen > oldest:
                libbpf.map_delete(fd, raw_key)
                stats.orphans_expired += 1
    finally:
        os.close(fd)
    stats.seconds = time.perf_counter() - started
    return stats


def _timeout(proto: int, raw_val: bytes, timeouts: Timeouts) -> float:
    """The idle seconds this flow may last, by its state (the flow entry's) and protocol."""
    state = raw_val[_V["state"]]
    if state == abi.CT_CLOSING:
        return timeouts.closing
    if state == abi.CT_NEW:
        return timeouts.new
    return timeouts.tcp if proto == socket.IPPROTO_TCP else timeouts.other
