"""Endpoint selection: kube-proxy's TestCategorizeEndpoints table, ported, plus our own and reason cases.

The upstream table is ``pkg/proxy/topology_test.go`` as of the PreferSameNode traffic distribution (KEP-3015):
every case is here under its upstream name, except those in ``UPSTREAM_NOT_APPLICABLE`` (with the reason).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancing.model import endpoints
from balancing.model.desired import FrontendKind
from balancing.model.endpoints import Candidate, SelectionContext

HERE = "node-1"


def ep(
    addr: str,
    *,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    local: bool = False,
    node: str = "node-2",
) -> Candidate:
    host, port = addr.rsplit(":", 1)
    return Candidate(
        ip=ipaddress.ip_address(host),
        port=int(port),
        node_name=HERE if local else node,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
    )


@dataclass
class Case:
    """``None`` for cluster/local means "the service does not use this set" (unlike an empty set)."""

    name: str
    eps: list[Candidate]
    cluster: set[str] | None
    local: set[str] | None = None
    all: set[str] | None = None  # defaults to whichever of cluster/local is set
    only_remote: bool = False  # has_any although nothing is reachable from here
    zone: str = "zone-a"  # this node's topology.kubernetes.io/zone label ("" when missing)
    node: str = HERE  # this node's name
    itp_local: bool = False
    etp_local: bool = False
    external: bool = False  # has a nodePort (externally accessible)


FOUR_ZONED = [
    ep("10.1.2.3:80", zones=("zone-a",)),
    ep("10.1.2.4:80", zones=("zone-b",)),
    ep("10.1.2.5:80", zones=("zone-c",)),
    ep("10.1.2.6:80", zones=("zone-a",)),
]
FOUR_NODE_HINTED = [
    ep("10.1.2.3:80", zones=("zone-a",), nodes=("node-1",)),
    ep("10.1.2.4:80", zones=("zone-b",), nodes=("node-2",)),
    ep("10.1.2.5:80", zones=("zone-c",), nodes=("node-3",)),
    ep("10.1.2.6:80", zones=("zone-a",), nodes=("node-4",)),
]
ALL_FOUR = {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"}
ZONE_A = {"10.1.2.3:80", "10.1.2.6:80"}
LOCAL_AND_REMOTE = [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")]
BOTH = {"10.0.0.0:80", "10.0.0.1:80"}
ZONED_LOCAL = [
    ep("10.1.2.3:80", zones=("zone-a",), local=True),
    ep("10.1.2.4:80", zones=("zone-b",), local=True),
    ep("10.1.2.5:80", zones=("zone-c",)),
    ep("10.1.2.6:80", zones=("zone-a",)),
]
REMOTE_TERMINATING = [
    ep("10.0.0.0:80", ready=False, serving=True, terminating=True),
    ep("10.0.0.1:80", ready=False, serving=True, terminating=True),
]
MIXED_TERMINATING = [
    ep("10.0.0.0:80"),
    ep("10.0.0.1:80", ready=False, serving=False, local=True),
    ep("10.0.0.2:80", ready=False, serving=True, terminating=True, local=True),
    ep("10.0.0.3:80", ready=False, serving=True, terminating=True),
]

# kube-proxy's TestCategorizeEndpoints, every case under its upstream name (in upstream order).
UPSTREAM_CASES = [
    Case("should use topology since all endpoints have hints, node has a zone label and and there are "
         "endpoints for the node's zone", FOUR_ZONED, ZONE_A),
    Case("externalTrafficPolicy: Local, topology ignored for Local endpoints", ZONED_LOCAL, ZONE_A,
         local={"10.1.2.3:80", "10.1.2.4:80"}, all={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"},
         etp_local=True, external=True),
    Case("internalTrafficPolicy: Local, topology ignored for Local endpoints", ZONED_LOCAL, ZONE_A,
         local={"10.1.2.3:80", "10.1.2.4:80"}, all={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"},
         itp_local=True, external=True),
    Case("empty node labels", [ep("10.1.2.3:80", zones=("zone-a",))], {"10.1.2.3:80"}, zone=""),
    Case("empty zone label", [ep("10.1.2.3:80", zones=("zone-a",))], {"10.1.2.3:80"}, zone=""),
    Case("node in different zone, no endpoint filtering", [ep("10.1.2.3:80", zones=("zone-a",))],
         {"10.1.2.3:80"}, zone="zone-b"),
    Case("unready endpoint", [*FOUR_ZONED[:3], ep("10.1.2.6:80", zones=("zone-a",), ready=False)],
         {"10.1.2.3:80"}),
    Case("only unready endpoints in same zone (should not filter)",
         [ep("10.1.2.3:80", zones=("zone-a",), ready=False), *FOUR_ZONED[1:3],
          ep("10.1.2.6:80", zones=("zone-a",), ready=False)],
         {"10.1.2.4:80", "10.1.2.5:80"}),
    Case("missing hints, no filtering applied", [*FOUR_ZONED[:2], ep("10.1.2.5:80"), FOUR_ZONED[3]],
         ALL_FOUR),
    Case("multiple hints per endpoint, filtering includes any endpoint with zone included",
         [ep("10.1.2.3:80", zones=("zone-a", "zone-b", "zone-c")),
          ep("10.1.2.4:80", zones=("zone-b", "zone-c")),
          ep("10.1.2.5:80", zones=("zone-b", "zone-d")),
          ep("10.1.2.6:80", zones=("zone-c",))],
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, zone="zone-c"),
    Case("PreferSameNode available", FOUR_NODE_HINTED, {"10.1.2.3:80"}),
    Case("PreferSameNode ignored if some endpoints unhinted",
         [FOUR_NODE_HINTED[0], ep("10.1.2.4:80"), *FOUR_NODE_HINTED[2:]], ALL_FOUR),
    Case("PreferSameNode falls back to PreferSameZone if no endpoint for node", FOUR_NODE_HINTED, ZONE_A,
         node="node-0"),
    Case("conflicting topology and localness require merging allEndpoints",
         [ep("10.0.0.0:80", zones=("zone-a",), local=True), ep("10.0.0.1:80", zones=("zone-b",), local=True),
          ep("10.0.0.2:80", zones=("zone-a",)), ep("10.0.0.3:80", zones=("zone-b",))],
         {"10.0.0.0:80", "10.0.0.2:80"}, local={"10.0.0.0:80", "10.0.0.1:80"},
         all={"10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"}, etp_local=True, external=True),
    Case("internalTrafficPolicy: Local, with empty endpoints", [], None, local=set(), itp_local=True),
    Case("internalTrafficPolicy: Local, but all endpoints are remote", [ep("10.0.0.0:80"), ep("10.0.0.1:80")],
         None, local=set(), only_remote=True, itp_local=True),
    Case("internalTrafficPolicy: Local, all endpoints are local",
         [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80", local=True)], None, local=BOTH, itp_local=True),
    Case("internalTrafficPolicy: Local, some endpoints are local", LOCAL_AND_REMOTE, None,
         local={"10.0.0.0:80"}, itp_local=True),
    Case("Cluster traffic policy, endpoints not Ready",
         [ep("10.0.0.0:80", ready=False), ep("10.0.0.1:80", ready=False)], set()),
    Case("Cluster traffic policy, some endpoints are Ready",
         [ep("10.0.0.0:80", ready=False), ep("10.0.0.1:80")], {"10.0.0.1:80"}),
    Case("Cluster traffic policy, all endpoints are terminating",
         [ep("10.0.0.0:80", ready=False, serving=True, terminating=True, local=True), REMOTE_TERMINATING[1]],
         BOTH),
    Case("iTP: Local, eTP: Cluster, some endpoints local", LOCAL_AND_REMOTE, BOTH, local={"10.0.0.0:80"},
         all=BOTH, itp_local=True, external=True),
    Case("iTP: Cluster, eTP: Local, some endpoints local", LOCAL_AND_REMOTE, BOTH, local={"10.0.0.0:80"},
         all=BOTH, etp_local=True, external=True),
    Case("iTP: Local, eTP: Local, some endpoints local", LOCAL_AND_REMOTE, BOTH, local={"10.0.0.0:80"},
         all=BOTH, itp_local=True, etp_local=True, external=True),
    Case("iTP: Local, eTP: Local, all endpoints remote", [ep("10.0.0.0:80"), ep("10.0.0.1:80")], BOTH,
         local=set(), all=BOTH, itp_local=True, etp_local=True, external=True),
    Case("iTP: Local, eTP: Local, all endpoints remote and terminating", REMOTE_TERMINATING, BOTH,
         local=set(), all=BOTH, only_remote=True, itp_local=True, etp_local=True, external=True),
    Case("iTP: Cluster, eTP: Local, with terminating endpoints", MIXED_TERMINATING, {"10.0.0.0:80"},
         local={"10.0.0.2:80"}, all={"10.0.0.0:80", "10.0.0.2:80"}, etp_local=True, external=True),
    Case("externalTrafficPolicy ignored if not externally accessible",
         [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)], BOTH, etp_local=True),
    Case("no cluster endpoints for iTP:Local internal-only service",
         [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)], None, local={"10.0.0.1:80"}, itp_local=True),
]  # fmt: skip

UPSTREAM_NOT_APPLICABLE = {
    "PreferSameNode falls back to same-zone when feature gate disabled":
        "Balancing has no feature gates: it always behaves as kube-proxy with PreferSameTrafficDistribution "
        "on (beta and on by default since Kubernetes 1.34), so node hints are always read",
}  # fmt: skip

# Ours: the order node → zone → all, which endpoints count, and the fallbacks around hints.
OUR_CASES = [
    Case("node hints win over zone hints for another zone",
         [ep("10.0.0.0:80", nodes=(HERE,), zones=("zone-b",)), ep("10.0.0.1:80", nodes=("node-2",),
                                                                   zones=("zone-a",))],
         {"10.0.0.0:80"}),
    Case("node hints without zone hints, none for this node: no filtering",
         [ep("10.0.0.0:80", nodes=("node-3",)), ep("10.0.0.1:80", nodes=("node-2",))], BOTH),
    Case("node hints ignored when an endpoint has no node hint, zone hints apply",
         [ep("10.0.0.0:80", nodes=(HERE,), zones=("zone-b",)), ep("10.0.0.1:80", zones=("zone-a",))],
         {"10.0.0.1:80"}),
    Case("node hints apply on a node without a zone label",
         [ep("10.0.0.0:80", nodes=(HERE,), zones=("zone-a",)), ep("10.0.0.1:80", nodes=("node-2",),
                                                                   zones=("zone-a",))],
         {"10.0.0.0:80"}, zone=""),
    Case("only unready endpoints hinted for this node: node hints ignored, zone hints apply",
         [ep("10.0.0.0:80", nodes=(HERE,), zones=("zone-a",), ready=False),
          ep("10.0.0.1:80", nodes=("node-2",), zones=("zone-a",)),
          ep("10.0.0.2:80", nodes=("node-3",), zones=("zone-b",))],
         {"10.0.0.1:80"}),
    Case("an unready endpoint without hints does not disable hints",
         [*FOUR_ZONED, ep("10.1.2.7:80", ready=False)], ZONE_A),
    Case("a serving-terminating endpoint without hints does not disable hints",
         [*FOUR_ZONED, ep("10.1.2.7:80", ready=False, serving=True, terminating=True)], ZONE_A),
    Case("a ready terminating endpoint counts for hints",
         [*FOUR_ZONED, ep("10.1.2.7:80", terminating=True)], ALL_FOUR | {"10.1.2.7:80"}),
    Case("an empty zone hint matches a node without a zone label, as in kube-proxy",
         [ep("10.0.0.0:80", zones=("",)), ep("10.0.0.1:80", zones=("zone-a",))], {"10.0.0.0:80"}, zone=""),
    Case("terminating fallback ignores hints",
         [ep("10.0.0.0:80", zones=("zone-b",), nodes=("node-2",), ready=False, serving=True,
             terminating=True),
          ep("10.0.0.1:80", zones=("zone-a",), nodes=(HERE,), ready=False, serving=True, terminating=True)],
         BOTH),
    Case("iTP Local: the local set ignores node hints for other nodes",
         [ep("10.0.0.0:80", nodes=("node-2",), local=True), ep("10.0.0.1:80", nodes=(HERE,), local=True)],
         None, local=BOTH, itp_local=True),
    Case("eTP Local: node hints filter the cluster set, not the local set",
         [ep("10.0.0.0:80", nodes=("node-2",), local=True), ep("10.0.0.1:80", nodes=(HERE,), local=True),
          ep("10.0.0.2:80", nodes=("node-2",))],
         {"10.0.0.1:80"}, local=BOTH, all=BOTH, etp_local=True, external=True),
    Case("not-serving terminating endpoints are never used",
         [ep("10.0.0.0:80", ready=False, serving=False, terminating=True)], set()),
    Case("serving but not terminating is not a fallback",
         [ep("10.0.0.0:80", ready=False, serving=True, terminating=False)], set()),
    Case("terminating ready endpoint counts as ready",
         [ep("10.0.0.0:80", terminating=True), ep("10.0.0.1:80")], BOTH),
    Case("local fallback is independent of cluster set", MIXED_TERMINATING, None, local={"10.0.0.2:80"},
         itp_local=True),
]  # fmt: skip

CASES = UPSTREAM_CASES + OUR_CASES


def context(case: Case) -> SelectionContext:
    return SelectionContext(
        node_name=case.node,
        zone=case.zone,
        internal_local=case.itp_local,
        external_local=case.etp_local,
        externally_accessible=case.external,
    )


def names(eps: endpoints.EndpointSet | None) -> set[str] | None:
    return None if eps is None else {str(c) for c in eps.endpoints}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_categorize_endpoints(case: Case) -> None:
    result = endpoints.select_endpoints(case.eps, context(case))
    assert names(result.cluster) == case.cluster
    assert names(result.local) == case.local
    expected_all = case.all if case.all is not None else (case.cluster if case.local is None else case.local)
    assert names(result.all_reachable) == expected_all
    assert result.has_any == (bool(expected_all) or case.only_remote)
    assert result.internal == (result.local if case.itp_local else result.cluster)


def test_upstream_table_is_complete_and_names_are_unique() -> None:
    upstream = [c.name for c in UPSTREAM_CASES]
    assert len(upstream) == 29 and len(UPSTREAM_NOT_APPLICABLE) == 1  # the 30 cases of the upstream table
    assert not set(upstream) & set(UPSTREAM_NOT_APPLICABLE)
    assert len({c.name for c in CASES}) == len(CASES)


def reason_case(
    *,
    zone: str = "zone-a",
    node: str = HERE,
    itp_local: bool = False,
    etp_local: bool = False,
    external: bool = False,
) -> Case:
    return Case(
        "", [], None, zone=zone, node=node, itp_local=itp_local, etp_local=etp_local, external=external
    )


NODE_AND_ZONE_ELSEWHERE = [
    ep("10.0.0.0:80", nodes=("node-2",), zones=("zone-b",)),
    ep("10.0.0.1:80", nodes=("node-3",), zones=("zone-c",)),
]
REASONS = [
    ("ready", LOCAL_AND_REMOTE, reason_case(), "ready"),
    ("zone hints", FOUR_ZONED, reason_case(), "ready; topology: zone hints for zone-a"),
    ("missing zone hint", [*FOUR_ZONED[:2], ep("10.1.2.5:80")], reason_case(),
     "ready; zone hints ignored: endpoint 10.1.2.5:80 has no zone hint"),
    ("no hint for zone", FOUR_ZONED, reason_case(zone="zone-q"),
     "ready; zone hints ignored: no endpoint hinted for zone zone-q"),
    ("no zone label", FOUR_ZONED, reason_case(zone=""),
     "ready; zone hints ignored: this node has no topology.kubernetes.io/zone label"),
    ("node hints", FOUR_NODE_HINTED, reason_case(), "ready; topology: node hints for node-1"),
    ("no hint for node, zone hints", FOUR_NODE_HINTED, reason_case(node="node-0"),
     "ready; node hints ignored: no endpoint hinted for node node-0; topology: zone hints for zone-a"),
    ("missing node hint, zone hints", [ep("10.0.0.0:80", nodes=(HERE,), zones=("zone-b",)),
                                       ep("10.0.0.1:80", zones=("zone-a",))], reason_case(),
     "ready; node hints ignored: endpoint 10.0.0.1:80 has no node hint; topology: zone hints for zone-a"),
    ("both ignored", NODE_AND_ZONE_ELSEWHERE, reason_case(),
     "ready; node hints ignored: no endpoint hinted for node node-1; "
     "zone hints ignored: no endpoint hinted for zone zone-a"),
    ("terminating fallback", REMOTE_TERMINATING, reason_case(), "terminating fallback (no ready endpoint)"),
    ("no endpoints", [], reason_case(), "no endpoints"),
    ("none usable", [ep("10.0.0.0:80", ready=False)], reason_case(),
     "no usable endpoint (1 neither ready nor serving-terminating)"),
    ("local ready", LOCAL_AND_REMOTE, reason_case(itp_local=True), "local ready on node-1"),
    ("local ignores hints", ZONED_LOCAL, reason_case(itp_local=True),
     "local ready on node-1; topology ignored (traffic policy Local)"),
    ("local fallback", MIXED_TERMINATING, reason_case(itp_local=True),
     "local terminating fallback (no ready endpoint on node-1)"),
    ("no local", [ep("10.0.0.0:80")], reason_case(itp_local=True), "no endpoints on node-1"),
]  # fmt: skip


@pytest.mark.parametrize(("eps", "case", "reason"), [r[1:] for r in REASONS], ids=[r[0] for r in REASONS])
def test_reason_is_returned_as_data(eps: list[Candidate], case: Case, reason: str) -> None:
    assert endpoints.select_endpoints(eps, context(case)).internal.reason == reason


def test_union_reason_names_both_sets() -> None:
    ctx = context(reason_case(etp_local=True, external=True))
    result = endpoints.select_endpoints(LOCAL_AND_REMOTE, ctx)
    assert result.all_reachable.reason == "ready + local ready on node-1"


def kube_proxy_cluster(eps: list[Candidate], ctx: SelectionContext) -> set[Candidate]:
    """The cluster set restated from kube-proxy's rule, as an oracle for random inputs."""
    ready = [c for c in eps if c.ready]
    if not ready:
        return {c for c in eps if c.serving and c.terminating}
    if all(c.node_hints for c in ready) and any(ctx.node_name in c.node_hints for c in ready):
        return {c for c in ready if ctx.node_name in c.node_hints}
    if all(c.zone_hints for c in ready) and any(ctx.zone in c.zone_hints for c in ready):
        return {c for c in ready if ctx.zone in c.zone_hints}
    return set(ready)


