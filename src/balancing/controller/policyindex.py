"""The policies that exist in the cluster, followed from the API server, for the webhook's conflict check.

A ``KubeSource`` narrowed to the two policy kinds keeps ``PolicyIndex`` current; ``existing()`` is what
``admission.conflicts`` compares a new or updated policy against. Until the first list has arrived the index
is not ready (the controller's /readyz says so), so a conflict is never missed because of a cold start.
``invalid()`` holds, per policy whose current version the model refuses, the model's messages; listeners
(``status.StatusController``) are told of every update once the index holds it.
Neighbours: ``sources.kube`` (list+watch), ``server`` (the webhook reads ``existing`` and ``ready``),
``status`` (the policies' Ready condition).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from balancing.errors import ManifestError
from balancing.model import objects, policies
from balancing.sources import kube
from balancing.sources.manifests import SourceUpdate

log = logging.getLogger(__name__)

POLICY_KINDS = ("LocalRedirectPolicy", "BalancingPolicy")
PolicyKey = tuple[str, str]  # (kind, name)


def invalid_policy(err: ManifestError) -> PolicyKey | None:
    """The policy an API-server object error is about (``KubeObjectError.obj`` is ``"Kind name"``)."""
    if not isinstance(err, kube.KubeObjectError):
        return None
    kind, _, name = err.obj.partition(" ")
    return (kind, name) if kind in POLICY_KINDS and name and "/" not in name else None


class PolicyIndex:
    def __init__(self) -> None:
        self._policies: dict[objects.ObjectRef, policies.Policy] = {}
        self._invalid: dict[PolicyKey, list[str]] = {}
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

    def ready(self) -> bool:
        return self.synced

    def apply(self, update: SourceUpdate) -> None:
        for ref in update.deletes:
            self._policies.pop(ref, None)
            self._invalid.pop((ref[0], ref[2]), None)
        for obj in update.upserts:
            if isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy):
                self._policies[objects.ref(obj)] = obj
                self._invalid.pop((obj.kind, obj.metadata.name), None)
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
        for listener in self.listeners:
            try:
                listener(update)
            except Exception:  # a listener's bug must not stop the index (the webhook depends on it)
                log.exception("policy index listener")

    def forget_invalid(self, key: PolicyKey) -> None:
        """``key`` turned out to be gone (an invalid policy's deletion is not always seen)."""
        self._invalid.pop(key, None)

    async def follow(self, source: kube.KubeSource) -> None:
        """Keep the index current from ``source`` (narrowed to the policy kinds) until cancelled."""
        source.resources = [r for r in source.resources if r.kind in POLICY_KINDS]
        async with contextlib.aclosing(source.updates()) as updates:
            async for update in updates:
                self.apply(update)
