"""The policy CRDs (deploy/crds/) checked as the API server checks them, and against the model.

Each document goes through the API server's steps on create (``admit``): status dropped (status
subresource), nulls and unknown fields pruned (as the server does by default; kubectl's strict field
validation would refuse unknown fields instead), defaults applied, the openAPIV3Schema validated
(``jsonschema``: Draft 4 with the ipv4/ipv6 formats, ``pattern`` with Go's anchoring), then, unless the
schema found a blocking error, every ``x-kubernetes-validations`` rule evaluated at its node
(``cel-python``). A table of named cases (``helpers.crdcases``, which tests/cluster/test_apiserver_crds.py
also sends to the real API server) breaks every rule at every place it sits; the model
(``objects.parse_object``) must give the same verdict on each case, on the examples in
``examples/policies/`` and on random policies (hypothesis).

``jsonschema`` and ``cel-python`` are dev dependencies: without them the structural checks and the model's
verdicts on the table still run. Known disagreements between the model and the CRDs are listed in
``KNOWN_DISAGREEMENTS`` (strict xfail: fixing one makes its case pass, and the entry must then go).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.crdcases import API_VERSION, BP_SVC, CASES, LRP_SVC, Case, policy, port
from helpers.docedit import clone, edit

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "deploy" / "crds"
EXAMPLES = ROOT / "examples" / "policies"
CRD_FILES = {
    "LocalRedirectPolicy": CRD_DIR / "balancing.elf.io_localredirectpolicies.yaml",
    "BalancingPolicy": CRD_DIR / "balancing.elf.io_balancingpolicies.yaml",
}
KINDS = tuple(CRD_FILES)

# --- loading and walking the schemas ---------------------------------------------------------------------


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(CRD_FILES[kind].read_text()) if d]
    assert len(docs) == 1, f"{CRD_FILES[kind].name} holds one CRD"
    result: dict[str, Any] = docs[0]
    return result


def schema_of(kind: str) -> dict[str, Any]:
    result: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


class Node(NamedTuple):
    path: str  # e.g. spec.frontend.addressMatcher.toPorts[].port
    schema: dict[str, Any]
    in_combinator: bool  # inside anyOf/allOf/oneOf/not: only value validations allowed


def walk(schema: dict[str, Any], path: str = "", in_combinator: bool = False) -> Iterator[Node]:
    yield Node(path or "<root>", schema, in_combinator)
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name, in_combinator)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}.*", in_combinator)
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]", in_combinator)
    for key in ("anyOf", "allOf", "oneOf"):
        for i, sub in enumerate(schema.get(key, [])):
            yield from walk(sub, f"{path}<{key}{i}>", True)
    if "not" in schema:
        yield from walk(schema["not"], f"{path}<not>", True)


def rules_of(kind: str) -> list[tuple[str, dict[str, str]]]:
    return [(n.path, r) for n in walk(schema_of(kind)) for r in n.schema.get("x-kubernetes-validations", [])]


# --- structural checks (no extra dependency) -------------------------------------------------------------

VALUE_VALIDATIONS = {
    "format", "pattern", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
    "maxLength", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "multipleOf",
    "required", "anyOf", "allOf", "oneOf", "not", "properties", "items",
}  # fmt: skip
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "boolean": bool, "object": dict, "array": list, "number": (int, float),
}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_crd_names_scope_and_version(kind: str) -> None:
    spec = crd(kind)["spec"]
    plural = CRD_FILES[kind].stem.split("_", 1)[1]
    assert crd(kind)["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd(kind)["metadata"]["name"] == f"{plural}.balancing.elf.io"
    assert spec["group"] == "balancing.elf.io"
    assert spec["scope"] == "Cluster"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["listKind"]) == (kind, plural, f"{kind}List")
    assert names["shortNames"] == [{"LocalRedirectPolicy": "lr", "BalancingPolicy": "bl"}[kind]]
    assert "elf" in names["categories"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1beta1", True, True)
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_name_fields_of_the_schema(kind: str) -> None:
    columns = crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    names = [c["name"] for c in columns]
    assert {"Service", "Address", "Ready", "Age"} <= set(names)
    paths = {n.path for n in walk(schema_of(kind))}
    for column in columns:
        assert column["description"] and column["type"] in ("string", "boolean", "integer", "date")
        json_path = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"])  # a filter selects list items
        if json_path.startswith(".metadata."):
            continue
        assert json_path.lstrip(".") in paths, (
            f"column {column['name']}: {column['jsonPath']} is in no schema"
        )


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    """The rules the API server applies to a CRD schema (structural schemas), plus our own: every field
    has a description (they are the user documentation) and ``required`` names declared properties."""
    problems: list[str] = []
    for path, schema, in_combinator in walk(schema_of(kind)):
        if in_combinator:
            if schema.get("type") and schema not in INT_OR_STRING:
                problems.append(f"{path}: type inside a combinator")
            extra = set(schema) - VALUE_VALIDATIONS - ({"type"} if schema in INT_OR_STRING else set())
            if extra:
                problems.append(f"{path}: {sorted(extra)} inside a combinator")
            continue
        if schema.get("x-kubernetes-int-or-string"):
            if "type" in schema or schema.get("anyOf") != INT_OR_STRING:
                problems.append(f"{path}: int-or-string must be exactly anyOf [integer, string], no type")
        elif "type" not in schema:
            problems.append(f"{path}: no type")
        if path == "metadata":  # the API server refuses anything but the type here
            if schema != {"type": "object"}:
                problems.append(f"{path}: the root's metadata must be exactly {{type: object}}")
        elif not schema.get("description"):
            problems.append(f"{path}: no description")
        if "properties" in schema and "additionalProperties" in schema:
            problems.append(f"{path}: both properties and additionalProperties")
        if "nullable" in schema:
            problems.append(f"{path}: nullable (policies have no null fields)")
        kind_ = schema.get("type")
        if (
            kind_ == "object"
            and not ({"properties", "additionalProperties"} & set(schema))
            and path != "metadata"
        ):
            problems.append(f"{path}: object without properties (everything in it would be pruned)")
        if kind_ == "array" and "items" not in schema:
            problems.append(f"{path}: array without items")
        for name in schema.get("required", []):
            if name not in schema.get("properties", {}):
                problems.append(f"{path}: required {name!r} is not a property")
        py_type = PY_TYPES.get(kind_, object) if isinstance(kind_, str) else object
        for value in schema.get("enum", []):
            if not isinstance(value, py_type):
                problems.append(f"{path}: enum value {value!r} is not a {kind_}")
        if "default" in schema:
            default = schema["default"]
            if not isinstance(default, py_type) or ("enum" in schema and default not in schema["enum"]):
                problems.append(f"{path}: default {default!r} does not fit the field")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            if not keys or not set(keys) <= set(schema["items"].get("required", [])):
                problems.append(f"{path}: list-map keys must be required fields of the items")
        for rule in schema.get("x-kubernetes-validations", []):
            if set(rule) != {"rule", "message"} or not rule["message"]:
                problems.append(f"{path}: a rule needs exactly rule and message (no messageExpression)")
    assert not problems, "\n".join(problems)


COMPREHENSION = re.compile(r"\.(all|exists|exists_one|map|filter)\(")


def cost_problems(schema: dict[str, Any]) -> list[str]:
    """Where the API server's CEL cost estimate would be unbounded: a list or map that a comprehension
    iterates without maxItems/maxProperties, a string with a rule or compared in toPorts rules without
    maxLength."""
    problems: list[str] = []
    nodes = {n.path: n.schema for n in walk(schema)}
    for path, node in nodes.items():
        for rule in (r["rule"] for r in node.get("x-kubernetes-validations", [])):
            if node.get("type") == "string" and "maxLength" not in node:
                problems.append(f"{path}: a string with a CEL rule needs a maxLength")
            if not COMPREHENSION.search(rule):
                continue
            for sub_path, sub in nodes.items():
                if sub_path != path and not sub_path.startswith(f"{path}."):
                    continue
                field = sub_path.rsplit(".", 1)[-1]
                named = sub_path == path or re.search(rf"\b{re.escape(field)}\b", rule) is not None
                if named and sub.get("type") == "array" and "maxItems" not in sub:
                    problems.append(f"{sub_path}: iterated by the rule at {path}, needs maxItems")
                is_map = sub.get("type") == "object" and "additionalProperties" in sub
                if named and is_map and "maxProperties" not in sub:
                    problems.append(f"{sub_path}: iterated by the rule at {path}, needs maxProperties")
    for path, node in nodes.items():
        if path.endswith(("toPorts[].name", "toPorts[].protocol")) and "maxLength" not in node:
            problems.append(f"{path}: compared in the toPorts comprehensions, needs a maxLength")
    return problems


@pytest.mark.parametrize("kind", KINDS)
def test_cel_cost_is_bounded(kind: str) -> None:
    """The API server refuses a CRD whose CEL rules it estimates too costly: every list or map a rule
    iterates is bounded, and every string a rule reads has a maxLength (values as in the model)."""
    assert cost_problems(schema_of(kind)) == []


def test_cost_check_finds_a_missing_bound() -> None:
    schema = clone(schema_of("BalancingPolicy"))
    spec = schema["properties"]["spec"]["properties"]
    del spec["frontend"]["properties"]["addressMatcher"]["properties"]["toPorts"]["maxItems"]
    del spec["backend"]["properties"]["serviceEndpoint"]["properties"]["endpointSelector"]["properties"][
        "matchLabels"
    ]["maxProperties"]
    found = cost_problems(schema)
    assert any(p.startswith("spec.frontend.addressMatcher.toPorts:") for p in found), found
    assert any("serviceEndpoint.endpointSelector.matchLabels:" in p for p in found), found


# --- the API server's admission of one document ----------------------------------------------------------


def _jsonschema() -> Any:
    return pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency (CRD schema checks)")


def _celpy() -> Any:
    return pytest.importorskip("celpy", reason="cel-python is a dev dependency (CRD CEL rule checks)")


def _prune(schema: dict[str, Any], value: Any, path: str, dropped: list[str]) -> None:
    """Drop null fields (the schemas have no nullable field) and unknown fields, recording the latter."""
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            return  # metadata: the API server checks ObjectMeta itself
        for key in list(value):
            sub = props.get(key) if props is not None else extra
            if value[key] is None:
                del value[key]
            elif sub is None:
                dropped.append(f"{path}{key}")
                del value[key]
            else:
                _prune(sub, value[key], f"{path}{key}.", dropped)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _prune(schema["items"], item, f"{path[:-1]}[{i}].", dropped)


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default(sub, value[key])
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                _default(schema["additionalProperties"], item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(schema["items"], item)


@functools.cache
def _validator(kind: str) -> Any:
    jsonschema = _jsonschema()

    def go_pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
        # Go's regexp: "$" is the end of the text (Python's "$" also matches before a final newline).
        go = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
        if validator.is_type(instance, "string") and not re.search(go, instance):
            yield jsonschema.ValidationError(f"{instance!r} should match {pattern!r}")

    draft4 = jsonschema.Draft4Validator
    cls = jsonschema.validators.extend(draft4, {"pattern": go_pattern})
    return cls(schema_of(kind), format_checker=draft4.FORMAT_CHECKER)


def _where(path: Any) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text or "<root>"


# The API server runs no CEL rule once the schema found one of these (wrong type, required field missing,
# too long, too many, unsupported value): hasBlockingErr in apiextensions' customresource strategy.
BLOCKING = {"type", "required", "maxLength", "maxItems", "maxProperties", "enum"}


def _schema_errors(kind: str, obj: dict[str, Any]) -> tuple[list[str], bool]:
    """The schema's errors, and whether one of them blocks the CEL rules."""
    errors = []
    blocking = False
    for error in _validator(kind).iter_errors(obj):
        detail = "; ".join(sorted({e.message for e in error.context})) if error.context else ""
        errors.append(f"{_where(error.absolute_path)}: {error.message}" + (f" ({detail})" if detail else ""))
        int_or_string = error.validator == "anyOf" and error.schema.get("x-kubernetes-int-or-string")
        blocking = blocking or error.validator in BLOCKING or bool(int_or_string)
    return sorted(errors), blocking


