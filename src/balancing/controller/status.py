"""The policies' ``Ready`` condition: aggregated by the controller, written to their status (Kubernetes mode).

``verdict`` decides, purely, in this order:

1. the policy's current version does not validate → ``False``/``Invalid`` with the model's messages (the
   agents skip it and keep the last valid version);
2. ``spec.enabled`` is false → ``False``/``Disabled``;
3. an older policy of the same kind claims one of its frontends → ``False``/``Conflict`` naming it (the
   webhook's rule, ``admission.conflicts``; the model lets the older one win there);
4. the agents' ``status.nodes`` entries (``agent.policy_status``), leaving out those of *departed* nodes
   (in-cluster entries, i.e. without ``outOfCluster``, naming a Node that no longer exists, once the Nodes
   have been listed): none → ``Unknown``/``Pending``; at least one node with backends →
   ``True``/``Programmed``; else ``False`` with the reason every reporting node gives (e.g.
   ``ServiceNotFound``), or ``NoBackends`` when they differ.

The message never counts nodes ("backends on at least one reporting node", "no backends on any reporting
node (NoBackends, ServiceNotFound)"): a count would change with every node joining or leaving the cluster,
and each change rewrites the condition of every policy, each write delivered to every agent's watch. The
per-node numbers are in ``status.nodes``.

``StatusController`` follows the ``PolicyIndex``: after each update it recomputes the policies the update
can affect (the policy itself; every policy of the kind when a spec, creation or deletion may change who
conflicts with whom; the policies with an entry for a Node that appeared or disappeared) and has
``sources.kubestatus.StatusWriter`` apply ``status.conditions`` [Ready, with ``observedGeneration``] and
``status.observedGeneration`` under the field manager ``balancing-controller`` whenever they differ from what
the object holds. ``lastTransitionTime`` is kept while the condition's status stays the same. The entries of
departed nodes (whose agents will never withdraw them) are removed with a JSON patch on the status
subresource, a ``test`` of each entry's ``nodeName`` at its index before its ``remove``: if the object
changed meanwhile the patch fails as a whole (``stale``) and is made again from the next version the watch
delivers. Entries with ``outOfCluster`` (bare-metal hosts, which are no Nodes) are never removed. Replicas
all compute the same from the same objects, so they need no leader: a replica that sees the condition
already there writes nothing, and of two replicas removing the same entry the second one's patch fails its
``test``.

Neighbours: ``policyindex`` (the policies, their validation errors, the Node names), ``admission`` (the
conflict rule), ``sources.kubestatus`` (the writes), ``balancing.agent.policy_status`` (what the node entries
mean).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from balancing.controller import admission
from balancing.controller.policyindex import POLICY_KINDS, PolicyIndex, PolicyKey, invalid_policy
from balancing.model import policies, policy_frontends
from balancing.model.status import NodeReport
from balancing.sources import kubestatus
from balancing.sources.kube import KubeConnection
from balancing.sources.update import SourceUpdate

__all__ = [
    "FIELD_MANAGER",
    "READY",
    "StatusController",
    "Verdict",
    "condition_of",
    "departed",
    "nodes_verdict",
    "prune_patch",
    "verdict",
]

log = logging.getLogger(__name__)

FIELD_MANAGER = "balancing-controller"
READY = "Ready"
PROGRAMMED = "Programmed"
PENDING = "Pending"
INVALID = "Invalid"
CONFLICT = "Conflict"
MESSAGE_MAX = 4096  # metav1.Condition allows 32768; a condition is for people
CONTROLLER_TIMING = kubestatus.WriterTiming(delay=0.5, min_interval=5.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str


def nodes_verdict(nodes: Sequence[NodeReport]) -> Verdict:
    """What the agents' entries say together (rule 4 of the module docstring; no node counts)."""
    if not nodes:
        return Verdict("Unknown", PENDING, "no node has reported the policy yet")
    if any(n.backends > 0 for n in nodes):
        return Verdict("True", PROGRAMMED, "backends on at least one reporting node")
    reasons = sorted(
        {n.reason if n.reason and n.reason != READY else policy_frontends.NO_BACKENDS for n in nodes}
    )
    reason = reasons[0] if len(reasons) == 1 else policy_frontends.NO_BACKENDS
    return Verdict("False", reason, _cap(f"no backends on any reporting node ({', '.join(reasons)})"))


def departed(nodes: Iterable[NodeReport], known: Collection[str] | None) -> list[NodeReport]:
    """The entries of in-cluster nodes not among the ``known`` Node names (``None``: the Nodes are not
    listed yet, so none); ``outOfCluster`` entries never."""
    if known is None:
        return []
    return [n for n in nodes if not n.out_of_cluster and n.node_name not in known]


