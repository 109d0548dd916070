"""The policies that exist in the cluster, followed from the API server, for the webhook's conflict check.

A ``KubeSource`` narrowed to the two policy kinds keeps ``PolicyIndex`` current; ``existing()`` is what
``admission.conflicts`` compares a new or updated policy against. Until the first list has arrived the index
is not ready (the controller's /readyz says so), so a conflict is never missed because of a cold start.
Neighbours: ``sources.kube`` (list+watch), ``server`` (the webhook reads ``existing`` and ``ready``).
"""

from __future__ import annotations

import contextlib
import logging

from balancing.model import objects, policies
from balancing.sources import kube
from balancing.sources.manifests import SourceUpdate

log = logging.getLogger(__name__)

POLICY_KINDS = ("LocalRedirectPolicy", "BalancingPolicy")


class PolicyIndex:
    def __init__(self) -> None:
        self._policies: dict[objects.ObjectRef, policies.Policy] = {}
        self.synced = False

    def existing(self) -> list[policies.Policy]:
        return list(self._policies.values())

    def ready(self) -> bool:
        return self.synced

    def apply(self, update: SourceUpdate) -> None:
        for ref in update.deletes:
            self._policies.pop(ref, None)
        for obj in update.upserts:
            if isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy):
                self._policies[objects.ref(obj)] = obj
        for err in update.errors:
            log.warning("policy in the API server does not validate: %s", err)
        self.synced = True

    async def follow(self, source: kube.KubeSource) -> None:
        """Keep the index current from ``source`` (narrowed to the policy kinds) until cancelled."""
        source.resources = [r for r in source.resources if r.kind in POLICY_KINDS]
        async with contextlib.aclosing(source.updates()) as updates:
            async for update in updates:
                self.apply(update)
