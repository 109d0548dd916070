"""The agent's policy status entries (``agent.policy_status``) written through ``sources.kubestatus`` to a
fake API server doing (simplified) server-side apply: one write per change, debounced with the latest value
winning, a change of backends alone at most once per minor interval, agents' entries side by side, an entry
removed, out-of-cluster entries marked, 404 ignored (and still paced), failures retried, 401/403 given up
after a few attempts, nothing ever raised; the writer's JSON patches (a stale one made again); and the
agent's wiring of it (no kernel needed)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import pytest_asyncio

from balancing import agent
from balancing.agent import policy_status as agent_status
from balancing.datapath import loader
from balancing.model import config, objects, policies, store
from balancing.sources import kubestatus
from balancing.sources.kube import KubeConnection
from balancing.sources.update import SourceUpdate
from balancing_testkit.fakeapi import FakeApi, serving

API = "balancing.elf.io/v1beta1"
BP = f"/apis/{API}/balancingpolicies"
LRP = f"/apis/{API}/localredirectpolicies"
FAST = kubestatus.WriterTiming(delay=0.02, min_interval=0.15, backoff_base=0.02, backoff_cap=0.05)
Outcomes = list[tuple[kubestatus.Key, str]]
PORTS = [{"port": "80", "protocol": "TCP"}]


def bp(name: str = "vip") -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "BalancingPolicy",
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 1},
        "spec": {
            "frontend": {"addressMatcher": {"ip": "169.254.0.90", "toPorts": PORTS}},
            "backend": {"addressEndpoint": {"addresses": ["10.0.0.1"], "toPorts": PORTS}},
        },
    }


def status(backends: int, reason: str = "Ready", name: str = "vip") -> store.PolicyStatus:
    return store.PolicyStatus(
        "BalancingPolicy", name, backends > 0, reason, "", backends, 1 if backends else 0
    )


@pytest_asyncio.fixture
async def api() -> AsyncIterator[tuple[FakeApi, KubeConnection]]:
    async with serving() as (fake, url):
        yield fake, KubeConnection.plain(url)


@contextlib.asynccontextmanager
async def reporter(
    connection: KubeConnection,
    node: str = "node-1",
    outcomes: Outcomes | None = None,
    *,
    timing: kubestatus.WriterTiming = FAST,
    out_of_cluster: bool = False,
) -> AsyncIterator[agent_status.PolicyStatusReporter]:
    def record(key: kubestatus.Key, result: str) -> None:
        if outcomes is not None:
            outcomes.append((key, result))

    writer = kubestatus.StatusWriter(
        connection, agent_status.field_manager(node), timing=timing, on_result=record
    )
    async with writer:
        yield agent_status.PolicyStatusReporter(
            node, writer, now=lambda: "2026-02-02T00:00:00Z", out_of_cluster=out_of_cluster
        )


def watched(fake: FakeApi, path: str = BP) -> SourceUpdate:
    """What the agent's watch delivers: the objects as the API server has them now."""
    docs = [copy.deepcopy(o) for o in fake.objects.get(path, {}).values()]
    kind = "BalancingPolicy" if path == BP else "LocalRedirectPolicy"
    return SourceUpdate([objects.parse_object({**d, "apiVersion": API, "kind": kind}) for d in docs])


def nodes(fake: FakeApi, name: str = "vip") -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = fake.objects[BP][("", name)].get("status", {}).get("nodes", [])
    return result


