"""sources.selected_pods: the pod watches BalancingPolicies need; the merge of overlapping pod watches."""

from __future__ import annotations

from typing import Any

import pytest

from balancing.model.objects import KubeObject, Pod, parse_object
from balancing.model.policies import BalancingPolicy, LocalRedirectPolicy
from balancing.model.selectors import LabelSelector
from balancing.sources.selected_pods import PodQuery, PodUnion, pod_queries, selector_query
from balancing.sources.update import SourceUpdate

NS = "io.kubernetes.pod.namespace"
PORTS = [{"port": "80", "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("selector", "query"),
    [
        ({}, PodQuery("", "")),
        ({"matchLabels": {"b": "2", "a": "1"}}, PodQuery("", "a=1,b=2")),
        ({"matchLabels": {NS: "kube-system", "k8s-app": "dns"}}, PodQuery("kube-system", "k8s-app=dns")),
        (
            {"matchExpressions": [{"key": NS, "operator": "In", "values": ["team-a"]}]},
            PodQuery("team-a", ""),
        ),
        (  # two namespaces: the API server can't, so every namespace (the model filters)
            {"matchExpressions": [{"key": NS, "operator": "In", "values": ["a", "b"]}]},
            PodQuery("", ""),
        ),
        (
            {"matchExpressions": [{"key": NS, "operator": "NotIn", "values": ["kube-system"]}]},
            PodQuery("", ""),
        ),
        (
            {
                "matchLabels": {"app": "web"},
                "matchExpressions": [
                    {"key": "tier", "operator": "NotIn", "values": ["b", "a"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                    {"key": "zone", "operator": "Exists"},
                ],
            },
            PodQuery("", "!canary,app=web,tier notin (a,b),zone"),
        ),
    ],
)
def test_selector_query(selector: dict[str, Any], query: PodQuery) -> None:
    assert selector_query(LabelSelector.model_validate(selector)) == query


def test_query_paths() -> None:
    assert PodQuery("", "app=web").path == "/api/v1/pods"
    assert PodQuery("kube-system", "").path == "/api/v1/namespaces/kube-system/pods"


def balancing(name: str, backend: dict[str, Any], enabled: bool = True) -> BalancingPolicy:
    frontend = {"addressMatcher": {"ip": "10.96.0.9", "toPorts": PORTS}}
    spec = {"enabled": enabled, "frontend": frontend, "backend": backend}
    return BalancingPolicy.model_validate({"metadata": {"name": name}, "spec": spec})


def by_selector(app: str, mode: str = "podEndpoint") -> dict[str, Any]:
    selector = {"matchLabels": {"app": app}}
    return {"serviceEndpoint": {"endpointSelector": selector, "toPorts": PORTS, "redirectMode": mode}}


def test_pod_queries_of_the_policies_in_force() -> None:
    lrp = LocalRedirectPolicy.model_validate(
        {
            "metadata": {"name": "dns"},
            "spec": {
                "frontend": {"addressMatcher": {"ip": "169.254.20.10", "toPorts": PORTS}},
                "backend": {"endpointSelector": {"matchLabels": {"app": "dns"}}, "toPorts": PORTS},
            },
        }
    )
    policies: list[KubeObject] = [
        balancing("a", by_selector("web")),
        balancing("b", by_selector("web", "hostPort")),  # same selector: one watch
        balancing("c", by_selector("edge", "nodeProxy")),
        balancing("d", by_selector("off"), enabled=False),
        balancing("e", {"addressEndpoint": {"addresses": ["192.0.2.1"], "toPorts": PORTS}}),
        lrp,  # this node's pods are followed anyway
    ]
    assert pod_queries(policies) == {PodQuery("", "app=web"), PodQuery("", "app=edge")}


def pod(name: str, version: str = "1") -> Pod:
    obj = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"v": version}},
        }
    )
    assert isinstance(obj, Pod)
    return obj


def ups(update: SourceUpdate) -> list[tuple[str, str]]:
    return [(o.metadata.name, o.metadata.labels["v"]) for o in update.upserts]


def test_union_delivers_each_pod_once_and_deletes_it_with_its_last_holder() -> None:
    union = PodUnion()
    assert ups(union.apply("node", SourceUpdate([pod("a")]))) == [("a", "1")]
    assert ups(union.apply("query", SourceUpdate([pod("a"), pod("b")]))) == [("b", "1")]
    assert not union.apply("node", SourceUpdate(deletes=[("Pod", "default", "a")]))  # query still holds it
    assert union.apply("query", SourceUpdate(deletes=[("Pod", "default", "a")])).deletes == [
        ("Pod", "default", "a")
    ]
    assert len(union) == 1


def test_union_follows_one_holder_so_a_lagging_watch_never_replays_old_versions() -> None:
    union = PodUnion()
    assert ups(union.apply("node", SourceUpdate([pod("a", "1")]))) == [("a", "1")]  # node: the primary
    union.apply("query", SourceUpdate([pod("a", "1")]))
    assert ups(union.apply("node", SourceUpdate([pod("a", "2")]))) == [("a", "2")]
    assert ups(union.apply("node", SourceUpdate([pod("a", "3")]))) == [("a", "3")]
    assert ups(union.apply("query", SourceUpdate([pod("a", "2")]))) == [], "the lagging watch is not shown"
    assert ups(union.apply("query", SourceUpdate([pod("a", "3")]))) == []
    assert union.drop("query") == SourceUpdate()


def test_union_falls_back_to_another_holder_when_the_primary_leaves() -> None:
    union = PodUnion()
    union.apply("node", SourceUpdate([pod("a", "1")]))
    union.apply("query", SourceUpdate([pod("a", "2")]))  # ahead of the primary for now
    update = union.drop("node")
    assert ups(update) == [("a", "2")] and not update.deletes, "the remaining holder's version is in force"
    assert ups(union.apply("query", SourceUpdate([pod("a", "3")]))) == [("a", "3")], "now the primary"
    union.apply("node", SourceUpdate([pod("a", "3")]))
    assert union.apply("node", SourceUpdate(deletes=[("Pod", "default", "a")])) == SourceUpdate()


def test_dropping_a_holder_deletes_only_what_nobody_else_holds() -> None:
    union = PodUnion()
    union.apply("node", SourceUpdate([pod("a")]))
    union.apply("q1", SourceUpdate([pod("a"), pod("b"), pod("c")]))
    union.apply("q2", SourceUpdate([pod("c")]))
    assert sorted(union.drop("q1").deletes) == [("Pod", "default", "b")]
    assert union.drop("unknown") == SourceUpdate()
    assert len(union) == 2


def test_other_kinds_are_ignored() -> None:
    union = PodUnion()
    node = parse_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}})
    update = union.apply("q", SourceUpdate([node]))
    assert not update
