"""Watches against the real API server: restarts, 410 Gone after compaction, bookmarks.

What the real kube-apiserver does (v1.37, read from k8s.io/apiserver's cacher and checked here):

- Watches are served from the watch cache. A restarted API server rebuilds that cache from a list of etcd at
  the current revision, so a watch resumed from any older resourceVersion of that resource gets HTTP 200
  and one ``ERROR`` event with a Status ``410 Expired`` ("too old resource version: N (M)"). Anything
  written anywhere since the last event a client saw (the API server writes its own lease) makes its
  resourceVersion older: after a restart, practically every watch relists (once).
- Compacting etcd alone changes nothing for watches: the watch cache still holds the events, so a watch
  resumed from a compacted resourceVersion replays them (the fake API server answers 410 there). A list
  with ``resourceVersionMatch=Exact`` of a compacted version is a plain HTTP 410.
- Bookmarks go to a watch (with ``allowWatchBookmarks``) about 2 s before its ``timeoutSeconds`` ends and
  about once a minute, and only when the resource's cache is past the resourceVersion the watch started
  from: an idle collection gets none. They are not filtered by the watch's selectors, so a watch of this
  node's pods learns the resourceVersion of other nodes' pod changes from them.

The agents (``helpers.kubenodes``) watch with a 240 s timeout, so their first bookmark comes about a minute
after a watch starts; the bookmark case runs the informer in-process with a short ``Timing`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx2 as httpx
import pytest

from balancing.metrics.kubecounts import KubeSourceCollector
from balancing.model.objects import ref
from balancing.sources import informer
from balancing.sources.kube import KubeConnection
from balancing.sources.update import SourceUpdate
from helpers.controlplane import ControlPlane
from helpers.kubenodes import KubeNodes, key

LISTS = "balancing_kube_lists_total"
SERVICE_CHANGES = "balancing_sync_proxy_rules_service_changes_total"
UNCHANGED = 10


def _loops(kn: KubeNodes, ip: str, port: int) -> list[subprocess.Popen[bytes]]:
    """A TCP client loop from each node's client pod towards ``ip:port`` (until ``_finish``)."""
    argv: list[str | float] = ["loop", ip, port, "--proto", "tcp", "--interval", 0.01, "--timeout", 1]
    return [kn.topo.spawn_client(n.client, None, argv) for n in kn.nodes]


