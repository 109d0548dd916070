"""Kubernetes label selectors (``metav1.LabelSelector``): validation and matching.

``LabelSelector`` validates as the API server does (label keys are qualified names, values are label values,
``In``/``NotIn`` need values, ``Exists``/``DoesNotExist`` take none) and matches as
``metav1.LabelSelectorAsSelector`` does: an empty selector matches everything, ``NotIn`` matches when the
key is absent. Pods are matched on ``pod_labels``: their labels plus ``io.kubernetes.pod.namespace`` (as
Cilium does), so a policy's endpoint selector picks pods in any namespace unless it names one.
Neighbours: ``policies`` uses ``LabelSelector`` for endpoint and node selectors; ``policy_frontends`` and
``store`` call ``matches``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from balancing.model import meta
from balancing.model.meta import PrunedModel

__all__ = [
    "NAMESPACE_LABEL",
    "LabelSelector",
    "LabelSelectorRequirement",
    "check_label_key",
    "check_label_value",
    "pod_labels",
]

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"

MAX_TERMS = 64  # matchLabels entries and matchExpressions, as the CRDs bound them


def check_label_key(key: str) -> str:
    """``key`` if it is a qualified name (``[prefix/]name``), else ``ValueError`` saying why."""
    return meta.check_qualified_name(key)


check_label_value = meta.check_label_value


class LabelSelectorRequirement(PrunedModel):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_label_key(value)

    @field_validator("values")
    @classmethod
    def _values(cls, value: list[str]) -> list[str]:
        for item in value:
            check_label_value(item)
        return value

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        return value is None  # DoesNotExist

    def __str__(self) -> str:
        if self.operator == "Exists":
            return self.key
        if self.operator == "DoesNotExist":
            return f"!{self.key}"
        op = "in" if self.operator == "In" else "notin"
        return f"{self.key} {op} ({','.join(sorted(set(self.values)))})"


class LabelSelector(PrunedModel):
    """``matchLabels`` and ``matchExpressions``, all of which must hold (an empty selector matches all)."""

    match_labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_TERMS)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=MAX_TERMS)

    @field_validator("match_labels", mode="before")
    @classmethod
    def _prune_nulls(cls, value: Any) -> Any:
        """The API server prunes null map values before validation; so do we (same verdicts as the CRD)."""
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if v is not None}
        return value

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            check_label_key(key)
            check_label_value(item)
        return value

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions
        )

    def __str__(self) -> str:
        """As ``kubectl`` prints selectors: ``app=web,tier in (a,b),!canary``; ``<all>`` when empty."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        parts += [str(r) for r in self.match_expressions]
        return ",".join(parts) or "<all>"


def pod_labels(namespace: str, labels: Mapping[str, str]) -> dict[str, str]:
    """What endpoint selectors see of a pod: its labels and ``io.kubernetes.pod.namespace`` (which wins)."""
    return {**labels, NAMESPACE_LABEL: namespace}