@functools.cache
def _cel_environment() -> Any:
    # One per process: building one raises the recursion limit (sys.setrecursionlimit(2500)), which
    # hypothesis reports when it happens inside a test (see the cel_ready fixture).
    return _celpy().Environment()


@functools.cache
def _program(rule: str) -> Any:
    env = _cel_environment()
    return env.program(env.compile(rule))


def cel_holds(rule: str, value: Any) -> bool:
    """One rule on one value: True only when it evaluates to true (an evaluation error rejects, as in
    Kubernetes)."""
    celpy = _celpy()
    try:
        result = _program(rule).evaluate({"self": celpy.json_to_cel(value)})
    except Exception:  # CELEvalError and whatever else a rule on a wrongly typed value raises
        return False
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def _cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    errors = [
        f"{path or '<root>'}: {rule['message']}"
        for rule in schema.get("x-kubernetes-validations", [])
        if not cel_holds(rule["rule"], value)
    ]
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                errors += _cel_errors(sub, item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


class Admission(NamedTuple):
    errors: list[str]  # empty: the API server stores the object
    dropped: list[str]  # unknown fields pruned (kubectl --validate=strict refuses the object instead)
    stored: dict[str, Any]  # the object as stored: pruned and defaulted


def admit(doc: dict[str, Any]) -> Admission:
    """What the API server does with ``doc`` on create: with the status subresource on, a create ignores
    ``status``; ObjectMeta needs a name; then pruning, defaulting, the schema and the CEL rules."""
    kind = doc["kind"]
    schema = schema_of(kind)
    obj = clone(doc)
    obj.pop("status", None)
    dropped: list[str] = []
    _prune(schema, obj, "", dropped)
    _default(schema, obj)
    errors, blocking = _schema_errors(kind, obj)
    if not (isinstance(obj.get("metadata"), dict) and obj["metadata"].get("name")):
        errors.append("metadata.name: Required value")
    if blocking:
        errors.append("<root>: some validation rules were not checked because the object was invalid")
    else:
        errors += _cel_errors(schema, obj)
    return Admission(errors, dropped, obj)


# --- the corpus (tests/helpers/crdcases.py, shared with tests/cluster/test_apiserver_crds.py) -------------

# Where the model and the CRDs disagree (case id -> why). Each is a strict xfail in the agreement test.
KNOWN_DISAGREEMENTS: dict[str, str] = {}


def test_corpus_ids_are_unique_and_cover_both_kinds() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c.doc["kind"] for c in CASES if c.valid} == set(KINDS)
    assert set(KNOWN_DISAGREEMENTS) <= set(ids)


