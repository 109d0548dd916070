"""Event sinks: the size-bounded rotating file, stdout, and a writer thread that never blocks the loop."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from pathlib import Path

from balancing.events import sinks
from balancing.events.record import EventRecord


def rec(n: int, width: int = 30) -> EventRecord:
    line = f'{{"n":{n}}}'.ljust(width - 1).encode() + b"\n"
    return EventRecord({"n": n}, line)


def numbers(*paths: Path) -> list[int]:
    out = []
    for p in paths:
        out += [int(line.split(b":")[1].split(b"}")[0]) for line in p.read_bytes().splitlines()]
    return out


def test_rotation_keeps_size_bound_and_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    f = sinks.RotatingFile(path, max_bytes=100, backups=2)
    for n in range(20):
        f.write_lines([rec(n).line])
    f.write_lines([rec(n).line for n in range(20, 26)])  # a batch spanning two rotations
    f.close()
    files = [f.backup(2), f.backup(1), path]
    assert all(p.stat().st_size <= 100 for p in files)
    assert not f.backup(3).exists()
    # 3 lines of 30 bytes per file: the newest 8 lines, in order, whole
    assert numbers(*files) == list(range(18, 26))
    assert f.rotations == 8


def test_no_backups_keeps_one_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    f = sinks.RotatingFile(path, max_bytes=100, backups=0)
    f.write_lines([rec(n).line for n in range(10)])
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl"]
    assert numbers(path) == [9]


def test_reopening_continues_the_file_and_its_size(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    f = sinks.RotatingFile(path, max_bytes=100, backups=1)
    f.write_lines([rec(0).line, rec(1).line])
    f.close()
    f = sinks.RotatingFile(path, max_bytes=100, backups=1)
    f.write_lines([rec(2).line, rec(3).line])
    f.close()
    assert numbers(path) == [3] and numbers(f.backup(1)) == [0, 1, 2]


def test_event_log_writes_every_line_to_every_output(tmp_path: Path) -> None:
    out = io.BytesIO()
    path = tmp_path / "events.jsonl"
    log = sinks.EventLog([sinks.StreamOutput(out), sinks.RotatingFile(path, 1 << 20, 1)])
    for n in range(5000):
        log.write(rec(n))
    log.close()
    assert log.written == 5000 and log.dropped == 0 and log.errors == 0
    assert out.getvalue() == path.read_bytes() == b"".join(rec(n).line for n in range(5000))


class Stuck:
    """An output that blocks (a full pipe) until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.lines: list[bytes] = []

    def write_lines(self, lines: Sequence[bytes]) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.lines += lines

    def close(self) -> None:
        pass


def test_a_stuck_output_drops_and_counts_instead_of_blocking() -> None:
    out = Stuck()
    log = sinks.EventLog([out], max_pending=5)
    log.write(rec(0))
    assert out.entered.wait(5)  # the writer thread holds line 0 and is stuck
    for n in range(1, 11):
        log.write(rec(n))  # returns at once: 5 queued, 5 dropped
    assert log.dropped == 5
    out.release.set()
    log.close()
    assert log.written == 6 and out.lines == [rec(n).line for n in range(6)]


class Broken:
    def write_lines(self, lines: Sequence[bytes]) -> None:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def test_a_failing_output_is_counted_and_the_others_still_get_lines() -> None:
    out = io.BytesIO()
    log = sinks.EventLog([Broken(), sinks.StreamOutput(out)])
    log.write(rec(1))
    log.close()
    assert log.errors == 1 and out.getvalue() == rec(1).line


def test_open_event_log_follows_the_flags(tmp_path: Path) -> None:
    assert sinks.open_event_log(None) is None
    log = sinks.open_event_log(tmp_path / "e.jsonl", max_bytes=1000, backups=2)
    assert log is not None
    log.write(rec(7))
    log.close()
    assert numbers(tmp_path / "e.jsonl") == [7]
