"""Reading one manifest file without ever blocking on it, within the file size budget.

``read_regular(path, max_bytes)`` returns the bytes of a regular file (symlinks followed, as in Kubernetes
ConfigMap volumes), None if nothing is there, and raises ``NotRegular`` for anything else: a FIFO, a
socket, a device, a directory, a dangling symlink or a symlink loop. Such an entry is never opened for
reading: it is ``stat``-ed first, and the file then opened is opened with ``O_NONBLOCK`` and ``fstat``-ed
again, so one swapped in between is refused too. ``TooLarge`` when the file holds more than ``max_bytes``
(checked on ``stat``, and again while reading a file that grows). Other ``OSError``\\ s (permissions, I/O)
propagate.

Neighbours: ``sources.manifests`` reads each manifest through this and decides what a skipped or
unreadable file means.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["NotRegular", "TooLarge", "read_regular"]

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1 << 20


class NotRegular(Exception):
    """The entry is not a regular file (``kind`` says what it is), so it is not read."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class TooLarge(Exception):
    """The file holds more than ``limit`` bytes (``size``: what was seen, at least ``limit + 1``)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.size = size
        self.limit = limit


def read_regular(path: Path, max_bytes: int) -> bytes | None:
    """The content of the regular file at ``path``, or None if there is none; see the module docstring."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotRegular("dangling symlink") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular("symlink loop") from None
        raise
    _check(info, max_bytes)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None  # removed since the stat
    try:
        info = os.fstat(fd)
        _check(info, max_bytes)  # replaced since the stat
        return _read_at_most(fd, info.st_size, max_bytes)
    finally:
        os.close(fd)


def _kind_of(mode: int) -> str:
    """What a non-regular entry is, in words."""
    kinds = [
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "special file")


def _check(info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise NotRegular(_kind_of(info.st_mode))
    if info.st_size > max_bytes:
        raise TooLarge(info.st_size, max_bytes)


def _read_at_most(fd: int, size_hint: int, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    want = min(size_hint + 1, max_bytes + 1)  # one more than expected: notices a file that grew
    while True:
        chunk = os.read(fd, max(want, 1))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(total, max_bytes)
        want = min(_CHUNK, max_bytes + 1 - total)