def test_every_rule_fires_somewhere_in_the_corpus() -> None:
    """Each x-kubernetes-validations rule, at each node it sits on, refuses at least one corpus case."""
    fired: set[tuple[str, str]] = set()
    for case in CASES:
        if not case.valid:
            for error in admit(case.doc).errors:
                fired.add((case.doc["kind"], re.sub(r"\[\d+\]", "[]", error)))
    missing = [
        f"{kind} {path}: {rule['message']}"
        for kind in KINDS
        for path, rule in rules_of(kind)
        if (kind, f"{path}: {rule['message']}") not in fired
    ]
    assert not missing, "rules no case breaks:\n" + "\n".join(missing)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crd_verdict(case: Case) -> None:
    result = admit(case.doc)
    if case.valid:
        assert result.errors == [], f"{case.id}: the CRD refuses a valid policy"
    else:
        assert result.errors, f"{case.id}: the CRD accepts an invalid policy"
        assert any(case.expect in e for e in result.errors), f"{case.id}: wrong rule fired: {result.errors}"


def test_unknown_fields_are_pruned_and_defaults_applied() -> None:
    result = admit(edit(LRP_SVC, {"spec.weight": 3, "spec.config": None}))
    assert result.dropped == ["spec.weight"]
    spec = result.stored["spec"]
    assert (spec["enabled"], spec["skipRedirectFromBackend"], spec["config"]) == (
        True,
        False,
        {"enableOutCluster": True},
    )
    assert admit(BP_SVC).stored["spec"]["backend"]["serviceEndpoint"]["redirectMode"] == "podEndpoint"


