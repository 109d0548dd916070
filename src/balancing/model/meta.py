"""The base of every typed Kubernetes object: ``KubeModel``, ``ObjectMeta`` and the API server's value rules.

``objects`` (Services, EndpointSlices, Pods, Nodes) and ``policies`` (the two policy kinds) both build on
these; ``objects`` re-exports them, so ``objects.KubeModel`` and ``objects.ObjectMeta`` keep working.

The rules are the API server's (apimachinery's ``IsDNS1123Label``, ``IsDNS1123Subdomain``,
``IsDNS1035Label``, ``IsValidPortName``, ``IsValidPortNum``, ``IsQualifiedName``, ``IsValidLabelValue``), with
messages worded like its own, so a value that validates here is one the API server would have stored, and no
name, label or port that reaches a map key, a listener or a log line can be out of range or carry a control
character.
``FieldErrors`` reports errors at fields below the one being validated (``spec.ports[1].name``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from balancing.model.desired import Protocol

__all__ = [
    "FieldErrors",
    "KubeModel",
    "NodePort",
    "ObjectMeta",
    "Port",
    "ProtocolField",
    "PrunedModel",
    "ServiceMeta",
    "check_dns1035_label",
    "check_dns1123_label",
    "check_dns1123_subdomain",
    "check_label_value",
    "check_labels",
    "check_port_name",
    "check_qualified_name",
    "null_values_empty",
    "port_number_problem",
]

# Used with fullmatch (a "$" would let a trailing newline through).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+")
_LABEL_MAX = 63
_SUBDOMAIN_MAX = 253
_PORT_NAME_MAX = 15
ANNOTATIONS_MAX_BYTES = 256 * 1024  # keys and values together, as the API server bounds them


class KubeModel(BaseModel):
    """Base for every object: camelCase aliases, unknown fields ignored, immutable, null fields absent.

    A null field means the field is absent: the API server decodes a null into a built-in object's field as
    the field's zero value (which is what an absent field gets too) and prunes nulls from custom resources.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data


PrunedModel = KubeModel  # the policy kinds' name for it (custom resources: the API server prunes nulls)


class FieldErrors:
    """Errors at fields below the one a validator checks, raised together as one ``ValidationError`` whose
    locations pydantic prefixes with that field's (``add((1, "name"), ...)`` in ``ports`` → ports[1].name)."""

    def __init__(self) -> None:
        self._errors: list[Any] = []

    def add(self, loc: tuple[int | str, ...], message: str, value: Any) -> None:
        error = PydanticCustomError("value_error", "{message}", {"message": message})
        self._errors.append({"type": error, "loc": loc, "input": value})

    def check(self, loc: tuple[int | str, ...], value: Any, check: Callable[[Any], object]) -> bool:
        """``check(value)``; a ``ValueError`` it raises becomes an error at ``loc`` (and False)."""
        try:
            check(value)
        except ValueError as exc:
            self.add(loc, str(exc), value)
            return False
        return True

    def raise_any(self, title: str) -> None:
        if self._errors:
            raise ValidationError.from_exception_data(title, self._errors)


# --- names -----------------------------------------------------------------------------------------------


def check_dns1123_label(value: str) -> str:
    """A lowercase RFC 1123 label (namespaces, port names of Services and EndpointSlices, container names)."""
    if len(value) > _LABEL_MAX or not _DNS1123_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r}: a lowercase RFC 1123 label must be no more than 63 characters of lower case "
            "alphanumeric characters or '-', and must start and end with an alphanumeric character"
        )
    return value


def check_dns1123_subdomain(value: str) -> str:
    """A lowercase RFC 1123 subdomain (names of Pods, EndpointSlices, Nodes, the policy kinds)."""
    if len(value) > _SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"{value!r}: a lowercase RFC 1123 subdomain must be no more than 253 characters of lower case "
            "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        )
    return value


def check_dns1035_label(value: str) -> str:
    """A DNS-1035 label (names of Services)."""
    if len(value) > _LABEL_MAX or not _DNS1035_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r}: a DNS-1035 label must be no more than 63 characters of lower case alphanumeric "
            "characters or '-', start with a letter and end with an alphanumeric character"
        )
    return value


def check_qualified_name(value: str, what: str = "label key") -> str:
    """``[prefix/]name``: the prefix a DNS subdomain, the name 1-63 of [A-Za-z0-9-_.], alphanumeric at both
    ends (label keys; annotation keys, whose prefix the API server lower-cases first)."""
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or len(prefix) > _SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        raise ValueError(f"{what} {value!r}: the prefix must be a lowercase DNS subdomain of at most 253")
    if not name or len(name) > _LABEL_MAX or not _QUALIFIED_NAME.fullmatch(name):
        raise ValueError(
            f"{what} {value!r}: the name must be 1-63 characters of [A-Za-z0-9-_.], "
            "starting and ending with an alphanumeric character"
        )
    return value


def check_label_value(value: str) -> str:
    """Empty, or 1-63 of [A-Za-z0-9-_.] starting and ending with an alphanumeric character."""
    if value and (len(value) > _LABEL_MAX or not _QUALIFIED_NAME.fullmatch(value)):
        raise ValueError(
            f"label value {value!r}: must be empty or 1-63 characters of [A-Za-z0-9-_.], "
            "starting and ending with an alphanumeric character"
        )
    return value


