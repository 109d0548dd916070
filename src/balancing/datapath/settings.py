"""The datapath's run-time settings: the one entry of ``bl_cfg_v3`` (``struct bl_config``), set by the agent.

What the hooks emit as resolution events (``abi.EVENTS_OFF``; ``EVENTS_SAMPLED``, one in ``sample_every``;
``EVENTS_ALL``; reverse translations too with ``reverse_events``), how full the ring buffer may get before
the datapath wakes its reader (``wakeup_bytes``), which network namespace is the host's
(``host_netns_cookie``: frontends flagged ``SVC_F_HOST_ONLY``, the loopback NodePorts, serve only it), and
with ``host_netns_only`` (socketLB.hostNamespaceOnly) that only the host namespace's sockets are translated at
all. A write takes effect on the next resolution. One flag is not this module's: ``abi.CFG_F_SKIP`` belongs to
the map writer (it says the excluded-pod map has entries) and a write here keeps it as it is; both run on the
agent's one datapath thread. Neighbours: ``libbpf`` (calls), ``abi`` (names, packer), ``ringbuf`` (the reader
the wakeup threshold is for), ``netns`` (the host's cookie), ``writer`` (the skip flag).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from balancing.datapath import abi, libbpf, ringbuf

MAX_WAKEUP_BYTES = 256 << 10
_ZERO_KEY = struct.pack("=I", 0)


def default_wakeup_bytes(ring_bytes: int) -> int:
    """A wakeup threshold for a ring of ``ring_bytes``: a quarter of it, at most 256 KiB.

    Below the threshold an event costs ~1.2 µs instead of ~10.5 µs (no wakeup); the reader's timer keeps the
    latency bounded, and the remaining three quarters absorb bursts between timer ticks.
    """
    return max(abi.EVENT.size + ringbuf.RECORD_OVERHEAD, min(ring_bytes // 4, MAX_WAKEUP_BYTES))


def write_config(
    map_dir: Path,
    events: int,
    *,
    sample_every: int = 1,
    wakeup_bytes: int = MAX_WAKEUP_BYTES,
    reverse_events: bool = False,
    host_netns_cookie: int = 0,
    host_netns_only: bool = False,
) -> None:
    """Set the datapath's run-time settings: what it emits (``abi.EVENTS_OFF/SAMPLED/ALL``), which network
    namespace is the host's (loopback NodePorts) and whether only its sockets are translated
    (``host_netns_only``, which needs the host's cookie); takes effect on the next resolution. The writer's
    ``abi.CFG_F_SKIP`` is kept as it is."""
    if events not in (abi.EVENTS_OFF, abi.EVENTS_SAMPLED, abi.EVENTS_ALL):
        raise ValueError(f"events mode {events} is not EVENTS_OFF, EVENTS_SAMPLED or EVENTS_ALL")
    if sample_every < 1:
        raise ValueError(f"sample_every must be at least 1, not {sample_every}")
    if host_netns_only and not host_netns_cookie:
        raise ValueError("host_netns_only needs the host's network namespace cookie")
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONFIG))
    try:
        skip = abi.config_flags(libbpf.map_lookup(fd, _ZERO_KEY, abi.CONFIG.size)) & abi.CFG_F_SKIP
        flags = skip | (abi.CFG_F_HOST_NS_ONLY if host_netns_only else 0)
        value = abi.pack_config(events, sample_every, wakeup_bytes, reverse_events, host_netns_cookie, flags)
        libbpf.map_update(fd, _ZERO_KEY, value)
    finally:
        os.close(fd)


def read_config(map_dir: Path) -> tuple[int, int, int, bool]:
    """(events, sample_every, wakeup_bytes, reverse_events) as the datapath sees them."""
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONFIG))
    try:
        raw = libbpf.map_lookup(fd, _ZERO_KEY, abi.CONFIG.size)
    finally:
        os.close(fd)
    events, sample_every, wakeup, reverse, *_ = abi.CONFIG.packer.unpack(raw or bytes(abi.CONFIG.size))
    return int(events), int(sample_every), int(wakeup), bool(reverse)


def read_flags(map_dir: Path) -> int:
    """The config's ``flags`` as the datapath sees them (``abi.CFG_F_*``)."""
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONFIG))
    try:
        return abi.config_flags(libbpf.map_lookup(fd, _ZERO_KEY, abi.CONFIG.size))
    finally:
        os.close(fd)
