"""The controller's Ready condition (``controller.status``): the aggregation rules, then written from the
policy index to a fake API server doing (simplified) server-side apply, next to the agents' entries."""

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
from balancing.sources.kube import KubeConnection, KubeSource, Timing
from helpers.fakeapi import FakeApi, serving

API = "balancing.elf.io/v1beta1"
BP = f"/apis/{API}/balancingpolicies"
LRP = f"/apis/{API}/localredirectpolicies"
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
    assert ctl.nodes_verdict([report("a", 0), report("b", 3), report("c", 1)]) == ctl.Verdict(
        "True", "Programmed", "backends on 2 of 3 reporting nodes"
    )
    assert ctl.nodes_verdict([report("a", 0), report("b", 0)]) == ctl.Verdict(
        "False", "NoBackends", "no backends on any of the 2 reporting nodes (NoBackends on 2)"
    )
    same = [report("a", 0, "ServiceNotFound"), report("b", 0, "ServiceNotFound")]
    assert ctl.nodes_verdict(same).reason == "ServiceNotFound"
    mixed = ctl.nodes_verdict([report("a", 0, "Conflict"), report("b", 0)])
    assert (mixed.reason, mixed.message) == (
        "NoBackends",
        "no backends on any of the 2 reporting nodes (Conflict on 1, NoBackends on 1)",
    )
    old_agent = NodeReport(node_name="a", backends=0)  # written before ready/reason existed
    assert ctl.nodes_verdict([old_agent]) == ctl.Verdict(
        "False", "NoBackends", "no backends on the reporting node (NoBackends on 1)"
    )


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

    async def agent_apply(self, node: str, backends: int, name: str = "vip") -> None:
        """What an agent writes: its entry, under its own field manager."""
        body = kubestatus.apply_body("BalancingPolicy", name, {"nodes": [entry(node, backends)]})
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.patch(
                kubestatus.status_path("BalancingPolicy", name),
                params={"fieldManager": f"balancing-agent-{node}", "force": "true"},
                json=body,
                headers={"Content-Type": kubestatus.APPLY_CONTENT_TYPE},
            )
            assert response.status_code == 200


@contextlib.asynccontextmanager
async def cluster(*docs: tuple[str, dict[str, Any]]) -> AsyncIterator[Cluster]:
    fake = FakeApi()
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
        assert (ready["status"], ready["message"]) == ("True", "backends on 1 of 2 reporting nodes")
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
        await c.agent_apply("node-2", 1)  # a new message, the same status
        await until(lambda: c.ready(BP, "vip")["message"] == "backends on 2 of 2 reporting nodes")
        assert c.ready(BP, "vip")["lastTransitionTime"] == since
        await c.agent_apply("node-1", 0)
        await c.agent_apply("node-2", 0)
        await until(_has(c, BP, "vip", "NoBackends"))
        ready = c.ready(BP, "vip")
        assert ready["status"] == "False" and ready["lastTransitionTime"] > since
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
