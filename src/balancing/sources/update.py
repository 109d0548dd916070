"""``SourceUpdate``: what every source delivers, the contract between the sources and their readers.

A change to the objects in force: new or changed objects, removed refs, and newly found problems, each an
``errors.ObjectError`` naming its object and field (``ManifestError`` from the manifest directory,
``KubeObjectError`` from the API server). A source's first update is its whole state. Neighbours: produced by
``sources.manifests``/``watch`` and ``sources.kube``; read by the agent (``agent.ingest``) and the
controller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from balancing.errors import ObjectError
from balancing.model.objects import KubeObject, ObjectRef

__all__ = ["SourceUpdate"]


@dataclass(frozen=True)
class SourceUpdate:
    """False when empty. ``errors`` holds problems found by this read (an object re-read unchanged is not
    reported again)."""

    upserts: list[KubeObject] = field(default_factory=list)
    deletes: list[ObjectRef] = field(default_factory=list)
    errors: Sequence[ObjectError] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes or self.errors)