def check_port_name(value: str) -> str:
    """An IANA_SVC_NAME (container port names; a named targetPort): at most 15 of [-a-z0-9], at least one
    letter, no '-' at either end, no '--'."""
    problems = []
    if len(value) > _PORT_NAME_MAX:
        problems.append("must be no more than 15 characters")
    if not _PORT_NAME_CHARS.fullmatch(value):
        problems.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search("[a-z]", value):
        problems.append("must contain at least one letter (a-z)")
    if "--" in value:
        problems.append("must not contain consecutive hyphens")
    if value.startswith("-") or value.endswith("-"):
        problems.append("must not begin or end with a hyphen")
    if problems:
        raise ValueError(f"{value!r}: " + ", ".join(problems))
    return value


def _plain_key(key: str) -> bool:
    """The common label key quickly: no prefix, or a well-formed one (the full check explains a bad one)."""
    prefix, _, name = key.rpartition("/")
    return (
        0 < len(name) <= _LABEL_MAX
        and _QUALIFIED_NAME.fullmatch(name) is not None
        and (
            not prefix or (len(prefix) <= _SUBDOMAIN_MAX and _DNS1123_SUBDOMAIN.fullmatch(prefix) is not None)
        )
        and key.count("/") <= 1
    )


def check_labels(value: dict[str, str]) -> dict[str, str]:
    """A ``map[string]string`` of labels (``metadata.labels``, a Service's selector) as the API server
    checks them; a bad key is reported at the map itself (a field path must not show it raw), a bad value at
    its key."""
    if all(
        _plain_key(k) and (not v or (len(v) <= _LABEL_MAX and _QUALIFIED_NAME.fullmatch(v)))
        for k, v in value.items()
    ):
        return value
    errors = FieldErrors()
    for key, item in value.items():
        if errors.check((), key, check_qualified_name):
            errors.check((key,), item, check_label_value)
    errors.raise_any("labels")
    return value


# --- numbers ---------------------------------------------------------------------------------------------


def port_number_problem(value: int) -> str | None:
    """The API server's complaint about a port number (``IsValidPortNum``), or None for 1-65535."""
    return None if 1 <= value <= 65535 else f"{value}: must be between 1 and 65535, inclusive"


def _port(value: int) -> int:
    problem = port_number_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _node_port(value: int) -> int:
    return value if value == 0 else _port(value)


# Integers as the API's JSON has them: no booleans, floats or numeric strings (the API server refuses them).
Port = Annotated[int, Strict(), AfterValidator(_port)]
NodePort = Annotated[int, Strict(), AfterValidator(_node_port)]  # 0 (or absent): not set


def _protocol(value: Any) -> Any:
    if isinstance(value, str):
        if value in ("TCP", "UDP", "SCTP"):
            return Protocol[value]
        raise ValueError(f'{value!r}: supported values: "SCTP", "TCP", "UDP"')
    if isinstance(value, Protocol):
        return value
    raise ValueError(f"{value!r}: the protocol is a string: TCP, UDP or SCTP")


ProtocolField = Annotated[Protocol, BeforeValidator(_protocol)]


def null_values_empty(value: Any) -> Any:
    """A ``map[string]string`` as the API server decodes it: a null value is the empty string."""
    if isinstance(value, dict) and None in value.values():
        return {k: "" if v is None else v for k, v in value.items()}
    return value


# --- metadata --------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{value!r}: must not contain control characters")
    return value


Printable = Annotated[str, AfterValidator(_printable)]


class ObjectMeta(KubeModel):
    """``metadata``: the name a lowercase RFC 1123 subdomain (``ServiceMeta``: a DNS-1035 label), the
    namespace an RFC 1123 label, labels and annotation keys as the API server checks them."""

    name: str = Field(min_length=1)
    namespace: str = ""
    uid: Printable = ""
    resource_version: Printable = ""
    generation: Annotated[int, Strict(), Field(ge=0)] = (
        0  # bumped on spec changes (0: not from an API server)
    )
    creation_timestamp: Printable = ""  # RFC 3339; compared as text, which sorts chronologically
    labels: Annotated[dict[str, str], BeforeValidator(null_values_empty)] = Field(default_factory=dict)
    annotations: Annotated[dict[str, str], BeforeValidator(null_values_empty)] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_dns1123_subdomain(value)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_dns1123_label(value) if value else value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, value: dict[str, str]) -> dict[str, str]:
        errors = FieldErrors()
        for key in value:
            if not _plain_key(key.lower()):
                errors.check((), key, lambda k: check_qualified_name(k.lower(), "annotation key"))
        size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
        if size > ANNOTATIONS_MAX_BYTES:
            errors.add((), f"may not be more than {ANNOTATIONS_MAX_BYTES} bytes (has {size})", "")
        errors.raise_any("annotations")
        return value


class ServiceMeta(ObjectMeta):
    """A Service's ``metadata``: its name is a DNS-1035 label (it becomes a DNS name in the cluster)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_dns1035_label(value)
