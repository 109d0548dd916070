"""Where event records go: JSON lines on stdout and/or a size-bounded, rotating file.

The event loop never writes to a file or pipe itself: ``EventLog.write`` only puts the encoded line on a
bounded queue (dropping and counting when it is full — a stuck stdout pipe or a slow disk must not stall
the agent), and one writer thread drains the queue in batches, writes each batch to every output and
flushes it. ``RotatingFile`` keeps every file at most ``max_bytes`` (whole lines; a single longer line
gets a file of its own) and ``backups`` older files ``PATH.1`` … ``PATH.N`` (``PATH.1`` the newest).
Neighbours: ``pipeline`` (calls ``write``), ``record`` (the lines), the agent (flags → ``open_event_log``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from balancing.events.record import EventRecord

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_BACKUPS = 3
DEFAULT_MAX_PENDING = 65536  # lines queued for the writer thread before new ones are dropped
BATCH = 4096


class Sink(Protocol):
    """Takes records on the event loop; must return at once."""

    def write(self, record: EventRecord) -> None: ...


class Output(Protocol):
    """A destination the writer thread writes batches of lines to (blocking is allowed there)."""

    def write_lines(self, lines: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...


class StreamOutput:
    """A binary stream we do not own (stdout): written and flushed, never closed."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def write_lines(self, lines: Sequence[bytes]) -> None:
        self.stream.write(b"".join(lines))
        self.stream.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()


class RotatingFile:
    """``path`` capped at ``max_bytes``; on overflow it becomes ``path.1`` (older ones shift, the oldest
    beyond ``backups`` is deleted) and writing continues in a fresh ``path``."""

    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        if max_bytes < 1 or backups < 0:
            raise ValueError(f"max_bytes must be positive and backups not negative ({max_bytes}, {backups})")
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.rotations = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 (kept open; closed by close())
        self._size = self._file.tell()

    def backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def write_lines(self, lines: Sequence[bytes]) -> None:
        chunk: list[bytes] = []
        size = self._size
        for line in lines:
            if size and size + len(line) > self.max_bytes:
                self._write(chunk)
                chunk, size = [], 0
                self._rotate()
            chunk.append(line)
            size += len(line)
        self._write(chunk)

    def _write(self, chunk: list[bytes]) -> None:
        if chunk:
            data = b"".join(chunk)
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            self.backup(self.backups).unlink(missing_ok=True)
            for n in range(self.backups - 1, 0, -1):
                if self.backup(n).exists():
                    os.replace(self.backup(n), self.backup(n + 1))
            os.replace(self.path, self.backup(1))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0
        self.rotations += 1

    def close(self) -> None:
        self._file.close()


_STOP = b""


class EventLog:
    """The JSON-lines sink: a bounded queue in front of one writer thread and its outputs."""

    def __init__(self, outputs: Sequence[Output], *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.outputs = list(outputs)
        self.written = 0  # lines handed to the outputs (writer thread)
        self.dropped = 0  # lines dropped because the queue was full (event loop)
        self.errors = 0  # failed output writes (writer thread)
        self._queue: queue.Queue[bytes] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self._thread.start()

    def write(self, record: EventRecord) -> None:
        try:
            self._queue.put_nowait(record.line)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [line for line in batch if line]
            self._emit(batch)

    def _emit(self, batch: list[bytes]) -> None:
        if not batch:
            return
        for out in self.outputs:
            try:
                out.write_lines(batch)
            except (OSError, ValueError) as exc:
                self.errors += 1
                if self.errors <= 10 or self.errors % 1000 == 0:
                    log.warning("writing events to %s failed (%d failures): %s", out, self.errors, exc)
        self.written += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then close the outputs."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)
        for out in self.outputs:
            with contextlib.suppress(OSError):
                out.close()


def open_event_log(
    path: Path | None,
    *,
    stdout: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
) -> EventLog | None:
    """The sink the flags ask for (``--event-log PATH``, ``--event-stdout``), or None for neither."""
    outputs: list[Output] = []
    if stdout:
        outputs.append(StreamOutput(sys.stdout.buffer))
    if path is not None:
        outputs.append(RotatingFile(path, max_bytes, backups))
    return EventLog(outputs) if outputs else None
