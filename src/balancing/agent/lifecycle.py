"""The node agent's lifecycle: start the datapath and the servers, run the supervised tasks, stop.

One asyncio program. Start: load and attach the datapath (reusing pins), with north-south the TC programs on
the node's devices (``datapath.northsouth``; without ``--nodeport-devices`` after the first sync, on the
devices holding this Node's addresses), read the maps back, open the health, ``/state`` and metrics servers.
Then the supervised tasks (``agent.supervise``: logged, counted, restarted with backoff, ``/healthz`` 503
while down):

- ``source``: the source's whole state into the store (``agent.ingest``), one reconciling full sync
  (``agent.programming``; never flush-and-refill), then each change applied as it comes. A restarted source
  delivers its whole state again, and what it no longer holds is deleted;
- ``resync`` (after the first full sync): full syncs on a timer, and after a failed write;
- ``pod-cgroups``: containers' cgroups followed for the policies' client rules and event attribution;
- ``conntrack-gc`` with north-south: ended and idle flows expired from connection tracking (their SNAT ports
  free again);
- the resolution-event pipeline when events are on (``agent.events``).

Bad input is logged with its file or object and field by the source, and the last good state stays
programmed. In Kubernetes mode, once the datapath holds a change, this node's entry in each policy's
``status.nodes`` is brought up to date in the background (``agent.policy_status``). SIGTERM/SIGINT stop the
agent; the pinned datapath keeps translating.

``/statusz`` on the health port (``Agent.statusz``, for ``balancing status``) adds to ``agent.health``'s
counts the version, the source kind, the programs the load attached and how full the writer's maps are
(``map_fill``, recounted once per write)::

    {..., "version": str, "source": "manifests" | "kubernetes", "frontends": int,   # programmed
     "maps": {"services" | "backends" | "affinityMatch" | "clients" | "qos":
              {"entries": int, "capacity": int | null}},
     "programs": {"attached": [program name], "loadWarnings": int}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from functools import partial
from importlib import metadata

from balancing import errors, gcpause, metrics
from balancing.agent import events, health, ingest, policy_status, programming, state, supervise
from balancing.agent.config import AgentConfig
from balancing.agent.udp_termination import Terminations
from balancing.datapath import abi, conntrack, loader, maps, netns, northsouth, owners
from balancing.datapath.programmed import ProgrammedState
from balancing.model import store
from balancing.sources import kube, kubestatus, manifests
from balancing.sources.update import SourceUpdate

__all__ = ["Agent", "map_fill", "run"]

log = logging.getLogger("balancing.agent")
CONNTRACK_SWEEP = 10.0  # seconds between north-south connection-tracking sweeps
# /statusz's map names → the writer's maps
FILLED_MAPS = {
    "services": abi.MAP_SERVICES,
    "backends": abi.MAP_BACKENDS,
    "affinityMatch": abi.MAP_AFFINITY_MATCH,
    "clients": abi.MAP_CLIENTS,
    "qos": abi.MAP_QOS,
    "skip": abi.MAP_SKIP,
}


def map_fill(state: ProgrammedState) -> dict[str, int]:
    """Entries of the writer's maps that ``state`` (the writer's record) stands for, by ``FILLED_MAPS``
    name; missing slots count for nothing."""
    services = 0
    for f in state.frontends.values():
        for tier in (f.primary, f.fallback):
            if tier is not None and tier.master:
                services += 1 + sum(1 for ref in tier.slots if ref is not None)
    fs = state.frontends.values()
    return {
        "services": services,
        "backends": len(state.backend_ids),
        "affinityMatch": sum(len(f.affinity_matches) for f in fs),
        "clients": sum(len(f.clients) for f in fs),
        "qos": sum(1 for f in fs if f.qos is not None),
        "skip": len(state.skip),
    }


def _version() -> str:
    try:
        return metadata.version("balancing")
    except metadata.PackageNotFoundError:
        return "unknown"


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = store.ClusterStore(cfg.model)
        self.directory = manifests.ManifestDirectory(cfg.manifests) if cfg.manifests is not None else None
        self.health = health.HealthState(stale_after=2 * cfg.resync_interval + 10)
        self.metrics = metrics.Metrics(clock=time.perf_counter)
        self.owners = owners.OwnerIndex()
        self.ingest = ingest.Ingest(self.store, self.metrics, "manifests" if self.directory else "kubernetes")
        self.terminations = Terminations(self.metrics)
        self.programming = programming.Programming(
            self.store,
            self.metrics,
            self.health,
            self.owners,
            self.terminations,
            healthcheck_host=cfg.healthcheck_host,
            resync_interval=cfg.resync_interval,
            on_programmed=self.report_status,
        )
        self.events = events.AgentEvents(
            cfg.events, cfg.datapath, self.owners, self.ingest.pods_by_uid.get, cfg.cgroup_rescan_interval
        )
        self.kube_source: kube.KubeSource | None = None
        self.reporter: policy_status.PolicyStatusReporter | None = None
        self._synced = asyncio.Event()  # the store holds the whole state: the resync loop may run
        self._state_cache: tuple[int, int, bytes] | None = None  # (store generation, write generation, body)
        self._ingested = 0
        self._metrics_server: metrics.MetricsServer | None = None
        self.load_report: loader.LoadReport | None = None  # what the start attached (for /statusz)
        self._capacity: dict[str, int] = {}  # map name → max entries, as the kernel has them
        self._fill: tuple[int, dict[str, object]] | None = None  # (write generation, /statusz's maps)
        self._north_south_devices: tuple[str, ...] = ()  # found from the Node's addresses (no devices given)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, run until ``stop`` is set, stop (the datapath stays attached); errors logged meanwhile
        are counted for ``/statusz``."""
        errors_seen = logging.getLogger("balancing")
        errors_seen.addHandler(self.health.errors)
        try:
            await self._run(stop)
        finally:
            errors_seen.removeHandler(self.health.errors)

    async def _run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        dp = self.cfg.datapath
        io = self.programming.io
        report = await loop.run_in_executor(io, partial(loader.load, dp, netns_dirs=self.cfg.netns_dirs))
        log.info("datapath on %s, pins in %s: %s", dp.cgroup, dp.bpffs, report.summary())
        self.load_report = report
        ns = self.cfg.north_south
        if ns is not None and ns.devices:  # else once the Node's addresses are known (first sync)
            await loop.run_in_executor(io, self._load_north_south, ns)
        kernel_maps = await loop.run_in_executor(io, maps.KernelMaps, dp.map_dir)
        self._capacity = dict(getattr(kernel_maps, "capacity", {}))
        maglev_size = ns.maglev_size if ns is not None else abi.DEFAULT_MAGLEV_SIZE
        await self.programming.open(kernel_maps, dp.cgroup, maglev_size)
        if self.cfg.terminate_udp:  # after loader.load: it would retire the terminator's own pin
            await self.terminations.open(dp, self.cfg.netns_dirs)
        servers = await self._serve()
        host_ns = self.cfg.host_netns
        cookie = await loop.run_in_executor(
            io, netns.own_cookie if host_ns is None else partial(netns.cookie_of, host_ns)
        )
        await self.events.configure(io, cookie, host_netns_only=self.cfg.socket_lb_host_namespace_only)
        try:
            await self.open_status_reporter()
            tasks = [
                self._supervised("source", self.follow_source),
                self._supervised("resync", self._resync_after_first_sync),
                self._supervised("pod-cgroups", self._follow_pod_cgroups),
                *([self._supervised("conntrack-gc", self._expire_conntrack)] if self.cfg.north_south else []),
                *self.events.start(self.programming.pods, stop),
            ]
            await stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if self.reporter is not None:
                await self.reporter.writer.close()
            await self.terminations.close()
            await self.events.close(io)
            for server in servers:
                server.close()
            for server in servers:
                await server.wait_closed()
            if self._metrics_server is not None:
                self._metrics_server.close()
            await self.programming.close()
            kernel_maps.close()
        log.info("stopped; the datapath stays attached and keeps translating")

    def _supervised(self, name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        return asyncio.create_task(
            supervise.supervise(
                name,
                body,
                health=self.health,
                on_failure=self.metrics.task_restarted,
                backoff=self.cfg.restart_backoff,
            ),
            name=name,
        )

    async def _serve(self) -> list[asyncio.AbstractServer]:
        """The health port (``/healthz``, ``/livez``, ``/readyz``, ``/statusz``), ``/state``, and metrics."""
        servers: list[asyncio.AbstractServer] = []
        health_routes = health.agent_routes(self.health, self.statusz)
        listen = [("--health-addr", health_routes, (self.cfg.health_host, self.cfg.health_port))]
        if self.cfg.state_addr is not None:
            listen.append(("--state-addr", health.routes({"/state": self.state}), self.cfg.state_addr))
        for flag, handler, (host, port) in listen:
            try:
                servers.append(await health.serve(handler, host, port))
            except OSError as exc:
                for server in servers:
                    server.close()
                raise errors.ConfigError(
                    flag, f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from exc
        if self.cfg.metrics_addr is not None:
            self.metrics.watch_datapath(self.cfg.datapath.bpffs, self.owners)
            try:
                self._metrics_server = self.metrics.serve(*self.cfg.metrics_addr)
            except OSError as exc:
                host, port = self.cfg.metrics_addr
                log.error("metrics cannot be served on %s:%d: %s (continuing without)", host, port, exc)
        return servers

    # --- source → model → datapath -------------------------------------------------------------------------

    def updates(self) -> AsyncGenerator[SourceUpdate, None]:
        """A new stream from the source, its first update the whole state."""
        if self.directory is None:
            self._open_kube_source()
        return ingest.updates(self.directory, self.kube_source)

    def _open_kube_source(self) -> kube.KubeSource:
        """The Kubernetes source (one per agent, shared by the updates and the status writer), its counts
        exported as metrics."""
        if self.kube_source is None:
            self.kube_source = ingest.new_kube_source(self.cfg)
            counts = self.kube_source.counts
            self.metrics.watch_kube(counts.events, counts.lists)
        return self.kube_source

    async def follow_source(self) -> None:
        """The source's whole state, one full sync, then every change; what a restart runs again."""
        async with contextlib.aclosing(self.updates()) as stream:
            self.take(await anext(stream), whole=True)
            self._synced.set()  # the store holds the whole state: a full sync from now on flushes nothing
            self.health.task_up("source")
            await self.programming.full_sync()  # a failure is retried by the resync loop
            await self._north_south_on_node_devices()
            gcpause.freeze_long_lived()  # the synced state is long-lived: no collection walks it again
            await self.follow_changes(stream)

    def _load_north_south(self, ns: northsouth.NorthSouthConfig) -> None:
        report = northsouth.load(ns, self.load_report)
        log.info("north-south on %s: %s", ", ".join(ns.devices), report.summary())

    async def _north_south_on_node_devices(self) -> None:
        """North-south without --nodeport-devices: on the devices holding this Node's addresses, once the
        first sync knows them (an agent restart finds them again). None found is an error on /healthz's
        terms, not a crash: the socket hooks keep serving."""
        ns = self.cfg.north_south
        if ns is None or ns.devices or self._north_south_devices:
            return
        loop = asyncio.get_running_loop()
        own = self.store.node().own_addresses
        devices = await loop.run_in_executor(self.programming.io, northsouth.devices_with, own)
        if not devices:
            shown = ", ".join(sorted(map(str, own))) or "none known"
            log.error(
                "north-south: no device holds this Node's addresses (%s): give --nodeport-devices", shown
            )
            return
        await loop.run_in_executor(self.programming.io, self._load_north_south, replace(ns, devices=devices))
        self._north_south_devices = devices

    async def _expire_conntrack(self) -> None:
        """North-south's ended and idle flows out of connection tracking, every ``CONNTRACK_SWEEP`` seconds
        (``datapath.conntrack``), once north-south runs."""
        self.health.task_up("conntrack-gc")
        loop = asyncio.get_running_loop()
        map_dir = self.cfg.datapath.map_dir
        while True:
            await asyncio.sleep(CONNTRACK_SWEEP)
            if not (map_dir / abi.MAP_CONNTRACK).exists():
                continue  # north-south not loaded yet (no device found so far)
            stats = await loop.run_in_executor(self.programming.io, conntrack.sweep, map_dir)
            if stats.flows_expired or stats.orphans_expired:
                log.debug(
                    "conntrack: %d flows and %d orphaned replies expired of %d entries in %.0f ms",
                    stats.flows_expired,
                    stats.orphans_expired,
                    stats.entries,
                    stats.seconds * 1000,
                )

    async def follow_changes(self, stream: AsyncGenerator[SourceUpdate, None]) -> None:
        """Every change of the source into the maps, as it comes."""
        async for update in stream:
            seen = time.perf_counter()
            self.take(update)
            if self.programming.needs_resync:
                await self.programming.full_sync()
            else:
                await self.programming.write(self.store.take_changes(), seen)
            self.health.task_up("source")

    def take(self, update: SourceUpdate, *, whole: bool = False) -> None:
        """One update into the store (``whole``: the source's whole state) and to the status reporter."""
        if whole:
            self.ingest.replace(update)
        else:
            self.ingest.apply(update)
        self._ingested += 1
        if self.reporter is not None:
            self.reporter.observe(update)

    async def _resync_after_first_sync(self) -> None:
        await self._synced.wait()  # before it, a full sync would remove what the last agent programmed
        self.health.task_up("resync")
        await self.programming.resync_loop()

    async def _follow_pod_cgroups(self) -> None:
        self.health.task_up("pod-cgroups")
        dp = self.cfg.datapath
        await self.programming.pod_cgroup_loop(
            dp.cgroup, self.cfg.cgroup_rescan_interval, self.events.pods_changed
        )

    # --- policy status (Kubernetes mode) -------------------------------------------------------------------

    async def open_status_reporter(self) -> None:
        """With the API as source and ``policy_status``: the writer of this node's status entries."""
        if self.directory is not None or not self.cfg.policy_status:
            return
        source = self._open_kube_source()
        node = self.cfg.model.node_name
        status_writer = kubestatus.StatusWriter(
            source.connection,
            policy_status.field_manager(node),
            timing=self.cfg.status_timing,
            on_result=lambda _key, result: self.metrics.status_written(result),
        )
        await status_writer.__aenter__()
        self.reporter = policy_status.PolicyStatusReporter(
            node, status_writer, out_of_cluster=self.cfg.model.external_client
        )

    def report_status(self) -> None:
        """The datapath holds the model's state: report it (in the background; never raises)."""
        if self.reporter is not None:
            try:
                self.reporter.reconcile(self.ingest.statuses)
            except Exception:  # reporting must never stop the agent
                log.exception("reporting policy status")

    # --- GET /state ----------------------------------------------------------------------------------------

    def state(self) -> tuple[int, bytes]:
        """The agent's view for the operator tools (``agent.state``), built once per change and cached, so
        clients looping on it cost one encoding per change, not one per request."""
        key = (self._ingested, self.programming.generation)
        if self._state_cache is None or self._state_cache[:2] != key:
            w = self.programming.writer
            body = state.build(
                self.cfg.model.node_name,
                self.store.desired(),
                w.svc_id if w is not None else (lambda _k: None),
                self.ingest.pods_by_uid.values(),
                self.store.conflicts(),
            )
            body["policies"] = [state.policy_json(s) for s in self.store.policy_status().values()]
            self._state_cache = (*key, json.dumps(body).encode())
        return 200, self._state_cache[2]

    # --- GET /statusz ---------------------------------------------------------------------------------------

    def statusz(self) -> tuple[int, dict[str, object]]:
        """``agent.health``'s ``/statusz`` with the version, source, programs and map fill: counts only."""
        report = self.load_report
        programs = (
            []
            if report is None
            else sorted(
                {
                    *report.programs_attached,
                    *report.programs_swapped,
                    *report.programs_unchanged,
                    *report.programs_moved,
                }
            )
        )
        return self.health.statusz(
            {
                "version": _version(),
                "source": "manifests" if self.directory is not None else "kubernetes",
                **self._map_status(),
                "programs": {"attached": programs, "loadWarnings": len(report.warnings) if report else 0},
            }
        )

    def _map_status(self) -> dict[str, object]:
        """``frontends`` and ``maps`` (entries and capacity), recounted once per write."""
        generation = self.programming.generation
        w = self.programming.writer
        if w is None:
            return {"frontends": 0, "maps": {}}
        if self._fill is None or self._fill[0] != generation:
            record = w.record()
            fill = map_fill(record)
            counted = {
                name: {"entries": fill[name], "capacity": self._capacity.get(pinned)}
                for name, pinned in FILLED_MAPS.items()
            }
            self._fill = (generation, {"frontends": len(record.frontends), "maps": counted})
        return self._fill[1]


def run(cfg: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(cfg).run(stop)

    asyncio.run(main())
