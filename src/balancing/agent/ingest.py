"""Sources in: the source's updates applied to the model's store, and what the agent keeps beside it.

``Ingest.apply`` takes one ``SourceUpdate`` (upserts, deletes, located errors) into the ``ClusterStore``:
errors are logged and counted (the source keeps the last good version, so nothing else happens), pods are
indexed by UID for event attribution, new frontend conflicts and policy readiness changes are logged.
``Ingest.replace`` takes a source's whole state, as a restarted source delivers it first: objects the store
holds that the new state lacks are deleted, so nothing removed while the source was down lingers.
``updates`` opens the configured source as one async stream whose first item is the whole state.
Neighbours: ``sources.manifests``/``watch`` and ``sources.kube`` (the streams), ``model.store`` (the
state), ``agent.lifecycle`` (calls this, then ``agent.programming`` writes the changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from balancing.agent.config import AgentConfig, KubeSourceConfig
from balancing.metrics import Metrics
from balancing.model import objects, store
from balancing.sources import kube, manifests, watch
from balancing.sources.update import SourceUpdate

__all__ = ["Ingest", "updates"]

log = logging.getLogger("balancing.agent")


class Ingest:
    def __init__(self, cluster: store.ClusterStore, metrics: Metrics, source_kind: str) -> None:
        self.store = cluster
        self.metrics = metrics
        self.source_kind = source_kind  # "manifests" or "kubernetes": the label of error counts
        self.pods_by_uid: dict[str, objects.Pod] = {}
        self._uid_of: dict[objects.ObjectRef, str] = {}
        self._conflicts: set[str] = set()
        self._policy_status: dict[tuple[str, str], tuple[bool, str, str]] = {}
        self.statuses: dict[store.PolicyKey, store.PolicyStatus] = {}  # at the last update

    def replace(self, update: SourceUpdate) -> None:
        """``update`` is the source's whole state: apply it, deleting whatever else the store holds."""
        present = {objects.ref(o) for o in update.upserts} | set(update.deletes)
        gone = [r for r in self.store.refs() if r not in present]
        self.apply(SourceUpdate(update.upserts, [*update.deletes, *gone], update.errors))

    def apply(self, update: SourceUpdate) -> None:
        for err in update.errors:
            if self.source_kind == "manifests":
                log.error("manifest rejected: %s", err)
            else:
                log.error("object rejected, keeping its last good version: %s", err)
            self.metrics.source_error(self.source_kind, "invalid")
        for ref in update.deletes:
            self.store.delete(ref)
            uid = self._uid_of.pop(ref, None)
            if uid is not None:
                self.pods_by_uid.pop(uid, None)
        for obj in update.upserts:
            self.store.upsert(obj)
            if isinstance(obj, objects.Pod) and obj.metadata.uid:
                ref = objects.ref(obj)
                self.pods_by_uid.pop(self._uid_of.get(ref, ""), None)
                self._uid_of[ref], self.pods_by_uid[obj.metadata.uid] = obj.metadata.uid, obj
        endpoints_kinds = ("EndpointSlice", "Pod")
        changed = [o.kind for o in update.upserts] + [r[0] for r in update.deletes]
        n_endpoints = sum(1 for k in changed if k in endpoints_kinds)
        self.metrics.changes(len(changed) - n_endpoints, n_endpoints)
        conflicts = set(self.store.conflicts())
        for msg in sorted(conflicts - self._conflicts):
            log.error("frontend conflict: %s", msg)
        self._conflicts = conflicts
        self.statuses = self.store.policy_status()
        self._log_policy_status()

    def _log_policy_status(self) -> None:
        """Policy readiness changes on this node go to the log (in Kubernetes mode the status subresource
        gets them too, through ``agent.policy_status``)."""
        status = {k: (s.ready, s.reason, s.message) for k, s in self.statuses.items()}
        for (kind, name), (ready, reason, message) in sorted(status.items()):
            if self._policy_status.get((kind, name)) != (ready, reason, message):
                level = logging.INFO if ready else logging.WARNING
                log.log(
                    level, "%s %s: %s (%s) %s", kind, name, "Ready" if ready else "not ready", reason, message
                )
        for kind, name in sorted(self._policy_status.keys() - status.keys()):
            log.info("%s %s: removed", kind, name)
        self._policy_status = status


def new_kube_source(cfg: AgentConfig) -> kube.KubeSource:
    k = cfg.kube or KubeSourceConfig()
    return kube.KubeSource(
        cfg.model.node_name,
        api_base_url=k.api_server,
        kubeconfig=k.kubeconfig,
        context=k.context,
        in_cluster=k.in_cluster or None,  # an explicit --in-cluster is never overridden by KUBECONFIG
    )


async def updates(
    directory: manifests.ManifestDirectory | None, source: kube.KubeSource | None
) -> AsyncGenerator[SourceUpdate, None]:
    """The source's updates, the first one being its whole state: the manifest directory or the API."""
    if directory is not None:
        yield await asyncio.to_thread(directory.load)  # parsing never blocks the loop
        async for update in watch.watch_manifests(directory):
            yield update
        return
    assert source is not None
    async with contextlib.aclosing(source.updates()) as stream:
        async for update in stream:
            yield update
