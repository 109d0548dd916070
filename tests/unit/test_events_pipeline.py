"""The events pipeline without a kernel: raw records in, records out to sinks and bounded subscribers."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from balancing.datapath import abi, podcgroups
from balancing.events.attribution import Attributor
from balancing.events.pipeline import EventPipeline
from balancing.events.record import EventRecord
from balancing.model.desired import Owner

WEB = Owner("Service", "default", "web", "http")


def raw_event(svc_id: int = 17, cgroup_id: int = 1) -> bytes:
    return abi.EVENT.packer.pack(
        1,
        cgroup_id,
        2,
        3,
        1234,
        svc_id,
        abi.pack_addr(ipaddress.ip_address("10.96.0.10")),
        abi.pack_addr(ipaddress.ip_address("10.244.1.5")),
        abi.pack_port(80),
        abi.pack_port(8080),
        1,
        6,
        1,
        0,
        b"curl".ljust(16, b"\0"),
        bytes(16),  # client_addr (north-south only)
        abi.pack_port(0),
        0,
        0,
    )


class ListSink:
    def __init__(self) -> None:
        self.records: list[EventRecord] = []

    def write(self, record: EventRecord) -> None:
        self.records.append(record)


def make(tmp_path: Path, **kw: object) -> tuple[EventPipeline, ListSink]:
    sink = ListSink()
    attr = Attributor(tmp_path, lambda _uid: None, index=podcgroups.PodCgroupIndex(), rescan_interval=1e9)
    owners = {17: WEB}
    pipeline = EventPipeline(tmp_path / abi.MAP_EVENTS, owners.get, attr, [sink], **kw)  # type: ignore[arg-type]
    return pipeline, sink


def test_slow_subscribers_drop_and_are_counted(tmp_path: Path) -> None:
    async def go() -> None:
        pipeline, sink = make(tmp_path)
        fast, slow = pipeline.subscribe(100), pipeline.subscribe(2)
        for _ in range(5):
            pipeline.ingest(raw_event())
        assert pipeline.process() == 5
        assert (fast.qsize(), slow.qsize()) == (5, 2)
        assert (pipeline.drops_of(fast), pipeline.drops_of(slow), pipeline.subscriber_drops) == (0, 3, 3)
        assert pipeline.seen == 5 and len(sink.records) == 5, "sinks and fast subscribers get everything"
        pipeline.unsubscribe(slow)
        pipeline.ingest(raw_event())
        pipeline.process()
        assert (fast.qsize(), slow.qsize(), pipeline.subscribers) == (6, 2, 1)

    asyncio.run(go())


def test_records_carry_owner_and_client(tmp_path: Path) -> None:
    pipeline, sink = make(tmp_path)
    pipeline.ingest(raw_event())
    pipeline.ingest(raw_event(svc_id=99))
    pipeline.process()
    first, second = (r.data for r in sink.records)
    assert first["owner"] == {"kind": "Service", "namespace": "default", "name": "web", "portName": "http"}
    assert second["owner"] is None
    assert first["client"]["host"] is True


def test_backlog_is_bounded(tmp_path: Path) -> None:
    pipeline, _ = make(tmp_path, max_backlog=3)
    for _ in range(5):
        pipeline.ingest(raw_event())
    assert (pipeline.backlog, pipeline.backlog_dropped) == (3, 2)


def test_bad_records_and_failing_lookups_are_counted_not_fatal(tmp_path: Path) -> None:
    sink = ListSink()
    attr = Attributor(tmp_path, lambda _uid: None, index=podcgroups.PodCgroupIndex(), rescan_interval=1e9)

    def owner_of(svc_id: int) -> Owner | None:
        if svc_id == 13:
            raise RuntimeError("boom")
        return None

    pipeline = EventPipeline(tmp_path / abi.MAP_EVENTS, owner_of, attr, [sink])
    pipeline.ingest(b"short")
    pipeline.ingest(raw_event(svc_id=13))
    pipeline.ingest(raw_event(svc_id=1))
    assert pipeline.process() == 3
    assert (pipeline.decode_errors, pipeline.process_errors, pipeline.seen) == (1, 1, 1)
    assert len(sink.records) == 1


def test_drain_processes_everything_in_batches(tmp_path: Path) -> None:
    async def go() -> None:
        pipeline, sink = make(tmp_path)
        for _ in range(3000):
            pipeline.ingest(raw_event())
        await pipeline.drain()
        assert pipeline.seen == 3000 and pipeline.backlog == 0 and len(sink.records) == 3000

    asyncio.run(go())


def test_run_without_the_pinned_ring_fails_clearly(tmp_path: Path) -> None:
    pipeline, _ = make(tmp_path)
    with pytest.raises(OSError, match="bl_events_v2"):
        asyncio.run(pipeline.run(asyncio.Event()))


def test_stats_lists_every_counter(tmp_path: Path) -> None:
    pipeline, _ = make(tmp_path)
    assert set(pipeline.stats()) == {
        "seen",
        "lost",
        "backlog_dropped",
        "decode_errors",
        "process_errors",
        "subscriber_drops",
        "callback_errors",
        "subscribers",
    }
