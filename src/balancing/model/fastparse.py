"""The fast lane of ``objects.parse_object``: the same objects, validated by pydantic-core without the Python
calls that cost most, straight from JSON bytes when there are any.

``objects`` checks the API server's rules with Python functions (names, labels, ports, ...) and drops null
fields (``KubeModel._drop_nulls``) in every nested object: a Python call per nested object and per checked
field, most of the time spent building 100k Services and their EndpointSlices. Here each kind's core schema
(pydantic's own, so the fields, aliases, defaults and the classes built can never drift from ``objects``) is
rewritten once (``lean``):

- the hot checks become native constraints that accept no more than the functions did (``_NATIVE``: DNS
  names and labels as anchored patterns with their lengths, label maps, port numbers as bounds, printable
  text, annotation keys and a size bound);
- checks of the common case go native first, the function only for the rest (``_USUALLY``: one IPv4
  cluster IP, a list of one port or one hint, whose items need no check against each other, a numeric
  targetPort);
- null-dropping becomes "a null is refused", except in a field whose default is null anyway (where dropping
  it and keeping it give the same object);
- every other Python validator stays as it is (a port's protocol, a Service's cross-field rules, rare
  fields): a few calls per Service, none per endpoint.

So the lane accepts a subset of what ``parse_object`` accepts and builds equal objects for what it accepts;
whatever it refuses goes through ``parse_object``, whose errors are the ones reported (the tests hold the
lane to that: tests/unit/test_fastparse.py). Covered: the kinds in ``FAST_KINDS``.

- ``parse(doc)``: one document (as a dict): the object, or None when the lane refuses it or does not cover
  its kind (``objects.parse_object`` calls it first, then validates the plain way).
- ``list_reader(api_version, kind)``: the ``ListReader`` of a covered kind (else None): a list response's
  bytes (``{"metadata": ..., "items": [...]}``) turned straight into objects (pydantic-core parses the
  JSON: no dicts, nothing built for the fields the model never reads); ``read(data)`` gives the list's
  ``metadata`` and, per item, the object, or the item's plain JSON value when the lane refused it. A
  ``ValueError`` when the bytes are no such list (invalid JSON, no ``items``, ...).

Short strings are interned while reading (pydantic-core's string cache): the namespaces, node names,
zones and label keys that thousands of objects share are one string each.

Neighbours: ``objects`` (the types, ``KINDS``; its ``parse_object`` takes this lane first), ``meta`` (the
rules); the Kubernetes source's informer reads its lists with ``list_reader``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

from pydantic import ValidationError
from pydantic_core import SchemaValidator, core_schema

from balancing.model import meta, objects

__all__ = ["FAST_KINDS", "ListReader", "lean", "list_reader", "parse"]

# Patterns as the functions in ``meta`` check them (anchored: pydantic-core searches; Rust's ``$`` is the
# end of the text, never before a trailing newline). ASCII classes only, as there.
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_DNS1035 = r"[a-z](?:[-a-z0-9]*[a-z0-9])?"
_QUALIFIED = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"  # 1-63 characters
# A label key: an optional prefix (a DNS subdomain) and "/", then a qualified name. The prefix's own bound
# (253) is kept by bounding the whole key to 253; longer keys go the plain way.
_LABEL_KEY = rf"(?:{_SUBDOMAIN}/)?{_QUALIFIED}"
# An annotation key is checked lower-cased: the same with upper-case letters in the prefix.
_ANNOTATION_KEY = (
    r"(?:[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?)*/)?"
)
_ANNOTATION_KEY += _QUALIFIED
_SUBDOMAIN_MAX = 253
_LABEL_MAX = 63
# Annotations within their byte budget whatever the text: at most this many entries of at most these many
# characters (4 bytes each at most in UTF-8) stay under meta.ANNOTATIONS_MAX_BYTES; others are summed.
_ANNOTATIONS_FEW = 48
_ANNOTATION_VALUE_SHORT = 1000
assert _ANNOTATIONS_FEW * (_SUBDOMAIN_MAX + _ANNOTATION_VALUE_SHORT) * 4 <= meta.ANNOTATIONS_MAX_BYTES

Schema = dict[str, Any]


def _text(
    pattern: str, max_length: int | None = None, *, optional: bool = False
) -> Callable[[Schema], Schema]:
    """A str schema's stand-in: the same str, matching ``pattern`` (or empty, if ``optional``)."""
    anchored = f"^(?:{pattern})?$" if optional else f"^(?:{pattern})$"

    def native(inner: Schema) -> Schema:
        if inner.get("type") != "str" or "pattern" in inner:
            raise _NoStandIn(f"a pattern over {inner.get('type')}")
        limit = (
            min(max_length, inner.get("max_length", max_length)) if max_length else inner.get("max_length")
        )
        return {**inner, "pattern": anchored, **({"max_length": limit} if limit else {})}

    return native


