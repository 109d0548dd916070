"""The agent's report of every policy on its node, written to the policy's ``status.nodes`` (Kubernetes mode).

Per policy the model knows (``store.policy_status``), this node's entry is ``{nodeName, backends, ready,
reason, lastUpdateTime}`` (plus ``outOfCluster: true`` from an agent running ``--out-of-cluster``: a host that
is no Node, whose entry the controller must not take for a departed node's), or no entry at all where the
policy does not apply here (``Disabled``, ``NodeNotSelected``, ``OutOfClusterDisabled``): the controller's
aggregate counts only nodes where the policy is meant to work. ``PolicyStatusReporter`` compares that with
the entry the API server holds for this node (read from the policy objects the source delivers, so a
restart with nothing changed writes nothing) and has ``sources.kubestatus.StatusWriter`` apply the
difference under the field manager ``balancing-agent-<node>``: server-side apply merges ``nodes`` by
``nodeName``, so each agent owns its entry only, and an apply without it removes it.

Written only on change of (backends, ready, reason, outOfCluster): ``lastUpdateTime`` is when the entry last
changed, not a heartbeat. Every agent watches every policy, so a periodic refresh by N agents would cost N
writes per policy per period, each delivered to N watchers. For the same reason a change of ``backends``
alone is a *minor* change, written at most once per ``WriterTiming.minor_interval`` (60 s): a cluster-wide
policy has the same backends on every node, so each scale step would otherwise make all N agents write; a
change of ``ready`` or ``reason`` (what the controller's ``Ready`` condition is made of) is written at once.
A policy deleted needs no write; one this node stops reporting gets an apply without the entry.

Neighbours: ``agent`` calls ``observe`` and ``reconcile`` after each source update and counts the outcomes;
``controller.status`` aggregates the entries into the ``Ready`` condition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from balancing.model import policies, policy_frontends, store
from balancing.sources import kubestatus
from balancing.sources.update import SourceUpdate

__all__ = [
    "FIELD_MANAGER_PREFIX",
    "NOT_HERE",
    "Entry",
    "PolicyStatusReporter",
    "Report",
    "field_manager",
    "minor_change",
    "report_of",
]

log = logging.getLogger(__name__)

FIELD_MANAGER_PREFIX = "balancing-agent"
NOT_HERE = frozenset(
    {policy_frontends.DISABLED, policy_frontends.NODE_NOT_SELECTED, policy_frontends.OUT_OF_CLUSTER_DISABLED}
)
POLICY_KINDS = (policies.LOCAL_REDIRECT_POLICY, policies.BALANCING_POLICY)
Report = tuple[int, bool, str]  # (backends, ready, reason): what an entry says, lastUpdateTime aside
Entry = tuple[int, bool, str, bool]  # a Report and outOfCluster: what the reporter compares


def report_of(status: store.PolicyStatus) -> Report | None:
    """This node's entry for a policy in ``status``, or ``None``: no entry (it does not apply here)."""
    if status.reason in NOT_HERE:
        return None
    return (status.backends, status.ready, status.reason)


def _reported(policy: policies.Policy, node: str) -> Entry | None:
    entry = policy.status.node(node)
    if entry is None:
        return None
    return (entry.backends, bool(entry.ready), entry.reason, entry.out_of_cluster)


def minor_change(want: Entry | None, have: Entry | None) -> bool:
    """Only ``backends`` differs (see the module docstring)."""
    return want is not None and have is not None and want[1:] == have[1:] and want[0] != have[0]


class PolicyStatusReporter:
    """This node's ``status.nodes`` entries, kept equal to the model's view; see the module docstring.
    ``out_of_cluster``: the agent runs on a host outside the cluster (``ModelConfig.external_client``)."""

    def __init__(
        self,
        node_name: str,
        writer: kubestatus.StatusWriter,
        now: Callable[[], str] = kubestatus.timestamp,
        *,
        out_of_cluster: bool = False,
    ) -> None:
        self.node_name = node_name
        self.writer = writer
        self.out_of_cluster = out_of_cluster
        self._now = now
        self._shown: dict[kubestatus.Key, Entry | None] = {}  # this node's entry as the API server has it

    def observe(self, update: SourceUpdate) -> None:
        """Note what the policies in ``update`` show for this node; forget deleted ones."""
        for obj in update.upserts:
            if isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy):
                self._shown[(obj.kind, obj.metadata.name)] = _reported(obj, self.node_name)
        for ref in update.deletes:
            if ref[0] in POLICY_KINDS:
                key = (ref[0], ref[2])
                self._shown.pop(key, None)
                self.writer.forget(key)

    def reconcile(self, statuses: Mapping[store.PolicyKey, store.PolicyStatus]) -> None:
        """Have every policy in ``statuses`` show this node's entry (writes happen in the background)."""
        for key, status in statuses.items():
            if key not in self._shown:
                continue  # not from the API server (or not yet seen there): nothing to write to
            report = report_of(status)
            want = None if report is None else (*report, self.out_of_cluster)
            have = self._shown[key]
            self.writer.ensure(key, want, have, self._body(key, want), minor=minor_change(want, have))
        for key in self._shown.keys() - statuses.keys():
            self._shown.pop(key)  # the model dropped it (e.g. invalid): it is no longer ours to report
            self.writer.forget(key)

    def _body(self, key: kubestatus.Key, want: Entry | None) -> Callable[[], dict[str, Any]]:
        def build() -> dict[str, Any]:
            if want is None:
                return kubestatus.apply_body(*key, {})  # our entry, no longer applied, is removed
            backends, ready, reason, out_of_cluster = want
            entry: dict[str, Any] = {
                "nodeName": self.node_name,
                "backends": backends,
                "ready": ready,
                "reason": reason,
                "lastUpdateTime": self._now(),
            }
            if out_of_cluster:
                entry["outOfCluster"] = True
            return kubestatus.apply_body(*key, {"nodes": [entry]})

        return build


def field_manager(node_name: str) -> str:
    """This node's field manager: ``balancing-agent-<node>``."""
    return kubestatus.field_manager(FIELD_MANAGER_PREFIX, node_name)