def test_cel_rules_compile() -> None:
    for kind in KINDS:
        for path, rule in rules_of(kind):
            try:
                _program(rule["rule"])
            except Exception as error:  # pragma: no cover - the message names the rule
                pytest.fail(f"{kind} {path}: rule does not compile: {error}\n{rule['rule']}")


# --- the model gives the same verdicts -------------------------------------------------------------------

ModelParse = Callable[[dict[str, Any]], Any]


@pytest.fixture(scope="module")
def model_parse() -> ModelParse:
    try:
        from balancing.model import objects
        from balancing.model import policies as _policies  # noqa: F401
    except ImportError:
        pytest.skip("the model has no policies yet (src/balancing/model/policies.py)")
    if not all((API_VERSION, kind) in objects.KINDS for kind in KINDS):
        pytest.skip(f"objects.parse_object does not read {API_VERSION} yet")
    return objects.parse_object


def model_accepts(parse: ModelParse, doc: dict[str, Any]) -> tuple[bool, str]:
    import pydantic

    try:
        parse(clone(doc))
    except (pydantic.ValidationError, ValueError) as error:
        return False, str(error)
    return True, ""


def _agreement_params() -> list[Any]:
    return [
        pytest.param(c, id=c.id, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DISAGREEMENTS[c.id]))
        if c.id in KNOWN_DISAGREEMENTS
        else pytest.param(c, id=c.id)
        for c in CASES
    ]


