"""The base of every typed Kubernetes object: ``KubeModel``, ``ObjectMeta`` and shared field types.

``objects`` (Services, EndpointSlices, Pods, Nodes) and ``policies`` (the two policy kinds) both build on
these; ``objects`` re-exports them, so ``objects.KubeModel`` and ``objects.ObjectMeta`` keep working.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from balancing.model.desired import Protocol

__all__ = ["KubeModel", "ObjectMeta", "Port", "ProtocolField", "PrunedModel"]


class KubeModel(BaseModel):
    """Base for every object: camelCase aliases, unknown fields ignored, immutable."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class PrunedModel(KubeModel):
    """A ``KubeModel`` whose null fields count as absent, as the API server prunes nulls from custom
    resources (``name: null`` is no name, ``config: null`` the default config)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data


def _protocol(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return Protocol[value.upper()]
        except KeyError:
            raise ValueError(f"unknown protocol {value!r} (expected TCP, UDP or SCTP)") from None
    return value


ProtocolField = Annotated[Protocol, BeforeValidator(_protocol)]
Port = Annotated[int, Field(ge=1, le=65535)]


class ObjectMeta(KubeModel):
    name: str = Field(min_length=1)
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    generation: int = 0  # bumped by the API server on every spec change (0: not from an API server)
    creation_timestamp: str = ""  # RFC 3339; compared as text, which sorts chronologically
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
