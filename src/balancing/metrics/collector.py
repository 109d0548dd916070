"""The datapath's metrics, read at scrape time: resolutions by owner, lost events, map usage, programs.

The BPF programs count every resolution in a per-CPU hash map keyed by (frontend id, result, protocol,
hook); nothing per connect crosses to user space. At each scrape ``DatapathCollector`` reads those sums
(``kernel.KernelReader``) and names each frontend id by its owner through ``owner_of`` (the agent's
``datapath.owners.OwnerIndex``, which follows the writer's ids).

Counters stay monotonic although owners change under them: the collector keeps, per map key, the value it last
attributed and adds only the *increase* since then to the owner's series. A frontend that a policy takes over
(same id, new owner), a Service deleted and recreated (new id, same owner) or a map entry recreated (its count
restarts) therefore never makes a series go down. The index still names a removed frontend's owner for
``OwnerIndex.linger`` seconds, so its last counts (and UDP replies of sockets still open) go to the right
series. An id with no owner is held back until the agent's first full sync, and then for ``unknown_grace``
seconds more (a scrape racing a write); after that it is counted under ``service_id`` with empty owner labels
and its keys are deleted from the kernel map (``Reader.forget``): new frontends get new ids, so without this
the counters of Services long gone would fill the map. A series whose owner no longer owns any counted
frontend is dropped after ``retention`` seconds, so deleted Services do not accumulate.

North-south flows are counted in the same resolution counters (hooks ``tc_ingress``/``tc_egress``, results
``translated_local``, ``translated_snat`` and ``dropped_*``: a drop by reason is a ``balancing_resolutions``
series). Where north-south runs, its connection-tracking and SNAT fill and its own counters are exported
too (``northsouth_families``); a node without it exports none of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from balancing.datapath import owners
from balancing.metrics import kernel
from balancing.model.desired import Owner
from balancing.model.desired import Protocol as IPProtocol

log = logging.getLogger(__name__)

RESOLUTION_LABELS = ("kind", "namespace", "name", "port", "protocol", "result", "hook", "service_id")
Labels = tuple[str, str, str, str, str, str, str, str]
# kernel.NorthSouth attribute → (gauge, help)
NORTHSOUTH_GAUGES = {
    "conntrack_entries": (
        "balancing_conntrack_entries",
        "North-south connection-tracking entries (2 per flow).",
    ),
    "conntrack_capacity": (
        "balancing_conntrack_capacity",
        "Maximum north-south connection-tracking entries.",
    ),
    "snat_ports_in_use": (
        "balancing_snat_ports_in_use",
        "SNAT source ports held by tracked north-south flows, all backends together.",
    ),
    "snat_port_range": (
        "balancing_snat_port_range_size",
        "SNAT source ports north-south may use towards each backend (a port is unique per backend).",
    ),
}
# kernel.NSSTAT_NAMES → the help of balancing_northsouth_<name>_total
NORTHSOUTH_COUNTERS = {
    "snat_allocations": "SNAT source ports taken for north-south flows to backends on other nodes.",
    "snat_retries": "SNAT port candidates found taken while allocating one (many: the range is filling).",
    "flows": "North-south flows tracked (connection-tracking entry pairs created).",
    "backend_gone": "Tracked north-south flows whose backend had left, sent to a newly picked backend.",
}


class Reader(Protocol):
    def read(self) -> kernel.Snapshot: ...

    def forget(self, svc_ids: set[int]) -> int: ...


def _protocol(number: int) -> str:
    try:
        return IPProtocol(number).name
    except ValueError:
        return str(number)


def northsouth_families(ns: kernel.NorthSouth | None) -> list[Metric]:
    """North-south's fill gauges and counters (none where it does not run; a part not read is left out)."""
    if ns is None:
        return []
    families: list[Metric] = []
    for attr, (name, text) in NORTHSOUTH_GAUGES.items():
        value = getattr(ns, attr)
        if value is not None:
            families.append(GaugeMetricFamily(name, text, value=value))
    for counter, text in NORTHSOUTH_COUNTERS.items():
        if counter in ns.counters:
            families.append(
                CounterMetricFamily(f"balancing_northsouth_{counter}", text, value=ns.counters[counter])
            )
    return families