def _labels(inner: Schema) -> Schema:
    """``check_labels``: label keys and values, the keys no longer than a prefix may be."""
    if inner.get("type") != "dict":
        raise _NoStandIn("labels over something else than a dict")
    key = core_schema.str_schema(pattern=f"^(?:{_LABEL_KEY})$", max_length=_SUBDOMAIN_MAX)
    value = core_schema.str_schema(pattern=f"^(?:{_QUALIFIED})?$", max_length=_LABEL_MAX)
    return {**inner, "keys_schema": key, "values_schema": value}


def _annotation_bytes(value: dict[str, str]) -> dict[str, str]:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
    if size > meta.ANNOTATIONS_MAX_BYTES:
        raise ValueError("over the annotations' size")
    return value


def _annotations(inner: Schema) -> Schema:
    """``ObjectMeta._annotations``: keys as checked there; the size natively when bounded by few short
    entries, else summed (a Python call, only then)."""
    if inner.get("type") != "dict":
        raise _NoStandIn("annotations over something else than a dict")
    key = core_schema.str_schema(pattern=f"^(?:{_ANNOTATION_KEY})$", max_length=_SUBDOMAIN_MAX)
    short = core_schema.str_schema(max_length=_ANNOTATION_VALUE_SHORT)
    few = core_schema.dict_schema(key, short, max_length=_ANNOTATIONS_FEW)
    summed = core_schema.no_info_after_validator_function(
        _annotation_bytes, core_schema.dict_schema(key, core_schema.str_schema())
    )
    return _union([few, summed])


def _ports(low: int) -> Callable[[Schema], Schema]:
    def native(inner: Schema) -> Schema:
        if inner != {"type": "int", "strict": True}:
            raise _NoStandIn("a port that is not a strict int")
        return {**inner, "ge": low, "le": 65535}

    return native


def _printable(inner: Schema) -> Schema:
    return _text(r"[^\x00-\x1f\x7f]*")(inner)


def _at_most_one(inner: Schema) -> Schema:
    """A list's check of its items against each other (names unique, families distinct): none needed for
    one item."""
    if inner.get("type") != "list":
        raise _NoStandIn(f"a list check over {inner.get('type')}")
    return {**inner, "max_length": 1}


def _cluster_ip(inner: Schema) -> Schema:
    """``clusterIP``: unset, ``None`` or an IPv4 address (others: the function)."""
    return _text(rf"None|{_IPV4}", optional=True)(inner)


def _cluster_ips(inner: Schema) -> Schema:
    """``clusterIPs``: ``["None"]`` or one IPv4 address (others: the function)."""
    if inner.get("type") != "list" or inner.get("items_schema") != {"type": "str"}:
        raise _NoStandIn("clusterIPs that are not a list of str")
    return {**inner, "items_schema": _text(rf"None|{_IPV4}")(inner["items_schema"]), "max_length": 1}


def _target_port(inner: Schema) -> Schema:
    """``targetPort``: a number (a name: the function)."""
    return dict(core_schema.int_schema(strict=True, ge=1, le=65535))


def _union(choices: list[Any]) -> Schema:
    """The first of ``choices`` that accepts a value."""
    return dict(core_schema.union_schema(choices, mode="left_to_right"))


def _underlying(function: Any) -> Any:
    return getattr(function, "__func__", function)


# An IPv4 address as inet_pton reads one (decimal, no leading zeros).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"

