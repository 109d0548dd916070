"""The agent's resolution-event plumbing: the datapath's event switch, the pipeline and the stream socket.

Writes the datapath's run-time settings (``configure``): the event mode (off, sampled or all), the host's
network namespace and whether only its sockets are translated (socketLB.hostNamespaceOnly). When events are
on, runs the ring-buffer pipeline (attribution to pods, owners, JSON-lines sinks) and the unix socket
``balancing monitor`` reads. Events off costs the datapath one config lookup per resolution; nothing else
runs. Neighbours: ``agent.lifecycle`` (owns the lifecycle), ``events`` (the pipeline), ``datapath.settings``
(the config map).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from balancing.datapath import abi, loader, owners, podcgroups, settings
from balancing.events import attribution, pipeline, sinks, stream
from balancing.model import objects

log = logging.getLogger(__name__)

MODES = {"off": abi.EVENTS_OFF, "sampled": abi.EVENTS_SAMPLED, "all": abi.EVENTS_ALL}


@dataclass(frozen=True)
class EventsConfig:
    mode: str = "off"  # off | sampled | all
    sample_every: int = 100
    reverse: bool = False
    log_path: Path | None = None
    stdout: bool = False
    log_max_bytes: int = 100 << 20
    log_backups: int = 3
    socket: Path = stream.DEFAULT_SOCKET


class AgentEvents:
    def __init__(
        self,
        cfg: EventsConfig,
        datapath: loader.DatapathConfig,
        owner_of: owners.OwnerLookup,
        pod_by_uid: Callable[[str], objects.Pod | None],
        rescan_interval: float,
    ) -> None:
        self.cfg, self.datapath = cfg, datapath
        self.owner_of, self.pod_by_uid, self.rescan_interval = owner_of, pod_by_uid, rescan_interval
        self.attributor: attribution.Attributor | None = None
        self.pipeline: pipeline.EventPipeline | None = None
        self._log: sinks.EventLog | None = None

    async def configure(
        self, executor: Executor, host_netns_cookie: int, *, host_netns_only: bool = False
    ) -> None:
        """Write the datapath's run-time settings: the event mode (also off), the host's netns, and with
        ``host_netns_only`` that only the host netns's sockets are translated. Run it on the datapath's
        executor: the map writer's skip flag shares the config entry (``datapath.settings``)."""
        write = functools.partial(
            settings.write_config,
            self.datapath.map_dir,
            MODES[self.cfg.mode],
            sample_every=self.cfg.sample_every,
            wakeup_bytes=settings.default_wakeup_bytes(self.datapath.event_bytes),
            reverse_events=self.cfg.reverse,
            host_netns_cookie=host_netns_cookie,
            host_netns_only=host_netns_only,
        )
        await asyncio.get_running_loop().run_in_executor(executor, write)

    def start(self, index: podcgroups.PodCgroupIndex, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        if self.cfg.mode == "off":
            return []
        self.attributor = attribution.Attributor(
            self.datapath.cgroup, self.pod_by_uid, index=index, rescan_interval=self.rescan_interval
        )
        self._log = sinks.open_event_log(
            self.cfg.log_path,
            stdout=self.cfg.stdout,
            max_bytes=self.cfg.log_max_bytes,
            backups=self.cfg.log_backups,
        )
        self.pipeline = pipeline.EventPipeline(
            self.datapath.map_dir / abi.MAP_EVENTS,
            self.owner_of,
            self.attributor,
            [self._log] if self._log else [],
        )
        server = stream.EventStreamServer(self.cfg.socket, self.pipeline.subscribe, self.pipeline.unsubscribe)
        log.info("resolution events %s; stream on %s", self.cfg.mode, self.cfg.socket)
        return [asyncio.create_task(self.pipeline.run(stop)), asyncio.create_task(server.run(stop))]

    def pods_changed(self, index: podcgroups.PodCgroupIndex) -> None:
        if self.attributor is not None:
            self.attributor.update_index(index)

    async def close(self, executor: Executor) -> None:
        if self._log is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._log.close)
