"""Nothing keyed by a deleted object outlives it: after churn, every cache returns to its baseline size.

Objects are created under names never used again (Services in fresh namespaces, EndpointSlices, Pods on this
node and elsewhere, Nodes, BalancingPolicies with an endpointSelector of their own, LocalRedirectPolicies,
malformed Services), then deleted: once while watched, once unseen behind a compaction, so the relist after
the 410 finds them gone. The informers (``Informer.objects``, ``_bad``), the pod merge, the model store,
the agent's pod indexes, the writer and its maps must then hold exactly what they held before. Structure
only: not timed, no bytes. Neighbours: ``bench/memory.py`` measures memory over a long run of the same
churn; ``test_kube_source.py`` covers the source's behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from balancing import agent
from balancing.datapath import loader, maps, writer
from balancing.model.config import ModelConfig
from balancing.model.objects import POLICY_API_VERSION
from balancing.sources.informer import Informer, Timing
from balancing.sources.kube import KubeSource
from balancing.sources.selected_pods import PodUnion
from balancing.sources.update import SourceUpdate
from balancing_testkit.fakeapi import FakeApi, serving

NODE = "node-1"
SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"
PODS = "/api/v1/pods"
BPS = f"/apis/{POLICY_API_VERSION}/balancingpolicies"
LRPS = f"/apis/{POLICY_API_VERSION}/localredirectpolicies"
FAST = Timing(resync=3600, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)
TCP = [{"port": "8080", "protocol": "TCP"}]
N = 8  # objects of each kind per round

Objects = list[tuple[str, str, str]]  # (path, namespace, name)
Queue = asyncio.Queue[SourceUpdate]


@pytest_asyncio.fixture
async def api() -> AsyncIterator[tuple[FakeApi, str]]:
    async with serving() as served:
        yield served


def put(fake: FakeApi, made: Objects, path: str, doc: dict[str, Any]) -> None:
    fake.put(path, doc)
    made.append((path, doc["metadata"].get("namespace", ""), doc["metadata"]["name"]))


def service(namespace: str, name: str, ip: str, selector: dict[str, str] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    if selector:
        spec["selector"] = selector
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"}, "spec": spec}


def pod(namespace: str, name: str, node: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def node(name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def populate(fake: FakeApi, tag: str, octet: int) -> Objects:
    """N of everything, under names unique to ``tag``; returns what it made."""
    made: Objects = []
    for i in range(N):
        ns, name, owner = f"ns-{tag}-{i}", f"svc-{tag}-{i}", f"bp-{tag}-{i}"
        selector = {"app": name} if i % 2 else None  # half get endpoints from pods, half from a slice
        put(fake, made, SERVICES, service(ns, name, f"10.96.{octet}.{i + 1}", selector))
        if selector is None:
            endpoints = [{"addresses": [f"10.128.{octet}.{i + 1}"], "conditions": {"ready": True}}]
            labels = {"kubernetes.io/service-name": name}
            slice_doc = {
                "metadata": {"name": f"{name}-abc", "namespace": ns, "labels": labels},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": endpoints,
            }
            put(fake, made, SLICES, slice_doc)
        labels = {"app": name, "owner": owner}
        put(fake, made, PODS, pod(ns, f"here-{tag}-{i}", NODE, f"10.244.{octet}.{i + 1}", labels))
        put(fake, made, PODS, pod(ns, f"there-{tag}-{i}", "node-2", f"10.245.{octet}.{i + 1}", labels))
        put(fake, made, NODES, node(f"node-{tag}-{i}", f"192.168.{octet}.{i + 1}"))
        bp = {
            "metadata": {"name": owner},
            "spec": {
                "frontend": {"serviceMatcher": {"serviceName": name, "namespace": ns}},
                "backend": {
                    "serviceEndpoint": {"endpointSelector": {"matchLabels": {"owner": owner}}, "toPorts": TCP}
                },
            },
        }
        put(fake, made, BPS, bp)
        lrp = {
            "metadata": {"name": f"lrp-{tag}-{i}"},
            "spec": {
                "frontend": {"addressMatcher": {"ip": f"10.250.{octet}.{i + 1}", "toPorts": TCP}},
                "backend": {"endpointSelector": {"matchLabels": {"app": name}}, "toPorts": TCP},
            },
        }
        put(fake, made, LRPS, lrp)
        bad = {"metadata": {"name": f"bad-{tag}-{i}", "namespace": ns}, "spec": {"clusterIP": "not-an-ip"}}
        put(fake, made, SERVICES, bad)
    return made


def container_sizes(prefix: str, obj: object) -> dict[str, int]:
    """``len`` of every dict/set/list attribute (and the summed lengths of containers nested in dicts)."""
    sizes: dict[str, int] = {}
    for name, value in vars(obj).items():
        if isinstance(value, dict | set | frozenset | list):
            sizes[f"{prefix}.{name}"] = len(value)
            if isinstance(value, dict):
                inner = [v for v in value.values() if isinstance(v, dict | set | frozenset | list)]
                sizes[f"{prefix}.{name}[*]"] = sum(len(v) for v in inner)
    return sizes


def sizes(a: agent.Agent, io: maps.FakeMaps, url: str) -> dict[str, int]:
    """Every cache's size; informers and pod merges are found through the GC (the source keeps them)."""
    assert a.programming.writer is not None
    gc.collect()
    found: dict[str, int] = {"informers": 0, "pod unions": 0}
    for obj in gc.get_objects():
        if isinstance(obj, Informer) and str(obj.client.base_url).startswith(url):
            found["informers"] += 1
            for name, n in (("objects", len(obj.objects)), ("_bad", len(obj._bad))):
                key = f"informer[{obj.resource.kind}].{name}"
                found[key] = found.get(key, 0) + n
        elif isinstance(obj, PodUnion):
            found["pod unions"] += 1
            found.update(container_sizes("pods", obj))
    found.update(container_sizes("store", a.store))
    found.update(container_sizes("writer", a.programming.writer))
    found.update({f"maps[{name}]": len(data) for name, data in io.data.items()})
    for name in ("pods_by_uid", "_uid_of", "_conflicts", "_policy_status"):
        found[f"agent.{name}"] = len(getattr(a.ingest, name))
    found["owners"] = len(a.owners._owners)
    return found


