"""Label selectors: validation (as the API server) and matching (as LabelSelectorAsSelector), table-driven."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from balancing.model.selectors import NAMESPACE_LABEL, LabelSelector, pod_labels


@dataclass
class MatchCase:
    name: str
    selector: dict[str, Any]
    labels: dict[str, str]
    matches: bool


def expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": list(values)}


MATCH_CASES = [
    MatchCase("empty selects everything", {}, {"app": "web"}, True),
    MatchCase("empty selects no labels too", {}, {}, True),
    MatchCase("matchLabels equal", {"matchLabels": {"app": "web"}}, {"app": "web", "x": "y"}, True),
    MatchCase("matchLabels differ", {"matchLabels": {"app": "web"}}, {"app": "db"}, False),
    MatchCase("matchLabels key absent", {"matchLabels": {"app": "web"}}, {}, False),
    MatchCase("matchLabels all must hold", {"matchLabels": {"app": "web", "tier": "a"}}, {"app": "web"},
              False),
    MatchCase("matchLabels empty value", {"matchLabels": {"flag": ""}}, {"flag": ""}, True),
    MatchCase("In: value listed", {"matchExpressions": [expr("app", "In", "web", "db")]}, {"app": "db"},
              True),
    MatchCase("In: value not listed", {"matchExpressions": [expr("app", "In", "web")]}, {"app": "db"}, False),
    MatchCase("In: key absent", {"matchExpressions": [expr("app", "In", "web")]}, {}, False),
    MatchCase("NotIn: value listed", {"matchExpressions": [expr("app", "NotIn", "web")]}, {"app": "web"},
              False),
    MatchCase("NotIn: other value", {"matchExpressions": [expr("app", "NotIn", "web")]}, {"app": "db"}, True),
    MatchCase("NotIn: key absent matches", {"matchExpressions": [expr("app", "NotIn", "web")]}, {}, True),
    MatchCase("Exists: present", {"matchExpressions": [expr("app", "Exists")]}, {"app": ""}, True),
    MatchCase("Exists: absent", {"matchExpressions": [expr("app", "Exists")]}, {"x": "y"}, False),
    MatchCase("DoesNotExist: absent", {"matchExpressions": [expr("app", "DoesNotExist")]}, {}, True),
    MatchCase("DoesNotExist: present", {"matchExpressions": [expr("app", "DoesNotExist")]}, {"app": "1"},
              False),
    MatchCase("labels and expressions both hold",
              {"matchLabels": {"app": "web"}, "matchExpressions": [expr("tier", "In", "a")]},
              {"app": "web", "tier": "a"}, True),
    MatchCase("labels hold, expression fails",
              {"matchLabels": {"app": "web"}, "matchExpressions": [expr("tier", "In", "a")]},
              {"app": "web", "tier": "b"}, False),
    MatchCase("namespace via the Cilium label",
              {"matchLabels": {NAMESPACE_LABEL: "kube-system"}}, pod_labels("kube-system", {}), True),
    MatchCase("namespace via the Cilium label, other namespace",
              {"matchLabels": {NAMESPACE_LABEL: "kube-system"}}, pod_labels("default", {}), False),
]  # fmt: skip


@pytest.mark.parametrize("case", MATCH_CASES, ids=[c.name for c in MATCH_CASES])
def test_matching(case: MatchCase) -> None:
    assert LabelSelector.model_validate(case.selector).matches(case.labels) is case.matches


def test_namespace_label_cannot_be_spoofed_by_a_pod_label() -> None:
    assert pod_labels("default", {NAMESPACE_LABEL: "kube-system", "app": "x"}) == {
        NAMESPACE_LABEL: "default",
        "app": "x",
    }


@dataclass
class InvalidCase:
    name: str
    selector: dict[str, Any]
    loc: tuple[str | int, ...]
    message: str


INVALID_CASES = [
    InvalidCase("In without values", {"matchExpressions": [expr("a", "In")]}, ("matchExpressions", 0),
                "operator In needs at least one value"),
    InvalidCase("NotIn without values", {"matchExpressions": [expr("a", "NotIn")]}, ("matchExpressions", 0),
                "operator NotIn needs at least one value"),
    InvalidCase("Exists with values", {"matchExpressions": [expr("a", "Exists", "x")]},
                ("matchExpressions", 0), "operator Exists takes no values"),
    InvalidCase("DoesNotExist with values", {"matchExpressions": [expr("a", "DoesNotExist", "x")]},
                ("matchExpressions", 0), "operator DoesNotExist takes no values"),
    InvalidCase("unknown operator", {"matchExpressions": [expr("a", "Gt", "1")]},
                ("matchExpressions", 0, "operator"), "Input should be"),
    InvalidCase("lowercase operator", {"matchExpressions": [expr("a", "in", "1")]},
                ("matchExpressions", 0, "operator"), "Input should be"),
    InvalidCase("key missing", {"matchExpressions": [{"operator": "Exists"}]},
                ("matchExpressions", 0, "key"), "Field required"),
    InvalidCase("bad expression key", {"matchExpressions": [expr("-a", "Exists")]},
                ("matchExpressions", 0, "key"), "label key '-a'"),
    InvalidCase("bad expression value", {"matchExpressions": [expr("a", "In", "x y")]},
                ("matchExpressions", 0, "values"), "label value 'x y'"),
    InvalidCase("bad matchLabels key", {"matchLabels": {"a b": "x"}}, ("matchLabels",), "label key 'a b'"),
    InvalidCase("bad matchLabels prefix", {"matchLabels": {"Bad_Prefix/a": "x"}}, ("matchLabels",),
                "the prefix must be a lowercase DNS subdomain"),
    InvalidCase("empty prefix", {"matchLabels": {"/a": "x"}}, ("matchLabels",), "prefix"),
    InvalidCase("name too long", {"matchLabels": {"a" * 64: "x"}}, ("matchLabels",), "1-63 characters"),
    InvalidCase("bad matchLabels value", {"matchLabels": {"a": "-x"}}, ("matchLabels",), "label value '-x'"),
    InvalidCase("value too long", {"matchLabels": {"a": "x" * 64}}, ("matchLabels",), "label value"),
    InvalidCase("matchLabels not a map", {"matchLabels": ["a"]}, ("matchLabels",), "dictionary"),
]  # fmt: skip


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c.name for c in INVALID_CASES])
def test_invalid_selectors(case: InvalidCase) -> None:
    with pytest.raises(ValidationError) as info:
        LabelSelector.model_validate(case.selector)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [case.loc]
    assert case.message in errors[0]["msg"]


@pytest.mark.parametrize(
    "labels",
    [{"app": "web"}, {"k8s.io/app": "x"}, {"a.b-c.d/e_f.g-h": "V_1.2-3"}, {"a": ""}, {"x" * 63: "y" * 63}],
)
def test_valid_keys_and_values(labels: dict[str, str]) -> None:
    assert LabelSelector.model_validate({"matchLabels": labels}).matches(labels)


def test_selector_text_is_kubectl_like() -> None:
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"b": "2", "a": "1"},
            "matchExpressions": [expr("t", "In", "y", "x"), expr("c", "DoesNotExist"), expr("d", "Exists"),
                                 expr("n", "NotIn", "z")],
        }
    )  # fmt: skip
    assert str(selector) == "a=1,b=2,t in (x,y),!c,d,n notin (z)"
    assert str(LabelSelector()) == "<all>"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5)
    | st.sampled_from(["In", "Exists", "app"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["matchLabels", "matchExpressions", "key", "operator", "values", "app"]), inner,
        max_size=4,
    ),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(json_values, st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3))
def test_random_input_parses_or_raises_validation_error(doc: Any, labels: dict[str, str]) -> None:
    try:
        selector = LabelSelector.model_validate(doc)
    except ValidationError:
        return
    assert isinstance(selector.matches(labels), bool)
    assert isinstance(str(selector), str)
