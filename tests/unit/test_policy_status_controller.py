"""The controller's Ready condition (``controller.status``): the aggregation rules (no node counts in the
message), then written from the policy index to a fake API server doing (simplified) server-side apply,
next to the agents' entries; departed nodes' entries ignored and removed by JSON patch, out-of-cluster
hosts' kept; an invalid policy's deletion forgotten (the informer reports it)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2 as httpx
import pytest

from balancing.controller import status as ctl
from balancing.controller.policyindex import PolicyIndex
from balancing.model import objects, policies
from balancing.model.status import NodeReport
from balancing.sources import kubestatus
from balancing.sources.informer import Informer, Resource
from balancing.sources.kube import KubeConnection, KubeSource, Timing
from balancing.sources.update import SourceUpdate
from balancing_testkit.fakeapi import FakeApi, serving

API = "balancing.elf.io/v1beta1"
BP = f"/apis/{API}/balancingpolicies"
LRP = f"/apis/{API}/localredirectpolicies"
NODES = "/api/v1/nodes"
FAST = kubestatus.WriterTiming(delay=0.01, min_interval=0.1, backoff_base=0.02, backoff_cap=0.05)
SOURCE = Timing(resync=3600, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)
PORTS = [{"port": "80", "protocol": "TCP"}]


def bp(name: str = "vip", ip: str = "169.254.0.90", created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "BalancingPolicy",
        "metadata": {"name": name, "creationTimestamp": created, "generation": 2},
        "spec": {
            "frontend": {"addressMatcher": {"ip": ip, "toPorts": PORTS}},
            "backend": {"addressEndpoint": {"addresses": ["10.0.0.1"], "toPorts": PORTS}},
        },
    }


def lrp(name: str, created: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LocalRedirectPolicy",
        "metadata": {"name": name, "creationTimestamp": created, "generation": 1},
        "spec": {
            "frontend": {"serviceMatcher": {"serviceName": "kube-dns", "namespace": "kube-system"}},
            "backend": {"endpointSelector": {"matchLabels": {"k8s-app": "dns"}}, "toPorts": PORTS},
        },
    }


def entry(node: str, backends: int, reason: str = "") -> dict[str, Any]:
    reason = reason or ("Ready" if backends else "NoBackends")
    return {"nodeName": node, "backends": backends, "ready": backends > 0, "reason": reason}


def report(node: str, backends: int, reason: str = "") -> NodeReport:
    return NodeReport.model_validate(entry(node, backends, reason))


def parsed(doc: dict[str, Any]) -> policies.Policy:
    obj = objects.parse_object(doc)
    assert isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy)
    return obj


# --- the rules -------------------------------------------------------------------------------------------


def test_nodes_verdict() -> None:
    assert ctl.nodes_verdict([]) == ctl.Verdict("Unknown", "Pending", "no node has reported the policy yet")
    programmed = ctl.Verdict("True", "Programmed", "backends on at least one reporting node")
    assert ctl.nodes_verdict([report("a", 0), report("b", 3), report("c", 1)]) == programmed
    assert ctl.nodes_verdict([report("a", 0), report("b", 0)]) == ctl.Verdict(
        "False", "NoBackends", "no backends on any reporting node (NoBackends)"
    )
    same = [report("a", 0, "ServiceNotFound"), report("b", 0, "ServiceNotFound")]
    assert ctl.nodes_verdict(same).reason == "ServiceNotFound"
    mixed = ctl.nodes_verdict([report("a", 0, "Conflict"), report("b", 0)])
    assert (mixed.reason, mixed.message) == (
        "NoBackends",
        "no backends on any reporting node (Conflict, NoBackends)",
    )
    old_agent = NodeReport(node_name="a", backends=0)  # written before ready/reason existed
    assert ctl.nodes_verdict([old_agent]) == ctl.Verdict(
        "False", "NoBackends", "no backends on any reporting node (NoBackends)"
    )


def test_condition_message_does_not_count_nodes() -> None:
    """Nodes joining or leaving must not change the condition (each change would rewrite every policy)."""
    for reports in ([report("a", 2)], [report("a", 2), report("b", 0)], [report(n, 1) for n in "abcdefg"]):
        assert ctl.nodes_verdict(reports) == ctl.nodes_verdict([report("z", 5)])
    assert ctl.nodes_verdict([report("a", 0)]) == ctl.nodes_verdict([report(n, 0) for n in "abcdefg"])


def test_departed_entries_and_their_removal_patch() -> None:
    here, gone, host = report("node-1", 2), report("node-9", 3), report("host-1", 1)
    host = host.model_copy(update={"out_of_cluster": True})
    entries = [gone, here, host, report("node-8", 0)]
    assert ctl.departed(entries, None) == []  # Nodes not listed yet: nothing departs
    assert ctl.departed(entries, {"node-1"}) == [gone, entries[3]]  # never the out-of-cluster host
    assert ctl.prune_patch(entries, {"node-9", "node-8"}) == [
        {"op": "test", "path": "/status/nodes/3/nodeName", "value": "node-8"},
        {"op": "remove", "path": "/status/nodes/3"},
        {"op": "test", "path": "/status/nodes/0/nodeName", "value": "node-9"},
        {"op": "remove", "path": "/status/nodes/0"},
    ]
    policy = bp()
    policy["status"] = {"nodes": [entry("node-9", 3), entry("node-1", 0)]}
    # A departed node's last report does not make the policy Ready.
    assert ctl.verdict(parsed(policy), [], [], {"node-1"}).status == "False"
    assert ctl.verdict(parsed(policy), [], [], None).status == "True"  # until the Nodes are listed
    policy["status"]["nodes"].append({**entry("host-1", 1), "outOfCluster": True})
    assert ctl.verdict(parsed(policy), [], [], {"node-1"}).status == "True"


def test_verdict_order() -> None:
    older, newer = parsed(lrp("older", "2025-01-01T00:00:00Z")), parsed(lrp("newer", "2026-01-01T00:00:00Z"))
    assert ctl.verdict(None, ["spec.frontend: exactly one of"], []) == ctl.Verdict(
        "False", "Invalid", "spec.frontend: exactly one of"
    )
    conflict = ctl.verdict(newer, [], [older, newer])
    assert (conflict.status, conflict.reason) == ("False", "Conflict")
    assert "older LocalRedirectPolicy older" in conflict.message
    assert ctl.verdict(older, [], [older, newer]).reason == "Pending"  # the older one wins
    disabled = lrp("newer", "2026-01-01T00:00:00Z")
    disabled["spec"]["enabled"] = False
    assert ctl.verdict(parsed(disabled), [], [older]) == ctl.Verdict(
        "False", "Disabled", "spec.enabled is false"
    )


# --- against the API server ------------------------------------------------------------------------------


class Cluster:
    """A fake API server, the controller's policy index following it, and the status controller."""

    def __init__(self, fake: FakeApi, url: str, controller: ctl.StatusController) -> None:
        self.fake, self.url, self.controller = fake, url, controller

    def conditions(self, path: str, name: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (
            self.fake.objects[path][("", name)].get("status", {}).get("conditions", [])
        )
        return found

    def ready(self, path: str, name: str) -> dict[str, Any]:
        (condition,) = self.conditions(path, name)
        return condition

    def writes(self) -> list[Any]:
        return [c for c in self.fake.patches() if c.params["fieldManager"] == ctl.FIELD_MANAGER]

    def prunes(self) -> list[Any]:
        return [
            c for c in self.fake.patches() if c.headers["content-type"] == kubestatus.JSON_PATCH_CONTENT_TYPE
        ]

    def entries(self, name: str = "vip", path: str = BP) -> list[str]:
        return [n["nodeName"] for n in self.fake.objects[path][("", name)].get("status", {}).get("nodes", [])]

    async def agent_apply(
        self, node: str, backends: int, name: str = "vip", *, reason: str = "", outside: bool = False
    ) -> None:
        """What an agent writes: its entry, under its own field manager."""
        written = {**entry(node, backends, reason), **({"outOfCluster": True} if outside else {})}
        body = kubestatus.apply_body("BalancingPolicy", name, {"nodes": [written]})
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.patch(
                kubestatus.status_path("BalancingPolicy", name),
                params={"fieldManager": f"balancing-agent-{node}", "force": "true"},
                json=body,
                headers={"Content-Type": kubestatus.APPLY_CONTENT_TYPE},
            )
            assert response.status_code == 200


def node(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.1.0.1"}]},
    }


@contextlib.asynccontextmanager
async def cluster(
    *docs: tuple[str, dict[str, Any]], nodes: tuple[str, ...] = ("node-1", "node-2")
) -> AsyncIterator[Cluster]:
    fake = FakeApi()
    for name in nodes:
        fake.put(NODES, node(name))
    for path, doc in docs:
        fake.put(path, doc)
    async with serving(fake) as (_, url):
        index = PolicyIndex()
        times = (f"2026-03-01T00:00:{s:02d}Z" for s in itertools.count())
        controller = ctl.StatusController(
            index, KubeConnection.plain(url), timing=FAST, now=lambda: next(times)
        )
        follow = asyncio.create_task(index.follow(KubeSource("", api_base_url=url, timing=SOURCE)))
        try:
            yield Cluster(fake, url, controller)
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
            await controller.close()


async def until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


def _has(c: Cluster, path: str, name: str, reason: str) -> Callable[[], bool]:
    return lambda: any(x.get("reason") == reason for x in c.conditions(path, name))


@pytest.mark.asyncio
async def test_ready_from_the_agents_entries_written_once() -> None:
    async with cluster((BP, bp())) as c:
        await until(_has(c, BP, "vip", "Pending"))
        assert c.ready(BP, "vip") == {
            "type": "Ready",
            "status": "Unknown",
            "reason": "Pending",
            "message": "no node has reported the policy yet",
            "lastTransitionTime": "2026-03-01T00:00:00Z",
            "observedGeneration": 2,
        }
        assert c.fake.objects[BP][("", "vip")]["status"]["observedGeneration"] == 2
        (write,) = c.writes()
        assert write.params == {"fieldManager": "balancing-controller", "force": "true"}
        assert write.headers["content-type"] == "application/apply-patch+yaml"
        await c.agent_apply("node-1", 0)
        await c.agent_apply("node-2", 3)
        await until(_has(c, BP, "vip", "Programmed"))
        ready = c.ready(BP, "vip")
        assert (ready["status"], ready["message"]) == ("True", "backends on at least one reporting node")
        # The agents' entries and the controller's condition live side by side, each owned by its writer.
        assert [n["nodeName"] for n in c.fake.objects[BP][("", "vip")]["status"]["nodes"]] == [
            "node-1",
            "node-2",
        ]
        assert c.fake.owners(BP, "vip") == {
            "balancing-agent-node-1": {("nodes", "node-1")},
            "balancing-agent-node-2": {("nodes", "node-2")},
            "balancing-controller": {("conditions", "Ready"), ("observedGeneration",)},
        }
        # Nothing changes: nothing more is written (the echo of each write is seen, not rewritten).
        writes = len(c.writes())
        await asyncio.sleep(FAST.min_interval * 3)
        assert len(c.writes()) == writes


@pytest.mark.asyncio
async def test_last_transition_time_kept_while_the_status_holds() -> None:
    async with cluster((BP, bp())) as c:
        await until(_has(c, BP, "vip", "Pending"))
        await c.agent_apply("node-1", 2)
        await until(_has(c, BP, "vip", "Programmed"))
        since = c.ready(BP, "vip")["lastTransitionTime"]
        writes = len(c.writes())
        await c.agent_apply("node-2", 1)  # one more node serving: the same condition, nothing written
        await until(lambda: c.entries() == ["node-1", "node-2"])
        await asyncio.sleep(FAST.min_interval * 2)
        assert len(c.writes()) == writes
        await c.agent_apply("node-1", 0, reason="ServiceNotFound")
        await c.agent_apply("node-2", 0)
        await until(_has(c, BP, "vip", "NoBackends"))  # the reasons differ
        ready = c.ready(BP, "vip")
        assert ready["status"] == "False" and ready["lastTransitionTime"] > since
        since = ready["lastTransitionTime"]
        await c.agent_apply("node-2", 0, reason="ServiceNotFound")  # a new reason, the same status
        await until(_has(c, BP, "vip", "ServiceNotFound"))
        assert c.ready(BP, "vip")["lastTransitionTime"] == since
        # A spec change is a new generation: observed again.
        spec = copy.deepcopy(c.fake.objects[BP][("", "vip")]["spec"])
        spec["frontend"]["addressMatcher"]["ip"] = "169.254.0.91"
        c.fake.update_spec(BP, "vip", spec)
        await until(lambda: c.ready(BP, "vip").get("observedGeneration") == 3)
        assert c.fake.objects[BP][("", "vip")]["status"]["observedGeneration"] == 3


@pytest.mark.asyncio
async def test_conflict_names_the_older_policy_and_clears_when_it_goes() -> None:
    older, newer = lrp("older", "2025-06-01T00:00:00Z"), lrp("newer", "2026-01-01T00:00:00Z")
    async with cluster((LRP, older), (LRP, newer)) as c:
        await until(_has(c, LRP, "newer", "Conflict"))
        message = c.ready(LRP, "newer")["message"]
        assert "already claimed by the older LocalRedirectPolicy older" in message
        assert c.ready(LRP, "newer")["status"] == "False"
        await until(_has(c, LRP, "older", "Pending"))
        c.fake.delete(LRP, "", "older")
        await until(_has(c, LRP, "newer", "Pending"))


@pytest.mark.asyncio
async def test_disabled_and_invalid_policies() -> None:
    disabled = bp("off", "169.254.0.92")
    disabled["spec"]["enabled"] = False
    invalid = bp("broken", "169.254.0.93")
    invalid["spec"]["frontend"]["addressMatcher"]["toPorts"] = [{"port": "70000", "protocol": "TCP"}]
    async with cluster((BP, disabled), (BP, invalid)) as c:
        await until(_has(c, BP, "off", "Disabled"))
        assert c.ready(BP, "off")["message"] == "spec.enabled is false"
        await until(_has(c, BP, "broken", "Invalid"))
        ready = c.ready(BP, "broken")
        assert ready["status"] == "False"
        assert "spec.frontend.addressMatcher.toPorts[0].port: port must be 1-65535" in ready["message"]
        assert "observedGeneration" not in ready  # the refused version's generation is not known
        # Fixed: Ready follows.
        c.fake.update_spec(BP, "broken", bp("broken", "169.254.0.93")["spec"])
        await until(_has(c, BP, "broken", "Pending"))


@pytest.mark.asyncio
async def test_departed_nodes_entries_are_ignored_and_removed() -> None:
    """A Node that left the cluster has no agent to withdraw its entry: the controller leaves it out of Ready
    and removes it (a JSON patch testing the entry's nodeName first); bare-metal hosts' entries stay."""
    async with cluster((BP, bp())) as c:
        await until(_has(c, BP, "vip", "Pending"))
        await c.agent_apply("node-1", 0)
        await c.agent_apply("host-1", 0, outside=True)  # no Node: an out-of-cluster host
        await c.agent_apply("node-9", 5)  # a node deleted before the controller saw its entry
        await until(lambda: c.entries() == ["node-1", "host-1"])
        await until(_has(c, BP, "vip", "NoBackends"))  # node-9's backends never counted
        (prune,) = c.prunes()
        assert prune.params == {"fieldManager": "balancing-controller"}
        assert prune.body == [
            {"op": "test", "path": "/status/nodes/2/nodeName", "value": "node-9"},
            {"op": "remove", "path": "/status/nodes/2"},
        ]
        assert "balancing-agent-node-9" not in c.fake.owners(BP, "vip")
        await c.agent_apply("node-2", 3)
        await until(_has(c, BP, "vip", "Programmed"))
        c.fake.delete(NODES, "", "node-2")  # the only serving node leaves
        await until(lambda: c.entries() == ["node-1", "host-1"])
        await until(_has(c, BP, "vip", "NoBackends"))
        assert len(c.prunes()) == 2
        # Nodes coming and going without entries change nothing; the host's entry is never touched.
        writes = len(c.fake.patches())
        c.fake.put(NODES, node("node-3"))
        c.fake.delete(NODES, "", "node-3")
        await asyncio.sleep(FAST.min_interval * 2)
        assert len(c.fake.patches()) == writes and c.entries() == ["node-1", "host-1"]


def test_entries_kept_until_the_nodes_are_listed() -> None:
    index = PolicyIndex()
    doc = bp()
    doc["status"] = {"nodes": [entry("node-9", 2)]}
    index.apply(SourceUpdate([parsed(doc)]))  # no Node list (yet): nothing is known to have departed
    assert index.nodes() is None
    assert ctl.verdict(index.get(("BalancingPolicy", "vip")), [], [], index.nodes()).status == "True"
    seen: list[frozenset[str]] = []
    index.listeners.append(lambda _update: seen.append(index.nodes_changed))
    node_obj = objects.parse_object({"apiVersion": "v1", "kind": "Node", **node("node-1")})
    index.apply(SourceUpdate([node_obj]), nodes_listed=True)
    assert index.nodes() == frozenset({"node-1"}) and seen == [frozenset({"node-1"})]
    index.apply(SourceUpdate([node_obj]))  # a Node's new version (a heartbeat): no change of names
    index.apply(SourceUpdate(deletes=[("Node", "", "node-1")]))
    assert seen == [frozenset({"node-1"}), frozenset(), frozenset({"node-1"})]
    assert index.nodes() == frozenset()
    assert index.nodes_changed == frozenset()


@pytest.mark.asyncio
async def test_deleted_invalid_policy_is_forgotten() -> None:
    """A policy no version of which ever validated: its deletion still reaches the index (the informer
    reports it), so neither its problems nor the writer's state for it stay behind."""
    invalid = bp("broken", "169.254.0.93")
    invalid["spec"]["frontend"]["addressMatcher"]["toPorts"] = [{"port": "70000", "protocol": "TCP"}]
    async with cluster((BP, invalid)) as c:
        await until(_has(c, BP, "broken", "Invalid"))
        key = ("BalancingPolicy", "broken")
        assert key in c.controller.index.invalid() and key in c.controller.writer._slots
        c.fake.delete(BP, "", "broken")
        await until(lambda: key not in c.controller.index.invalid())
        assert key not in c.controller.writer._slots


@pytest.mark.asyncio
async def test_informer_reports_the_deletion_of_a_malformed_object() -> None:
    """By a watch's DELETED and by a relist after the watch missed it; never for an object it never knew."""
    invalid = bp("broken", "169.254.0.93")
    invalid["spec"]["frontend"]["addressMatcher"]["toPorts"] = [{"port": "70000", "protocol": "TCP"}]
    fake = FakeApi()
    fake.put(BP, invalid)
    async with serving(fake) as (_, url), httpx.AsyncClient(base_url=url) as client:
        informer = Informer(client, Resource(BP, API, "BalancingPolicy"), dict, SOURCE)
        listed = await informer.list_until_done()
        assert not listed.upserts and len(listed.errors) == 1
        ref = ("BalancingPolicy", "", "broken")
        assert informer._event({"type": "DELETED", "object": invalid}).deletes == [ref]
        assert not informer._event({"type": "DELETED", "object": invalid})  # no longer known
        stranger = {**bp("stranger"), "spec": {}}
        assert not informer._event({"type": "DELETED", "object": stranger})
        await informer.list_until_done()  # known as malformed again ...
        fake.delete(BP, "", "broken")
        assert (await informer.list_until_done()).deletes == [ref]  # ... and gone from the next list
        assert not informer._bad
