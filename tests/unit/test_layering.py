"""Precedence (LocalRedirectPolicy, then BalancingPolicy, then Service) and each fallback case, as a table."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from balancing.model.desired import Backend, BackendPod, Frontend, FrontendKind, Owner, PodRef
from balancing.model.layering import Layer, combine, owner_name


def be(ip: str, port: int = 53) -> Backend:
    return Backend(ipaddress.ip_address(ip), port)


LOCAL, CLUSTER, SERVICE = be("10.1.0.7"), be("10.2.0.9"), be("10.0.0.5")
LRP_OWNER = Owner("LocalRedirectPolicy", "", "l", "dns")
BP_OWNER = Owner("BalancingPolicy", "", "b", "dns")
SVC_OWNER = Owner("Service", "kube-system", "kube-dns", "dns")
POD = BackendPod(PodRef("kube-system", "nld-1", "u1"), LOCAL)

L = Layer(LRP_OWNER, (LOCAL,), "1 local backend", backend_pods=(POD,), skip_redirect_from_backends=True,
          qos_limit=5)  # fmt: skip
L_NONE = Layer(LRP_OWNER, (), "no ready pod on node-1 matches endpointSelector app=dns (IPv4)")
L_ADDR = Layer(LRP_OWNER, (LOCAL,), "1 local backend", refuse_when_empty=True, backend_pods=(POD,))
L_ADDR_NONE = Layer(LRP_OWNER, (), "no ready pod on node-1 matches endpointSelector app=dns (IPv4)",
                    refuse_when_empty=True)  # fmt: skip
B = Layer(BP_OWNER, (CLUSTER,), "1 backend (podEndpoint)")
B_NONE = Layer(BP_OWNER, (), "no ready pod matches endpointSelector app=x (IPv4)")
S = Frontend(SVC_OWNER, (SERVICE,), "ready", FrontendKind.CLUSTER_IP, affinity_timeout=300)
S_NONE = Frontend(SVC_OWNER, (), "no endpoints")


@dataclass
class LayerCase:
    name: str
    lrp: Layer | None
    bp: Layer | None
    service: Frontend | None
    owner: Owner | None  # None: no frontend at all
    backends: tuple[Backend, ...] = ()
    fallback: tuple[Backend, ...] | None = None
    fallback_owner: Owner | None = None
    reason: str = ""
    pods: bool = False  # LRP extras (backend pods, skip flag, QoS) carried


CASES = [
    LayerCase("nothing", None, None, None, None),
    LayerCase("Service alone: unchanged", None, None, S, SVC_OWNER, (SERVICE,), reason="ready"),
    LayerCase("LRP over Service", L, None, S, LRP_OWNER, (LOCAL,), (SERVICE,), SVC_OWNER,
              "LocalRedirectPolicy l: 1 local backend; fallback Service kube-system/kube-dns", pods=True),
    LayerCase("LRP over BP over Service: BP is the fallback", L, B, S, LRP_OWNER, (LOCAL,), (CLUSTER,),
              BP_OWNER,
              "LocalRedirectPolicy l: 1 local backend; fallback BalancingPolicy b", pods=True),
    LayerCase("LRP over empty BP: Service is the fallback", L, B_NONE, S, LRP_OWNER, (LOCAL,), (SERVICE,),
              SVC_OWNER, pods=True),
    LayerCase("LRP over a Service without endpoints: empty fallback (refuse)", L, None, S_NONE, LRP_OWNER,
              (LOCAL,), (), SVC_OWNER, pods=True),
    LayerCase("LRP over empty BP and no Service: no fallback", L, B_NONE, None, LRP_OWNER, (LOCAL,), None,
              None,
              "LocalRedirectPolicy l: 1 local backend; no fallback", pods=True),
    LayerCase("LRP addressMatcher alone: no fallback", L_ADDR, None, None, LRP_OWNER, (LOCAL,), None, None,
              "LocalRedirectPolicy l: 1 local backend; no fallback", pods=True),
    LayerCase("LRP addressMatcher over BP: BP fallback", L_ADDR, B, None, LRP_OWNER, (LOCAL,), (CLUSTER,),
              BP_OWNER, pods=True),
    LayerCase("LRP addressMatcher without local backend refuses, whatever lies below", L_ADDR_NONE, B, S,
              LRP_OWNER, (), None, None, "LocalRedirectPolicy l: no ready pod on node-1 matches "
              "endpointSelector app=dns (IPv4); refused"),
    LayerCase("LRP serviceMatcher without local backend: BP, with Service fallback", L_NONE, B, S, BP_OWNER,
              (CLUSTER,), (SERVICE,), SVC_OWNER, "BalancingPolicy b: 1 backend (podEndpoint); fallback "
              "Service kube-system/kube-dns; skipped LocalRedirectPolicy l: no ready pod on node-1 matches "
              "endpointSelector app=dns (IPv4)"),
    LayerCase("LRP serviceMatcher without local backend: the Service", L_NONE, None, S, SVC_OWNER, (SERVICE,),
              reason="ready (LocalRedirectPolicy l: no ready pod on node-1 matches endpointSelector app=dns "
              "(IPv4))"),
    LayerCase("nothing has backends: the Service's refusal", L_NONE, B_NONE, S_NONE, SVC_OWNER, (),
              reason="no endpoints (LocalRedirectPolicy l: no ready pod on node-1 matches endpointSelector "
              "app=dns (IPv4); BalancingPolicy b: no ready pod matches endpointSelector app=x (IPv4))"),
    LayerCase("LRP serviceMatcher alone without backends: refuse", L_NONE, None, None, LRP_OWNER, (),
              reason="LocalRedirectPolicy l: no ready pod on node-1 matches endpointSelector app=dns (IPv4); "
              "nothing below: refused"),
    LayerCase("BP over Service", None, B, S, BP_OWNER, (CLUSTER,), (SERVICE,), SVC_OWNER,
              "BalancingPolicy b: 1 backend (podEndpoint); fallback Service kube-system/kube-dns"),
    LayerCase("BP addressMatcher alone: no fallback", None, B, None, BP_OWNER, (CLUSTER,), None, None,
              "BalancingPolicy b: 1 backend (podEndpoint); no fallback"),
    LayerCase("BP without backends: the Service takes over", None, B_NONE, S, SVC_OWNER, (SERVICE,),
              reason="ready (BalancingPolicy b: no ready pod matches endpointSelector app=x (IPv4))"),
    LayerCase("BP without backends alone: refuse", None, B_NONE, None, BP_OWNER, ()),
    LayerCase("empty LRP and BP, no Service: the LRP owns the refusal", L_NONE, B_NONE, None, LRP_OWNER, ()),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_combine(case: LayerCase) -> None:
    got = combine(case.lrp, case.bp, case.service)
    if case.owner is None:
        assert got is None
        return
    assert got is not None
    assert got.owner == case.owner
    assert got.backends == case.backends
    assert got.fallback == case.fallback
    assert got.fallback_owner == case.fallback_owner
    if case.reason:
        assert got.reason == case.reason
    lrp = case.lrp
    if case.pods:
        assert lrp is not None
        assert got.backend_pods == lrp.backend_pods
        assert got.skip_redirect_from_backends == lrp.skip_redirect_from_backends
        assert got.qos_limit == lrp.qos_limit
    else:
        assert (got.backend_pods, got.skip_redirect_from_backends, got.qos_limit) == ((), False, 0)


def test_service_alone_is_the_very_same_frontend() -> None:
    assert combine(None, None, S) is S


def test_service_taking_over_keeps_its_affinity_and_kind() -> None:
    external = Frontend(SVC_OWNER, (SERVICE,), "ready", FrontendKind.EXTERNAL_IP, affinity_timeout=300)
    got = combine(L_NONE, B_NONE, external)
    assert got is not None and (got.kind, got.affinity_timeout) == (FrontendKind.EXTERNAL_IP, 300)


def test_policy_primary_takes_the_service_kind_but_no_affinity() -> None:
    external = Frontend(SVC_OWNER, (SERVICE,), "ready", FrontendKind.EXTERNAL_IP, affinity_timeout=300)
    for lrp, bp in ((L, None), (None, B)):
        got = combine(lrp, bp, external)
        assert got is not None and (got.kind, got.affinity_timeout) == (FrontendKind.EXTERNAL_IP, 0)
    alone = combine(None, B, None)
    assert alone is not None and alone.kind is FrontendKind.CLUSTER_IP


def test_programmed_state_differs_between_layers() -> None:
    """The datapath writes a map entry when ``programmed_as`` changes: a fallback change must count."""
    with_bp, without_bp = combine(L, B, S), combine(L, None, S)
    assert with_bp is not None and without_bp is not None
    assert with_bp.programmed_as() != without_bp.programmed_as()


def test_owner_name_has_no_port() -> None:
    assert owner_name(SVC_OWNER) == "Service kube-system/kube-dns"
    assert owner_name(LRP_OWNER) == "LocalRedirectPolicy l"
