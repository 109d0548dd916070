"""KubeSource against a small fake API server speaking list+watch (JSON lines) over plain HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from balancing.errors import SourceError
from balancing.sources.kube import KubeObjectError, KubeSource, Timing
from balancing.sources.manifests import SourceUpdate
from helpers.fakeapi import FakeApi

SERVICES = "/api/v1/services"
NODES = "/api/v1/nodes"
PODS = "/api/v1/pods"

Key = tuple[str, str]


def service(name: str, ip: str = "10.0.0.1", port: int = 80) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": port}]},
    }


def pod(name: str, node: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"}, "spec": {"nodeName": node}}


PORTS = [{"port": "80", "protocol": "TCP", "name": "http"}]
POLICY = {
    "metadata": {"name": "lrp"},
    "spec": {
        "frontend": {"serviceMatcher": {"serviceName": "web", "namespace": "default", "toPorts": PORTS}},
        "backend": {
            "serviceEndpoint": {
                "redirectMode": "hostPort",
                "endpointSelector": {"matchLabels": {"app": "web"}},
                "toPorts": PORTS,
            }
        },
    },
}

FAST = Timing(resync=3600, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)


@pytest_asyncio.fixture
async def api() -> AsyncIterator[tuple[FakeApi, str]]:
    fake = FakeApi()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(fake.tasks):
            task.cancel()
        await asyncio.gather(*fake.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def following(url: str, timing: Timing = FAST) -> AsyncIterator[AsyncGenerator[SourceUpdate, None]]:
    source = KubeSource("node-1", api_base_url=url, timing=timing)
    async with contextlib.aclosing(source.updates()) as updates:
        yield updates


async def next_update(updates: AsyncIterator[SourceUpdate], timeout: float = 5.0) -> SourceUpdate:
    return await asyncio.wait_for(anext(updates), timeout)


async def no_update(updates: AsyncIterator[SourceUpdate], api: FakeApi, wait: float = 0.3) -> None:
    """Nothing arrives within ``wait``: shown by a sentinel change being the next update."""
    await asyncio.sleep(wait)
    api.put(NODES, {"metadata": {"name": "sentinel"}})
    update = await next_update(updates)
    assert [o.metadata.name for o in update.upserts] == ["sentinel"] and not update.deletes


def names(update: SourceUpdate) -> set[tuple[str, str]]:
    return {(o.kind, o.metadata.name) for o in update.upserts}


async def watching(api: FakeApi, path: str, count: int = 1) -> None:
    """Until ``count`` watches of ``path`` are open."""
    async with asyncio.timeout(5):
        while len(api.watches.get(path, [])) < count:
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_initial_list_is_the_full_state(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.put(SERVICES, service("web"))
    fake.put(NODES, {"metadata": {"name": "node-1"}})
    fake.put(PODS, pod("here", "node-1"))
    fake.put(PODS, pod("elsewhere", "node-2"))
    fake.put(
        "/apis/balancing.elf.io/v1beta1/balancingpolicies",
        {"metadata": {"name": "p"}, "spec": {}},
    )
    async with following(url) as updates:
        first = await next_update(updates)
        assert {("Service", "web"), ("Node", "node-1"), ("Pod", "here")} <= names(first)
        assert ("Pod", "elsewhere") not in names(first)
        assert not first.deletes
        pod_lists = [p for path, p in fake.requests if path == PODS]
        assert pod_lists[0]["fieldSelector"] == "spec.nodeName=node-1"


@pytest.mark.asyncio
async def test_watch_added_modified_deleted_and_bookmarks(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.put(SERVICES, service("web"))
    async with following(url) as updates:
        await next_update(updates)
        await watching(fake, SERVICES)
        fake.put(SERVICES, service("api", "10.0.0.2"))
        assert names(await next_update(updates)) == {("Service", "api")}
        fake.put(SERVICES, service("api", "10.0.0.3"))
        (changed,) = (await next_update(updates)).upserts
        assert changed.kind == "Service" and changed.spec.cluster_ip == "10.0.0.3"
        fake.delete(SERVICES, "default", "web")
        assert (await next_update(updates)).deletes == [("Service", "default", "web")]
        fake.bookmark(SERVICES)
        bookmark_rv = fake.rv
        fake.drop_watches()
        await no_update(updates, fake)
        resumed = [p for path, p in fake.requests if path == SERVICES and p.get("watch")]
        assert resumed[-1]["resourceVersion"] == str(bookmark_rv)


@pytest.mark.asyncio
async def test_dropped_connection_resumes_from_resource_version(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.put(SERVICES, service("web"))
    async with following(url) as updates:
        await next_update(updates)
        await watching(fake, SERVICES)
        fake.drop_watches()
        fake.put(SERVICES, service("missed", "10.0.0.9"), notify=False)  # while disconnected
        assert names(await next_update(updates)) == {("Service", "missed")}
        lists = [p for path, p in fake.requests if path == SERVICES and not p.get("watch")]
        assert len(lists) == 1  # resumed, not relisted


@pytest.mark.asyncio
async def test_gone_relists_and_emits_only_the_difference(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    for name in ("keep", "change", "vanish"):
        fake.put(SERVICES, service(name))
    async with following(url) as updates:
        await next_update(updates)
        await watching(fake, SERVICES)
        fake.drop_watches()
        fake.put(SERVICES, service("change", "10.0.0.7"), notify=False)
        fake.put(SERVICES, service("new"), notify=False)
        fake.delete(SERVICES, "default", "vanish", notify=False)
        fake.compact()
        update = await next_update(updates)
        assert names(update) == {("Service", "change"), ("Service", "new")}
        assert update.deletes == [("Service", "default", "vanish")]
        assert not update.errors
        await no_update(updates, fake)


@pytest.mark.asyncio
async def test_slow_server_times_out_and_retries(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.stall_watches = True
    timing = Timing(resync=3600, watch_timeout=1, read_slack=0.3, backoff_base=0.02, backoff_cap=0.1)
    async with following(url, timing) as updates:
        await next_update(updates)
        await asyncio.sleep(1.5)  # watches hang past their read timeout
        fake.stall_watches = False
        fake.put(SERVICES, service("late"))
        assert names(await next_update(updates)) == {("Service", "late")}


@pytest.mark.asyncio
async def test_malformed_objects_skipped_with_error_rest_kept(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.put(SERVICES, service("good"))
    fake.put(SERVICES, service("bad", port=70000))
    async with following(url) as updates:
        first = await next_update(updates)
        assert ("Service", "good") in names(first) and ("Service", "bad") not in names(first)
        (error,) = first.errors
        assert isinstance(error, KubeObjectError)
        assert error.obj == "Service default/bad" and error.field == "spec.ports[0].port"
        assert "Service default/bad" in str(error) and "spec.ports[0].port" in str(error)
        await watching(fake, SERVICES)
        fake.put(SERVICES, service("good", port=70000))  # a good object turning bad keeps its last version
        update = await next_update(updates)
        assert not update.upserts and not update.deletes
        assert [e.obj for e in update.errors] == ["Service default/good"]
        fake.put(SERVICES, service("bad", port=81))
        assert names(await next_update(updates)) == {("Service", "bad")}


@pytest.mark.asyncio
async def test_resync_changes_nothing(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.put(SERVICES, service("web"))
    fake.put(SERVICES, service("bad", port=70000))
    timing = Timing(resync=0.2, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)
    async with following(url, timing) as updates:
        first = await next_update(updates)
        assert len(first.errors) == 1
        await no_update(updates, fake, wait=0.8)
        lists = [p for path, p in fake.requests if path == SERVICES and not p.get("watch")]
        assert len(lists) >= 3  # resynced (relisted) several times, reporting nothing new


@pytest.mark.asyncio
async def test_collection_not_served_counts_as_empty_until_it_appears(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    policies = "/apis/balancing.elf.io/v1beta1/balancingpolicies"
    fake.missing.add(policies)
    fake.put(SERVICES, service("web"))
    async with following(url) as updates:
        first = await next_update(updates)
        assert names(first) == {("Service", "web")}
        fake.put(policies, POLICY)
        fake.missing.discard(policies)
        update = await next_update(updates)
        assert names(update) == {("BalancingPolicy", "lrp")}


@pytest.mark.asyncio
async def test_kubeconfig_token_is_sent(api: tuple[FakeApi, str], tmp_path: Path) -> None:
    fake, url = api
    fake.put(NODES, {"metadata": {"name": "node-1"}})
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "s3cret"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    source = KubeSource("node-1", kubeconfig=path, timing=FAST)
    async with contextlib.aclosing(source.updates()) as updates:
        assert ("Node", "node-1") in names(await next_update(updates))
    assert fake.headers["authorization"] == "Bearer s3cret"


def test_kubeconfig_errors_are_source_errors(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("current-context: missing\ncontexts: []\n")
    with pytest.raises(SourceError, match="missing"):
        KubeSource("node-1", kubeconfig=path)
