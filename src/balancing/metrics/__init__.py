"""Prometheus metrics of the agent: control-plane instruments and datapath counters read at scrape time.

``control.Metrics`` owns a dedicated registry with the control-plane metrics (kube-proxy's names where the
meaning matches, prefixed ``balancing_``) and serves it over HTTP from a thread; ``collector`` reads the
per-CPU BPF counters and map usage at each scrape (``kernel`` does the reading) and names frontends by
their owners (``balancing.datapath.owners``, the index the agent keeps of the writer's ids);
``kubecounts`` exports what the Kubernetes source's watches and lists received. May import
``balancing.datapath`` (ABI, libbpf, per-CPU reads, owners), ``balancing.model.desired`` and
prometheus-client; never the agent, the CLI or the sources.
"""

from balancing.metrics.collector import DatapathCollector
from balancing.metrics.control import Metrics, MetricsServer
from balancing.metrics.kernel import KernelReader, MapUsage, Snapshot

__all__ = [
    "DatapathCollector",
    "KernelReader",
    "MapUsage",
    "Metrics",
    "MetricsServer",
    "Snapshot",
]