async def until(check: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_one_write_per_change(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    fake.put(BP, bp())
    async with reporter(connection) as rep:
        rep.observe(watched(fake))
        rep.reconcile({("BalancingPolicy", "vip"): status(3)})
        rep.reconcile({("BalancingPolicy", "vip"): status(3)})  # the same again: nothing more
        await until(lambda: len(fake.patches()) == 1)
        call = fake.patches()[0]
        assert call.path == f"{BP}/vip/status"
        assert call.params == {"fieldManager": "balancing-agent-node-1", "force": "true"}
        assert call.headers["content-type"] == "application/apply-patch+yaml"
        entry = {"nodeName": "node-1", "backends": 3, "ready": True, "reason": "Ready",
                 "lastUpdateTime": "2026-02-02T00:00:00Z"}  # fmt: skip
        assert call.body == {"apiVersion": API, "kind": "BalancingPolicy", "metadata": {"name": "vip"},
                             "status": {"nodes": [entry]}}  # fmt: skip
        assert nodes(fake) == [entry]
        # The watch has not delivered the write yet: the old object must not trigger a second write.
        rep.reconcile({("BalancingPolicy", "vip"): status(3)})
        rep.observe(watched(fake))  # now it has
        rep.reconcile({("BalancingPolicy", "vip"): status(3)})
        await asyncio.sleep(FAST.min_interval + 0.05)
        assert len(fake.patches()) == 1
        # A change is written once more.
        rep.reconcile({("BalancingPolicy", "vip"): status(0, "NoBackends")})
        await until(lambda: len(fake.patches()) == 2)
        assert nodes(fake)[0] | {"lastUpdateTime": ""} == {
            "nodeName": "node-1", "backends": 0, "ready": False, "reason": "NoBackends", "lastUpdateTime": ""
        }  # fmt: skip


@pytest.mark.asyncio
async def test_debounced_latest_value_wins(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    fake.put(BP, bp())
    async with reporter(connection) as rep:
        rep.observe(watched(fake))
        for n in (1, 2, 3, 4):  # pods becoming ready one after another
            rep.reconcile({("BalancingPolicy", "vip"): status(n)})
        await until(lambda: len(fake.patches()) == 1)
        assert [e["backends"] for e in nodes(fake)] == [4]
        for n in (5, 6):
            rep.reconcile({("BalancingPolicy", "vip"): status(n)})
        await until(lambda: len(fake.patches()) == 2)
        first, second = fake.patches()
        assert second.at - first.at >= FAST.min_interval * 0.9  # at most one write per interval
        assert [e["backends"] for e in nodes(fake)] == [6]
        await asyncio.sleep(FAST.min_interval)
        assert len(fake.patches()) == 2


@pytest.mark.asyncio
async def test_two_agents_own_their_entries_and_one_is_removed(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    fake.put(BP, bp())
    key = ("BalancingPolicy", "vip")
    async with reporter(connection, "node-1") as one, reporter(connection, "node-2") as two:
        one.observe(watched(fake))
        two.observe(watched(fake))
        one.reconcile({key: status(2)})
        two.reconcile({key: status(0, "NoBackends")})
        await until(lambda: len(nodes(fake)) == 2)
        assert {e["nodeName"]: e["backends"] for e in nodes(fake)} == {"node-1": 2, "node-2": 0}
        assert fake.owners(BP, "vip") == {
            "balancing-agent-node-1": {("nodes", "node-1")},
            "balancing-agent-node-2": {("nodes", "node-2")},
        }
        one.observe(watched(fake))
        two.observe(watched(fake))
        # node-1's labels no longer match the nodeLabelSelector: its entry goes, node-2's stays.
        one.reconcile({key: status(0, "NodeNotSelected")})
        await until(lambda: len(nodes(fake)) == 1)
        assert [e["nodeName"] for e in nodes(fake)] == ["node-2"]
        assert "status" not in fake.patches()[-1].body  # owning nothing: no managedFields record left
        one.observe(watched(fake))
        one.reconcile({key: status(0, "NodeNotSelected")})
        await asyncio.sleep(FAST.min_interval + 0.05)
        assert len(fake.patches()) == 3  # nothing left to remove


@pytest.mark.asyncio
async def test_restart_with_nothing_changed_writes_nothing(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    doc = bp()
    doc["status"] = {"nodes": [{"nodeName": "node-1", "backends": 2, "ready": True, "reason": "Ready",
                                "lastUpdateTime": "2026-01-01T00:00:00Z"}]}  # fmt: skip
    fake.put(BP, doc)
    async with reporter(connection) as rep:
        rep.observe(watched(fake))
        rep.reconcile({("BalancingPolicy", "vip"): status(2)})
        await asyncio.sleep(FAST.delay + 0.1)
    assert fake.patches() == []


@pytest.mark.asyncio
async def test_entry_removed_by_someone_else_is_written_again(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    fake.put(BP, bp())
    key = ("BalancingPolicy", "vip")
    async with reporter(connection) as rep:
        rep.observe(watched(fake))
        rep.reconcile({key: status(2)})
        await until(lambda: len(fake.patches()) == 1)
        rep.observe(watched(fake))
        rep.reconcile({key: status(2)})
        wiped = copy.deepcopy(fake.objects[BP][("", "vip")])
        del wiped["status"]
        fake.put(BP, wiped)  # e.g. `kubectl replace --subresource status`
        rep.observe(watched(fake))
        rep.reconcile({key: status(2)})
        await until(lambda: len(fake.patches()) == 2)
        assert [e["backends"] for e in nodes(fake)] == [2]


@pytest.mark.asyncio
async def test_deleted_policy_is_not_an_error(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    fake.put(BP, bp())
    outcomes: Outcomes = []
    async with reporter(connection, outcomes=outcomes) as rep:
        rep.observe(watched(fake))
        fake.delete(BP, "", "vip")  # deleted before the agent's write
        rep.reconcile({("BalancingPolicy", "vip"): status(1)})
        await until(lambda: bool(outcomes))
        assert outcomes == [(("BalancingPolicy", "vip"), "gone")]
        await asyncio.sleep(FAST.backoff_cap + 0.05)
        assert len(fake.patches()) == 1  # not retried
        # A deletion the watch delivers drops a pending write.
        fake.put(BP, bp("other"))
        rep.observe(watched(fake))
        rep.reconcile({("BalancingPolicy", "other"): status(1)})
        rep.observe(SourceUpdate(deletes=[("BalancingPolicy", "", "other")]))
        await asyncio.sleep(FAST.delay + 0.1)
        assert len(fake.patches()) == 1


@pytest.mark.asyncio
async def test_failures_are_retried_with_backoff(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    fake.put(BP, bp())
    fake.fail_patches = [500, 429, 503]
    outcomes: Outcomes = []
    async with reporter(connection, outcomes=outcomes) as rep:
        rep.observe(watched(fake))
        rep.reconcile({("BalancingPolicy", "vip"): status(2)})
        await until(lambda: len(outcomes) == 4)
    assert [r for _, r in outcomes] == ["retry", "retry", "retry", "ok"]
    assert [e["backends"] for e in nodes(fake)] == [2]


@pytest.mark.asyncio
async def test_refused_value_is_dropped_until_it_changes(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    fake.put(BP, bp())
    fake.fail_patches = [422]
    outcomes: Outcomes = []
    async with reporter(connection, outcomes=outcomes) as rep:
        rep.observe(watched(fake))
        rep.reconcile({("BalancingPolicy", "vip"): status(2)})
        await until(lambda: bool(outcomes))
        rep.reconcile({("BalancingPolicy", "vip"): status(2)})
        await asyncio.sleep(FAST.min_interval + 0.05)
        assert [r for _, r in outcomes] == ["failed"]
        rep.reconcile({("BalancingPolicy", "vip"): status(3)})
        await until(lambda: len(outcomes) == 2)
    assert [r for _, r in outcomes] == ["failed", "ok"]


@pytest.mark.asyncio
async def test_unreachable_api_server_never_raises(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, _ = api
    fake.put(BP, bp())
    outcomes: Outcomes = []
    nowhere = KubeConnection.plain("http://127.0.0.1:9")  # discard port: connection refused
    async with reporter(nowhere, outcomes=outcomes) as rep:
        rep.observe(watched(fake))
        rep.reconcile({("BalancingPolicy", "vip"): status(2)})  # returns at once
        await until(lambda: len(outcomes) >= 2)
        assert {r for _, r in outcomes} == {"retry"}
        assert rep.writer.pending() == 1
    assert rep.writer.pending() == 0  # closed: dropped, nothing raised


@pytest.mark.asyncio
async def test_policies_not_applying_here_write_no_entry(api: tuple[FakeApi, KubeConnection]) -> None:
    fake, connection = api
    for name in ("disabled", "elsewhere", "outside"):
        fake.put(BP, bp(name))
    async with reporter(connection) as rep:
        rep.observe(watched(fake))
        rep.reconcile({
            ("BalancingPolicy", "disabled"): status(0, "Disabled", "disabled"),
            ("BalancingPolicy", "elsewhere"): status(0, "NodeNotSelected", "elsewhere"),
            ("BalancingPolicy", "outside"): status(0, "OutOfClusterDisabled", "outside"),
        })  # fmt: skip
        await asyncio.sleep(FAST.delay + 0.1)
    assert fake.patches() == []


@pytest.mark.asyncio
async def test_backends_only_changes_are_written_at_most_once_per_minor_interval(
    api: tuple[FakeApi, KubeConnection],
) -> None:
    """Every agent reports the same backends of a cluster-wide policy: a scale step must not make them all
    write every ``min_interval``; a change of ready or reason still goes out at once."""
    fake, connection = api
    fake.put(BP, bp())
    key = ("BalancingPolicy", "vip")
    timing = dataclasses.replace(FAST, minor_interval=0.6)
    async with reporter(connection, timing=timing) as rep:
        rep.observe(watched(fake))
        rep.reconcile({key: status(3)})  # a new entry: not minor
        await until(lambda: len(fake.patches()) == 1)
        rep.observe(watched(fake))
        for n in (4, 5, 6):  # a scale step, pod by pod
            rep.reconcile({key: status(n)})
            await asyncio.sleep(0.1)
        assert len(fake.patches()) == 1
        await until(lambda: len(fake.patches()) == 2)
        first, second = fake.patches()
        assert second.at - first.at >= timing.minor_interval * 0.9
        assert [e["backends"] for e in nodes(fake)] == [6]
        rep.observe(watched(fake))
        rep.reconcile({key: status(7)})  # minor: waits for the long interval ...
        await asyncio.sleep(0.05)
        rep.reconcile({key: status(0, "NoBackends")})  # ... until a real change overtakes it
        await until(lambda: len(fake.patches()) == 3)
        third = fake.patches()[2]
        # paced by min_interval (arrival times: the first request also paid the connection, hence the slack)
        assert timing.min_interval * 0.5 <= third.at - second.at < timing.minor_interval * 0.8
        assert (nodes(fake)[0]["backends"], nodes(fake)[0]["reason"]) == (0, "NoBackends")
        rep.observe(watched(fake))
        rep.reconcile({key: status(2)})  # back to ready: not minor either
        await until(lambda: len(fake.patches()) == 4)
        assert fake.patches()[3].at - third.at < timing.minor_interval * 0.8


def test_minor_change() -> None:
    assert agent_status.minor_change((3, True, "Ready", False), (2, True, "Ready", False))
    assert not agent_status.minor_change((0, False, "NoBackends", False), (2, True, "Ready", False))
    assert not agent_status.minor_change((2, True, "Ready", False), None)
    assert not agent_status.minor_change(None, (2, True, "Ready", False))
    assert not agent_status.minor_change((2, True, "Ready", True), (3, True, "Ready", False))


@pytest.mark.asyncio
async def test_out_of_cluster_agent_marks_its_entry(api: tuple[FakeApi, KubeConnection]) -> None:
    """A bare-metal host is no Node: its entry says so, or the controller would remove it."""
    fake, connection = api
    doc = bp()
    doc["status"] = {"nodes": [{"nodeName": "host-1", "backends": 2, "ready": True, "reason": "Ready",
                                "lastUpdateTime": "2026-01-01T00:00:00Z"}]}  # fmt: skip
    fake.put(BP, doc)  # written by an agent from before the mark existed
    key = ("BalancingPolicy", "vip")
    async with reporter(connection, "host-1", out_of_cluster=True) as rep:
        rep.observe(watched(fake))
        rep.reconcile({key: status(2)})
        await until(lambda: len(fake.patches()) == 1)
        assert nodes(fake)[0] == {"nodeName": "host-1", "backends": 2, "ready": True, "reason": "Ready",
                                  "lastUpdateTime": "2026-02-02T00:00:00Z", "outOfCluster": True}  # fmt: skip
        rep.observe(watched(fake))
        rep.reconcile({key: status(2)})
        await asyncio.sleep(FAST.min_interval + 0.05)
        assert len(fake.patches()) == 1


@pytest.mark.asyncio
async def test_gone_policy_keeps_its_pacing_until_forgotten(api: tuple[FakeApi, KubeConnection]) -> None:
    """After a 404 the watch may lag behind the deletion for a while: reconciles meanwhile (with changing
    values) must still be paced, at most one PATCH per min interval."""
    fake, connection = api
    fake.put(BP, bp())
    key = ("BalancingPolicy", "vip")
    outcomes: Outcomes = []
    async with reporter(connection, outcomes=outcomes) as rep:
        rep.observe(watched(fake))
        fake.delete(BP, "", "vip")  # the agent's watch has not delivered this
        started = asyncio.get_running_loop().time()
        for i in range(60):
            rep.reconcile({key: status(1 + i % 2, "Ready" if i % 3 else "Conflict")})
            await asyncio.sleep(0.01)
        await asyncio.sleep(FAST.delay)
        elapsed = asyncio.get_running_loop().time() - started
        assert 1 <= len(fake.patches()) <= elapsed / FAST.min_interval + 1
        assert {r for _, r in outcomes} == {"gone"}
        assert rep.writer.pending() <= 1
        rep.observe(SourceUpdate(deletes=[("BalancingPolicy", "", "vip")]))  # the watch catches up
        assert rep.writer.pending() == 0 and not rep.writer._slots


@pytest.mark.asyncio
async def test_denied_writes_fail_after_a_few_attempts(
    api: tuple[FakeApi, KubeConnection], caplog: pytest.LogCaptureFixture
) -> None:
    """401/403 (RBAC lacking patch on the status subresource) are not retried forever: after
    ``denied_attempts`` the value counts as failed, logged once per object; a new value tries again."""
    fake, connection = api
    fake.put(BP, bp())
    key = ("BalancingPolicy", "vip")
    outcomes: Outcomes = []
    caplog.set_level(logging.DEBUG, logger="balancing.sources.kubestatus")
    async with reporter(connection, outcomes=outcomes) as rep:
        rep.observe(watched(fake))
        fake.fail_patches = [403] * 3
        rep.reconcile({key: status(2)})
        await until(lambda: len(outcomes) == 3)
        assert [r for _, r in outcomes] == ["retry", "retry", "failed"]
        rep.reconcile({key: status(2)})  # the same value: not again
        await asyncio.sleep(FAST.min_interval + FAST.backoff_cap + 0.1)
        assert len(fake.patches()) == 3
        fake.fail_patches = [401] * 3
        rep.reconcile({key: status(3)})  # a new value tries again
        await until(lambda: len(outcomes) == 6)
        assert [r for _, r in outcomes][3:] == ["retry", "retry", "failed"]
        rep.reconcile({key: status(4)})
        await until(lambda: len(outcomes) == 7)
        assert outcomes[-1][1] == "ok"
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR  # once per object
    assert "HTTP 403" in errors[0].getMessage() and "balancingpolicies/status" in errors[0].getMessage()


@pytest.mark.asyncio
async def test_json_patch_that_no_longer_applies_is_made_again(api: tuple[FakeApi, KubeConnection]) -> None:
    """The controller's removals: a JSON patch whose ``test`` fails (the object changed) is ``stale``, and
    the same value is tried again on the next ``ensure``, from the newer object."""
    fake, connection = api
    doc = bp()
    doc["status"] = {"nodes": [{"nodeName": n, "backends": 1} for n in ("a", "gone", "b")]}
    fake.put(BP, doc)
    key = ("BalancingPolicy", "vip")
    outcomes: Outcomes = []

    def removal(index: int) -> Callable[[], list[dict[str, Any]]]:
        path = f"/status/nodes/{index}"
        return lambda: [
            {"op": "test", "path": f"{path}/nodeName", "value": "gone"},
            {"op": "remove", "path": path},
        ]

    writer = kubestatus.StatusWriter(
        connection,
        "balancing-controller",
        timing=FAST,
        on_result=lambda k, r: outcomes.append((k, r)),
        content_type=kubestatus.JSON_PATCH_CONTENT_TYPE,
    )
    async with writer:
        writer.ensure(key, ("a", "b"), ("gone", "a", "b"), removal(0))  # from an outdated version
        await until(lambda: bool(outcomes))
        assert outcomes == [(key, "stale")]
        call = fake.patches()[0]
        assert call.params == {"fieldManager": "balancing-controller"}  # no force: not an apply
        assert call.headers["content-type"] == "application/json-patch+json"
        assert [n["nodeName"] for n in nodes(fake)] == ["a", "gone", "b"]  # nothing removed
        writer.ensure(key, ("a", "b"), ("a", "gone", "b"), removal(1))  # the next version
        await until(lambda: len(outcomes) == 2)
        assert outcomes[-1] == (key, "ok")
        assert [n["nodeName"] for n in nodes(fake)] == ["a", "b"]
        assert fake.patches()[1].at - call.at >= FAST.min_interval * 0.9  # still paced


@pytest.mark.asyncio
async def test_fake_api_json_patch(api: tuple[FakeApi, KubeConnection]) -> None:
    """The fake's JSON patch: all or nothing, 422 on a failed test, force refused, and the removed entry
    leaves its manager's ownership."""
    fake, connection = api
    fake.put(BP, bp())
    async with reporter(connection, "node-1") as one, reporter(connection, "node-2") as two:
        for rep in (one, two):
            rep.observe(watched(fake))
            rep.reconcile({("BalancingPolicy", "vip"): status(1)})
        await until(lambda: len(nodes(fake)) == 2)
    path = kubestatus.status_path("BalancingPolicy", "vip")
    headers = {"Content-Type": kubestatus.JSON_PATCH_CONTENT_TYPE}

    async def patch(ops: Any, **params: str) -> int:
        async with httpx.AsyncClient(base_url=connection.base_url) as client:
            response = await client.patch(path, params=params, json=ops, headers=headers)
            return response.status_code

    remove_first = [
        {"op": "test", "path": "/status/nodes/0/nodeName", "value": "node-1"},
        {"op": "remove", "path": "/status/nodes/0"},
    ]
    assert await patch(remove_first, force="true") == 422
    assert await patch(remove_first[::-1]) == 422  # removed, then the test fails: all or nothing
    assert [n["nodeName"] for n in nodes(fake)] == ["node-1", "node-2"]  # a failed patch changes nothing
    assert await patch([{"op": "remove", "path": "/status/nodes/5"}]) == 422
    assert await patch(remove_first, fieldManager="x") == 200
    assert [n["nodeName"] for n in nodes(fake)] == ["node-2"]
    assert fake.owners(BP, "vip") == {"balancing-agent-node-2": {("nodes", "node-2")}}


def test_report_of_and_field_manager() -> None:
    assert agent_status.report_of(status(2)) == (2, True, "Ready")
    assert agent_status.report_of(status(0, "Conflict")) == (0, False, "Conflict")
    assert agent_status.report_of(status(0, "NodeNotSelected")) is None
    long = "n" * 253
    manager = agent_status.field_manager(long)
    assert len(manager) == 128 and manager.startswith("balancing-agent-nnn")
    assert manager != agent_status.field_manager("n" * 252)
    assert kubestatus.status_path("LocalRedirectPolicy", "a.b") == f"{LRP}/a.b/status"


def test_status_is_read_leniently() -> None:
    """A malformed status never makes a policy invalid; malformed entries are skipped."""
    doc = bp()
    doc["status"] = {
        "observedGeneration": "x",
        "conditions": [{"type": "Ready", "status": "True"}, {"status": "no type"}],
        "nodes": [{"nodeName": "a", "backends": 2}, {"backends": 1}, "junk"],
    }
    policy = objects.parse_object(doc)
    assert isinstance(policy, policies.BalancingPolicy)
    assert policy.status.observed_generation is None
    assert [c.type for c in policy.status.conditions] == ["Ready"]
    assert [(n.node_name, n.backends) for n in policy.status.nodes] == [("a", 2)]
    doc["status"] = "nonsense"
    policy = objects.parse_object(doc)
    assert isinstance(policy, policies.BalancingPolicy) and policy.status == policies.ObservedStatus()


def test_status_only_change_recomputes_nothing() -> None:
    """Status writes reach every agent as new policy versions: the model must not recompute for them."""
    model = store.ClusterStore("node-1")
    doc = bp()
    model.upsert(objects.parse_object(doc))
    before = model.policy_status()
    recomputed = model.policy_recomputed
    doc["metadata"]["resourceVersion"] = "7"
    doc["status"] = {"nodes": [{"nodeName": "node-2", "backends": 1}]}
    model.upsert(objects.parse_object(doc))
    assert model.policy_status() == before and model.policy_recomputed == recomputed
    doc["spec"]["enabled"] = False
    model.upsert(objects.parse_object(doc))
    assert model.policy_status()[("BalancingPolicy", "vip")].reason == "Disabled"


@pytest.mark.asyncio
async def test_agent_reports_once_the_datapath_holds_it(
    api: tuple[FakeApi, KubeConnection], tmp_path: Path
) -> None:
    """The agent's wiring (no kernel needed): the source's policies are observed, the entry is written when a
    sync succeeds, and the outcome is counted; ``--no-policy-status`` writes nothing."""
    fake, connection = api
    fake.put(BP, bp())
    datapath = loader.DatapathConfig(tmp_path / "none.o", tmp_path / "bpffs", tmp_path)
    kube = agent.KubeSourceConfig(api_server=connection.base_url)
    cfg = agent.AgentConfig(None, config.ModelConfig("node-1"), datapath, metrics_addr=None, kube=kube,
                            status_timing=FAST)  # fmt: skip
    node = agent.Agent(cfg)
    try:
        await node.open_status_reporter()
        assert node.reporter is not None
        node.take(watched(fake))
        await asyncio.sleep(FAST.delay + 0.05)
        assert fake.patches() == []  # not before the maps hold it
        node.report_status()  # what a successful sync calls
        await until(lambda: bool(nodes(fake)))
        assert nodes(fake)[0] | {"lastUpdateTime": ""} == {
            "nodeName": "node-1", "backends": 1, "ready": True, "reason": "Ready", "lastUpdateTime": ""
        }  # fmt: skip
        await until(
            lambda: b'balancing_policy_status_writes_total{result="ok"} 1.0' in node.metrics.exposition()
        )
    finally:
        if node.reporter is not None:
            await node.reporter.writer.close()
        node.programming.io.shutdown()
    quiet = agent.Agent(dataclasses.replace(cfg, policy_status=False))
    await quiet.open_status_reporter()
    assert quiet.reporter is None
    quiet.programming.io.shutdown()
    assert not node.reporter.out_of_cluster  # an in-cluster agent's entries are not marked
    outside = agent.Agent(
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, external_client=True))
    )
    await outside.open_status_reporter()
    assert outside.reporter is not None and outside.reporter.out_of_cluster  # --out-of-cluster: marked
    await outside.reporter.writer.close()
    outside.programming.io.shutdown()