def _finish(kn: KubeNodes, loops: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    return [kn.topo.finish_client(p) for p in loops]


def _serve(kn: KubeNodes, name: str, pods: int = 2, timeout: float = 20) -> str:
    """Service ``name`` with pod-a1 and pod-b1 (or only pod-a1) behind it, programmed on both nodes within
    ``timeout`` seconds; its ClusterIP."""
    kn.create(kn.service(name))
    chosen = [kn.a.pods[0], kn.b.pods[0]][:pods]
    for pod in chosen:
        kn.run_pod(pod, {"app": name}, name=f"{name}-{pod.name}")
    ip = kn.cluster_ips(name)[0]
    kn.wait_frontends(key(ip, 80), backends=len(chosen), timeout=timeout)
    return ip


@pytest.mark.kernel
def test_agents_resume_after_an_api_server_restart_and_never_stop_translating(kn: KubeNodes) -> None:
    """The API server stopped (SIGTERM), down a second, started again: a client loop on each node keeps
    connecting through it without one failure, and both agents resume (a Service created afterwards is
    programmed), relisting at most once (after a 410)."""
    ip = _serve(kn, "web")
    gone = kn.metric(LISTS, resource="Service", reason="gone")
    loops = _loops(kn, ip, 80)
    kn.api.restart_apiserver(down=1.0)
    # a change made after the restart is programmed on both nodes: within the informers' backoff cap (30 s),
    # which the failed requests while the API server was down may have reached
    _serve(kn, "after", pods=1, timeout=30 + 20)
    for res in _finish(kn, loops):
        assert res["failed"] == 0 and res["ok"] > 50 and set(res["backends"]) == {"pod-a1", "pod-b1"}, res
    # The restarted API server's watch cache starts at etcd's current revision: a watch resuming from an
    # older resourceVersion gets 410 and relists once; one whose last bookmark was already that revision
    # resumes without. Never more than one relist.
    after = kn.metric(LISTS, resource="Service", reason="gone")
    assert all(g <= a <= g + 1 for g, a in zip(gone, after, strict=True)), (gone, after)


@pytest.mark.kernel
def test_410_after_compaction_and_restart_relists_only_the_differences(kn: KubeNodes) -> None:
    """The agents miss changes (stopped), etcd is compacted and the API server restarted: their watches
    resume from a resourceVersion the new watch cache no longer has, get 410, relist, and apply only what
    changed; a Service that did not change keeps translating throughout."""
    kept = _serve(kn, "kept")
    gone = _serve(kn, "gone", pods=1)
    unchanged = [kn.service(f"still-{i}") for i in range(UNCHANGED)]  # no pods: frontends that refuse
    kn.create(*unchanged)
    still = [key(kn.cluster_ips(f"still-{i}")[0], 80) for i in range(UNCHANGED)]
    kn.wait_frontends(*still, timeout=20)
    before = {
        (r, reason): kn.metric(LISTS, resource=r, reason=reason)
        for r in ("Service", "EndpointSlice")
        for reason in ("gone", "initial")
    }
    changes = kn.metric(SERVICE_CHANGES)
    logged = [len(a.stderr()) for a in kn.agents]
    loops = _loops(kn, kept, 80)
    with kn.agents_frozen():
        kn.kubectl("delete", "service", "gone")
        kn.create(kn.service("new"))
        kn.run_pod(kn.b.pods[0], {"app": "new"}, name="new-pod-b1")
        kn.wait_endpoints("new", bool, "the new Service's endpoint")
        kn.api.compact()
        kn.api.restart_apiserver()
    new = kn.cluster_ips("new")[0]
    kn.wait(lambda f: len(f.get(key(new, 80), [])) == 1 and key(gone, 80) not in f, "new in, gone out", 30)
    for res in _finish(kn, loops):
        assert res["failed"] == 0 and res["ok"] > 50 and set(res["backends"]) == {"pod-a1", "pod-b1"}, res
    for (resource, reason), counts in before.items():  # one relist after a 410, nothing else
        bump = 1 if reason == "gone" else 0
        assert kn.metric(LISTS, resource=resource, reason=reason) == [c + bump for c in counts], (
            resource,
            reason,
        )
    # A full replay would count every Service again (the unchanged ones, "kept", "kubernetes"); the relist
    # only the two differences (other tests' namespaces being deleted meanwhile could add a few).
    seen = [now - then for now, then in zip(kn.metric(SERVICE_CHANGES), changes, strict=True)]
    assert all(2 <= n < UNCHANGED for n in seen), seen
    for agent, start in zip(kn.agents, logged, strict=True):
        assert re.search(r"/api/v1/services: resourceVersion \d+ gone; relisting", agent.stderr()[start:])
        assert all(k in agent.frontends() for k in still)


# --- the informer in-process against the real API server (no kernel needed) ------------------------------


@contextlib.asynccontextmanager
async def _informer(
    cp: ControlPlane, resource: informer.Resource, timing: informer.Timing
) -> AsyncIterator[tuple[informer.Informer, list[SourceUpdate]]]:
    """An ``Informer`` over the admin connection (as the agent builds it), listed; ``run`` it to watch."""
    connection = KubeConnection.from_kubeconfig(cp.kubeconfig)
    async with httpx.AsyncClient(
        base_url=connection.base_url, verify=connection.verify, auth=connection.auth, timeout=30.0
    ) as client:
        inf = informer.Informer(client, resource, connection.headers, timing)
        await inf.list_until_done()
        yield inf, []


async def _watching(inf: informer.Informer, updates: list[SourceUpdate]) -> asyncio.Task[None]:
    async def emit(update: SourceUpdate) -> None:
        updates.append(update)

    return asyncio.create_task(inf.run(emit))


async def _until(ok: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not ok():
            await asyncio.sleep(0.05)


def _names(refs: Iterable[tuple[str, str, str]]) -> set[str]:
    return {name for _, _, name in refs}


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _kubectl(cp: ControlPlane, namespace: str, *args: str) -> None:
    await asyncio.to_thread(cp.kubectl, "-n", namespace, *args)


async def _service(cp: ControlPlane, namespace: str, name: str) -> None:
    await _kubectl(cp, namespace, "create", "service", "clusterip", name, "--tcp=80:80")


@pytest.mark.asyncio
async def test_bookmarks_arrive_before_the_watch_timeout_and_carry_other_nodes_changes(
    kube: ControlPlane, namespace: str
) -> None:
    """A watch of one node's pods (the agent's ``spec.nodeName`` watch) with a 5 s timeout: a pod created on
    another node is filtered out, but the bookmark the API server sends about 2 s before the timeout carries
    its resourceVersion, so the next watch resumes past it; the agent's metric counts the bookmark."""
    node = f"bm-{namespace}"
    pods = informer.Resource(f"/api/v1/namespaces/{namespace}/pods", "v1", "Pod", f"spec.nodeName={node}")
    timing = informer.Timing(resync=3600, watch_timeout=5, backoff_base=0.1, backoff_cap=1)
    elsewhere = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "elsewhere", "namespace": namespace},
        "spec": {"nodeName": "another-node", "containers": [{"name": "main", "image": "x.invalid/y"}]},
    }
    async with _informer(kube, pods, timing) as (inf, updates):
        watch = await _watching(inf, updates)
        try:
            await asyncio.to_thread(kube.apply, [elsewhere])
            pod = await asyncio.to_thread(kube.get, "pod", "elsewhere", namespace)
            created = int(pod["metadata"]["resourceVersion"])
            await _until(lambda: int(inf.resource_version) >= created, "a bookmark past the pod", timeout=15)
        finally:
            await _stop(watch)
            await _kubectl(kube, namespace, "delete", "pod", "elsewhere", "--grace-period=0", "--force")
    assert not updates and set(inf.counts.events) == {("Pod", "BOOKMARK")}  # only bookmarks moved it
    collected = KubeSourceCollector(inf.counts.events, inf.counts.lists).collect()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in collected for s in m.samples}
    assert samples[("balancing_kube_watch_events_total", (("resource", "Pod"), ("type", "BOOKMARK")))] >= 1


