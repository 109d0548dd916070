"""The events pipeline: ring buffer → decode → attribute to a pod → JSON record → sinks and subscribers.

``EventPipeline.run`` reads the pinned ring buffer on the event loop. The datapath wakes readers only once
``wakeup_bytes`` are queued, so the loop both watches the ring's epoll fd (``loop.add_reader``) and consumes
every ``interval`` seconds (100 ms). Reading only copies each record's bytes into a bounded backlog (full:
dropped and counted in ``backlog_dropped``); records are then decoded, attributed and encoded in batches,
yielding to the loop between batches, and handed to every sink and every subscriber queue. Subscriber
queues are bounded: a slow subscriber loses events (``subscriber_drops``) instead of growing memory or
stalling the others. The datapath's own count of events lost to a full ring is read every tick into
``lost``. All counters are plain attributes for the agent's metrics.

Neighbours: ``datapath.ringbuf`` (reader, lost counter), ``attribution`` (cgroup → pod), ``record``
(schema), ``sinks`` (log), ``stream`` (a subscriber per ``balancing monitor`` client). The agent wires it:
it writes the config map and supplies ``owner_of`` (frontend identity → Service or policy: the
``datapath.owners.OwnerIndex`` that follows the writer's ids).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from balancing.datapath import abi, owners, ringbuf
from balancing.events import record
from balancing.events.attribution import Attributor
from balancing.events.record import EventRecord
from balancing.events.sinks import Sink

log = logging.getLogger(__name__)

INTERVAL = 0.1  # seconds between timer consumes
MAX_BACKLOG = 65536  # records read from the ring but not yet processed
BATCH = 1024  # records processed between yields to the event loop
SUBSCRIBER_QUEUE = 1024
_EVENT_SIZE = abi.EVENT.size


class EventPipeline:
    """Consumes one pinned ring buffer; fans records out to sinks and subscribers."""

    def __init__(
        self,
        ring_pin: Path,
        owner_of: owners.OwnerLookup,
        attributor: Attributor,
        sinks: Sequence[Sink] = (),
        *,
        lost_pin: Path | None = None,
        interval: float = INTERVAL,
        max_backlog: int = MAX_BACKLOG,
        subscriber_queue: int = SUBSCRIBER_QUEUE,
    ) -> None:
        self.ring_pin = ring_pin
        self.lost_pin = lost_pin or ring_pin.with_name(abi.MAP_EVENT_STATS)
        self.owner_of = owner_of
        self.attributor = attributor
        self.sinks = list(sinks)
        self.interval = interval
        self.max_backlog = max_backlog
        self.subscriber_queue = subscriber_queue
        self.seen = 0  # records processed
        self.lost = 0  # the datapath's counter: events not emitted because the ring was full
        self.backlog_dropped = 0  # read from the ring, dropped because processing fell behind
        self.decode_errors = 0  # records of the wrong size
        self.process_errors = 0  # records whose attribution, owner lookup or sinks raised
        self.subscriber_drops = 0  # records a full subscriber queue did not take (all subscribers)
        self.callback_errors = 0  # exceptions in the ring buffer callback (from the reader)
        self._backlog: collections.deque[bytes] = collections.deque()
        self._subscribers: dict[asyncio.Queue[EventRecord], int] = {}  # queue → its drops
        self._wall_offset = record.wall_clock_offset_ns()

    # --- subscribers ---------------------------------------------------------------------------------------

    def subscribe(self, maxsize: int | None = None) -> asyncio.Queue[EventRecord]:
        """A bounded queue that receives every record from now on (dropped when it is full)."""
        q: asyncio.Queue[EventRecord] = asyncio.Queue(maxsize or self.subscriber_queue)
        self._subscribers[q] = 0
        return q

    def unsubscribe(self, q: asyncio.Queue[EventRecord]) -> None:
        self._subscribers.pop(q, None)

    def drops_of(self, q: asyncio.Queue[EventRecord]) -> int:
        return self._subscribers.get(q, 0)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # --- processing (no I/O but attribution rescans; usable without a ring buffer) -----------------------

    def ingest(self, raw: bytes) -> None:
        """Queue one raw record (the ring buffer callback)."""
        if len(self._backlog) >= self.max_backlog:
            self.backlog_dropped += 1
            return
        self._backlog.append(raw)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def process(self, limit: int = BATCH) -> int:
        """Decode, attribute and publish up to ``limit`` queued records; returns how many."""
        n = 0
        while self._backlog and n < limit:
            self._process_one(self._backlog.popleft())
            n += 1
        return n

    def _process_one(self, raw: bytes) -> None:
        if len(raw) < _EVENT_SIZE:
            self.decode_errors += 1
            return
        try:
            event = abi.Event.unpack(raw)
            pod = None if record.is_north_south(event) else self.attributor.attribute(event.cgroup_id)
            rec = record.encode(record.build(event, pod, self.owner_of(event.svc_id), self._wall_offset))
            for sink in self.sinks:
                sink.write(rec)
        except Exception:
            self.process_errors += 1
            if self.process_errors <= 10 or self.process_errors % 1000 == 0:
                log.exception("processing an event failed (%d failures so far)", self.process_errors)
            return
        self.seen += 1
        self._publish(rec)

    def _publish(self, rec: EventRecord) -> None:
        for q in self._subscribers:
            try:
                q.put_nowait(rec)
            except asyncio.QueueFull:
                self._subscribers[q] += 1
                self.subscriber_drops += 1

    async def drain(self) -> None:
        """Process the whole backlog, yielding to the loop after every batch."""
        self._wall_offset = record.wall_clock_offset_ns()  # follows clock steps (NTP)
        while self.process():
            await asyncio.sleep(0)

    # --- the ring buffer ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; raises ``OSError`` if the pinned maps cannot be opened."""
        loop = asyncio.get_running_loop()
        rb = ringbuf.RingBuffer(self.ring_pin, self.ingest)
        try:
            lost = ringbuf.LostCounter(self.lost_pin)
        except OSError:
            rb.close()
            raise
        wake = asyncio.Event()
        fd = rb.epoll_fd
        loop.add_reader(fd, self._on_readable, rb, wake)
        try:
            while not stop.is_set():
                await _wait_any(wake, stop, self.interval)
                wake.clear()
                self._tick(rb, lost)
                await self.drain()
        finally:
            loop.remove_reader(fd)
            self._tick(rb, lost)
            await self.drain()
            rb.close()
            lost.close()

    def _on_readable(self, rb: ringbuf.RingBuffer, wake: asyncio.Event) -> None:
        try:
            rb.poll(0)  # drains the ring (into the backlog), so the fd stops being readable
        except OSError as exc:
            log.warning("reading the event ring buffer failed: %s", exc)
        wake.set()

    def _tick(self, rb: ringbuf.RingBuffer, lost: ringbuf.LostCounter) -> None:
        try:
            rb.consume()
            self.lost = lost.read()
        except OSError as exc:
            log.warning("reading the event ring buffer failed: %s", exc)
        self.callback_errors = rb.callback_errors

    def stats(self) -> dict[str, int]:
        """Every counter, for metrics and logs."""
        return {
            "seen": self.seen,
            "lost": self.lost,
            "backlog_dropped": self.backlog_dropped,
            "decode_errors": self.decode_errors,
            "process_errors": self.process_errors,
            "subscriber_drops": self.subscriber_drops,
            "callback_errors": self.callback_errors,
            "subscribers": self.subscribers,
        }


async def _wait_any(wake: asyncio.Event, stop: asyncio.Event, timeout: float) -> None:
    """Until ``wake`` or ``stop`` is set, or ``timeout`` seconds passed."""
    tasks = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