candidates = st.builds(
    Candidate,
    ip=st.integers(1, 20).map(lambda i: ipaddress.IPv4Address(f"10.0.0.{i}")),
    port=st.sampled_from([80, 81]),
    node_name=st.sampled_from(["node-1", "node-2", ""]),
    ready=st.booleans(),
    serving=st.booleans(),
    terminating=st.booleans(),
    zone_hints=st.frozensets(st.sampled_from(["zone-a", "zone-b"])),
    node_hints=st.frozensets(st.sampled_from(["node-1", "node-2"])),
)
contexts = st.builds(
    SelectionContext,
    node_name=st.just(HERE),
    zone=st.sampled_from(["zone-a", "zone-c", ""]),
    internal_local=st.booleans(),
    external_local=st.booleans(),
    externally_accessible=st.booleans(),
    external_client=st.booleans(),
)


@given(st.lists(candidates, max_size=8, unique_by=lambda c: (c.ip, c.port)), contexts)
def test_selection_invariants(eps: list[Candidate], ctx: SelectionContext) -> None:
    result = endpoints.select_endpoints(eps, ctx)
    for chosen in (result.cluster, result.local):
        if chosen is None:
            continue
        assert all(c.ready or (c.serving and c.terminating) for c in chosen.endpoints)
        assert list(chosen.endpoints) == sorted(
            chosen.endpoints, key=lambda c: (int(c.ip), c.port, c.node_name)
        )
    if result.local is not None:
        assert all(c.node_name == HERE for c in result.local.endpoints)
    if result.cluster is not None:
        assert set(result.cluster.endpoints) == kube_proxy_cluster(eps, ctx)
        if any(c.ready for c in eps):
            assert result.cluster.endpoints, "ready endpoints exist, so topology must leave some"
    assert endpoints.select_endpoints(list(reversed(eps)), ctx) == result
    assert result.for_frontend(FrontendKind.CLUSTER_IP) == result.internal
    if not ctx.externally_accessible:
        assert result.external is None and result.arriving is None
        return
    for kind in (FrontendKind.NODE_PORT, FrontendKind.LOAD_BALANCER, FrontendKind.EXTERNAL_IP):
        for node in ("node-1", "node-2", "node-9", ""):
            chosen = result.for_frontend(kind, node)
            assert all(c.ready or c.fallback for c in chosen.endpoints)
            if ctx.external_client and ctx.external_local and kind is FrontendKind.NODE_PORT:
                assert all(c.node_name == node for c in chosen.endpoints)
            elif not (ctx.external_client and ctx.external_local):
                assert result.cluster is not None and chosen.endpoints == result.cluster.endpoints


