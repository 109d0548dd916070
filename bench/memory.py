"""Long-run memory benchmark of Kubernetes mode: informers → model store → map writer under steady churn.

Job: show whether following a churning API server for a long time grows memory (the requirement: "no memory
growth on long runs"). A child process serves ``balancing_testkit.fakeapi.FakeApi`` and churns it at a steady
population: endpoints added, removed and flipping readiness, Services, EndpointSlices, Pods (on this node
and elsewhere), Nodes and policies (BalancingPolicies with ``serviceEndpoint.endpointSelector`` among them)
replaced under names never used twice, namespaces retiring, malformed objects coming and going, and a
``compact()`` + ``drop_watches()`` every few seconds, so every watch resumes into a 410 and relists. This
process runs the real ``KubeSource`` (short resync timings) and the agent's own code (``Agent.take``,
``follow_changes``, ``Programming.full_sync``, ``MapWriter.recover``) over a ``MapWriter`` on in-memory
maps: no kernel, no root.

After a warm-up it pauses the churn at intervals, lets everything drain, and records tracemalloc's live bytes
(after ``gc.collect()``), RSS and the sizes of the internal caches (store, agent, writer, maps, every
``Informer`` and the source's ``PodUnion``). Report: first/last/max, growth per 1000 changes, the slope of a
linear fit over the second half, a verdict per figure, and the allocation sites that grew most (tracemalloc
``compare_to`` by traceback; ``--frames 8`` for deeper tracebacks, at a lower change rate). The churn waits
whenever the agent is ``--max-lag`` resourceVersions behind, since a backlog in the source's queue would
read as growth. The fake runs in another process because it keeps a request log and watch history by
design; allocations made in this file (the bench's own bookkeeping) are left out of the live bytes.
``--rss-only`` runs without tracemalloc (full speed; RSS judged instead).

Run: ``make bench-memory`` or ``.venv/bin/python bench/memory.py [--duration S] [--services N] [--rate R]
[-o json]``. Neighbours: ``bench/run.py`` (datapath and sync speed), ``tests/unit/test_informer_memory.py``
(the same property checked structurally, fast).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import random
import sys
import time
import tracemalloc
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from balancing import agent, gcpause
from balancing.agent.programming import VERIFY_EVERY
from balancing.datapath import loader, maps, writer
from balancing.model.config import ModelConfig
from balancing.model.objects import POLICY_API_VERSION
from balancing.sources import kube
from balancing.sources.informer import Informer, Timing
from balancing.sources.selected_pods import PodUnion
from balancing.sources.update import SourceUpdate
from balancing_testkit.fakeapi import FakeApi

ROOT = Path(__file__).resolve().parents[1]

NODE = "bench-node"
OTHER_NODES = ("node-b", "node-c")
SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"
PODS = "/api/v1/pods"
LRPS = f"/apis/{POLICY_API_VERSION}/localredirectpolicies"
BPS = f"/apis/{POLICY_API_VERSION}/balancingpolicies"
POOL_LABEL = "balancing.elf.io/pool"
CREATED = "2026-01-01T00:00:00Z"
HEALTH_PORTS = 21000  # healthCheckNodePorts, served on 127.0.0.1: below the ephemeral port range
Doc = dict[str, Any]

# --- the churn (child process) -----------------------------------------------------------------------------


@dataclass
class Svc:
    namespace: str
    name: str
    serial: int
    variant: int  # 0-5 ClusterIP, 6 NodePort, 8 pods by selector, 9 LoadBalancer Local with externalIPs
    width: int  # EndpointSlices it has
    slices: dict[str, list[Doc]] = field(default_factory=dict)  # slice name → endpoints
    affinity: bool = False


def _ip(prefix: str, n: int) -> str:
    return f"{prefix}.{(n // 250) % 250}.{n % 250 + 1}"


class Churn:
    """A steady population on a ``FakeApi``, changed one random step at a time; names are never reused."""

    def __init__(self, fake: FakeApi, services: int, seed: int) -> None:
        self.fake, self.target, self.rng = fake, max(services, 10), random.Random(seed)
        self.serial = 0
        self.created = 0  # Services
        self.changes = 0
        self.services: dict[str, Svc] = {}
        self.local_pods: dict[tuple[str, str], Doc] = {}
        self.remote_pods: dict[tuple[str, str], Doc] = {}
        self.policies: dict[tuple[str, str], int] = {}  # (path, name) → kind (see add_policy)
        self.owners: list[str] = []  # BalancingPolicies selecting pods by an ``owner`` label of their own
        self.bad: list[tuple[str, str]] = []  # malformed Services in force
        self.extra_nodes: list[str] = []
        self.own_pool = "a"
        self.steps: list[tuple[Callable[[], None], int]] = [
            (self.endpoints, 45),
            (self.replace_service, 10),
            (self.modify_service, 3),
            (self.replace_slice, 3),
            (self.replace_local_pod, 12),
            (self.flip_pod, 5),
            (self.replace_remote_pod, 4),
            (self.replace_policy, 6),
            (self.change_node, 3),
            (self.malformed, 3),
        ]

    # -- API writes --

    def put(self, path: str, doc: Doc) -> None:
        self.fake.put(path, doc)
        self.changes += 1

    def delete(self, path: str, namespace: str, name: str) -> None:
        self.fake.delete(path, namespace, name)
        self.changes += 1

    def next(self) -> int:
        self.serial += 1
        return self.serial

    # -- population --

    def populate(self) -> None:
        self.put(NODES, self.node_doc(NODE, "192.168.0.10"))
        for i, name in enumerate(OTHER_NODES):
            self.put(NODES, self.node_doc(name, f"192.168.0.{11 + i}"))
        for _ in range(2):  # extra nodes then go 2, 3, 2, 3...
            self.add_node()
        for _ in range(self.target):
            self.add_service()
        for _ in range(max(5, self.target // 10)):  # before the pods, which carry their owner labels
            self.add_policy()
        for _ in range(self.target // 2):
            self.add_local_pod()
        for _ in range(self.target // 4):
            self.add_remote_pod()

    def step(self) -> None:
        fns, weights = zip(*self.steps, strict=True)
        self.rng.choices(fns, weights)[0]()

    # -- documents --

    def node_doc(self, name: str, ip: str) -> Doc:
        labels = {POOL_LABEL: self.own_pool} if name == NODE else {}
        addresses = [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]
        return {"metadata": {"name": name, "labels": labels}, "status": {"addresses": addresses}}

    def service_doc(self, svc: Svc) -> Doc:
        variant = svc.variant
        ip = _ip("10.96", svc.serial)
        port: Doc = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
        spec: Doc = {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": [port]}
        if variant == 6:
            spec["type"] = "NodePort"
            port["nodePort"] = 30000 + svc.serial // 10 % 2500
        if variant == 8:
            spec["selector"] = {"app": svc.name}
        if variant == 9:
            spec.update(
                type="LoadBalancer",
                externalTrafficPolicy="Local",
                healthCheckNodePort=HEALTH_PORTS + svc.serial // 10 % 1000,
                externalIPs=[_ip("10.240", svc.serial)],
            )
            port["nodePort"] = 32500 + svc.serial // 10 % 2500
        if svc.affinity:
            spec["sessionAffinity"] = "ClientIP"
        meta = {"name": svc.name, "namespace": svc.namespace, "uid": f"s-{svc.serial}"}
        return {"metadata": {**meta, "creationTimestamp": CREATED}, "spec": spec}

    def slice_doc(self, svc: Svc, name: str) -> Doc:
        labels = {"kubernetes.io/service-name": svc.name}
        return {
            "metadata": {"name": name, "namespace": svc.namespace, "labels": labels},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": svc.slices[name],
        }

    def ready(self) -> bool:
        """Readiness, drawn afresh for every new endpoint or pod and every flip: the mix stays steady."""
        return self.rng.random() < 0.85

    def endpoint(self) -> Doc:
        ready = self.ready()
        return {
            "addresses": [_ip("10.128", self.rng.randrange(60000))],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
            "nodeName": self.rng.choice((NODE, *OTHER_NODES)),
        }

    def pod_doc(self, namespace: str, name: str, node: str, labels: dict[str, str], serial: int) -> Doc:
        ip = _ip("10.244", serial)
        return {
            "metadata": {"name": name, "namespace": namespace, "uid": f"p-{serial}", "labels": labels},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True" if self.ready() else "False"}],
            },
        }

    # -- steps --

    def add_service(self, like: Svc | None = None) -> None:
        """A new Service (and its slices), of the same variant and width as ``like`` when replacing it, so
        the mix stays what it was at the start. Replacements take the oldest (of Services, Pods, policies),
        so the age mix (namespaces spanned, owners still alive) stays steady too."""
        serial = self.next()
        variant = like.variant if like else serial % 10
        width = like.width if like else (0 if variant == 8 else 1 + serial % 2)  # 8: endpoints from pods
        affinity = self.rng.random() < 0.5
        self.created += 1  # namespaces of 8 Services each: the live ones always span about 25 of them
        svc = Svc(f"ns-{self.created // 8}", f"svc-{serial}", serial, variant, width, affinity=affinity)
        self.services[svc.name] = svc
        self.put(SERVICES, self.service_doc(svc))
        for _ in range(width):
            self.add_slice(svc)

    def add_slice(self, svc: Svc) -> None:
        name = f"{svc.name}-{self.next()}"
        svc.slices[name] = [self.endpoint() for _ in range(self.rng.randint(2, 6))]
        self.put(SLICES, self.slice_doc(svc, name))

    def replace_service(self) -> None:
        svc = self.services.pop(next(iter(self.services)))  # the oldest: the age mix stays steady
        self.delete(SERVICES, svc.namespace, svc.name)
        for name in svc.slices:
            self.delete(SLICES, svc.namespace, name)
        self.add_service(like=svc)

    def modify_service(self) -> None:
        svc = self.services[self.rng.choice(list(self.services))]
        svc.affinity = not svc.affinity  # half have it, as created
        self.put(SERVICES, self.service_doc(svc))

    def sliced(self) -> Svc:
        while True:
            svc = self.services[self.rng.choice(list(self.services))]
            if svc.slices:
                return svc

    def replace_slice(self) -> None:
        svc = self.sliced()
        name = self.rng.choice(list(svc.slices))
        del svc.slices[name]
        self.delete(SLICES, svc.namespace, name)
        self.add_slice(svc)

    def endpoints(self) -> None:
        svc = self.sliced()
        name = self.rng.choice(list(svc.slices))
        eps = svc.slices[name]
        action = self.rng.choice(("add", "remove", "flip"))  # a walk over 2..6 endpoints, as created
        if len(eps) <= 2 and action == "remove":
            action = "add"
        elif len(eps) >= 6 and action == "add":
            action = "remove"
        if action == "add":
            eps.append(self.endpoint())
        elif action == "remove":
            eps.pop(self.rng.randrange(len(eps)))
        else:
            ep = eps[self.rng.randrange(len(eps))]
            ready = self.ready()
            ep["conditions"] = {"ready": ready, "serving": ready, "terminating": not ready}
        self.put(SLICES, self.slice_doc(svc, name))

    def policy_labels(self) -> dict[str, str]:
        labels = {"app": f"pol-{self.rng.randrange(8)}"}
        if self.owners:
            labels["owner"] = self.rng.choice(self.owners)
        return labels

    def add_local_pod(self) -> None:
        serial = self.next()
        selecting = [s for s in self.services.values() if s.variant == 8]
        if selecting and self.rng.random() < 0.5:
            svc = self.rng.choice(selecting)
            namespace, labels = svc.namespace, {"app": svc.name}
        else:
            namespace, labels = "pods", self.policy_labels()
        key = (namespace, f"pod-{serial}")
        self.local_pods[key] = self.pod_doc(namespace, key[1], NODE, labels, serial)
        self.put(PODS, self.local_pods[key])

    def replace_local_pod(self) -> None:
        key = next(iter(self.local_pods))
        del self.local_pods[key]
        self.delete(PODS, *key)
        self.add_local_pod()

    def flip_pod(self) -> None:
        doc = self.local_pods[self.rng.choice(list(self.local_pods))]
        doc["status"]["conditions"][0]["status"] = "True" if self.ready() else "False"
        self.put(PODS, doc)

    def add_remote_pod(self) -> None:
        serial = self.next()
        key = ("pods", f"remote-{serial}")
        doc = self.pod_doc(*key, self.rng.choice(OTHER_NODES), self.policy_labels(), serial)
        self.remote_pods[key] = doc
        self.put(PODS, doc)

    def replace_remote_pod(self) -> None:
        key = next(iter(self.remote_pods))
        del self.remote_pods[key]
        self.delete(PODS, *key)
        self.add_remote_pod()

    def add_policy(self, kind: int | None = None) -> None:
        """A new policy of ``kind`` (the kind of the one it replaces; at the start, all four in turn)."""
        serial = self.next()
        tcp = {"port": "8080", "protocol": "TCP"}
        kind = serial % 4 if kind is None else kind
        if kind in (0, 1):  # BalancingPolicy over a Service, backends picked by label selector
            svc = self.services[self.rng.choice(list(self.services))]
            name = f"bp-{serial}"
            selector = {"app": f"pol-{serial % 8}"} if kind == 0 else {"owner": name}
            if kind == 1:
                self.owners.append(name)
            mode = "podEndpoint" if kind == 0 else "hostPort"
            spec: Doc = {
                "frontend": {"serviceMatcher": {"serviceName": svc.name, "namespace": svc.namespace}},
                "backend": {
                    "serviceEndpoint": {
                        "endpointSelector": {"matchLabels": selector},
                        "toPorts": [tcp],
                        "redirectMode": mode,
                    }
                },
            }
            path = BPS
        elif kind == 2:  # BalancingPolicy on a custom VIP, on nodes of one pool only
            name = f"bpa-{serial}"
            spec = {
                "frontend": {"addressMatcher": {"ip": _ip("10.250", serial), "toPorts": [tcp]}},
                "backend": {
                    "addressEndpoint": {"addresses": [_ip("10.251", serial)], "toPorts": [tcp]},
                },
                "config": {"nodeLabelSelector": {"matchLabels": {POOL_LABEL: "a"}}},
            }
            path = BPS
        else:  # LocalRedirectPolicy: pods on this node
            name = f"lrp-{serial}"
            spec = {
                "frontend": {"addressMatcher": {"ip": _ip("10.252", serial), "toPorts": [tcp]}},
                "backend": {
                    "endpointSelector": {"matchLabels": {"app": f"pol-{serial % 8}"}},
                    "toPorts": [tcp],
                },
            }
            path = LRPS
        self.policies[path, name] = kind
        self.put(path, {"metadata": {"name": name, "creationTimestamp": CREATED}, "spec": spec})

    def replace_policy(self) -> None:
        path, name = next(iter(self.policies))
        kind = self.policies.pop((path, name))
        if name in self.owners:
            self.owners.remove(name)
        self.delete(path, "", name)
        self.add_policy(kind)

    def change_node(self) -> None:
        choice = self.rng.randrange(3)
        if choice == 0:  # this node's labels: policies with a nodeLabelSelector
            self.own_pool = "b" if self.own_pool == "a" else "a"
            self.put(NODES, self.node_doc(NODE, "192.168.0.10"))
        elif choice == 1:  # another node's address: NodePort frontends
            name = self.rng.choice(OTHER_NODES)
            self.put(NODES, self.node_doc(name, _ip("192.168", self.rng.randrange(1000, 2000))))
        elif len(self.extra_nodes) < 3:  # nodes coming and going
            self.add_node()
        else:
            self.delete(NODES, "", self.extra_nodes.pop(0))

    def add_node(self) -> None:
        name = f"node-x{self.next()}"
        self.extra_nodes.append(name)
        self.put(NODES, self.node_doc(name, _ip("192.169", self.serial)))

    def malformed(self) -> None:
        """A malformed Service appears; the oldest one is later fixed then deleted, or deleted as it is."""
        if len(self.bad) < 4:
            serial = self.next()
            key = ("bad", f"bad-{serial}")
            self.bad.append(key)
            spec = {"clusterIP": "not-an-ip", "ports": [{"port": 80}]}
            self.put(SERVICES, {"metadata": {"name": key[1], "namespace": key[0]}, "spec": spec})
            return
        namespace, name = self.bad.pop(0)
        if self.rng.random() < 0.5:
            spec = {"clusterIP": _ip("10.97", self.serial), "ports": [{"port": 80}]}
            self.put(SERVICES, {"metadata": {"name": name, "namespace": namespace}, "spec": spec})
        self.delete(SERVICES, namespace, name)


@dataclass(frozen=True)
class ChurnConfig:
    services: int
    rate: float
    seed: int
    compact_every: float
    max_lag: int


# Shared counters: API changes made, lists served, watches served, compactions (child → parent), and the
# newest resourceVersion the agent has ingested (parent → child: flow control).
CHANGES, LISTS, WATCHES, COMPACTIONS, SEEN_RV = range(5)


def serve(cfg: ChurnConfig, conn: Connection, counters: Any, stop: Event, paused: Event) -> None:
    """The child: serve the fake API server and churn it until ``stop``; hold still while ``paused`` or
    while the agent is more than ``max_lag`` resourceVersions behind (it must keep up, or the backlog in
    the source's queue would be measured as growth)."""
    logging.disable(logging.CRITICAL)
    asyncio.run(_serve(cfg, conn, counters, stop, paused))


async def _serve(cfg: ChurnConfig, conn: Connection, counters: Any, stop: Event, paused: Event) -> None:
    fake = FakeApi()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    churn = Churn(fake, cfg.services, cfg.seed)
    churn.populate()
    conn.send(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    budget, last = 0.0, time.monotonic()
    next_compact = last + cfg.compact_every
    lists = watches = compactions = 0
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        for _, params in fake.requests:  # the fake logs every request: count them, keep it short
            if params.get("watch"):
                watches += 1
            else:
                lists += 1
        fake.requests.clear()
        if paused.is_set() or fake.rv - counters[SEEN_RV] > cfg.max_lag:
            last = now
            next_compact = max(next_compact, now + 1.0)
        else:
            budget = min(budget + (now - last) * cfg.rate, cfg.rate)  # at most a second behind
            last = now
            while budget >= 1:
                before = churn.changes
                churn.step()
                budget -= churn.changes - before
            if now >= next_compact:  # every watch resumes from a compacted resourceVersion: 410, relist
                fake.compact()
                fake.drop_watches()
                compactions += 1
                next_compact = now + cfg.compact_every
        for index, value in ((CHANGES, churn.changes), (LISTS, lists), (WATCHES, watches)):
            counters[index] = value
        counters[COMPACTIONS] = compactions
    server.close()
    for task in list(fake.tasks):
        task.cancel()
    await asyncio.gather(*fake.tasks, return_exceptions=True)


# --- the agent side (this process) ------------------------------------------------------------------------


class QuietMaps(maps.FakeMaps):
    """``FakeMaps`` without its operation log (kept for writer tests, it grows with every write by design)."""

    def _record(self, op: str, name: str, key: bytes) -> None:
        pass


class Feed:
    """The source's updates as the agent reads them: counts object changes, notes when the last one came,
    and tells the churn the newest resourceVersion read."""

    def __init__(self, counters: Any) -> None:
        self.changes = 0
        self.updates = 0
        self.last = time.monotonic()
        self.counters = counters
        self.gate = asyncio.Event()  # cleared while a sample is taken: the next update is held back
        self.gate.set()
        self.parked = asyncio.Event()  # set while the agent holds no update (the last one is written)
        self.parked.set()

    async def hold(self) -> None:
        """Until the agent has written the update it took and will get no other (``release`` ends it)."""
        self.gate.clear()
        await self.parked.wait()

    def release(self) -> None:
        self.gate.set()

    async def follow(self, source: kube.KubeSource) -> AsyncGenerator[SourceUpdate, None]:
        async with contextlib.aclosing(source.updates()) as updates:
            async for update in updates:
                await self.gate.wait()
                self.parked.clear()
                self.updates += 1
                self.changes += len(update.upserts) + len(update.deletes)
                self.last = time.monotonic()
                versions = [int(o.metadata.resource_version or 0) for o in update.upserts]
                if versions and max(versions) > self.counters[SEEN_RV]:
                    self.counters[SEEN_RV] = max(versions)
                yield update
                self.parked.set()  # the agent asks for the next update once it has written this one


def container_sizes(prefix: str, obj: object) -> dict[str, int]:
    """``len`` of every dict/set/list attribute of ``obj`` (and the summed lengths of nested containers)."""
    sizes: dict[str, int] = {}
    for name, value in sorted(vars(obj).items()):
        if isinstance(value, dict | set | frozenset | list):
            sizes[f"{prefix}.{name}"] = len(value)
            if isinstance(value, dict):
                inner = [v for v in value.values() if isinstance(v, dict | set | frozenset | list)]
                if inner:
                    sizes[f"{prefix}.{name}[*]"] = sum(len(v) for v in inner)
    return sizes


def source_sizes(url: str) -> dict[str, int]:
    """Every live ``Informer`` of this run and the source's ``PodUnion`` (found through the GC: the source
    keeps them to itself)."""
    sizes = {"informers": 0}
    for obj in gc.get_objects():
        if isinstance(obj, Informer) and str(obj.client.base_url).startswith(url):
            sizes["informers"] += 1
            for name, n in (("objects", len(obj.objects)), ("_bad", len(obj._bad))):
                key = f"informer[{obj.resource.kind}].{name}"
                sizes[key] = sizes.get(key, 0) + n
        elif isinstance(obj, PodUnion):
            sizes.update(container_sizes("pod_union", obj))
    return sizes


def state_sizes(a: agent.Agent, io: maps.FakeMaps, url: str) -> dict[str, int]:
    assert a.programming.writer is not None
    sizes = source_sizes(url)
    sizes.update(container_sizes("store", a.store))
    sizes.update(container_sizes("writer", a.programming.writer))
    sizes.update(container_sizes("owners", a.owners))
    for name in ("pods_by_uid", "_uid_of", "_conflicts", "_policy_status"):
        sizes[f"agent.{name}"] = len(getattr(a.ingest, name))
    sizes.update({f"maps[{name}]": len(data) for name, data in sorted(io.data.items())})
    sizes["asyncio tasks"] = len(asyncio.all_tasks())
    return sizes


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# Allocations made by tracemalloc itself (snapshots) and by this file (the bench's bookkeeping) do not count:
# the innermost frame decides, as ``tracemalloc.Filter(False, file)`` would (which is far slower).
EXCLUDED = frozenset({tracemalloc.__file__, __file__})


def live_snapshot() -> tracemalloc.Snapshot:
    """A snapshot without the ``EXCLUDED`` files' allocations."""
    snapshot = tracemalloc.take_snapshot()
    kept = [t for t in _raw(snapshot) if not t[2] or t[2][0][0] not in EXCLUDED]
    return tracemalloc.Snapshot(kept, snapshot.traceback_limit)


def _raw(snapshot: tracemalloc.Snapshot) -> list[tuple[int, int, tuple[tuple[str, int], ...], int]]:
    """The snapshot's raw traces: (domain, size, frames most recent first, total frames)."""
    raw: list[tuple[int, int, tuple[tuple[str, int], ...], int]] = vars(snapshot.traces)["_traces"]
    return raw


@dataclass
class Sample:
    seconds: float
    changes: int  # object changes the agent ingested since its initial state
    server_changes: int
    live_bytes: int  # tracemalloc, after gc.collect(), less EXCLUDED
    traced_bytes: int  # tracemalloc's total (includes the bench's bookkeeping)
    tracemalloc_bytes: int  # tracemalloc's own tables
    rss_bytes: int
    gc_objects: int
    sizes: dict[str, int]


@dataclass
class Run:
    args: argparse.Namespace
    url: str
    counters: Any
    paused: Event
    samples: list[Sample] = field(default_factory=list)
    first: tracemalloc.Snapshot | None = None
    last: tracemalloc.Snapshot | None = None
    updates: int = 0
    initial_objects: int = 0


async def measure(run: Run) -> None:
    args = run.args
    nowhere = Path("/nonexistent")
    cfg = agent.AgentConfig(
        manifests=None,
        model=ModelConfig(NODE),
        datapath=loader.DatapathConfig(nowhere / "balancing.o", nowhere / "bpffs", nowhere / "cgroup"),
        resync_interval=args.full_sync,
        healthcheck_host="127.0.0.1",
        metrics_addr=None,
    )
    a = agent.Agent(cfg)
    if hasattr(a.owners, "linger"):  # removed frontends' owners are kept that long: let it show in the run
        a.owners.linger = args.owner_linger
    io = QuietMaps()
    a.programming.writer = writer.MapWriter(io, a.programming.pod_cgroups)
    timing = Timing(resync=args.resync, watch_timeout=60, read_slack=5.0, backoff_base=0.05, backoff_cap=0.5)
    source = kube.KubeSource(NODE, api_base_url=run.url, timing=timing)
    feed = Feed(run.counters)
    updates = feed.follow(source)
    first = await anext(updates)
    run.initial_objects = len(first.upserts)
    feed.changes = 0
    a.take(first, whole=True)  # as Agent.follow_source: the initial state, one full sync, then follow
    await a.programming.full_sync()
    gcpause.freeze_long_lived()  # as Agent.follow_source
    del first
    lock = asyncio.Lock()  # held by the periodic full sync and by sampling
    tasks = [asyncio.create_task(a.follow_changes(updates)), asyncio.create_task(resync_loop(a, lock))]
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        await asyncio.sleep(args.warmup)
        end = time.monotonic() + args.duration
        while True:
            await asyncio.sleep(args.interval)
            async with lock:
                run.paused.set()
                try:
                    await quiesce(feed, a, tasks)
                    await feed.hold()  # a straggling update must not be written while the sample reads
                    await loop.run_in_executor(a.programming.io, lambda: None)  # the writer thread is idle
                    take_sample(run, a, io, feed, time.monotonic() - started)
                finally:
                    feed.release()
                    run.paused.clear()
            if time.monotonic() >= end:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await updates.aclose()
        await a.programming.close()
        run.updates = feed.updates


async def resync_loop(a: agent.Agent, lock: asyncio.Lock) -> None:
    """``Programming.resync_loop``, holding ``lock`` while it syncs so samples never see half a full sync."""
    count = 0
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(a.cfg.resync_interval)
        async with lock:
            count += 1
            if count % VERIFY_EVERY == 0 and a.programming.writer is not None:
                await loop.run_in_executor(a.programming.io, a.programming.writer.recover)
            await a.programming.full_sync()


async def quiesce(
    feed: Feed, a: agent.Agent, tasks: Sequence[asyncio.Task[None]], quiet: float = 0.5
) -> None:
    """Until no update came for ``quiet`` seconds (the paused churn is drained and written)."""
    await asyncio.sleep(0.05)
    async with asyncio.timeout(30):
        while time.monotonic() - feed.last < quiet:
            for task in tasks:
                if task.done():
                    task.result()  # a crashed follow/resync loop is an error, not a quiet period
            await asyncio.sleep(0.05)


def take_sample(run: Run, a: agent.Agent, io: maps.FakeMaps, feed: Feed, seconds: float) -> None:
    sizes = state_sizes(a, io, run.url)
    gc.collect()
    gc_objects = len(gc.get_objects())
    live = 0
    if tracemalloc.is_tracing():
        snapshot = live_snapshot()
        live = sum(t[1] for t in _raw(snapshot))
        if run.first is None:
            run.first = snapshot
        run.last = snapshot
    run.samples.append(
        Sample(
            seconds=round(seconds, 2),
            changes=feed.changes,
            server_changes=int(run.counters[CHANGES]),
            live_bytes=live,
            traced_bytes=tracemalloc.get_traced_memory()[0],
            tracemalloc_bytes=tracemalloc.get_tracemalloc_memory(),
            rss_bytes=rss_bytes(),
            gc_objects=gc_objects,
            sizes=sizes,
        )
    )
    if run.args.verbose:
        print(f"  {seconds:6.1f}s {feed.changes:8d} changes  live {live / 2**20:8.2f} MiB", file=sys.stderr)


# --- the report -------------------------------------------------------------------------------------------


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0 when xs do not vary)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


@dataclass
class Figure:
    first: float
    last: float
    min: float
    max: float
    per_1000_changes: float  # (last - first) per 1000 changes
    slope_per_1000_changes: float  # linear fit over the second half
    verdict: str  # flat | GROWS, or info: shown, not judged


def figure(xs: Sequence[int], ys: Sequence[float], tolerance: float | None) -> Figure:
    """A series' figures; "GROWS" when the second half's trend, over the whole run, exceeds ``tolerance``
    and the noise seen in the first half (its range), and the series ends above everything it reached in
    its first half (``None``: not judged)."""
    span = max(xs[-1] - xs[0], 1)
    half = len(xs) // 2
    fit = slope(xs[half:], ys[half:])
    early = ys[: max(half, 1)]
    noise = max(early) - min(early)
    grows = tolerance is not None and fit * span > max(tolerance, noise) and ys[-1] > max(early)
    return Figure(
        first=ys[0],
        last=ys[-1],
        min=min(ys),
        max=max(ys),
        per_1000_changes=round((ys[-1] - ys[0]) / span * 1000, 3),
        slope_per_1000_changes=round(fit * 1000, 3),
        verdict="info" if tolerance is None else "GROWS" if grows else "flat",
    )


# Caches bounded by time, not by what is in force: shown, not judged.
TIME_BOUNDED = {"owners._retired": "removed frontends' owners, kept for OwnerIndex.linger (--owner-linger)"}


def figures(samples: Sequence[Sample], args: argparse.Namespace) -> dict[str, Figure]:
    """Judged: live bytes (1% or 64 KiB over the run, or ``--tolerance``) and every cache size (10% or 5
    entries) but ``TIME_BOUNDED`` ones. RSS is judged only without tracemalloc (whose tables and snapshots
    it would include); the traced total (with the bench's bookkeeping) and the GC's object count (likewise)
    are shown only."""
    xs = [s.changes for s in samples]
    tracing = not args.rss_only
    first = samples[0]
    judged: dict[str, float | None] = {
        "live_bytes": max(64 << 10, 0.01 * first.live_bytes, args.tolerance) if tracing else None,
        "rss_bytes": None if tracing else max(4 << 20, 0.05 * first.rss_bytes, args.tolerance),
        "traced_bytes": None,
        "tracemalloc_bytes": None,
        "gc_objects": None,
    }
    out: dict[str, Figure] = {}
    for name, tolerance in judged.items():
        if tracing or name in ("rss_bytes", "gc_objects"):
            out[name] = figure(xs, [float(getattr(s, name)) for s in samples], tolerance)
    for name in sorted({k for s in samples for k in s.sizes}):
        ys = [float(s.sizes.get(name, 0)) for s in samples]
        out[name] = figure(xs, ys, None if name in TIME_BOUNDED else max(5.0, 0.1 * max(ys)))
    return out


def top_growth(run: Run, limit: int, group: str) -> list[dict[str, Any]]:
    """The allocation sites (grouped by ``traceback`` or ``filename``) that grew most from the first sample
    to the last. By traceback, a steady state shows turnover too: new versions of objects parsed where watch
    events are, replacing versions parsed where lists were; by file, that nets out."""
    if run.first is None or run.last is None or run.first is run.last:
        return []
    stats = [s for s in run.last.compare_to(run.first, group) if s.size_diff > 0][:limit]
    return [
        {
            "size_diff": s.size_diff,
            "count_diff": s.count_diff,
            "size": s.size,
            "traceback": [f"{f.filename}:{f.lineno}" for f in reversed(s.traceback)],
        }
        for s in stats
    ]


def report(run: Run, elapsed: float) -> dict[str, Any]:
    samples = run.samples
    figs = figures(samples, run.args)
    return {
        "config": {k: v for k, v in vars(run.args).items() if k not in ("output", "verbose")},
        "run": {
            "seconds": round(elapsed, 1),
            "initial_objects": run.initial_objects,
            "changes_ingested": samples[-1].changes,
            "changes_measured": samples[-1].changes - samples[0].changes,
            "changes_per_second": round(
                (samples[-1].changes - samples[0].changes)
                / max(samples[-1].seconds - samples[0].seconds, 1e-9),
                1,
            ),
            "api_changes": int(run.counters[CHANGES]),
            "updates": run.updates,
            "lists": int(run.counters[LISTS]),
            "watches": int(run.counters[WATCHES]),
            "compactions": int(run.counters[COMPACTIONS]),
            "samples": len(samples),
        },
        "verdict": "GROWS" if any(f.verdict == "GROWS" for f in figs.values()) else "flat",
        "figures": {k: asdict(v) for k, v in figs.items()},
        "top_growth": top_growth(run, 10, "traceback"),
        "top_growth_by_file": top_growth(run, 10, "filename"),
        "samples": [asdict(s) for s in samples],
    }


def _fmt(name: str, value: float) -> str:
    if name.endswith("_bytes"):
        return f"{value / 2**20:.2f}M"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def print_table(result: dict[str, Any]) -> None:
    r = result["run"]
    print(
        f"memory bench: {r['seconds']}s, {r['initial_objects']} objects at start, "
        f"{r['changes_measured']} changes measured ({r['changes_per_second']}/s; "
        f"{r['changes_ingested']} ingested, {r['api_changes']} made on the API server), "
        f"{r['lists']} lists, {r['watches']} watches, "
        f"{r['compactions']} compactions (410 relists), {r['samples']} samples"
    )
    head = f"{'figure':34} {'first':>9} {'last':>9} {'max':>9} {'Δ/1000 chg':>11} {'slope 2nd half':>15}"
    head += "  verdict"
    print(head)
    print("-" * len(head))
    for name, f in result["figures"].items():
        unit = 2**10 if name.endswith("_bytes") else 1
        suffix = "K" if unit > 1 else ""
        print(
            f"{name:34} {_fmt(name, f['first']):>9} {_fmt(name, f['last']):>9} {_fmt(name, f['max']):>9} "
            f"{f['per_1000_changes'] / unit:>10.2f}{suffix or ' '} "
            f"{f['slope_per_1000_changes'] / unit:>14.2f}{suffix or ' '}  {f['verdict']}"
        )
    growing = [name for name, f in result["figures"].items() if f["verdict"] == "GROWS"]
    print(f"verdict: {result['verdict']}{' (' + ', '.join(growing) + ')' if growing else ''}")
    print("(bytes in MiB; Δ and slope per 1000 changes ingested, in KiB for bytes; info: shown, not judged)")
    top = result["top_growth"][:5]
    if top:
        print("allocation sites that grew most, first sample → last (tracemalloc compare_to by traceback;")
        print("in a steady state partly turnover: see the net per file below):")
        for t in top:
            print(f"  {t['size_diff']:+,} B in {t['count_diff']:+,} blocks")
            for frame in t["traceback"][:6]:
                print(f"      {frame}")
        print("net growth per file:")
        for t in result["top_growth_by_file"][:5]:
            print(f"  {t['size_diff']:+,} B in {t['count_diff']:+,} blocks  {t['traceback'][0]}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds measured after the warm-up")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of churn before the first sample")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--services", type=int, default=200, help="Services kept in force")
    ap.add_argument("--rate", type=float, default=200.0, help="API changes per second, at most")
    ap.add_argument("--resync", type=float, default=5.0, help="informer resync (relist) period")
    ap.add_argument("--full-sync", type=float, default=3.0, help="the agent's full-sync period")
    ap.add_argument("--compact-every", type=float, default=6.0, help="seconds between compact+drop_watches")
    ap.add_argument(
        "--max-lag", type=int, default=300, help="API changes the churn may be ahead of the agent"
    )
    ap.add_argument("--owner-linger", type=float, default=1.0, help="OwnerIndex.linger (agent: 300 s)")
    ap.add_argument("--frames", type=int, default=1, help="tracemalloc traceback depth (deeper: slower)")
    ap.add_argument("--tolerance", type=float, default=0.0, help="bytes of growth tolerated (default: auto)")
    ap.add_argument("--rss-only", action="store_true", help="no tracemalloc: full speed, RSS judged")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", choices=("text", "json"), default="text")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a figure grows")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def run_bench(args: argparse.Namespace) -> Run:
    """Start the churning fake API server in a child process, then measure the agent side here."""
    ctx = multiprocessing.get_context("fork")  # before any thread or event loop exists here
    here, there = ctx.Pipe()
    stop, paused = ctx.Event(), ctx.Event()
    counters = ctx.Array("q", 5)
    churn = ChurnConfig(args.services, args.rate, args.seed, args.compact_every, args.max_lag)
    child = ctx.Process(target=serve, args=(churn, there, counters, stop, paused), daemon=True)
    child.start()
    try:
        if not here.poll(60):
            raise RuntimeError("the fake API server did not start")
        run = Run(args, str(here.recv()), counters, paused)
        if not args.rss_only:
            tracemalloc.start(args.frames)
        asyncio.run(measure(run))
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.terminate()
            child.join()
    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    started = time.monotonic()
    run = run_bench(args)
    result = report(run, time.monotonic() - started)
    tracemalloc.stop()
    out = ROOT / "build/bench/memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"(written to {out.relative_to(ROOT)})")
    return 1 if args.strict and result["verdict"] == "GROWS" else 0


if __name__ == "__main__":
    sys.exit(main())
