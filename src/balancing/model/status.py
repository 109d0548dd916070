"""A policy's ``status`` subresource as read back from the API server: ``ObservedStatus``.

``status.observedGeneration``, ``status.conditions`` (metav1.Condition shape, keyed by ``type``) and
``status.nodes`` (one ``NodeReport`` per node agent, keyed by ``nodeName``; ``outOfCluster`` marks a host
outside the cluster), as the CRDs define them. The agents write their own ``nodes`` entry, the controller
the ``Ready`` condition and removes the entries of departed nodes (``sources.kubestatus`` does the writing);
both read what is there through this type to write only differences.

Read leniently: status is observation, never intent, so a malformed entry is skipped and a malformed status
reads as empty. A policy is never made invalid by its status (``policies`` parses it with
``parse_status``). Pure data, no I/O.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from balancing.model.meta import KubeModel

__all__ = ["Condition", "NodeReport", "ObservedStatus", "parse_status"]


class NodeReport(KubeModel):
    """One node agent's entry in ``status.nodes``."""

    node_name: str
    backends: int = 0
    ready: bool | None = None  # absent in entries written before the field existed
    reason: str = ""
    last_update_time: str = ""
    out_of_cluster: bool = False  # written by agents on hosts outside the cluster (no Node of that name)


class Condition(KubeModel):
    """One entry of ``status.conditions`` (metav1.Condition)."""

    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


class ObservedStatus(KubeModel):
    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()
    nodes: tuple[NodeReport, ...] = ()

    def node(self, name: str) -> NodeReport | None:
        """``name``'s entry in ``nodes``, if it has one."""
        return next((n for n in self.nodes if n.node_name == name), None)

    def condition(self, type_: str) -> Condition | None:
        """The condition of type ``type_``, if there is one."""
        return next((c for c in self.conditions if c.type == type_), None)


def _entries(model: type[KubeModel], value: Any, key: str) -> list[Any]:
    """The entries of a list-map that validate, the first of each key (the API server keeps keys unique)."""
    found: dict[str, Any] = {}
    for item in value if isinstance(value, list) else []:
        try:
            entry = model.model_validate(item)
        except ValidationError:
            continue
        found.setdefault(getattr(entry, key), entry)
    return list(found.values())


def parse_status(value: Any) -> ObservedStatus:
    """``status`` as read from an object; anything malformed in it is left out (see the module docstring)."""
    if isinstance(value, ObservedStatus):
        return value
    if not isinstance(value, dict):
        return ObservedStatus()
    generation = value.get("observedGeneration")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        generation = None
    return ObservedStatus(
        observed_generation=generation,
        conditions=tuple(_entries(Condition, value.get("conditions"), "type")),
        nodes=tuple(_entries(NodeReport, value.get("nodes"), "node_name")),
    )