@pytest.mark.parametrize("case", _agreement_params())
def test_model_agrees_with_crd(case: Case, model_parse: ModelParse) -> None:
    accepted, error = model_accepts(model_parse, case.doc)
    assert accepted == case.valid, f"{case.id}: model {'accepts' if accepted else 'refuses'}: {error}"
    if accepted:  # and the CRD's defaults are the model's: the stored object means the same
        assert model_parse(admit(case.doc).stored) == model_parse(clone(case.doc))


def _example_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{i}", doc)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc
    ]


def test_examples_cover_both_kinds() -> None:
    docs = _example_docs()
    assert {d["kind"] for _, d in docs} == set(KINDS)
    assert all(d["apiVersion"] == API_VERSION for _, d in docs)


@pytest.mark.parametrize(("name", "doc"), _example_docs(), ids=[n for n, _ in _example_docs()])
def test_example_is_valid(name: str, doc: dict[str, Any]) -> None:
    result = admit(doc)
    assert result.errors == [] and result.dropped == [], name


@pytest.mark.parametrize(("name", "doc"), _example_docs(), ids=[n for n, _ in _example_docs()])
def test_model_accepts_example(name: str, doc: dict[str, Any], model_parse: ModelParse) -> None:
    assert model_accepts(model_parse, doc) == (True, ""), name


# --- random policies -------------------------------------------------------------------------------------

NAMES = ("a", "b", "c", "dns", "dns-tcp", "http")
OMIT = object()


