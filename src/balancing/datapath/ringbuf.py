"""The event side of the datapath maps: the ring buffer reader and the lost counter.

``RingBuffer`` reads a *pinned* ``BPF_MAP_TYPE_RINGBUF`` map through libbpf's ring buffer API and hands the
raw bytes of every record to a Python callback. The datapath submits with ``BPF_RB_NO_WAKEUP`` until
``wakeup_bytes`` are queued (``settings``: ``bl_cfg_v3``), so a reader must watch ``epoll_fd`` *and* call
``consume()`` on a timer. The callback runs inside the C call: an exception it raises is caught, counted
(``callback_errors``) and logged, never propagated into libbpf.

``LostCounter`` sums the per-CPU ``bl_evstat_v1`` counter of events the datapath dropped because the ring
was full. Neighbours: ``libbpf`` (calls, errors as ``OSError``), ``abi`` (names), ``settings`` (what the
datapath emits); ``balancing.events.pipeline`` is the consumer.
"""

from __future__ import annotations

import ctypes
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

RECORD_OVERHEAD = 8  # the ring buffer's per-record header (struct bpf_ringbuf_hdr)


class RingBuffer:
    """A reader of one pinned ring buffer map; ``on_record`` gets each record's bytes (a copy)."""

    def __init__(self, pin: Path | str, on_record: RecordCallback) -> None:
        self.pin = Path(pin)
        self.records = 0
        self.callback_errors = 0
        self._on_record = on_record
        self._callback = libbpf.RingBufferSampleFn(self._sample)  # kept: libbpf holds it until free
        self._map_fd = libbpf.obj_get(str(self.pin))
        try:
            self._rb: int | None = libbpf.ring_buffer_new(self._map_fd, self._callback)
        except OSError as exc:
            os.close(self._map_fd)
            raise OSError(exc.errno, f"ring_buffer__new({self.pin}): {exc.strerror}") from None

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
        return libbpf.ring_buffer_epoll_fd(self._handle())

    def poll(self, timeout_ms: int = 0) -> int:
        """Wait up to ``timeout_ms`` for a wakeup, then consume; returns the records seen (EINTR: 0)."""
        try:
            return libbpf.ring_buffer_poll(self._handle(), timeout_ms)
        except InterruptedError:  # a signal arrived; nothing lost
            return 0

    def consume(self) -> int:
        """Consume every queued record without waiting (needed: most submits do not wake readers)."""
        return libbpf.ring_buffer_consume(self._handle())

    def close(self) -> None:
        if self._rb is not None:
            libbpf.ring_buffer_free(self._rb)
            self._rb = None
            os.close(self._map_fd)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- bl_evstat_v1 ----------------------------------------------------------------------------------------


class LostCounter:
    """The datapath's count of events dropped because the ring buffer was full (summed over CPUs)."""

    def __init__(self, pin: Path | str) -> None:
        self.pin = Path(pin)
        self._cpus = libbpf.possible_cpus()  # a per-CPU map has a slot for each possible CPU
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
