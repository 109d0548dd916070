"""Which Pods beyond this node's the Kubernetes source must follow, and how overlapping pod watches merge.

A BalancingPolicy's ``serviceEndpoint`` picks ready pods *anywhere* in the cluster, so the agent follows,
besides the Pods of its own node, the Pods each such policy's ``endpointSelector`` selects:

- ``PodQuery`` is one such watch: a namespace (from the ``io.kubernetes.pod.namespace`` pseudo-label when it
  names exactly one, else all namespaces) and a label selector string for the API server. Terms the API
  server cannot evaluate (other uses of the namespace pseudo-label) are left out, so the query selects a
  superset; the model matches every pod against the full selector anyway.
- ``pod_queries(policies)`` is the set of queries the policies in force need: equal selectors share one
  watch, a disabled policy or an ``addressEndpoint`` needs none, and LocalRedirectPolicies need none (their
  backends are this node's pods, already followed).
- ``PodUnion`` merges the updates of several pod watches that may hold the same Pod: the model sees the
  versions of one holder (the first to deliver it, then another when that one lets it go), and a delete only
  when the last holder lets it go, so each Pod arrives once and never moves back to an older version.

Neighbours: ``sources.kube.KubeSource`` starts and stops one ``Informer`` per query as policies change and
feeds every pod update through one ``PodUnion``; ``model.selectors`` defines the selector semantics.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from balancing.model import objects
from balancing.model.objects import KubeObject, ObjectRef, ref
from balancing.model.policies import BalancingPolicy
from balancing.model.selectors import NAMESPACE_LABEL, LabelSelector, LabelSelectorRequirement
from balancing.sources.update import SourceUpdate

__all__ = ["PodQuery", "PodUnion", "pod_queries", "selector_query"]


@dataclass(frozen=True, order=True)
class PodQuery:
    """One watch of Pods: ``namespace`` ("" for all) and an API-server ``labelSelector`` ("" for all)."""

    namespace: str
    label_selector: str

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods" if self.namespace else "/api/v1/pods"

    def __str__(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "all namespaces"
        return f"pods in {where} matching {self.label_selector or '<all>'}"


def selector_query(selector: LabelSelector) -> PodQuery:
    """The narrowest watch the API server can serve that returns every pod ``selector`` matches."""
    namespace = selector.match_labels.get(NAMESPACE_LABEL, "")
    terms = [f"{k}={v}" for k, v in sorted(selector.match_labels.items()) if k != NAMESPACE_LABEL]
    for requirement in selector.match_expressions:
        if requirement.key != NAMESPACE_LABEL:
            terms.append(str(requirement))
        elif not namespace and _single_namespace(requirement):
            namespace = requirement.values[0]
    return PodQuery(namespace, ",".join(sorted(terms)))


def _single_namespace(requirement: LabelSelectorRequirement) -> bool:
    return requirement.operator == "In" and len(set(requirement.values)) == 1


def pod_queries(policies: Iterable[KubeObject]) -> set[PodQuery]:
    """The pod watches the BalancingPolicies among ``policies`` need (other objects are ignored)."""
    found: set[PodQuery] = set()
    for policy in policies:
        if not isinstance(policy, BalancingPolicy) or not policy.spec.enabled:
            continue
        endpoint = policy.spec.backend.service_endpoint
        if endpoint is not None:
            found.add(selector_query(endpoint.endpoint_selector))
    return found


class PodUnion:
    """The Pods held by any of several watches (holders), each delivered to the model once.

    The model sees one holder's versions of a Pod: the first holder that delivered it (its primary) until
    that one lets it go, then another holder's. Watches run at their own pace, so a second watch lagging
    behind the first would otherwise replay older versions (ready, not ready, ready...) into the model.
    """

    def __init__(self) -> None:
        self._held: dict[ObjectRef, dict[Hashable, KubeObject]] = {}  # pod → holder → its version
        self._primary: dict[ObjectRef, Hashable] = {}  # the holder whose versions the model sees

    def __len__(self) -> int:
        return len(self._primary)

    def apply(self, holder: Hashable, update: SourceUpdate) -> SourceUpdate:
        """``update`` from one holder, as the change the model must see (errors pass through)."""
        upserts: list[KubeObject] = []
        deletes: list[ObjectRef] = []
        for obj in update.upserts:
            if not isinstance(obj, objects.Pod):
                continue
            key = ref(obj)
            holders = self._held.setdefault(key, {})
            primary = self._primary.setdefault(key, holder)
            if primary == holder and holders.get(holder) != obj:
                upserts.append(obj)
            holders[holder] = obj
        for key in update.deletes:
            self._release(key, holder, upserts, deletes)
        return SourceUpdate(upserts, deletes, list(update.errors))

    def drop(self, holder: Hashable) -> SourceUpdate:
        """The holder stopped watching: the Pods nobody else holds are deleted."""
        upserts: list[KubeObject] = []
        deletes: list[ObjectRef] = []
        for key in [k for k, holders in self._held.items() if holder in holders]:
            self._release(key, holder, upserts, deletes)
        return SourceUpdate(upserts, deletes)

    def _release(
        self, key: ObjectRef, holder: Hashable, upserts: list[KubeObject], deletes: list[ObjectRef]
    ) -> None:
        holders = self._held.get(key)
        if holders is None or holder not in holders:
            return
        released = holders.pop(holder)
        shown = released if self._primary[key] == holder else None
        if not holders:
            del self._held[key], self._primary[key]
            deletes.append(key)
        elif shown is not None:  # the primary left: another holder's version is the one in force now
            successor, version = next(iter(holders.items()))
            self._primary[key] = successor
            if version != shown:
                upserts.append(version)
