"""The event side of the datapath maps: the ring buffer reader, the run-time config, the lost counter.

``RingBuffer`` wraps libbpf's ``ring_buffer__new/__poll/__consume/__epoll_fd/__free`` over a *pinned*
``BPF_MAP_TYPE_RINGBUF`` map and hands the raw bytes of every record to a Python callback. The datapath
submits with ``BPF_RB_NO_WAKEUP`` until ``wakeup_bytes`` are queued, so a reader must watch ``epoll_fd``
*and* call ``consume()`` on a timer. The callback runs inside the C call: an exception it raises is caught,
counted (``callback_errors``) and logged, never propagated into libbpf.

``write_config`` programs ``bl_cfg_v1`` (events off/sampled/all, sampling, wakeup threshold, reverse
events); ``LostCounter`` sums the per-CPU ``bl_evstat_v1`` counter of events the datapath dropped because
the ring was full. Neighbours: ``libbpf`` (generic calls, errors as ``OSError``), ``abi`` (names, packers);
``balancing.events.pipeline`` is the consumer.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from balancing.datapath import abi, libbpf

log = logging.getLogger(__name__)

RecordCallback = Callable[[bytes], None]

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)  # the same handle libbpf.py holds


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def _check(call: str, ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise OSError(err, f"{call}: {os.strerror(err)}")
    return ret


# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_VOIDP = ctypes.c_void_p

_rb_new = _fn("ring_buffer__new", _VOIDP, ctypes.c_int, _SAMPLE_FN, _VOIDP, _VOIDP)
_rb_free = _fn("ring_buffer__free", None, _VOIDP)
_rb_poll = _fn("ring_buffer__poll", ctypes.c_int, _VOIDP, ctypes.c_int)
_rb_consume = _fn("ring_buffer__consume", ctypes.c_int, _VOIDP)
_rb_epoll_fd = _fn("ring_buffer__epoll_fd", ctypes.c_int, _VOIDP)

RECORD_OVERHEAD = 8  # the ring buffer's per-record header (struct bpf_ringbuf_hdr)
MAX_WAKEUP_BYTES = 256 << 10


def num_possible_cpus() -> int:
    """CPUs a per-CPU map has a value slot for (libbpf reads /sys/devices/system/cpu/possible)."""
    return libbpf.possible_cpus()


def default_wakeup_bytes(ring_bytes: int) -> int:
    """A wakeup threshold for a ring of ``ring_bytes``: a quarter of it, at most 256 KiB.

    Below the threshold an event costs ~1.2 µs instead of ~10.5 µs (no wakeup); the reader's timer keeps the
    latency bounded, and the remaining three quarters absorb bursts between timer ticks.
    """
    return max(abi.EVENT.size + RECORD_OVERHEAD, min(ring_bytes // 4, MAX_WAKEUP_BYTES))


class RingBuffer:
    """A reader of one pinned ring buffer map; ``on_record`` gets each record's bytes (a copy)."""

    def __init__(self, pin: Path | str, on_record: RecordCallback) -> None:
        self.pin = Path(pin)
        self.records = 0
        self.callback_errors = 0
        self._on_record = on_record
        self._callback = _SAMPLE_FN(self._sample)  # kept: libbpf holds the C pointer until free
        self._map_fd = libbpf.obj_get(str(self.pin))
        ctypes.set_errno(0)
        self._rb: int | None = _rb_new(self._map_fd, self._callback, None, None)
        if not self._rb:
            err = ctypes.get_errno() or 1
            os.close(self._map_fd)
            raise OSError(err, f"ring_buffer__new({self.pin}): {os.strerror(err)}")

    def _sample(self, _ctx: Any, data: int, size: int) -> int:
        try:
            self.records += 1
            self._on_record(ctypes.string_at(data, size))
        except Exception:  # never unwind through libbpf's C frames
            self.callback_errors += 1
            if self.callback_errors <= 10 or self.callback_errors % 1000 == 0:
                log.exception("event callback failed (%d failures so far)", self.callback_errors)
        return 0

    def _handle(self) -> int:
        if self._rb is None:
            raise ValueError(f"ring buffer {self.pin} is closed")
        return self._rb

    @property
    def epoll_fd(self) -> int:
        """Readable when the datapath forced a wakeup (fill above ``wakeup_bytes``)."""
        return _check("ring_buffer__epoll_fd", _rb_epoll_fd(self._handle()))

    def poll(self, timeout_ms: int = 0) -> int:
        """Wait up to ``timeout_ms`` for a wakeup, then consume; returns the records seen (EINTR: 0)."""
        ctypes.set_errno(0)
        n = int(_rb_poll(self._handle(), timeout_ms))
        if n == -errno.EINTR:  # a signal arrived; nothing lost
            return 0
        return _check("ring_buffer__poll", n)

    def consume(self) -> int:
        """Consume every queued record without waiting (needed: most submits do not wake readers)."""
        ctypes.set_errno(0)
        return _check("ring_buffer__consume", int(_rb_consume(self._handle())))

    def close(self) -> None:
        if self._rb is not None:
            _rb_free(self._rb)
            self._rb = None
            os.close(self._map_fd)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- bl_cfg_v1 -------------------------------------------------------------------------------------------

_ZERO_KEY = struct.pack("=I", 0)


def write_config(
    map_dir: Path,
    events: int,
    *,
    sample_every: int = 1,
    wakeup_bytes: int = MAX_WAKEUP_BYTES,
    reverse_events: bool = False,
    host_netns_cookie: int = 0,
) -> None:
    """Set the datapath's run-time settings: what it emits (``abi.EVENTS_OFF/SAMPLED/ALL``) and which network
    namespace is the host's (loopback NodePorts); takes effect on the next resolution."""
    if events not in (abi.EVENTS_OFF, abi.EVENTS_SAMPLED, abi.EVENTS_ALL):
        raise ValueError(f"events mode {events} is not EVENTS_OFF, EVENTS_SAMPLED or EVENTS_ALL")
    if sample_every < 1:
        raise ValueError(f"sample_every must be at least 1, not {sample_every}")
    value = abi.pack_config(events, sample_every, wakeup_bytes, reverse_events, host_netns_cookie)
    fd = libbpf.obj_get(str(map_dir / abi.MAP_CONFIG))
    try:
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
    events, sample_every, wakeup, reverse, _host = abi.CONFIG.packer.unpack(raw or bytes(abi.CONFIG.size))
    return int(events), int(sample_every), int(wakeup), bool(reverse)


# --- bl_evstat_v1 ----------------------------------------------------------------------------------------


class LostCounter:
    """The datapath's count of events dropped because the ring buffer was full (summed over CPUs)."""

    def __init__(self, pin: Path | str) -> None:
        self.pin = Path(pin)
        self._cpus = num_possible_cpus()
        self._key = struct.pack("=I", abi.EVSTAT_LOST)
        self._fd: int | None = libbpf.obj_get(str(self.pin))

    def read(self) -> int:
        if self._fd is None:
            raise ValueError(f"lost counter {self.pin} is closed")
        raw = libbpf.map_lookup(self._fd, self._key, 8 * self._cpus)
        return sum(struct.unpack(f"={self._cpus}Q", raw)) if raw else 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_lost(map_dir: Path) -> int:
    """One read of the lost-event counter under ``map_dir`` (``<bpffs>/maps``)."""
    counter = LostCounter(map_dir / abi.MAP_EVENT_STATS)
    try:
        return counter.read()
    finally:
        counter.close()
