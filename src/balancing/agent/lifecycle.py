"""The agent: wires manifest source → model store → map writer, and serves health endpoints.

One asyncio program. Start: load and attach the datapath (reusing pins), read the maps back, read every
manifest, program the full desired state with one reconciling sync (never flush-and-refill), then follow
the directory and apply only the frontends each change touches. A periodic resync repairs anything that
drifted and retries after a failed write. Bad input is logged with its file, document and field, and the
last good state stays programmed. SIGTERM/SIGINT stop the agent; the pinned datapath keeps translating.
In Kubernetes mode, once the datapath holds a change, this node's entry in each policy's ``status.nodes`` is
brought up to date in the background (``agent_status``; ``--no-policy-status`` turns it off).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from balancing import agent_events, agent_status, agentstate, errors, health, healthcheck, metrics
from balancing.datapath import loader, maps, netns, sockterm, writer
from balancing.model import config, desired, objects, store
from balancing.sources import kube, kubestatus, manifests, podcgroups, watch

log = logging.getLogger("balancing.agent")
VERIFY_EVERY = 10  # resyncs between re-reads of the maps


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC during bulk model and map work.

    A full sync of 10k services allocates ~10^6 short-lived objects while ~10^6 long-lived ones exist, so
    generation-2 collections rescan the whole heap repeatedly (about a third of the sync's time); the objects
    involved are acyclic and are freed by reference counting anyway.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class KubeSourceConfig:
    """Where the API server is: a kubeconfig, a plain URL (``kubectl proxy``), or neither: in-cluster."""

    kubeconfig: Path | None = None
    api_server: str | None = None


@dataclass(frozen=True)
class AgentConfig:
    manifests: Path | None  # the standalone source; None: the Kubernetes API (``kube``)
    model: config.ModelConfig
    datapath: loader.DatapathConfig
    health_host: str = "127.0.0.1"
    health_port: int = 10256
    resync_interval: float = 30.0
    healthcheck_host: str = "0.0.0.0"  # where healthCheckNodePort servers listen
    cgroup_rescan_interval: float = 2.0  # seconds between scans for pod cgroups (policy client rules)
    metrics_addr: tuple[str, int] | None = ("127.0.0.1", 10249)  # None: no metrics server
    events: agent_events.EventsConfig = field(default_factory=agent_events.EventsConfig)
    host_netns: Path | None = None  # the host's network namespace; None: the agent's own
    kube: KubeSourceConfig | None = None  # the Kubernetes API source, when ``manifests`` is None
    policy_status: bool = True  # Kubernetes mode: write this node's entry in the policies' status.nodes
    terminate_udp: bool = True  # destroy connected UDP sockets whose backend left their frontend
    netns_dirs: tuple[Path, ...] = sockterm.NETNS_DIRS  # where termination also finds network namespaces
    status_timing: kubestatus.WriterTiming = field(default_factory=kubestatus.WriterTiming)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = store.ClusterStore(cfg.model)
        self.health_checks = healthcheck.HealthCheckServers(cfg.healthcheck_host)
        self.source = manifests.ManifestDirectory(cfg.manifests) if cfg.manifests is not None else None
        self.health = health.HealthState(stale_after=2 * cfg.resync_interval + 10)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datapath")
        # Socket termination runs apart (up to its time budget per run), in write order, off the write path.
        self._term_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sockterm")
        self._sockterm: sockterm.SocketTerminator | None = None
        self._terminations: set[asyncio.Future[None]] = set()  # the run going on, if any
        self._doomed: dict[desired.FrontendKey, set[desired.Backend]] = {}  # removed meanwhile: next run
        self._stopping = False
        self._writer: writer.MapWriter | None = None
        self._pods = podcgroups.PodCgroupIndex()
        self._needs_resync = False
        self._conflicts: set[str] = set()
        self._policy_status: dict[tuple[str, str], tuple[bool, str, str]] = {}
        self._statuses: dict[store.PolicyKey, store.PolicyStatus] = {}  # at the last source update
        self._kube_source: kube.KubeSource | None = None
        self._reporter: agent_status.PolicyStatusReporter | None = None
        self.metrics = metrics.Metrics(clock=time.perf_counter)
        self.owners = metrics.OwnerIndex()
        self._pods_by_uid: dict[str, objects.Pod] = {}
        self._uid_of: dict[objects.ObjectRef, str] = {}
        self.events = agent_events.AgentEvents(
            cfg.events, cfg.datapath, self.owners, self._pods_by_uid.get, cfg.cgroup_rescan_interval
        )

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._io, loader.load, self.cfg.datapath)
        log.info(
            "datapath on %s, pins in %s: %s",
            self.cfg.datapath.cgroup,
            self.cfg.datapath.bpffs,
            report.summary(),
        )
        kernel_maps = await loop.run_in_executor(self._io, maps.KernelMaps, self.cfg.datapath.map_dir)
        self._pods = await loop.run_in_executor(self._io, podcgroups.scan, self.cfg.datapath.cgroup)
        self._writer = await loop.run_in_executor(self._io, writer.MapWriter, kernel_maps, self._pod_cgroups)
        if self.cfg.terminate_udp:  # after loader.load: it would retire the terminator's own pin
            dp = self.cfg.datapath
            self._sockterm = await loop.run_in_executor(
                self._term_io,
                partial(
                    sockterm.SocketTerminator,
                    dp.bpffs,
                    dp.cgroup,
                    dp.object_path.with_name(sockterm.OBJECT),
                    netns_dirs=self.cfg.netns_dirs,
                ),
            )
        routes = health.agent_routes(self.health, {"/state": self._state})
        server = await health.serve(routes, self.cfg.health_host, self.cfg.health_port)
        metrics_server = None
        if self.cfg.metrics_addr is not None:
            self.metrics.watch_datapath(self.cfg.datapath.bpffs, self.owners)
            try:
                metrics_server = self.metrics.serve(*self.cfg.metrics_addr)
            except OSError as exc:
                host, port = self.cfg.metrics_addr
                log.error("metrics cannot be served on %s:%d: %s (continuing without)", host, port, exc)
        host_ns = self.cfg.host_netns
        cookie = await loop.run_in_executor(
            self._io, netns.own_cookie if host_ns is None else partial(netns.cookie_of, host_ns)
        )
        await self.events.configure(self._io, cookie)
        try:
            await self._open_status_reporter()
            updates = self._updates()
            self._ingest(await anext(updates))  # the initial state: everything the source has
            await self._full_sync()
            tasks = [
                asyncio.create_task(self._follow(updates)),
                asyncio.create_task(self._resync_loop()),
                asyncio.create_task(self._pod_cgroup_loop()),
                *self.events.start(self._pods, stop),
            ]
            await stop.wait()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            if self._reporter is not None:
                await self._reporter.writer.close()
            self._stopping = True
            await asyncio.gather(*self._terminations, return_exceptions=True)
            if self._sockterm is not None:
                await loop.run_in_executor(self._term_io, self._sockterm.close)
            self._term_io.shutdown(wait=True)
            await self.events.close(self._io)
            await self.health_checks.close()
            if metrics_server is not None:
                metrics_server.close()
            server.close()
            await server.wait_closed()
            kernel_maps.close()
            self._io.shutdown(wait=True)
        log.info("stopped; the datapath stays attached and keeps translating")

    # --- source → model ------------------------------------------------------------------------------------

    def _ingest(self, update: manifests.SourceUpdate) -> None:
        for err in update.errors:
            log.error("manifest rejected, keeping the last good version of the file: %s", err)
            self.metrics.source_error("manifests" if self.source is not None else "kubernetes", "invalid")
        for ref in update.deletes:
            self.store.delete(ref)
            uid = self._uid_of.pop(ref, None)
            if uid is not None:
                self._pods_by_uid.pop(uid, None)
        for obj in update.upserts:
            self.store.upsert(obj)
            if isinstance(obj, objects.Pod) and obj.metadata.uid:
                ref = objects.ref(obj)
                self._pods_by_uid.pop(self._uid_of.get(ref, ""), None)
                self._uid_of[ref], self._pods_by_uid[obj.metadata.uid] = obj.metadata.uid, obj
        endpoints_kinds = ("EndpointSlice", "Pod")
        changed = [o.kind for o in update.upserts] + [r[0] for r in update.deletes]
        n_endpoints = sum(1 for k in changed if k in endpoints_kinds)
        self.metrics.changes(len(changed) - n_endpoints, n_endpoints)
        conflicts = set(self.store.conflicts())
        for msg in sorted(conflicts - self._conflicts):
            log.error("frontend conflict: %s", msg)
        self._conflicts = conflicts
        self._statuses = self.store.policy_status()
        self._log_policy_status()
        if self._reporter is not None:
            self._reporter.observe(update)

    async def _updates(self) -> AsyncGenerator[manifests.SourceUpdate, None]:
        """The source's updates, the first one being its whole state: the manifest directory or the API."""
        if self.source is not None:
            yield self.source.load()
            async for update in watch.watch_manifests(self.source):
                yield update
            return
        source = self._kube_source or self._new_kube_source()
        async with contextlib.aclosing(source.updates()) as updates:
            async for update in updates:
                yield update

    async def _follow(self, updates: AsyncGenerator[manifests.SourceUpdate, None]) -> None:
        async for update in updates:
            seen = time.perf_counter()
            self._ingest(update)
            if self._needs_resync:
                await self._full_sync()
            else:
                await self._write(self.store.take_changes(), seen)

    def _new_kube_source(self) -> kube.KubeSource:
        k = self.cfg.kube or KubeSourceConfig()
        source = kube.KubeSource(self.cfg.model.node_name, api_base_url=k.api_server, kubeconfig=k.kubeconfig)
        self._kube_source = source
        return source

    # --- policy status (Kubernetes mode) -------------------------------------------------------------------

    async def _open_status_reporter(self) -> None:
        """With the API as source and ``policy_status``: the writer of this node's status entries."""
        if self.source is not None or not self.cfg.policy_status:
            return
        node = self.cfg.model.node_name
        status_writer = kubestatus.StatusWriter(
            self._new_kube_source().connection,
            agent_status.field_manager(node),
            timing=self.cfg.status_timing,
            on_result=lambda _key, result: self.metrics.status_written(result),
        )
        await status_writer.__aenter__()
        self._reporter = agent_status.PolicyStatusReporter(
            node, status_writer, out_of_cluster=self.cfg.model.external_client
        )

    def _report_status(self) -> None:
        """The datapath holds the model's state: report it (in the background; never raises)."""
        if self._reporter is not None:
            try:
                self._reporter.reconcile(self._statuses)
            except Exception:  # reporting must never stop the agent
                log.exception("reporting policy status")

    # --- model → datapath ----------------------------------------------------------------------------------

    async def _full_sync(self) -> None:
        assert self._writer is not None
        started = time.perf_counter()
        with gc_paused():
            wanted = self.store.desired()
            self.store.take_changes()  # everything it would report is in ``wanted``
            try:
                stats = await asyncio.get_running_loop().run_in_executor(self._io, self._writer.sync, wanted)
            except errors.DatapathError as exc:
                self._failed(exc)
                return
        self._needs_resync = False
        self._report_status()
        self._terminate(stats.udp_backends_removed)
        self.owners.replace(wanted.frontends, self._writer.svc_id)
        self.metrics.sync_done(time.perf_counter() - started, full=True)
        self.metrics.pending(0, 0)
        self._report_no_local()
        await self.health_checks.update(self.store.health_checks())
        self.health.synced()
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

    async def _write(self, changes: desired.FrontendChanges, seen: float) -> None:
        assert self._writer is not None
        await self.health_checks.update(self.store.health_checks())
        if not changes:
            self._report_status()
            return
        try:
            stats = await asyncio.get_running_loop().run_in_executor(self._io, self._writer.apply, changes)
        except errors.DatapathError as exc:
            self._failed(exc)
            return
        self._report_status()
        self._terminate(stats.udp_backends_removed)
        self.owners.apply(changes, self._writer.svc_id)
        self.metrics.sync_done(time.perf_counter() - seen, full=False)
        self.metrics.programmed(seen)
        self.metrics.pending(0, 0)
        self._report_no_local()
        self.health.synced()
        log.info(
            "applied %d frontend changes (%d written, %d removed, %d map ops) %.2f ms after the change",
            len(changes.upsert) + len(changes.remove),
            stats.frontends_written,
            stats.frontends_removed,
            stats.ops,
            (time.perf_counter() - seen) * 1000,
        )

    def _terminate(self, removed: Mapping[desired.FrontendKey, frozenset[desired.Backend]]) -> None:
        """Destroy the connected UDP sockets given a backend that this write removed (after the write, so a
        reconnect cannot get it again); in the background, never failing the write. Pairs removed while a
        run is going are merged into the next run: one run at a time, however fast backends churn."""
        if not removed or self._sockterm is None:
            return
        for key, backends in removed.items():
            self._doomed.setdefault(key, set()).update(backends)
        self._start_termination()

    def _start_termination(self) -> None:
        terminator = self._sockterm
        if self._terminations or not self._doomed or terminator is None:
            return  # a run is going on (it starts the next when it ends), or nothing to do

        def run(pairs: dict[desired.FrontendKey, set[desired.Backend]]) -> None:
            report = terminator.terminate(pairs)
            self.metrics.udp_sockets_terminated(report.destroyed, len(report.errors))
            if report.skipped:
                log.debug("connected UDP sockets of removed backends left alone: %s", report.skipped)
            elif report.destroyed or report.errors:
                log.info("%s", report.summary())

        def finished(future: asyncio.Future[None]) -> None:
            self._terminations.discard(future)
            if not self._stopping:
                self._start_termination()  # with what was removed meanwhile

        pairs, self._doomed = self._doomed, {}
        future = asyncio.get_running_loop().run_in_executor(self._term_io, run, pairs)
        self._terminations.add(future)
        future.add_done_callback(finished)

    def _pod_cgroups(self, pod: desired.PodRef) -> tuple[int, ...]:
        return self._pods.cgroups_of(pod.uid)

    async def _pod_cgroup_loop(self) -> None:
        """Containers start and restart with new cgroups: keep the policies' client rules on them."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.cgroup_rescan_interval)
            index = await loop.run_in_executor(self._io, podcgroups.scan, self.cfg.datapath.cgroup)
            if index.by_pod == self._pods.by_pod or self._writer is None:
                continue
            self._pods = index
            self.events.pods_changed(index)
            try:
                stats = await loop.run_in_executor(self._io, self._writer.refresh_clients)
            except errors.DatapathError as exc:
                self._failed(exc)
                continue
            if stats.ops:
                log.info("pod cgroups changed: %d client rules written", stats.ops)

    def _failed(self, exc: errors.DatapathError) -> None:
        log.error("programming the datapath failed, keeping what is programmed and retrying: %s", exc)
        self.health.last_error = str(exc)
        self._needs_resync = True
        self.metrics.write_failed(getattr(exc, "map", ""))

    def _report_no_local(self) -> None:
        for policy, n in self.store.no_local_endpoints().items():
            self.metrics.no_local_endpoints(policy, n)

    def _log_policy_status(self) -> None:
        """Policy readiness changes on this node go to the log (in Kubernetes mode the status subresource
        gets them too, through ``_report_status``)."""
        status = {k: (s.ready, s.reason, s.message) for k, s in self._statuses.items()}
        for (kind, name), (ready, reason, message) in sorted(status.items()):
            if self._policy_status.get((kind, name)) != (ready, reason, message):
                level = logging.INFO if ready else logging.WARNING
                log.log(
                    level, "%s %s: %s (%s) %s", kind, name, "Ready" if ready else "not ready", reason, message
                )
        for kind, name in sorted(self._policy_status.keys() - status.keys()):
            log.info("%s %s: removed", kind, name)
        self._policy_status = status

    def _state(self) -> tuple[int, dict[str, object]]:
        """``GET /state``: the agent's view for the operator tools (see ``agentstate``)."""
        svc_id = self._writer.svc_id if self._writer is not None else (lambda _k: None)
        body = agentstate.build(
            self.cfg.model.node_name,
            self.store.desired(),
            svc_id,
            self._pods_by_uid.values(),
            self.store.conflicts(),
        )
        body["policies"] = [dataclasses.asdict(s) for s in self.store.policy_status().values()]
        return 200, body

    async def _resync_loop(self) -> None:
        """Full syncs on a timer; every ``VERIFY_EVERY``-th first re-reads the maps, so a change made behind
        the agent's back (or lost) is found and repaired, not just what the agent remembers writing."""
        count = 0
        while True:
            await asyncio.sleep(self.cfg.resync_interval if not self._needs_resync else 1.0)
            count += 1
            if count % VERIFY_EVERY == 0 and self._writer is not None:
                await asyncio.get_running_loop().run_in_executor(self._io, self._writer.recover)
            await self._full_sync()


def run(cfg: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(cfg).run(stop)

    asyncio.run(main())