# Python validators replaced by native constraints (keyed by the function itself); all others stay.
_NATIVE: dict[Any, Callable[[Schema], Schema]] = {
    meta.check_dns1123_label: _text(_LABEL, _LABEL_MAX),
    meta.check_dns1123_subdomain: _text(_SUBDOMAIN, _SUBDOMAIN_MAX),
    meta.check_dns1035_label: _text(_DNS1035, _LABEL_MAX),
    meta.check_label_value: _text(_QUALIFIED, optional=True),
    meta.check_labels: _labels,
    _underlying(meta.ObjectMeta._name): _text(_SUBDOMAIN, _SUBDOMAIN_MAX),
    _underlying(meta.ObjectMeta._namespace): _text(_LABEL, _LABEL_MAX, optional=True),
    _underlying(meta.ObjectMeta._labels): _labels,
    _underlying(meta.ObjectMeta._annotations): _annotations,
    _underlying(meta.ServiceMeta._name): _text(_DNS1035, _LABEL_MAX),
    meta._printable: _printable,
    meta._port: _ports(1),
    meta._node_port: _ports(0),
}
_OPTIONAL: dict[Any, Callable[[Schema], Schema]] = {  # objects.OptionalCheck(check): empty, or check
    meta.check_dns1123_label: _text(_LABEL, _LABEL_MAX, optional=True),
    meta.check_dns1123_subdomain: _text(_SUBDOMAIN, _SUBDOMAIN_MAX, optional=True),
}
# Python validators tried after a native stand-in for the common case (the first to accept wins; both
# accept the same values the same way where the stand-in does).
_USUALLY: dict[Any, Callable[[Schema], Schema]] = {
    _underlying(objects.ServiceSpec._cluster_ip): _cluster_ip,
    _underlying(objects.ServiceSpec._cluster_ips): _cluster_ips,
    _underlying(objects.ServiceSpec._ports): _at_most_one,
    _underlying(objects.ServiceSpec._ip_families): _at_most_one,
    _underlying(objects.EndpointSlice._ports): _at_most_one,
    objects._unique_hint_names: _at_most_one,
    _underlying(objects.Container._ports): _at_most_one,
    _underlying(objects.PodStatus._pod_ips): _at_most_one,
    objects._target_port: _target_port,
}
# Python validators dropped: the lane refuses what they would change (a null).
_DROPPED = {_underlying(meta.KubeModel._drop_nulls), meta.null_values_empty}


class _NoStandIn(Exception):
    """A schema the rewrite does not know how to make native (a bug in ``_NATIVE``: found at import)."""


_FUNCTIONS = ("function-before", "function-after", "function-wrap", "function-plain")
_LEAVES = frozenset(
    {
        "any",
        "none",
        "bool",
        "int",
        "float",
        "decimal",
        "str",
        "bytes",
        "date",
        "time",
        "datetime",
        "timedelta",
    }
    | {"literal", "enum", "is-instance", "is-subclass", "callable", "uuid", "url", "multi-host-url"}
    | {"definition-ref", "complex"}
)
_CHILDREN = (
    "schema",
    "items_schema",
    "keys_schema",
    "values_schema",
    "lax_schema",
    "strict_schema",
    "json_schema",
    "python_schema",
)


def lean(schema: Schema, *, null_default: bool = False) -> Schema:
    """``schema`` rewritten for the fast lane (see the module docstring); ``null_default``: it is a field's
    schema whose default is None."""
    kind = schema["type"]
    if kind in _FUNCTIONS and isinstance(schema.get("function"), dict):
        return _function(schema)
    if kind == "nullable":
        inner = lean(schema["schema"])
        return {**schema, "schema": inner} if null_default else inner
    if kind == "default":
        none = "default" in schema and schema["default"] is None
        return {**schema, "schema": lean(schema["schema"], null_default=none)}
    if kind == "model-fields":
        fields = {name: {**f, "schema": lean(f["schema"])} for name, f in schema["fields"].items()}
        return {**schema, "fields": fields}
    if kind in ("union", "chain"):
        key = "choices" if kind == "union" else "steps"
        return {**schema, key: [_choice(c) for c in schema[key]]}
    if kind == "tagged-union":
        return {**schema, "choices": {tag: lean(c) for tag, c in schema["choices"].items()}}
    if kind == "definitions":
        return {
            **schema,
            "schema": lean(schema["schema"]),
            "definitions": [lean(d) for d in schema["definitions"]],
        }
    if kind in ("typed-dict", "dataclass", "dataclass-args", "arguments"):
        raise _NoStandIn(f"{kind} schemas are not rewritten")
    children = {k: lean(schema[k]) for k in _CHILDREN if isinstance(schema.get(k), dict)}
    if not children and kind not in _LEAVES:
        raise _NoStandIn(f"unknown schema type {kind!r}")
    return {**schema, **children}


def _choice(choice: Any) -> Any:
    if isinstance(choice, tuple):  # (schema, label)
        return (lean(choice[0]), choice[1])
    return lean(choice)


