"""KubeSource against a small fake API server speaking list+watch (JSON lines) over plain HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from balancing.errors import KubeObjectError, ObjectError, SourceError
from balancing.model.objects import Service
from balancing.sources.kube import KubeSource, Timing
from balancing.sources.update import SourceUpdate
from balancing_testkit.fakeapi import FakeApi, serving

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
POLICY: dict[str, Any] = {
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
    async with serving() as served:
        yield served


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


# --- the pods BalancingPolicies select anywhere ----------------------------------------------------------

BALANCING = "/apis/balancing.elf.io/v1beta1/balancingpolicies"


def labelled_pod(name: str, node: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    meta = {"name": name, "namespace": namespace, "labels": labels}
    return {"metadata": meta, "spec": {"nodeName": node}}


def selecting(name: str, selector: dict[str, Any], *, enabled: bool = True) -> dict[str, Any]:
    """A BalancingPolicy whose serviceEndpoint picks pods by ``selector``."""
    spec: dict[str, Any] = copy.deepcopy(POLICY["spec"])
    spec["backend"]["serviceEndpoint"]["endpointSelector"] = selector
    spec["enabled"] = enabled
    return {"metadata": {"name": name}, "spec": spec}


async def gathered(
    updates: AsyncIterator[SourceUpdate], done: Callable[[SourceUpdate], bool]
) -> SourceUpdate:
    """Updates merged in arrival order until ``done`` holds for the merge (changes may arrive coalesced)."""
    merged_errors: list[ObjectError] = []
    merged = SourceUpdate(errors=merged_errors)
    while not done(merged):
        update = await next_update(updates)
        merged.upserts.extend(update.upserts)
        merged.deletes.extend(update.deletes)
        merged_errors.extend(update.errors)
    return merged


def pod_names(update: SourceUpdate) -> set[str]:
    return {o.metadata.name for o in update.upserts if o.kind == "Pod"}


def pod_watches(fake: FakeApi) -> list[tuple[str, dict[str, str]]]:
    return [(path, p) for path, p in fake.requests if "pods" in path and p.get("watch")]


@pytest.mark.asyncio
async def test_pods_a_policy_selects_on_other_nodes_are_in_the_initial_state(
    api: tuple[FakeApi, str],
) -> None:
    fake, url = api
    fake.put(PODS, labelled_pod("web-here", "node-1", app="web"))
    fake.put(PODS, labelled_pod("web-there", "node-2", app="web"))
    fake.put(PODS, labelled_pod("db-there", "node-2", app="db"))
    fake.put(BALANCING, selecting("p", {"matchLabels": {"app": "web"}}))
    async with following(url) as updates:
        first = await next_update(updates)
        assert pod_names(first) == {"web-here", "web-there"}, "each pod once, though two watches see web-here"
        selector_lists = [
            p["labelSelector"]
            for path, p in fake.requests
            if path == PODS and "labelSelector" in p and "watch" not in p
        ]
        assert selector_lists == ["app=web"]
        await no_update(updates, fake)


@pytest.mark.asyncio
async def test_a_new_policy_brings_its_pods_and_its_deletion_takes_them_away(
    api: tuple[FakeApi, str],
) -> None:
    fake, url = api
    fake.put(PODS, labelled_pod("web-here", "node-1", app="web"))
    fake.put(PODS, labelled_pod("web-there", "node-2", app="web"))
    async with following(url) as updates:
        assert pod_names(await next_update(updates)) == {"web-here"}
        await watching(fake, BALANCING)
        fake.put(BALANCING, selecting("p", {"matchLabels": {"app": "web"}}))
        added = await gathered(updates, lambda u: len(u.upserts) == 2)
        assert names(added) == {("BalancingPolicy", "p"), ("Pod", "web-there")}
        await watching(fake, PODS, 2)
        fake.put(PODS, labelled_pod("web-later", "node-3", app="web"))
        assert pod_names(await next_update(updates)) == {"web-later"}
        fake.delete(PODS, "default", "web-there")
        assert (await next_update(updates)).deletes == [("Pod", "default", "web-there")]
        fake.delete(BALANCING, "", "p")
        gone = await gathered(updates, lambda u: len(u.deletes) == 2)
        assert sorted(gone.deletes) == [("BalancingPolicy", "", "p"), ("Pod", "default", "web-later")], (
            "this node's pod stays: its own watch holds it"
        )
        await no_update(updates, fake)


@pytest.mark.asyncio
async def test_a_changed_selector_lists_the_new_pods_before_dropping_the_old(
    api: tuple[FakeApi, str],
) -> None:
    fake, url = api
    fake.put(PODS, labelled_pod("blue", "node-2", app="web", colour="blue"))
    fake.put(PODS, labelled_pod("green", "node-2", app="web", colour="green"))
    fake.put(BALANCING, selecting("p", {"matchLabels": {"colour": "blue"}}))
    async with following(url) as updates:
        assert pod_names(await next_update(updates)) == {"blue"}
        await watching(fake, BALANCING)
        fake.put(BALANCING, selecting("p", {"matchLabels": {"colour": "green"}}))
        seen = {"blue"}  # the pods the consumer holds, applying each update as the agent does
        while seen != {"green"}:
            update = await next_update(updates)
            seen -= {name for kind, _, name in update.deletes if kind == "Pod"}
            seen |= pod_names(update)
            assert seen, "never a moment without the policy's pods"


@pytest.mark.asyncio
async def test_equal_selectors_share_one_watch_and_disabled_policies_need_none(
    api: tuple[FakeApi, str],
) -> None:
    fake, url = api
    fake.put(PODS, labelled_pod("web", "node-2", app="web"))
    fake.put(PODS, labelled_pod("off", "node-2", app="off"))
    fake.put(BALANCING, selecting("a", {"matchLabels": {"app": "web"}}))
    fake.put(
        BALANCING, selecting("b", {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]})
    )
    fake.put(BALANCING, selecting("c", {"matchLabels": {"app": "web"}}))
    fake.put(BALANCING, selecting("d", {"matchLabels": {"app": "off"}}, enabled=False))
    async with following(url) as updates:
        assert pod_names(await next_update(updates)) == {"web"}
        await watching(fake, PODS, 3)  # this node's, app=web, app in (web)
        selectors = sorted(p.get("labelSelector", "") for _, p in pod_watches(fake))
        assert selectors == ["", "app in (web)", "app=web"]
        fake.delete(BALANCING, "", "a")  # c still needs app=web
        assert (await next_update(updates)).deletes == [("BalancingPolicy", "", "a")]
        await no_update(updates, fake)


@pytest.mark.asyncio
async def test_a_namespace_in_the_selector_narrows_the_watch_to_it(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    fake.put(PODS, labelled_pod("dns", "node-2", namespace="kube-system", app="dns"))
    fake.put(PODS, labelled_pod("dns", "node-2", namespace="default", app="dns"))
    selector = {"matchLabels": {"io.kubernetes.pod.namespace": "kube-system", "app": "dns"}}
    fake.put(BALANCING, selecting("p", selector))
    async with following(url) as updates:
        first = await next_update(updates)
        assert {(o.metadata.namespace, o.metadata.name) for o in first.upserts if o.kind == "Pod"} == {
            ("kube-system", "dns")
        }
        assert [
            p["labelSelector"] for path, p in fake.requests if path == "/api/v1/namespaces/kube-system/pods"
        ]


@pytest.mark.asyncio
async def test_relist_of_a_selector_watch_after_gone_emits_only_the_difference(
    api: tuple[FakeApi, str],
) -> None:
    fake, url = api
    fake.put(PODS, labelled_pod("a", "node-2", app="web"))
    fake.put(PODS, labelled_pod("b", "node-2", app="web"))
    fake.put(BALANCING, selecting("p", {"matchLabels": {"app": "web"}}))
    async with following(url) as updates:
        assert pod_names(await next_update(updates)) == {"a", "b"}
        await watching(fake, PODS, 2)
        fake.drop_watches()
        fake.delete(PODS, "default", "a", notify=False)
        fake.put(PODS, labelled_pod("c", "node-2", app="web"), notify=False)
        fake.compact()
        seen = SourceUpdate()
        while len(seen.upserts) + len(seen.deletes) < 2:  # one update per collection that changed
            update = await next_update(updates)
            seen.upserts.extend(update.upserts)
            seen.deletes.extend(update.deletes)
        assert pod_names(seen) == {"c"} and seen.deletes == [("Pod", "default", "a")]


@pytest.mark.asyncio
async def test_pending_changes_coalesce_per_object() -> None:
    """A busy consumer gets the latest version of each changed object once, never a backlog of changes."""
    from balancing.model.objects import parse_object
    from balancing.sources.kube import Pending

    def svc(name: str, ip: str) -> Any:
        return parse_object({"apiVersion": "v1", "kind": "Service", **service(name, ip)})

    pending = Pending(max_errors=2)
    for i in range(100):
        pending.add(SourceUpdate([svc("web", f"10.0.0.{i + 1}")]))
    pending.add(SourceUpdate([svc("gone", "10.0.1.1")]))
    pending.add(SourceUpdate(deletes=[("Service", "default", "gone"), ("Service", "default", "old")]))
    pending.add(SourceUpdate(deletes=[("Service", "default", "back")]))
    pending.add(SourceUpdate([svc("back", "10.0.2.1")]))
    pending.add(
        SourceUpdate(errors=[KubeObjectError(f"Service default/bad{i}", "spec", "x") for i in range(3)])
    )
    assert len(pending) == 6
    update = await asyncio.wait_for(pending.take(), 1)
    assert all(isinstance(o, Service) for o in update.upserts)
    assert {o.metadata.name: o.spec.cluster_ip for o in update.upserts if isinstance(o, Service)} == {
        "web": "10.0.0.100",
        "back": "10.0.2.1",
    }
    assert sorted(update.deletes) == [("Service", "default", "gone"), ("Service", "default", "old")]
    assert [e.obj for e in update.errors] == ["Service default/bad1", "Service default/bad2"]
    assert len(pending) == 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pending.take(), 0.05)  # nothing new: it waits


@pytest.mark.asyncio
async def test_pending_drops_an_error_its_objects_newer_version_overtook() -> None:
    """A bad version's error and the fixed version can land in one update: the consumer must not see the
    error after the fix (it would mark a valid object invalid)."""
    from balancing.model.objects import parse_object
    from balancing.sources.kube import Pending

    fixed = parse_object({"apiVersion": "v1", "kind": "Service", **service("web")})
    error = KubeObjectError("Service default/web", "spec.ports[0].port", "too big")
    pending = Pending()
    pending.add(SourceUpdate(errors=[error]))
    pending.add(SourceUpdate([fixed]))
    update = await asyncio.wait_for(pending.take(), 1)
    assert update.upserts == [fixed] and update.errors == []
    pending.add(SourceUpdate([fixed]))
    pending.add(SourceUpdate(errors=[error]))  # broken again after the good version: both, in that order
    update = await asyncio.wait_for(pending.take(), 1)
    assert update.upserts == [fixed] and update.errors == [error]


@pytest.mark.asyncio
async def test_a_pod_query_the_server_keeps_failing_does_not_hold_back_the_initial_state(
    api: tuple[FakeApi, str],
) -> None:
    fake, url = api
    fake.put(SERVICES, service("web"))
    fake.put(PODS, labelled_pod("dns", "node-2", namespace="kube-system", app="dns"))
    fake.put(BALANCING, selecting("p", {"matchLabels": {"io.kubernetes.pod.namespace": "kube-system"}}))
    fake.failing.add("/api/v1/namespaces/kube-system/pods")
    timing = Timing(
        resync=3600, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1, pods_wait=0.3
    )
    async with following(url, timing) as updates:
        first = await next_update(updates)
        assert ("Service", "web") in names(first) and pod_names(first) == set(), "served without those pods"
        fake.failing.clear()
        assert pod_names(await next_update(updates)) == {"dns"}, "they follow once the server lists them"


@pytest.mark.asyncio
async def test_a_following_task_that_fails_is_started_again() -> None:
    import httpx2 as httpx

    from balancing.sources.kube import KubeConnection, _Run

    runs: list[int] = []
    again = asyncio.Event()

    async def work() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("a bug")
        again.set()
        await asyncio.sleep(3600)

    async with httpx.AsyncClient() as client:
        run = _Run(client, KubeConnection.plain("http://127.0.0.1:1"), FAST)
        run._spawn("x", work)
        await asyncio.wait_for(again.wait(), 3)
        await run.stop()
    assert len(runs) == 2


@pytest.mark.asyncio
async def test_lists_use_the_watch_cache_except_after_gone(api: tuple[FakeApi, str]) -> None:
    """As client-go's reflector: the first list may come from the watch cache (resourceVersion=0), a resync
    asks for nothing older than what was seen, and after a 410 the list is a quorum read."""
    fake, url = api
    fake.put(SERVICES, service("web"))
    timing = Timing(resync=0.3, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)
    async with following(url, timing) as updates:
        await next_update(updates)

        def lists() -> list[dict[str, str]]:
            return [p for path, p in fake.requests if path == SERVICES and not p.get("watch")]

        assert lists()[0] == {"resourceVersion": "0"}
        seen = fake.rv
        await no_update(updates, fake, wait=0.6)
        resync = lists()[1]
        assert resync["resourceVersionMatch"] == "NotOlderThan" and int(resync["resourceVersion"]) >= seen
    async with following(url) as updates:  # no resync now: the next list is the one after the 410
        await next_update(updates)
        await watching(fake, SERVICES)
        fake.drop_watches()
        fake.put(SERVICES, service("missed"), notify=False)
        fake.compact()
        assert names(await next_update(updates)) == {("Service", "missed")}
        assert lists()[-1] == {}, "the relist after a 410 is a quorum read"
