"""Control-plane metrics: how long syncs take, how fast a change reaches the maps, what failed.

Names follow kube-proxy where the meaning matches, with ``balancing_`` in place of kube-proxy's
``kubeproxy_`` prefix, so a kube-proxy dashboard or alert ports over by swapping the prefix::

    kubeproxy_sync_proxy_rules_duration_seconds       →  balancing_sync_proxy_rules_duration_seconds
    kubeproxy_network_programming_duration_seconds    →  balancing_network_programming_duration_seconds

One difference in meaning: kube-proxy measures network programming from the EndpointSlice's
``last-change-trigger-time`` (API server time); the agent measures from the moment it *saw* the change (its
source delivered the object) to the moment the maps were written, so the API server's and the watch's delays
are not in it. Its buckets therefore start at a millisecond.

Every metric lives in the ``Metrics`` object's own ``CollectorRegistry`` (never the process-global default),
so tests and several agents in one process do not share state. The methods are thread-safe and cheap; the
agent calls them from its event loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import balancing
from balancing.datapath import owners
from balancing.metrics import collector, kubecounts

# kube-proxy's sync buckets (ExponentialBuckets(0.001, 2, 15)): 1 ms .. 16 s.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# Change seen → maps written: typically a millisecond or less, seconds when a sync is queued behind another.
PROGRAMMING_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
PREFIX = "balancing_"
STATUS_RESULTS = ("ok", "gone", "retry", "failed")  # sources.kubestatus outcomes


IDLE_TIMEOUT = 10.0  # seconds a scrape connection may stall (reading the request or writing the answer)


class _QuietHandler(WSGIRequestHandler):
    """One scrape: a socket timeout bounds every read and write, and a deadline the whole connection (a
    client trickling a byte now and then would otherwise hold its slot for ever); no access log."""

    timeout = IDLE_TIMEOUT
    deadline = 3 * IDLE_TIMEOUT

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(self.deadline, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, at most ``slots`` at once: a connection over the cap is closed unread."""

    daemon_threads = True
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away or timed out: nothing to report


