"""What the Kubernetes source received, as Prometheus counters read at scrape time.

``KubeSourceCollector`` turns two mappings kept by the source's informers (``sources.informer.Counts``,
handed over by the agent as plain mappings so that metrics never imports the sources) into
``balancing_kube_watch_events_total{resource,type}`` (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) and
``balancing_kube_lists_total{resource,reason}`` (initial, resync, gone after a 410, retry, unserved). A
``reason="gone"`` list follows a watch the API server could no longer resume (after its restart, or a watch
fallen behind its watch cache); BOOKMARK events show it keeping idle watches' resourceVersions fresh.

Neighbours: ``control.Metrics.watch_kube`` registers it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "balancing_"  # control.PREFIX: control imports this module, not the reverse
Counted = Mapping[tuple[str, str], int]


class KubeSourceCollector(Collector):
    """The source's watch events and lists; ``events`` and ``lists`` map (resource kind, label) to a
    count that only grows."""

    def __init__(self, events: Counted, lists: Counted) -> None:
        self.events, self.lists = events, lists

    def collect(self) -> Iterable[Metric]:
        events = CounterMetricFamily(
            f"{PREFIX}kube_watch_events",
            "Watch events received from the API server, by resource kind and event type.",
            labels=["resource", "type"],
        )
        for (resource, kind), n in sorted(dict(self.events).items()):
            events.add_metric([resource, kind], n)
        lists = CounterMetricFamily(
            f"{PREFIX}kube_lists",
            "Lists of a collection sent to the API server, by resource kind and reason (initial, resync, "
            "gone: after a 410 Gone, retry: after a failed request, unserved: while it is not served).",
            labels=["resource", "reason"],
        )
        for (resource, reason), n in sorted(dict(self.lists).items()):
            lists.add_metric([resource, reason], n)
        return [events, lists]