class DatapathCollector(Collector):
    """A prometheus-client collector over the datapath pinned under ``bpffs``."""

    def __init__(
        self,
        bpffs: Path,
        owner_of: owners.OwnerLookup,
        *,
        entries_every: float = 30.0,
        unknown_grace: float = 60.0,
        retention: float = 3600.0,
        reader: Reader | None = None,
        clock: Callable[[], float] = time.monotonic,
        synced: Callable[[], bool] = lambda: True,
    ) -> None:
        self.reader: Reader = reader or kernel.KernelReader(bpffs, entries_every=entries_every, clock=clock)
        self.owner_of = owner_of
        self.synced = synced  # whether owner_of knows what is programmed yet (a first full sync happened)
        self.unknown_grace = unknown_grace
        self.retention = retention
        self._clock = clock
        self._lock = threading.Lock()  # the HTTP server runs concurrent scrapes in threads
        self._last: dict[kernel.StatKey, int] = {}  # per map key: the value already attributed
        self._totals: dict[Labels, int] = {}
        self._mapped_at: dict[Labels, float] = {}  # when a counted frontend last had these labels
        self._unknown_since: dict[int, float] = {}
        self._was_up = True

    def describe(self) -> Iterable[Metric]:
        """The families, without reading the kernel (registration checks names with this)."""
        return self._families(kernel.Snapshot(), {}, up=True, took=0.0)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            started = self._clock()
            snap = self.reader.read()
            up = not snap.errors
            if up != self._was_up:
                (log.info if up else log.warning)(
                    "datapath metrics %s", "readable again" if up else f"unreadable: {'; '.join(snap.errors)}"
                )
                self._was_up = up
            totals = self._account(snap.resolutions, started)
            return self._families(snap, totals, up=up, took=self._clock() - started)

    # --- attribution ---------------------------------------------------------------------------------------

    def _account(self, counts: Mapping[kernel.StatKey, int], now: float) -> dict[Labels, int]:
        owner_by_id: dict[int, Owner | None] = {}
        expired: set[int] = set()  # not programmed (past the grace): counted now, then deleted
        for key, value in counts.items():
            svc_id = key[0]
            if svc_id not in owner_by_id:
                owner_by_id[svc_id] = self._owner(svc_id, now)
            owner = owner_by_id[svc_id]
            since = self._unknown_since.get(svc_id)
            if owner is None and (since is None or now - since < self.unknown_grace):
                continue  # held back: its increase goes to the owner once known
            labels = self._labels(owner, key)
            last = self._last.get(key, 0)
            self._last[key] = value
            delta = value - last if value >= last else value  # smaller: the entry was recreated
            if delta:
                self._totals[labels] = self._totals.get(labels, 0) + delta
            if labels in self._totals:
                self._mapped_at[labels] = now
            if owner is None:
                expired.add(svc_id)
        self._forget(expired)
        for key in self._last.keys() - counts.keys():
            del self._last[key]
        for svc_id in self._unknown_since.keys() - owner_by_id.keys():
            del self._unknown_since[svc_id]
        for labels in [lb for lb, at in self._mapped_at.items() if now - at > self.retention]:
            del self._mapped_at[labels], self._totals[labels]
        return dict(self._totals)

    def _forget(self, svc_ids: set[int]) -> None:
        if not svc_ids:
            return
        try:
            deleted = self.reader.forget(svc_ids)
        except OSError as exc:
            log.warning("cannot delete the counters of %d retired frontend ids: %s", len(svc_ids), exc)
            return
        log.debug("deleted %d counters of %d retired frontend ids", deleted, len(svc_ids))
        for key in [k for k in self._last if k[0] in svc_ids]:
            del self._last[key]  # a key that comes back counts from zero

    def _owner(self, svc_id: int, now: float) -> Owner | None:
        owner = self.owner_of(svc_id)
        if owner is None and self.synced():  # before the first sync nothing is known: no clock runs
            self._unknown_since.setdefault(svc_id, now)
        else:
            self._unknown_since.pop(svc_id, None)
        return owner

    @staticmethod
    def _labels(owner: Owner | None, key: kernel.StatKey) -> Labels:
        svc_id, result, proto, hook = key
        if owner is None:
            return ("", "", "", "", _protocol(proto), result, hook, str(svc_id))
        return (owner.kind, owner.namespace, owner.name, owner.port_name, _protocol(proto), result, hook, "")

    # --- exposition ----------------------------------------------------------------------------------------

    @staticmethod
    def _families(
        snap: kernel.Snapshot, totals: Mapping[Labels, int], *, up: bool, took: float
    ) -> list[Metric]:
        resolutions = CounterMetricFamily(
            "balancing_resolutions",
            "Connects, datagrams and north-south flows the datapath resolved, by frontend owner, protocol, "
            "result and hook.",
            labels=RESOLUTION_LABELS,
        )
        for labels, value in sorted(totals.items()):
            resolutions.add_metric(labels, value)
        families: list[Metric] = [resolutions]
        lost = CounterMetricFamily(
            "balancing_events_lost", "Resolution events dropped because the ring buffer was full."
        )
        if snap.events_lost is not None:
            lost.add_metric([], snap.events_lost)
        families.append(lost)
        entries = GaugeMetricFamily(
            "balancing_map_entries",
            "Entries in a BPF hash map (the counter map's at each scrape, the others' cached a while).",
            labels=("map", "type"),
        )
        capacity = GaugeMetricFamily(
            "balancing_map_capacity", "Maximum entries of a BPF hash map.", labels=("map", "type")
        )
        for name, usage in sorted(snap.maps.items()):
            entries.add_metric((name, usage.type), usage.entries)
            capacity.add_metric((name, usage.type), usage.capacity)
        families += [entries, capacity]
        families.append(
            GaugeMetricFamily(
                "balancing_programs_loaded", "BPF programs pinned by a link.", value=snap.programs_loaded
            )
        )
        families.append(
            GaugeMetricFamily(
                "balancing_programs_attached",
                "BPF programs attached to a live cgroup.",
                value=snap.programs_attached,
            )
        )
        families.append(
            GaugeMetricFamily(
                "balancing_datapath_up", "1 if every pinned map and link could be read.", value=int(up)
            )
        )
        families.append(
            GaugeMetricFamily(
                "balancing_datapath_scrape_duration_seconds",
                "Time the last scrape spent reading the datapath.",
                value=took,
            )
        )
        return families + northsouth_families(snap.northsouth)