def prune_patch(nodes: Sequence[NodeReport], gone: Collection[str]) -> list[dict[str, Any]]:
    """The JSON patch removing the entries of ``gone`` from ``status.nodes`` (as ``nodes`` lists them): per
    entry, from the last, a ``test`` of its ``nodeName`` then its ``remove``, so the whole patch fails if the
    list changed."""
    ops: list[dict[str, Any]] = []
    for index in reversed(range(len(nodes))):
        name = nodes[index].node_name
        if name in gone:
            path = f"/status/nodes/{index}"
            ops.append({"op": "test", "path": f"{path}/nodeName", "value": name})
            ops.append({"op": "remove", "path": path})
    return ops


def verdict(
    policy: policies.Policy | None,
    problems: Sequence[str],
    older_rivals: Iterable[policies.Policy],
    known_nodes: Collection[str] | None = None,
) -> Verdict:
    """The Ready condition of ``policy`` (``None`` with ``problems``: no version of it validates);
    ``older_rivals``: the policies that may claim its frontends (all of them will do); ``known_nodes``: the
    Node names, once listed (entries of other in-cluster nodes are left out)."""
    if problems or policy is None:
        return Verdict("False", INVALID, _cap("; ".join(problems) or "the policy does not validate"))
    if not policy.spec.enabled:
        return Verdict("False", policy_frontends.DISABLED, "spec.enabled is false")
    found = admission.conflicts(policy, older_rivals)
    if found:
        return Verdict("False", CONFLICT, _cap("; ".join(found)))
    gone = {n.node_name for n in departed(policy.status.nodes, known_nodes)}
    return nodes_verdict([n for n in policy.status.nodes if n.node_name not in gone])


def condition_of(policy: policies.Policy | None) -> tuple[Any, ...] | None:
    """What the object shows of what the controller writes: (status, reason, message, the condition's and
    the status's observedGeneration), or ``None``."""
    if policy is None:
        return None
    ready = policy.status.condition(READY)
    if ready is None:
        return None
    return (ready.status, ready.reason, ready.message, ready.observed_generation,
            policy.status.observed_generation)  # fmt: skip


def _cap(message: str) -> str:
    return message if len(message) <= MESSAGE_MAX else message[: MESSAGE_MAX - 1] + "…"


def _group(policy: policies.Policy) -> tuple[str, ...]:
    """Policies of one kind can only conflict within one group: one Service, or one virtual IP."""
    frontend = policy.spec.frontend
    if frontend.address_matcher is not None:
        return (policy.kind, "address", str(frontend.address_matcher.ip))
    matcher = frontend.service_matcher
    assert matcher is not None
    return (policy.kind, "service", matcher.namespace, matcher.service_name)