@dataclass
class MetricsServer:
    """The scrape endpoint: prometheus-client's HTTP server in a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0)."""
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class Metrics:
    """The agent's metrics: control-plane instruments plus, once watched, the datapath's counters."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, process: bool = True) -> None:
        """``clock`` is the clock ``programmed(seen)``'s ``seen`` was read from; ``process`` adds the standard
        process_*, python_gc_* and python_info collectors to the registry."""
        self.registry = CollectorRegistry()
        self._clock = clock
        r = self.registry
        if process:
            prometheus_client.ProcessCollector(registry=r)
            prometheus_client.PlatformCollector(registry=r)
            prometheus_client.GCCollector(registry=r)
        Info(f"{PREFIX}build", "Version of the Balancing agent.", registry=r).info(
            {"version": balancing.__version__}
        )
        self.sync_duration = Histogram(
            f"{PREFIX}sync_proxy_rules_duration_seconds",
            "Latency of one sync (full or partial) of the desired state into the BPF maps, in seconds.",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.sync_full_duration = Histogram(
            f"{PREFIX}sync_full_proxy_rules_duration_seconds",
            "Latency of one full (reconciling) sync into the BPF maps, in seconds.",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.sync_partial_duration = Histogram(
            f"{PREFIX}sync_partial_proxy_rules_duration_seconds",
            "Latency of one partial sync (only the frontends a change touched), in seconds.",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            f"{PREFIX}sync_proxy_rules_last_timestamp_seconds",
            "The last time (Unix seconds) the desired state was successfully written to the maps.",
            registry=r,
        )
        self.network_programming = Histogram(
            f"{PREFIX}network_programming_duration_seconds",
            "Time from the agent seeing an object change to the BPF maps being written, in seconds.",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.service_changes = Counter(
            f"{PREFIX}sync_proxy_rules_service_changes_total",
            "Service (and policy) object changes seen by the agent.",
            registry=r,
        )
        self.endpoint_changes = Counter(
            f"{PREFIX}sync_proxy_rules_endpoint_changes_total",
            "EndpointSlice (and pod) object changes seen by the agent.",
            registry=r,
        )
        self.service_pending = Gauge(
            f"{PREFIX}sync_proxy_rules_service_changes_pending",
            "Service changes seen but not yet written to the maps.",
            registry=r,
        )
        self.endpoint_pending = Gauge(
            f"{PREFIX}sync_proxy_rules_endpoint_changes_pending",
            "Endpoint changes seen but not yet written to the maps.",
            registry=r,
        )
        # A gauge despite "_total": kube-proxy's name and type, kept so its dashboards port over.
        self.no_local = Gauge(
            f"{PREFIX}sync_proxy_rules_no_local_endpoints_total",
            "Services with a Local traffic policy and no local endpoint, at the last sync.",
            ["traffic_policy"],
            registry=r,
        )
        self.source_errors = Counter(
            f"{PREFIX}source_errors_total",
            "Input the agent could not use: bad manifests (kind=invalid), unreadable files, API errors.",
            ["source", "kind"],
            registry=r,
        )
        self.write_failures = Counter(
            f"{PREFIX}map_write_failures_total",
            "Failed writes of the desired state to a BPF map (the last good state stays programmed).",
            ["map"],
            registry=r,
        )
        self.status_writes = Counter(
            f"{PREFIX}policy_status_writes_total",
            "Server-side applies of this node's entry in the policies' status (Kubernetes mode), by result: "
            "ok, gone (the policy was deleted), retry (failed, retried with backoff), failed (refused).",
            ["result"],
            registry=r,
        )
        self.udp_terminated = Counter(
            f"{PREFIX}udp_sockets_terminated_total",
            "Connected UDP sockets destroyed because their backend left the frontend they connected to "
            "(kube-proxy's UDP conntrack cleanup).",
            registry=r,
        )
        self.udp_termination_errors = Counter(
            f"{PREFIX}udp_socket_termination_errors_total",
            "Failures while destroying such sockets (a namespace that could not be entered, an iterator "
            "that failed, or the feature being unavailable on this kernel).",
            registry=r,
        )
        self.task_restarts = Counter(
            f"{PREFIX}task_restarts_total",
            "Agent tasks (source, resync, pod-cgroups) that failed and were restarted; /healthz is 503 while "
            "one is down.",
            ["task"],
            registry=r,
        )
        for policy in ("internal", "external"):
            self.no_local.labels(policy).set(0)
        for result in STATUS_RESULTS:
            self.status_writes.labels(result)

    # --- what the agent calls ------------------------------------------------------------------------------

    def sync_done(self, duration_s: float, full: bool) -> None:
        """A sync wrote the maps successfully in ``duration_s`` seconds."""
        self.sync_duration.observe(duration_s)
        (self.sync_full_duration if full else self.sync_partial_duration).observe(duration_s)
        self.last_sync.set(time.time())

    def programmed(self, seen: float) -> None:
        """The maps now hold a change first seen at ``seen`` (read from this object's clock)."""
        self.network_programming.observe(max(0.0, self._clock() - seen))

    def changes(self, services: int, endpoints: int) -> None:
        """The agent saw ``services`` Service/policy and ``endpoints`` EndpointSlice/pod object changes."""
        if services:
            self.service_changes.inc(services)
        if endpoints:
            self.endpoint_changes.inc(endpoints)

    def pending(self, services: int, endpoints: int) -> None:
        """Changes seen and not yet programmed (0, 0 after a successful write)."""
        self.service_pending.set(services)
        self.endpoint_pending.set(endpoints)

    def no_local_endpoints(self, traffic_policy: str, n: int) -> None:
        """``n`` services with ``traffic_policy`` ("internal" or "external") Local have no local endpoint."""
        self.no_local.labels(traffic_policy).set(n)

    def source_error(self, source: str, kind: str) -> None:
        """An input was rejected: ``source`` ("manifests", "kubernetes"), ``kind`` ("invalid", "api", ...)."""
        self.source_errors.labels(source, kind).inc()

    def status_written(self, result: str) -> None:
        """One attempt to write a policy's status ended with ``result`` (see ``STATUS_RESULTS``)."""
        self.status_writes.labels(result).inc()

    def udp_sockets_terminated(self, destroyed: int, errors: int) -> None:
        """One termination run destroyed ``destroyed`` sockets and met ``errors`` failures."""
        if destroyed:
            self.udp_terminated.inc(destroyed)
        if errors:
            self.udp_termination_errors.inc(errors)

    def task_restarted(self, task: str) -> None:
        """A supervised agent task failed and is being restarted."""
        self.task_restarts.labels(task).inc()

    def write_failed(self, map_name: str) -> None:
        """A write to ``map_name`` failed ("" when the error names no map)."""
        self.write_failures.labels(map_name or "unknown").inc()

    # --- wiring --------------------------------------------------------------------------------------------

    def watch_datapath(
        self, bpffs: Path, owner_of: owners.OwnerLookup, *, entries_every: float = 30.0
    ) -> collector.DatapathCollector:
        """Read the pinned maps under ``bpffs`` at every scrape; hash maps other than the counters are
        counted at most every ``entries_every`` seconds."""
        synced = (lambda: owner_of.synced) if isinstance(owner_of, owners.OwnerIndex) else (lambda: True)
        c = collector.DatapathCollector(bpffs, owner_of, entries_every=entries_every, synced=synced)
        self.registry.register(c)
        return c

    def watch_kube(self, events: kubecounts.Counted, lists: kubecounts.Counted) -> None:
        """Export the Kubernetes source's counts of watch events and lists (read at every scrape)."""
        self.registry.register(kubecounts.KubeSourceCollector(events, lists))

    def serve(self, host: str, port: int, *, max_connections: int = 16) -> MetricsServer:
        """Serve ``/metrics`` from threads (scrapes never run on the agent's event loop), at most
        ``max_connections`` at once (more are closed unread), each dropped after ``IDLE_TIMEOUT`` seconds
        without progress (a half-sent request or a client that never reads holds nothing for long)."""
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
        server_class: type[_BoundedWSGIServer] = type(
            "_Server", (_BoundedWSGIServer,), {"address_family": family}
        )
        server: WSGIServer = make_server(
            host,
            port,
            prometheus_client.make_wsgi_app(self.registry),
            server_class,
            handler_class=_QuietHandler,
        )
        assert isinstance(server, _BoundedWSGIServer)
        server.slots = threading.BoundedSemaphore(max_connections)
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        return MetricsServer(server, thread)

    def exposition(self) -> bytes:
        """The Prometheus text exposition, as a scrape would get it."""
        return prometheus_client.generate_latest(self.registry)