@st.composite
def valid_policies(draw: st.DrawFn) -> dict[str, Any]:
    """Policies built only from valid parts, paired correctly."""
    kind = draw(st.sampled_from(KINDS))
    count = draw(st.integers(1, 3))
    numbers = draw(st.lists(st.integers(1, 65535), min_size=count, max_size=count, unique=True))
    protocols = draw(st.lists(st.sampled_from(["TCP", "UDP"]), min_size=count, max_size=count))
    as_text = draw(st.lists(st.booleans(), min_size=2 * count, max_size=2 * count))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=count, max_size=count, unique=True))
    named = count > 1 or draw(st.booleans())
    back_numbers = draw(st.lists(st.integers(1, 65535), min_size=count, max_size=count))

    def ports(nums: list[int], texts: list[bool]) -> list[dict[str, Any]]:
        return [
            port(str(n) if t else n, p, names[i] if named else None)
            for i, (n, p, t) in enumerate(zip(nums, protocols, texts, strict=True))
        ]

    front = ports(numbers, as_text[:count])
    back = draw(st.permutations(ports(back_numbers, as_text[count:])))
    label_key = st.sampled_from(["app", "k8s-app", "app.kubernetes.io/name", "Tier_2", "x.y/z-1"])
    label_value = st.sampled_from(["", "web", "dns", "v1.2", "A_b-c"])
    expression = st.one_of(
        st.fixed_dictionaries(
            {
                "key": label_key,
                "operator": st.sampled_from(["In", "NotIn"]),
                "values": st.lists(label_value, min_size=1, max_size=2),
            }
        ),
        st.fixed_dictionaries({"key": label_key, "operator": st.sampled_from(["Exists", "DoesNotExist"])}),
    )
    selector = st.fixed_dictionaries(
        {},
        optional={
            "matchLabels": st.dictionaries(label_key, label_value, max_size=2),
            "matchExpressions": st.lists(expression, max_size=2),
        },
    )
    ip = st.sampled_from(["10.0.0.1", "169.254.20.10", "fd00::10", "::ffff:10.0.0.1", "2001:db8::1"])
    if draw(st.booleans()):
        frontend: dict[str, Any] = {"addressMatcher": {"ip": draw(ip), "toPorts": front}}
    else:
        matcher = {"serviceName": "svc", "namespace": "ns"}
        frontend = {"serviceMatcher": matcher if draw(st.booleans()) else {**matcher, "toPorts": front}}
    config = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "nodeLabelSelector": selector,
                "enableOutCluster": st.booleans(),
                **({"qosLimit": st.integers(0, 2**32 - 1)} if kind == "LocalRedirectPolicy" else {}),
            },
        )
    )
    spec: dict[str, Any] = {"frontend": frontend, "config": config}
    if kind == "LocalRedirectPolicy":
        spec["backend"] = {"endpointSelector": draw(selector), "toPorts": back}
        spec["skipRedirectFromBackend"] = draw(st.booleans())
    elif draw(st.booleans()):
        mode = draw(st.sampled_from(["podEndpoint", "hostPort", "nodeProxy"]))
        spec["backend"] = {
            "serviceEndpoint": {"endpointSelector": draw(selector), "toPorts": back, "redirectMode": mode}
        }
    else:
        spec["backend"] = {
            "addressEndpoint": {"addresses": draw(st.lists(ip, min_size=1, max_size=3)), "toPorts": back}
        }
    return policy(kind, spec)