# --- which set each frontend kind uses ------------------------------------------------------------

NP, LB, EIP, CIP = (FrontendKind.NODE_PORT, FrontendKind.LOAD_BALANCER, FrontendKind.EXTERNAL_IP,
                    FrontendKind.CLUSTER_IP)  # fmt: skip
SPREAD = [
    ep("10.0.0.1:80", local=True),
    ep("10.0.0.2:80", node="node-2"),
    ep("10.0.0.3:80", node="node-3", ready=False, serving=True, terminating=True),
    ep("10.0.0.4:80", node="node-3", ready=False),
    ep("10.0.0.5:80", node=""),
]
READY_ANYWHERE = {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.5:80"}


@dataclass
class KindCase:
    """Expected endpoints per (frontend kind, node of a NodePort address)."""

    name: str
    eps: list[Candidate]
    expect: dict[tuple[FrontendKind, str], set[str]]
    etp_local: bool = False
    itp_local: bool = False
    external_client: bool = False


ALL_KINDS = [(CIP, ""), (NP, HERE), (NP, "node-2"), (NP, "node-3"), (NP, "node-4"), (NP, ""), (LB, ""),
             (EIP, "")]  # fmt: skip


def same(chosen: set[str], **override: set[str]) -> dict[tuple[FrontendKind, str], set[str]]:
    """Every kind gets ``chosen``; ``override`` by "NP_node-2"-style names."""
    expect = dict.fromkeys(ALL_KINDS, chosen)
    for name, value in override.items():
        kind, node = name.split("_", 1) if "_" in name else (name, "")
        expect[{"NP": NP, "LB": LB, "EIP": EIP, "CIP": CIP}[kind], node.replace("_", "-")] = value
    return expect


KIND_CASES = [
    KindCase("policies Cluster: every kind uses the cluster set", SPREAD, same(READY_ANYWHERE)),
    KindCase("iTP Local applies to ClusterIP only", SPREAD, same(READY_ANYWHERE, CIP={"10.0.0.1:80"}),
             itp_local=True),
    KindCase("eTP Local, in-cluster client: short-circuit to the cluster set", SPREAD, same(READY_ANYWHERE),
             etp_local=True),
    KindCase("eTP Local does not apply to ClusterIP, even for external clients", SPREAD,
             same(READY_ANYWHERE, NP_node_1={"10.0.0.1:80"}, NP_node_2={"10.0.0.2:80"},
                  NP_node_3={"10.0.0.3:80"}, NP_node_4=set(), NP=set()),
             etp_local=True, external_client=True),
    KindCase("eTP Cluster, external client: cluster set everywhere", SPREAD, same(READY_ANYWHERE),
             external_client=True),
    KindCase("eTP Local, external client, nothing ready: LB and externalIP fall back cluster-wide",
             [ep("10.0.0.1:80", ready=False), ep("10.0.0.3:80", node="node-3", ready=False, serving=True,
                                                   terminating=True)],
             same({"10.0.0.3:80"}, NP_node_1=set(), NP_node_2=set(), NP_node_4=set(), NP=set()),
             etp_local=True, external_client=True),
    KindCase("eTP Local, in-cluster client: topology hints apply to external frontends",
             [ep("10.0.0.1:80", zones=("zone-a",), node="node-3"), ep("10.0.0.2:80", zones=("zone-b",))],
             same({"10.0.0.1:80"}), etp_local=True),
    KindCase("eTP Local, external client: topology ignored for LB, externalIP and per-node sets",
             [ep("10.0.0.1:80", zones=("zone-a",), node="node-3"), ep("10.0.0.2:80", zones=("zone-b",))],
             same({"10.0.0.1:80", "10.0.0.2:80"}, CIP={"10.0.0.1:80"}, NP_node_1=set(),
                  NP_node_2={"10.0.0.2:80"}, NP_node_3={"10.0.0.1:80"}, NP_node_4=set(), NP=set()),
             etp_local=True, external_client=True),
]  # fmt: skip


@pytest.mark.parametrize("case", KIND_CASES, ids=[c.name for c in KIND_CASES])
def test_set_per_frontend_kind(case: KindCase) -> None:
    ctx = SelectionContext(
        HERE,
        "zone-a",
        case.itp_local,
        case.etp_local,
        externally_accessible=True,
        external_client=case.external_client,
    )
    result = endpoints.select_endpoints(case.eps, ctx)
    got = {(kind, node): names(result.for_frontend(kind, node)) for kind, node in case.expect}
    assert got == case.expect


EXTERNAL_REASONS = [
    ("in-cluster, eTP Cluster", False, False, NP, "node-2", "ready"),
    ("in-cluster, eTP Local", True, False, LB, "",
     "externalTrafficPolicy Local: in-cluster client reaches all endpoints; ready"),
    ("external, eTP Local, LB", True, True, LB, "",
     "externalTrafficPolicy Local, external client via load balancer or external IP: ready on any node"),
    ("external, eTP Local, NodePort with local ready", True, True, NP, "node-2",
     "externalTrafficPolicy Local, external client via node node-2: local ready on node-2"),
    ("external, eTP Local, NodePort with local fallback", True, True, NP, "node-3",
     "externalTrafficPolicy Local, external client via node node-3: local terminating fallback "
     "(no ready endpoint on node-3)"),
    ("external, eTP Local, NodePort on a node without endpoints", True, True, NP, "node-4",
     "externalTrafficPolicy Local, external client via node node-4: no endpoints on node-4"),
    ("external, eTP Local, loopback NodePort (not created, but answered)", True, True, NP, "",
     "externalTrafficPolicy Local, external client via node this host: no endpoints on this host"),
]  # fmt: skip


@pytest.mark.parametrize(("etp_local", "external", "kind", "node", "reason"),
                         [r[1:] for r in EXTERNAL_REASONS], ids=[r[0] for r in EXTERNAL_REASONS])  # fmt: skip
def test_external_reasons(
    etp_local: bool, external: bool, kind: FrontendKind, node: str, reason: str
) -> None:
    ctx = SelectionContext(
        HERE, external_local=etp_local, externally_accessible=True, external_client=external
    )
    assert endpoints.select_endpoints(SPREAD, ctx).for_frontend(kind, node).reason == reason


def test_external_client_fallback_and_empty_reasons() -> None:
    ctx = SelectionContext(HERE, external_local=True, externally_accessible=True, external_client=True)
    prefix = "externalTrafficPolicy Local, external client via load balancer or external IP: "
    fallback = [ep("10.0.0.3:80", ready=False, serving=True, terminating=True)]
    assert endpoints.select_endpoints(fallback, ctx).for_frontend(LB).reason == (
        prefix + "terminating fallback (no ready endpoint)"
    )
    assert endpoints.select_endpoints([], ctx).for_frontend(EIP).reason == prefix + "no endpoints"


def test_external_sets_absent_without_external_frontends() -> None:
    result = endpoints.select_endpoints(
        SPREAD, SelectionContext(HERE, external_local=True, external_client=True)
    )
    assert result.external is None and result.arriving is None