async def pump(updates: AsyncGenerator[SourceUpdate, None], into: Queue) -> None:
    """The source's updates into a queue (a timed-out wait on the generator itself would close it)."""
    async for update in updates:
        into.put_nowait(update)


async def ingest(a: agent.Agent, updates: Queue, until: Callable[[], bool]) -> None:
    """Apply updates as the agent does until nothing came for a moment and ``until()`` holds (or, when it
    never does, for a few seconds: the caller's assertion then shows what differs)."""
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        try:
            update = await asyncio.wait_for(updates.get(), 0.2)
        except TimeoutError:
            if until():
                return
            continue
        a.take(update)
        await a.programming.write(a.store.take_changes(), time.perf_counter())


@pytest.mark.asyncio
async def test_caches_return_to_their_baseline_after_churn(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    kept: Objects = []  # objects in force throughout
    put(fake, kept, NODES, node(NODE, "192.168.0.1"))
    put(fake, kept, SERVICES, service("default", "kept", "10.96.0.1", {"app": "kept"}))
    put(fake, kept, PODS, pod("default", "kept", NODE, "10.244.0.1", {"app": "kept", "owner": "bp-kept"}))
    bp = {
        "metadata": {"name": "bp-kept"},
        "spec": {
            "frontend": {"serviceMatcher": {"serviceName": "kept", "namespace": "default"}},
            "backend": {
                "serviceEndpoint": {"endpointSelector": {"matchLabels": {"owner": "bp-kept"}}, "toPorts": TCP}
            },
        },
    }
    put(fake, kept, BPS, bp)
    nowhere = Path("/nonexistent")
    cfg = agent.AgentConfig(
        manifests=None,
        model=ModelConfig(NODE),
        datapath=loader.DatapathConfig(nowhere, nowhere, nowhere),
        metrics_addr=None,
    )
    a = agent.Agent(cfg)
    io = maps.FakeMaps()
    a.programming.writer = writer.MapWriter(io)
    source = KubeSource(NODE, api_base_url=url, timing=FAST)
    try:
        async with contextlib.aclosing(source.updates()) as stream:
            a.take(await anext(stream), whole=True)
            a.programming.writer.sync(a.store.desired())
            a.store.take_changes()
            updates: Queue = asyncio.Queue()
            pumping = asyncio.create_task(pump(stream, updates))
            try:
                await churn(fake, url, a, io, updates)
            finally:
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
    finally:
        a.programming.io.shutdown(wait=True)


async def churn(fake: FakeApi, url: str, a: agent.Agent, io: maps.FakeMaps, updates: Queue) -> None:
    services = a.store._services
    baseline = sizes(a, io, url)
    assert baseline["informers"] == 8  # seven collections and the kept policy's pods

    # Round 1: created, then deleted while watched.
    made = populate(fake, "w", 1)
    await ingest(a, updates, lambda: len(services) == 1 + N)
    assert sizes(a, io, url)["informers"] == 8 + N
    for path, namespace, name in made:
        fake.delete(path, namespace, name)
    await ingest(a, updates, lambda: sizes(a, io, url) == baseline)
    assert _differences(baseline, sizes(a, io, url)) == {}

    # Round 2: created, then deleted unseen: the watches resume into a 410 and relist.
    made = populate(fake, "r", 2)
    await ingest(a, updates, lambda: len(services) == 1 + N)
    for path, namespace, name in made:
        fake.delete(path, namespace, name, notify=False)
    fake.compact()
    fake.drop_watches()
    lists = _lists(fake)
    await ingest(a, updates, lambda: sizes(a, io, url) == baseline)
    assert _differences(baseline, sizes(a, io, url)) == {}
    assert _lists(fake) >= lists + 6  # the collections were relisted after the 410


def _lists(fake: FakeApi) -> int:
    return sum(1 for _, params in fake.requests if not params.get("watch"))


def _differences(before: dict[str, int], after: dict[str, int]) -> dict[str, tuple[int | None, int | None]]:
    return {
        k: (before.get(k), after.get(k))
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k)
    }
