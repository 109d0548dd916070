"""The policies that exist in the cluster, followed from the API server, for the webhook's conflict check.

A ``KubeSource`` narrowed to the two policy kinds and Nodes (no Pods: a source without them watches none)
keeps ``PolicyIndex`` current; ``existing()`` is what ``admission.conflicts`` compares a new or updated
policy against. Until the first list has arrived the index is not ready (the controller's /readyz says so),
so a conflict is never missed because of a cold start. ``invalid()`` holds, per policy whose current
version the model refuses, the model's messages (dropped when the policy is deleted: the informer reports
the deletion of an object it only knew as malformed). ``nodes()`` is the set of Node names once the Nodes
have been listed (the status' departed-node rule), and ``nodes_changed`` the names the update being
delivered added or removed; listeners (``status.StatusController``) are told of every update once the
index holds it.
Neighbours: ``sources.kube`` (list+watch), ``server`` (the webhook reads ``existing`` and ``ready``),
``status`` (the policies' Ready condition).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from balancing.errors import KubeObjectError, ObjectError
from balancing.model import objects, policies
from balancing.sources import kube
from balancing.sources.update import SourceUpdate

log = logging.getLogger(__name__)

POLICY_KINDS = ("LocalRedirectPolicy", "BalancingPolicy")
FOLLOWED_KINDS = (*POLICY_KINDS, "Node")
PolicyKey = tuple[str, str]  # (kind, name)


def invalid_policy(err: ObjectError) -> PolicyKey | None:
    """The policy an API-server object error is about (``KubeObjectError.obj`` is ``"Kind name"``)."""
    if not isinstance(err, KubeObjectError):
        return None
    kind, _, name = err.obj.partition(" ")
    return (kind, name) if kind in POLICY_KINDS and name and "/" not in name else None


class PolicyIndex:
    def __init__(self) -> None:
        self._policies: dict[objects.ObjectRef, policies.Policy] = {}
        self._invalid: dict[PolicyKey, list[str]] = {}
        self._nodes: set[str] | None = None  # None: the Nodes are not (known to be) listed
        self.nodes_changed: frozenset[str] = frozenset()  # Node names the update being delivered changed
        self.synced = False
        self.listeners: list[Callable[[SourceUpdate], None]] = []

    def existing(self) -> list[policies.Policy]:
        return list(self._policies.values())

    def get(self, key: PolicyKey) -> policies.Policy | None:
        """The policy (its last version the model accepts), if any."""
        return self._policies.get((key[0], "", key[1]))

    def invalid(self) -> dict[PolicyKey, list[str]]:
        """Per policy whose current version the model refuses: the model's messages (field: message)."""
        return dict(self._invalid)

    def nodes(self) -> frozenset[str] | None:
        """The names of the Nodes that exist, or ``None`` until they have been listed."""
        return None if self._nodes is None else frozenset(self._nodes)

    def ready(self) -> bool:
        return self.synced

    def apply(self, update: SourceUpdate, *, nodes_listed: bool = False) -> None:
        """Hold ``update`` and tell the listeners; ``nodes_listed``: it holds every Node (a first list)."""
        if nodes_listed and self._nodes is None:
            self._nodes = set()
        changed: set[str] = set()
        for ref in update.deletes:
            if ref[0] == "Node":
                if self._nodes is not None and ref[2] in self._nodes:
                    self._nodes.discard(ref[2])
                    changed.add(ref[2])
                continue
            self._policies.pop(ref, None)
            self._invalid.pop((ref[0], ref[2]), None)
        for obj in update.upserts:
            if isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy):
                self._policies[objects.ref(obj)] = obj
                self._invalid.pop((obj.kind, obj.metadata.name), None)
            elif (
                isinstance(obj, objects.Node)
                and self._nodes is not None
                and obj.metadata.name not in self._nodes
            ):
                self._nodes.add(obj.metadata.name)
                changed.add(obj.metadata.name)
        problems: dict[PolicyKey, list[str]] = {}
        for err in update.errors:
            log.warning("policy in the API server does not validate: %s", err)
            key = invalid_policy(err)
            if key is not None:
                problems.setdefault(key, []).append(
                    f"{err.field}: {err.message}" if err.field else err.message
                )
        self._invalid.update(problems)  # one update holds every error of an object's version
        self.synced = True
        self.nodes_changed = frozenset(changed)
        for listener in self.listeners:
            try:
                listener(update)
            except Exception:  # a listener's bug must not stop the index (the webhook depends on it)
                log.exception("policy index listener")
        self.nodes_changed = frozenset()

    def forget_invalid(self, key: PolicyKey) -> None:
        """``key`` turned out to be gone (its deletion may not have been seen yet)."""
        self._invalid.pop(key, None)

    async def follow(self, source: kube.KubeSource) -> None:
        """Keep the index current from ``source`` (narrowed to the policy kinds and Nodes) until cancelled."""
        source.resources = [r for r in source.resources if r.kind in FOLLOWED_KINDS]
        follows_nodes = any(r.kind == "Node" for r in source.resources)
        async with contextlib.aclosing(source.updates()) as updates:
            async for update in updates:
                self.apply(update, nodes_listed=follows_nodes)  # the first update is a full list