class StatusController:
    """Keeps every policy's Ready condition written and departed nodes' entries removed; see the module
    docstring."""

    def __init__(
        self,
        index: PolicyIndex,
        connection: KubeConnection,
        *,
        registry: CollectorRegistry | None = None,
        timing: kubestatus.WriterTiming = CONTROLLER_TIMING,
        now: Callable[[], str] = kubestatus.timestamp,
    ) -> None:
        """Follows ``index`` (as its listener) and writes through ``connection``, counting the writes in
        ``registry`` (the webhook's) when given. Call from the event loop; ``close`` when done."""
        self.index = index
        self.writer = kubestatus.StatusWriter(
            connection, FIELD_MANAGER, timing=timing, on_result=self._written
        )
        self.pruner = kubestatus.StatusWriter(
            connection,
            FIELD_MANAGER,
            timing=timing,
            on_result=self._pruned,
            content_type=kubestatus.JSON_PATCH_CONTENT_TYPE,
        )
        self._now = now
        self._intents: dict[PolicyKey, tuple[Any, ...]] = {}  # what conflicts depend on, per policy
        self._writes = PromCounter(
            "balancing_controller_policy_status_writes",
            "Server-side applies of the policies' Ready condition, by result: ok, gone (the policy was "
            "deleted), retry (failed, retried with backoff), failed (refused, dropped).",
            ["result"],
            registry=registry,
        )
        self._prunes = PromCounter(
            "balancing_controller_policy_status_prunes",
            "JSON patches removing departed nodes' entries from the policies' status.nodes, by result: ok, "
            "gone, retry, failed, stale (the object changed meanwhile; made again from its next version).",
            ["result"],
            registry=registry,
        )
        for result in ("ok", "gone", "retry", "failed"):
            self._writes.labels(result)
            self._prunes.labels(result)
        self._prunes.labels("stale")
        index.listeners.append(self.on_update)

    async def close(self) -> None:
        await self.writer.close()
        await self.pruner.close()

    def _written(self, key: kubestatus.Key, result: str) -> None:
        self._writes.labels(result).inc()
        if result == "gone":
            self.index.forget_invalid(key)

    def _pruned(self, _key: kubestatus.Key, result: str) -> None:
        self._prunes.labels(result).inc()

    # --- following the index -------------------------------------------------------------------------------

    def on_update(self, update: SourceUpdate) -> None:
        """The index now holds ``update``: recompute what it can affect."""
        keys: set[PolicyKey] = set()
        kinds: set[str] = set()
        for obj in update.upserts:
            if isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy):
                key: PolicyKey = (obj.kind, obj.metadata.name)
                keys.add(key)
                intent = (obj.spec, obj.metadata.creation_timestamp)
                if self._intents.get(key) != intent:
                    self._intents[key] = intent
                    kinds.add(obj.kind)
        for ref in update.deletes:
            if ref[0] not in POLICY_KINDS:
                continue
            gone: PolicyKey = (ref[0], ref[2])
            if self._intents.pop(gone, None) is not None:
                kinds.add(ref[0])
            self.writer.forget(gone)
            self.pruner.forget(gone)
        for err in update.errors:
            invalid = invalid_policy(err)
            if invalid is not None:
                keys.add(invalid)
        changed = self.index.nodes_changed
        if changed:  # a Node appeared or disappeared: the policies with an entry for it
            for policy in self.index.existing():
                if any(n.node_name in changed for n in policy.status.nodes):
                    keys.add((policy.kind, policy.metadata.name))
        self.reconcile(keys, kinds)

    def reconcile(self, keys: Iterable[PolicyKey] = (), kinds: Iterable[str] = ()) -> None:
        """Bring the Ready condition (and the departed nodes' entries) of ``keys`` and of every policy of
        ``kinds`` up to date."""
        existing = self.index.existing()
        groups: dict[tuple[str, ...], list[policies.Policy]] = {}
        for policy in existing:
            groups.setdefault(_group(policy), []).append(policy)
        invalid = self.index.invalid()
        known = self.index.nodes()
        every = set(kinds)
        wanted = set(keys) | {(p.kind, p.metadata.name) for p in existing if p.kind in every}
        wanted |= {k for k in invalid if k[0] in every}
        for key in sorted(wanted):
            found = self.index.get(key)
            problems = invalid.get(key, [])
            if found is None and not problems:
                continue  # deleted meanwhile
            rivals = groups.get(_group(found), []) if found is not None else []
            self._ensure(key, found, verdict(found, problems, rivals, known), bool(problems))
            if found is not None and not problems:  # an invalid one's status is not known: left alone
                self._prune(key, found, known)

    def _prune(self, key: PolicyKey, policy: policies.Policy, known: Collection[str] | None) -> None:
        nodes = policy.status.nodes
        gone = {n.node_name for n in departed(nodes, known)}
        have = tuple(n.node_name for n in nodes)
        want = tuple(name for name in have if name not in gone)

        def body() -> list[dict[str, Any]]:
            log.info("%s %s: removing the entries of departed nodes %s", *key, ", ".join(sorted(gone)))
            return prune_patch(nodes, gone)

        self.pruner.ensure(key, want, have, body)

    def _ensure(self, key: PolicyKey, policy: policies.Policy | None, v: Verdict, invalid: bool) -> None:
        # The generation of a version the model refuses is not known: no observedGeneration then.
        generation = policy.metadata.generation if policy is not None and not invalid else 0
        observed = generation or None
        want = (v.status, v.reason, v.message, observed, observed)
        have = condition_of(policy)

        def body() -> dict[str, Any]:
            shown = policy.status.condition(READY) if policy is not None else None
            since = shown.last_transition_time if shown is not None and shown.status == v.status else ""
            condition: dict[str, Any] = {
                "type": READY,
                "status": v.status,
                "reason": v.reason,
                "message": v.message,
                "lastTransitionTime": since or self._now(),
            }
            status: dict[str, Any] = {"conditions": [condition]}
            if observed is not None:
                condition["observedGeneration"] = observed
                status["observedGeneration"] = observed
            log.info("%s %s: Ready %s (%s) %s", *key, v.status, v.reason, v.message)
            return kubestatus.apply_body(*key, status)

        self.writer.ensure(key, want, have, body)