@st.composite
def random_policies(draw: st.DrawFn) -> dict[str, Any]:
    """Policies from a mix of valid and invalid parts (mostly valid ones, so some whole policies are);
    ``None`` is an explicit null, ``OMIT`` leaves the field out."""

    def maybe(strategy: st.SearchStrategy[Any], bad_values: list[Any]) -> Any:
        return draw(st.one_of(strategy, strategy, strategy, st.sampled_from(bad_values)))

    def one_port() -> dict[str, Any]:
        entry = {
            "port": maybe(
                st.sampled_from(["53", "80", 80, 443, "65535"]), ["0", 0, "65536", "080", "x", 70000]
            ),
            "protocol": maybe(st.sampled_from(["TCP", "UDP"]), ["SCTP", "tcp"]),
        }
        name = maybe(st.sampled_from([OMIT, "a", "b", "c", None]), ["", "a_b", "-a"])
        return entry if name is OMIT else {**entry, "name": name}

    def to_ports() -> list[dict[str, Any]] | None:
        return None if draw(st.integers(0, 9)) == 0 else [one_port() for _ in range(draw(st.integers(0, 3)))]

    def selector() -> dict[str, Any]:
        key = st.sampled_from(["app", "x.io/app", "a b", "-a", "A/b"])
        expr: dict[str, Any] = {
            "key": draw(key),
            "operator": draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Eq"])),
        }
        if draw(st.booleans()):
            expr["values"] = draw(st.lists(st.sampled_from(["v", "", "a b"]), max_size=2))
        out: dict[str, Any] = {}
        if draw(st.booleans()):
            # (no null values: see KNOWN_DISAGREEMENTS["lrp/null-match-label"])
            out["matchLabels"] = {draw(key): draw(st.sampled_from(["v", "", "a b"]))}
        if draw(st.booleans()):
            out["matchExpressions"] = [expr]
        return out

    kind = draw(st.sampled_from(KINDS))
    shape = draw(st.sampled_from(["service", "service", "address", "address", "both", "neither"]))
    ip = st.sampled_from(["10.0.0.1", "fd00::1", "0.0.0.0", "10.0.0.256", "::"])
    frontend: dict[str, Any] = {}
    if shape in ("service", "both"):
        matcher: dict[str, Any] = {"serviceName": "svc", "namespace": "ns"}
        if draw(st.booleans()):
            matcher["toPorts"] = to_ports()
        frontend["serviceMatcher"] = matcher
    if shape in ("address", "both"):
        frontend["addressMatcher"] = {"ip": draw(ip), "toPorts": to_ports()}
    spec: dict[str, Any] = {"frontend": frontend}
    if kind == "LocalRedirectPolicy":
        spec["backend"] = {"endpointSelector": selector(), "toPorts": to_ports()}
        spec["config"] = {"qosLimit": maybe(st.integers(0, 2**32 - 1), [-1, 2**32, None, True])}
        spec["skipRedirectFromBackend"] = maybe(st.booleans(), [None, "true", 1])
    else:
        backend = draw(st.sampled_from(["service", "service", "address", "address", "both", "neither"]))
        spec["backend"] = {}
        if backend in ("service", "both"):
            mode = maybe(st.sampled_from(["podEndpoint", "hostPort", "nodeProxy"]), ["nodePort"])
            spec["backend"]["serviceEndpoint"] = {
                "endpointSelector": selector(),
                "toPorts": to_ports(),
                "redirectMode": mode,
            }
        if backend in ("address", "both"):
            spec["backend"]["addressEndpoint"] = {
                "addresses": draw(st.lists(ip, max_size=2)),
                "toPorts": to_ports(),
            }
        spec["config"] = {"nodeLabelSelector": selector()}
    return policy(kind, spec)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def cel_ready() -> None:
    """Every rule compiled before hypothesis runs (the CEL environment changes the recursion limit)."""
    for kind in KINDS:
        _validator(kind)
        for _, rule in rules_of(kind):
            _program(rule["rule"])


@PROPERTY
@given(valid_policies())
def test_crd_admits_random_valid_policies(cel_ready: None, doc: dict[str, Any]) -> None:
    result = admit(doc)
    assert result.errors == [], result.errors


@PROPERTY
@given(valid_policies())
def test_model_accepts_random_valid_policies(
    cel_ready: None, model_parse: ModelParse, doc: dict[str, Any]
) -> None:
    assert model_accepts(model_parse, doc) == (True, "")
    assert model_parse(admit(doc).stored) == model_parse(clone(doc))


@PROPERTY
@given(random_policies())
def test_model_and_crd_agree_on_random_policies(
    cel_ready: None, model_parse: ModelParse, doc: dict[str, Any]
) -> None:
    crd_errors = admit(doc).errors
    accepted, error = model_accepts(model_parse, doc)
    assert accepted == (not crd_errors), f"model: {error or 'accepts'}; CRD: {crd_errors or 'accepts'}"