def _function(schema: Schema) -> Schema:
    function = _underlying(schema["function"]["function"])
    if "schema" not in schema:  # a plain validator: kept
        return schema
    inner = lean(schema["schema"])
    kept = {**schema, "schema": inner}
    if function in _DROPPED:
        return inner
    if schema["type"] == "function-after":
        native = _NATIVE.get(function)
        if isinstance(function, objects.OptionalCheck):
            native = _OPTIONAL.get(function.check)
        if native is not None:
            return native(inner)
    usually = _USUALLY.get(function)
    if usually is not None and schema["type"] in ("function-after", "function-before"):
        return _union([usually(inner), kept])
    return kept


# --- the validators ----------------------------------------------------------------------------------------

# Covered kinds: those a cluster has many of. Their schemas hold no Python call per nested object.
FAST_KINDS: frozenset[tuple[str, str]] = frozenset(
    {("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"), ("v1", "Node"), ("v1", "Pod")}
)
_CONFIG = core_schema.CoreConfig(cache_strings="all")


def _item_schema(key: tuple[str, str]) -> Schema:
    return lean(dict(objects.KINDS[key].__pydantic_core_schema__))


def _models(schema: Any) -> set[type]:
    """The model classes a schema builds."""
    found: set[type] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "model":
                found.add(node["cls"])
            stack.extend(v for k, v in node.items() if k not in ("cls", "function", "serialization"))
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return found


def _validator(schema: Schema) -> SchemaValidator:
    """A validator of ``schema`` built from it alone: pydantic-core would otherwise reuse each model class's
    own (prebuilt) validator for the classes it meets, Python validators and all. It does so only for a class
    marked complete, so the classes are marked incomplete while it is built (at import, under the import
    lock; nothing else reads the mark meanwhile but pydantic's own rebuilding, which does not run then)."""
    models = sorted(_models(schema), key=lambda c: c.__qualname__)
    marks = {cls: cls.__dict__.get("__pydantic_complete__") for cls in models}
    try:
        for cls in models:
            cls.__pydantic_complete__ = False  # type: ignore[attr-defined]
        return SchemaValidator(schema, _CONFIG)
    finally:
        for cls, mark in marks.items():
            cls.__pydantic_complete__ = mark  # type: ignore[attr-defined]


_VALIDATORS = {key: _validator(_item_schema(key)) for key in FAST_KINDS}


def parse(doc: dict[str, Any]) -> objects.KubeObject | None:
    """``parse_object(doc)`` if the fast lane accepts ``doc``, else None (also for kinds not covered)."""
    validator = _VALIDATORS.get((doc.get("apiVersion"), doc.get("kind")))  # type: ignore[arg-type]
    if validator is None:
        return None
    try:
        return cast(objects.KubeObject, validator.validate_python(doc))
    except Exception:  # refused (a kept validator may raise anything on a value the plain way never shows it)
        return None


class ListReader:
    """Reads list responses of one covered kind; see the module docstring."""

    def __init__(self, api_version: str, kind: str) -> None:
        item = _item_schema((api_version, kind))
        definitions = []
        if item["type"] == "definitions":
            item, definitions = item["schema"], item["definitions"]
        either = core_schema.union_schema([item, core_schema.any_schema()], mode="left_to_right")
        body: Schema = dict(
            core_schema.typed_dict_schema(
                {
                    "metadata": core_schema.typed_dict_field(core_schema.any_schema(), required=False),
                    "items": core_schema.typed_dict_field(core_schema.list_schema(either)),
                },
                extra_behavior="ignore",
            )
        )
        if definitions:
            body = dict(core_schema.definitions_schema(cast(Any, body), definitions))
        self.model = objects.KINDS[(api_version, kind)]
        self._validator = _validator(body)

    def read(self, data: bytes | bytearray) -> tuple[Any, list[Any]]:
        """The list's ``metadata`` (None when absent) and its items: objects, or plain JSON values."""
        try:
            body = self._validator.validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"not a list: {exc.error_count()} problems") from None
        except Exception as exc:  # a kept validator's own exception: the plain way reads the list instead
            raise ValueError(f"not read: {type(exc).__name__}") from None
        return body.get("metadata"), body["items"]


@functools.cache
def list_reader(api_version: str, kind: str) -> ListReader | None:
    """The (shared) reader of lists of a covered kind; None for the others."""
    return ListReader(api_version, kind) if (api_version, kind) in FAST_KINDS else None