@pytest.mark.asyncio
async def test_compaction_alone_is_no_410_the_watch_cache_replays(kube: ControlPlane, namespace: str) -> None:
    """A watch resumed from a resourceVersion etcd has compacted away is still served from the API server's
    watch cache: the missed events arrive, no 410, no relist (the fake API server answers 410 here)."""
    services = informer.Resource(f"/api/v1/namespaces/{namespace}/services", "v1", "Service")
    await _service(kube, namespace, "old")
    async with _informer(kube, services, informer.Timing(resync=3600, backoff_base=0.1)) as (inf, updates):
        listed_at = int(inf.resource_version)
        await _service(kube, namespace, "new")
        await _kubectl(kube, namespace, "delete", "service", "old")
        assert await asyncio.to_thread(kube.compact) > listed_at
        watch = await _watching(inf, updates)
        try:
            await _until(lambda: _names(inf.objects) == {"new"}, "the missed changes")
        finally:
            await _stop(watch)
    assert {k: v for k, v in inf.counts.lists.items() if v} == {("Service", "initial"): 1}
    assert inf.counts.events == {("Service", "ADDED"): 1, ("Service", "DELETED"): 1}


@pytest.mark.asyncio
async def test_a_410_after_a_restart_relists_and_emits_only_the_differences(
    kube: ControlPlane, namespace: str
) -> None:
    """What the restarted API server sends a watch from before the restart: HTTP 200 and one ERROR event
    (410 Expired); the informer then relists (a quorum read) and emits exactly what changed meanwhile."""
    services = informer.Resource(f"/api/v1/namespaces/{namespace}/services", "v1", "Service")
    for name in ("kept", "changed", "gone"):
        await _service(kube, namespace, name)
    async with _informer(kube, services, informer.Timing(resync=3600, backoff_base=0.1)) as (inf, updates):
        assert _names(inf.objects) == {"kept", "changed", "gone"}
        await _kubectl(kube, namespace, "delete", "service", "gone")
        await _service(kube, namespace, "new")
        await _kubectl(kube, namespace, "label", "service", "changed", "tier=web")
        await asyncio.to_thread(kube.compact)
        await asyncio.to_thread(kube.restart_apiserver)
        watch = await _watching(inf, updates)
        try:
            await _until(lambda: bool(updates), "the relist's update", timeout=30)
        finally:
            await _stop(watch)
    assert inf.counts.events == {("Service", "ERROR"): 1}  # a 200 with an ERROR event, not an HTTP 410
    assert inf.counts.lists[("Service", "gone")] == 1
    (update,) = updates
    assert sorted(ref(o)[2] for o in update.upserts) == ["changed", "new"]
    assert _names(update.deletes) == {"gone"}
    assert _names(inf.objects) == {"kept", "changed", "new"}
