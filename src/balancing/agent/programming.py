"""Writes out: the model's desired state programmed into the datapath's maps, and what follows a write.

``full_sync`` writes the whole desired state with one reconciling sync (never flush-and-refill); ``write``
applies only the frontends a change touched. After either: the health-check node ports follow the model,
the frontend owners (for metrics and events) follow the writer's ids, removed backends' connected UDP sockets
are terminated (``agent.udp_termination``), ``on_programmed`` runs (policy status), and ``/healthz`` learns of
the sync. A failed write keeps what is programmed, is logged and counted, and asks for a full sync, which the
resync loop runs within a second (and every ``resync_interval``; every ``VERIFY_EVERY``-th re-reads the
maps first, so a change made behind the agent's back is repaired). Blocking map work runs on one executor
thread, in order. Neighbours: ``datapath.writer`` (the writes), ``model.store`` (the state),
``agent.lifecycle`` (wiring).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from balancing import errors, gcpause
from balancing.agent import health, healthcheck_ports
from balancing.agent.udp_termination import Terminations
from balancing.datapath import abi, maps, podcgroups, writer
from balancing.datapath.owners import OwnerIndex
from balancing.metrics import Metrics
from balancing.model import desired, store

__all__ = ["VERIFY_EVERY", "Programming"]

log = logging.getLogger("balancing.agent")
VERIFY_EVERY = 10  # resyncs between re-reads of the maps


class Programming:
    def __init__(
        self,
        cluster: store.ClusterStore,
        metrics: Metrics,
        state: health.HealthState,
        owners: OwnerIndex,
        terminations: Terminations,
        *,
        healthcheck_host: str,
        resync_interval: float,
        on_programmed: Callable[[], None] = lambda: None,
    ) -> None:
        self.store, self.metrics, self.health, self.owners = cluster, metrics, state, owners
        self.terminations = terminations
        self.resync_interval = resync_interval
        self.on_programmed = on_programmed
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datapath")
        self.health_checks = healthcheck_ports.HealthCheckServers(healthcheck_host)
        self.writer: writer.MapWriter | None = None
        self.pods = podcgroups.PodCgroupIndex()
        self.needs_resync = False
        self._failing: dict[desired.FrontendKey, str] = {}  # frontends the last write could not program
        self.generation = 0  # bumped by every successful write: what the tools' view is keyed on

    async def open(
        self, kernel_maps: maps.MapIO, cgroup: Path, maglev_size: int = abi.DEFAULT_MAGLEV_SIZE
    ) -> None:
        """Read back what the maps hold (the writer's ids survive restarts) and the pods' cgroups."""
        loop = asyncio.get_running_loop()
        self.pods = await loop.run_in_executor(self.io, podcgroups.scan, cgroup)
        self.writer = await loop.run_in_executor(
            self.io, writer.MapWriter, kernel_maps, self.pod_cgroups, maglev_size
        )

    def pod_cgroups(self, pod: desired.PodRef) -> tuple[int, ...]:
        return self.pods.cgroups_of(pod.uid)

    async def full_sync(self) -> bool:
        """Program the whole desired state; False if the write failed (a resync follows)."""
        assert self.writer is not None
        started = time.perf_counter()
        with gcpause.paused():
            wanted = self.store.desired()
            self.store.take_changes()  # everything it would report is in ``wanted``
            try:
                stats = await asyncio.get_running_loop().run_in_executor(self.io, self.writer.sync, wanted)
            except errors.DatapathError as exc:
                self.failed(exc)
                return False
        self._written(stats)
        self.owners.replace(wanted.frontends, self.writer.svc_id)
        self.metrics.sync_done(time.perf_counter() - started, full=True)
        await self._after_write()
        self.health.extra["frontends"] = len(wanted.frontends)
        if stats.ops or not self.health.extra.get("synced_once"):
            log.info(
                "full sync: %d frontends, %d written, %d removed, %d map ops in %.1f ms",
                len(wanted.frontends),
                stats.frontends_written,
                stats.frontends_removed,
                stats.ops,
                (time.perf_counter() - started) * 1000,
            )
        self.health.extra["synced_once"] = True
        return True

    async def write(self, changes: desired.FrontendChanges, seen: float) -> None:
        """Apply the frontends one change touched (``seen``: when the change arrived, for the latency)."""
        assert self.writer is not None
        if not changes:
            await self.health_checks.update(self.store.health_checks())
            self.on_programmed()
            return
        try:
            stats = await asyncio.get_running_loop().run_in_executor(self.io, self.writer.apply, changes)
        except errors.DatapathError as exc:
            await self.health_checks.update(self.store.health_checks())
            self.failed(exc)
            return
        self._written(stats, touched={*changes.upsert, *changes.remove})
        self.owners.apply(changes.without(stats.failed), self.writer.svc_id)
        self.metrics.sync_done(time.perf_counter() - seen, full=False)
        self.metrics.programmed(seen)
        await self._after_write()
        log.info(
            "applied %d frontend changes (%d written, %d removed, %d map ops) %.2f ms after the change",
            len(changes.upsert) + len(changes.remove),
            stats.frontends_written,
            stats.frontends_removed,
            stats.ops,
            (time.perf_counter() - seen) * 1000,
        )

    def _written(
        self, stats: writer.WriteStats, touched: Collection[desired.FrontendKey] | None = None
    ) -> None:
        """After a write: ``touched`` are the frontends it was about (None: a full sync, about all)."""
        self.generation += 1
        self._frontend_failures(stats.failed, touched)
        self.on_programmed()
        self.terminations.submit(stats.udp_backends_removed)

    def _frontend_failures(
        self,
        failed: Mapping[desired.FrontendKey, errors.FrontendWriteError],
        touched: Collection[desired.FrontendKey] | None,
    ) -> None:
        """Frontends a write could not program (the others are written): each new or changed failure logged
        once, counted, shown by ``/healthz``'s ``lastError`` (a count: the names stay in the log), retried by
        a full sync. A full sync (``touched`` None) says what fails now; a partial write only about the
        frontends it touched, so it never clears a failure a concurrent full sync just found."""
        now = {key: str(err) for key, err in failed.items()}
        for key, text in sorted(now.items(), key=lambda kv: str(kv[0])):
            if self._failing.get(key) != text:
                log.error("%s (the others are written; retrying)", text)
            self.metrics.write_failed(failed[key].map)
        still = {} if touched is None else {k: v for k, v in self._failing.items() if k not in touched}
        for key in sorted(self._failing.keys() - now.keys() - still.keys(), key=str):
            log.info("frontend %s programmed after an earlier failure", key)
        self._failing = {**still, **now}
        self.needs_resync = bool(self._failing)
        if self._failing:
            self.health.last_error = f"{len(self._failing)} frontends not programmed (the log names them)"

    async def _after_write(self) -> None:
        self.metrics.pending(0, 0)
        for policy, n in self.store.no_local_endpoints().items():
            self.metrics.no_local_endpoints(policy, n)
        await self.health_checks.update(self.store.health_checks())
        error = self.health.last_error if self._failing else ""
        self.health.synced()
        self.health.last_error = error

    def failed(self, exc: errors.DatapathError) -> None:
        log.error("programming the datapath failed, keeping what is programmed and retrying: %s", exc)
        self.health.last_error = str(exc)
        self.needs_resync = True
        self.metrics.write_failed(getattr(exc, "map", ""))

    async def resync_loop(self) -> None:
        """Full syncs on a timer; after a failed write within a second, backing off (doubling up to the
        resync interval) while the same failures persist (a full map stays full until something goes)."""
        count = 0
        retry = 1.0
        while True:
            if self.needs_resync:
                await asyncio.sleep(min(retry, self.resync_interval))
                retry *= 2
            else:
                retry = 1.0
                await asyncio.sleep(self.resync_interval)
            count += 1
            if count % VERIFY_EVERY == 0 and self.writer is not None:
                await asyncio.get_running_loop().run_in_executor(self.io, self.writer.recover)
            await self.full_sync()

    async def pod_cgroup_loop(
        self, cgroup: Path, interval: float, changed: Callable[[podcgroups.PodCgroupIndex], None]
    ) -> None:
        """Containers start and restart with new cgroups: keep the policies' client rules and the excluded
        pods' skip entries on them."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            index = await loop.run_in_executor(self.io, podcgroups.scan, cgroup)
            if index.by_pod == self.pods.by_pod or self.writer is None:
                continue
            self.pods = index
            changed(index)
            try:
                stats = await loop.run_in_executor(self.io, self.writer.refresh_clients)
            except errors.DatapathError as exc:
                self.failed(exc)
                continue
            if stats.failed:  # the writer plans them again; a full sync retries them
                self._frontend_failures(stats.failed, touched=set(stats.failed))
            if stats.ops:
                log.info("pod cgroups changed: %d client rule and skip map operations", stats.ops)

    async def close(self) -> None:
        await self.health_checks.close()
        self.io.shutdown(wait=True)
