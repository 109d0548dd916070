"""One policy on one node (``compute_policy``: frontends, port mapping, each redirect mode, where it applies),
then policies in the store (layering, incremental recomputation, node labels, conflicts, status)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from balancing.model import objects, policies
from balancing.model.config import ModelConfig
from balancing.model.desired import Backend, BackendPod, FrontendChanges, FrontendKey, PodRef, Protocol
from balancing.model.policy_frontends import (
    PolicyContext,
    PolicyResult,
    compute_policy,
    node_entry,
    not_applied,
)
from balancing.model.store import ClusterStore, PolicyStatus

API = "balancing.elf.io/v1beta1"
DNS_PORTS = [("53", "UDP", "dns"), ("53", "TCP", "dns-tcp")]
NLD = {"matchLabels": {"k8s-app": "nld"}}

# --- builders ------------------------------------------------------------------------------------------


def ports(raw: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    return [{"port": p, "protocol": proto, "name": name} for p, proto, name in raw]


def frontend(
    service: tuple[str, str] | None, vip: str | None, front: list[tuple[str, str, str]] | None
) -> Any:
    if vip is not None:
        return {"addressMatcher": {"ip": vip, "toPorts": ports(front or [])}}
    assert service is not None
    matcher: dict[str, Any] = {"namespace": service[0], "serviceName": service[1]}
    if front:
        matcher["toPorts"] = ports(front)
    return {"serviceMatcher": matcher}


def config(node_selector: dict[str, Any] | None, out_cluster: bool, qos: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {"enableOutCluster": out_cluster}
    if node_selector is not None:
        doc["nodeLabelSelector"] = node_selector
    if qos:
        doc["qosLimit"] = qos
    return doc


def lrp(
    name: str = "nld",
    *,
    service: tuple[str, str] | None = ("kube-system", "kube-dns"),
    vip: str | None = None,
    front: list[tuple[str, str, str]] | None = None,
    back: list[tuple[str, str, str]] | None = None,
    selector: dict[str, Any] | None = None,
    skip: bool = False,
    qos: int = 0,
    node_selector: dict[str, Any] | None = None,
    out_cluster: bool = True,
    enabled: bool = True,
    created: str = "",
) -> policies.LocalRedirectPolicy:
    doc = {"apiVersion": API, "kind": "LocalRedirectPolicy",
           "metadata": {"name": name, "creationTimestamp": created},
           "spec": {"enabled": enabled, "frontend": frontend(service, vip, front),
                    "backend": {"endpointSelector": NLD if selector is None else selector,
                                "toPorts": ports(DNS_PORTS if back is None else back)},
                    "skipRedirectFromBackend": skip,
                    "config": config(node_selector, out_cluster, qos)}}  # fmt: skip
    obj = objects.parse_object(doc)
    assert isinstance(obj, policies.LocalRedirectPolicy)
    return obj


def bp(
    name: str = "web",
    *,
    service: tuple[str, str] | None = None,
    vip: str | None = "169.254.0.90",
    front: list[tuple[str, str, str]] | None = None,
    back: list[tuple[str, str, str]] | None = None,
    selector: dict[str, Any] | None = None,
    mode: str = "podEndpoint",
    addresses: list[str] | None = None,
    node_selector: dict[str, Any] | None = None,
    out_cluster: bool = True,
    created: str = "",
) -> policies.BalancingPolicy:
    front = [("80", "TCP", "http")] if front is None and vip is not None else front
    back_ports = ports([("8080", "TCP", "http")] if back is None else back)
    if addresses is not None:
        backend: dict[str, Any] = {"addressEndpoint": {"addresses": addresses, "toPorts": back_ports}}
    else:
        backend = {"serviceEndpoint": {"endpointSelector": selector or {"matchLabels": {"app": "web"}},
                                       "toPorts": back_ports, "redirectMode": mode}}  # fmt: skip
    doc = {"apiVersion": API, "kind": "BalancingPolicy",
           "metadata": {"name": name, "creationTimestamp": created},
           "spec": {"frontend": frontend(service, vip, front), "backend": backend,
                    "config": config(node_selector, out_cluster)}}  # fmt: skip
    obj = objects.parse_object(doc)
    assert isinstance(obj, policies.BalancingPolicy)
    return obj


def svc(
    name: str = "kube-dns",
    ns: str = "kube-system",
    ips: tuple[str, ...] = ("10.96.0.10",),
    svc_ports: list[tuple[str, int, str]] | None = None,
    **spec: Any,
) -> objects.Service:
    raw = (
        svc_ports
        if svc_ports is not None
        else [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"), ("metrics", 9153, "TCP")]
    )
    doc = {"metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIPs": list(ips),
                    "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in raw],
                    **spec}}  # fmt: skip
    return objects.Service.model_validate(doc)


def pod(
    name: str,
    *ips: str,
    ns: str = "kube-system",
    labels: dict[str, str] | None = None,
    node: str = "node-1",
    ready: bool = True,
    phase: str = "Running",
    container_ports: list[dict[str, Any]] | None = None,
) -> objects.Pod:
    doc = {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                        "labels": {"k8s-app": "nld"} if labels is None else labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "ports": container_ports or []}]},
           "status": {"phase": phase, "podIPs": [{"ip": ip} for ip in ips],
                      "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}  # fmt: skip
    return objects.Pod.model_validate(doc)


def node(name: str, *internal: str, labels: dict[str, str] | None = None, **annotations: str) -> objects.Node:
    doc = {"metadata": {"name": name, "labels": labels or {},
                        "annotations": {f"balancing.elf.io/{k}": v for k, v in annotations.items()}},
           "status": {"addresses": [{"type": "InternalIP", "address": a} for a in internal]
                      + [{"type": "ExternalIP", "address": "198.51.100.1"}]}}  # fmt: skip
    return objects.Node.model_validate(doc)


def key(text: str) -> FrontendKey:
    host, _, rest = text.rpartition(":")
    number, _, proto = rest.partition("/")
    return FrontendKey(ipaddress.ip_address(host.strip("[]")), int(number), Protocol[proto])


def shown(result: PolicyResult) -> dict[str, list[str]]:
    return {str(k): [str(b) for b in layer.backends] for k, layer in sorted(result.frontends.items())}


CTX = PolicyContext("node-1")


def compute(
    policy: policies.Policy,
    service: objects.Service | None = None,
    pods: list[objects.Pod] | None = None,
    ctx: PolicyContext = CTX,
) -> PolicyResult:
    return compute_policy(policy, service, pods or [], ctx)


# --- frontends and port mapping ----------------------------------------------------------------------


def test_service_matcher_all_ports_pairs_by_service_port_name() -> None:
    result = compute(lrp(), svc(), [pod("nld-1", "10.1.0.7")])
    assert shown(result) == {"10.96.0.10:53/TCP": ["10.1.0.7:53"], "10.96.0.10:53/UDP": ["10.1.0.7:53"]}
    owners = {str(k): str(layer.owner) for k, layer in result.frontends.items()}
    assert owners == {"10.96.0.10:53/TCP": "LocalRedirectPolicy nld:dns-tcp",
                      "10.96.0.10:53/UDP": "LocalRedirectPolicy nld:dns"}  # fmt: skip
    assert (result.reason, result.backends) == ("Ready", 1)
    assert result.message == (
        "1 backend for 2 frontends; frontend port 9153/TCP (metrics) has no backend port named 'metrics'"
    )


def test_service_matcher_single_ports_map_directly() -> None:
    service = svc(svc_ports=[("", 53, "UDP")])
    result = compute(lrp(back=[("5353", "UDP", "")]), service, [pod("nld-1", "10.1.0.7")])
    assert shown(result) == {"10.96.0.10:53/UDP": ["10.1.0.7:5353"]}


def test_service_matcher_to_ports_select_service_ports_by_number_and_protocol() -> None:
    policy = lrp(front=[("53", "UDP", "x")], back=[("5353", "UDP", "y")])
    result = compute(policy, svc(), [pod("nld-1", "10.1.0.7")])
    assert shown(result) == {"10.96.0.10:53/UDP": ["10.1.0.7:5353"]}
    assert next(iter(result.frontends.values())).owner.port_name == "x"


def test_to_port_missing_from_the_service_is_noted() -> None:
    policy = lrp(front=[("53", "UDP", "dns"), ("54", "TCP", "dns-tcp")])
    result = compute(policy, svc(), [pod("nld-1", "10.1.0.7")])
    assert list(shown(result)) == ["10.96.0.10:53/UDP"]
    assert "port 54/TCP (dns-tcp) is not a port of Service kube-system/kube-dns" in result.message


def test_service_port_protocol_mismatch_is_no_frontend() -> None:
    result = compute(lrp(back=[("53", "TCP", "")]), svc(svc_ports=[("", 53, "UDP")]), [pod("p", "10.1.0.7")])
    assert (result.frontends, result.reason) == ({}, "NoFrontends")
    assert "differ in protocol" in result.message


@pytest.mark.parametrize(
    ("service", "reason", "message"),
    [
        (None, "ServiceNotFound", "Service kube-system/kube-dns does not exist"),
        (svc(ips=("None",)), "NoFrontends", "Service kube-system/kube-dns is not served: headless"),
        (svc(type="ExternalName"), "NoFrontends", "not served: type ExternalName"),
    ],
)
def test_service_matcher_without_a_usable_service(
    service: objects.Service | None, reason: str, message: str
) -> None:
    result = compute(lrp(), service, [pod("nld-1", "10.1.0.7")])
    assert (result.frontends, result.reason) == ({}, reason)
    assert message in result.message


def test_dual_stack_service_gets_backends_per_family() -> None:
    service = svc(ips=("10.96.0.10", "fd00::a"))
    result = compute(lrp(), service, [pod("nld-1", "10.1.0.7", "fd00:1::7"), pod("nld-2", "10.1.0.8")])
    assert shown(result) == {
        "10.96.0.10:53/TCP": ["10.1.0.7:53", "10.1.0.8:53"],
        "10.96.0.10:53/UDP": ["10.1.0.7:53", "10.1.0.8:53"],
        "[fd00::a]:53/TCP": ["[fd00:1::7]:53"],
        "[fd00::a]:53/UDP": ["[fd00:1::7]:53"],
    }
    assert result.backends == 3


def test_address_matcher_ports_by_name() -> None:
    policy = lrp(service=None, vip="169.254.0.90", front=[("8080", "TCP", "p1"), ("80", "TCP", "p2")],
                 back=[("80", "TCP", "p1"), ("81", "TCP", "p2")],
                 selector={"matchLabels": {"app": "r"}})  # fmt: skip
    result = compute(policy, None, [pod("r", "10.1.0.9", labels={"app": "r"})])
    assert shown(result) == {"169.254.0.90:80/TCP": ["10.1.0.9:81"], "169.254.0.90:8080/TCP": ["10.1.0.9:80"]}
    assert all(layer.refuse_when_empty for layer in result.frontends.values())


# --- LocalRedirectPolicy backends ---------------------------------------------------------------------


def test_local_backends_only_ready_running_pods_on_this_node() -> None:
    pods = [
        pod("here", "10.1.0.1"),
        pod("elsewhere", "10.1.0.2", node="node-2"),
        pod("not-ready", "10.1.0.3", ready=False),
        pod("pending", "10.1.0.4", phase="Pending"),
        pod("other-labels", "10.1.0.5", labels={"k8s-app": "kube-dns"}),
        pod("no-ip"),
        pod("other-ns", "10.1.0.6", ns="default"),  # any namespace unless the selector says otherwise
    ]
    result = compute(lrp(), svc(), pods)
    assert shown(result)["10.96.0.10:53/UDP"] == ["10.1.0.1:53", "10.1.0.6:53"]


def test_selector_can_name_the_namespace() -> None:
    selector = {"matchLabels": {"k8s-app": "nld", "io.kubernetes.pod.namespace": "kube-system"}}
    result = compute(
        lrp(selector=selector), svc(), [pod("a", "10.1.0.1"), pod("b", "10.1.0.6", ns="default")]
    )
    assert shown(result)["10.96.0.10:53/UDP"] == ["10.1.0.1:53"]


def test_backend_pods_and_lrp_settings_are_carried() -> None:
    result = compute(lrp(skip=True, qos=100), svc(), [pod("b", "10.1.0.2"), pod("a", "10.1.0.1")])
    layer = result.frontends[key("10.96.0.10:53/UDP")]
    assert layer.backend_pods == (
        BackendPod(PodRef("kube-system", "a", "uid-a"), Backend(ipaddress.ip_address("10.1.0.1"), 53)),
        BackendPod(PodRef("kube-system", "b", "uid-b"), Backend(ipaddress.ip_address("10.1.0.2"), 53)),
    )
    assert (layer.skip_redirect_from_backends, layer.qos_limit, layer.refuse_when_empty) == (True, 100, False)
    assert layer.reason == "2 local backends"


def test_no_local_backend() -> None:
    result = compute(lrp(), svc(), [pod("elsewhere", "10.1.0.2", node="node-2")])
    assert list(shown(result).values()) == [[], []]
    assert result.reason == "NoBackends"
    assert result.message.startswith("no ready pod on node-1 matches endpointSelector k8s-app=nld (IPv4)")


def test_external_client_has_no_local_pods() -> None:
    ctx = PolicyContext("bare-metal", external_client=True)
    result = compute(lrp(), svc(), [pod("p", "10.1.0.1", node="bare-metal")], ctx)
    assert all(not layer.backends for layer in result.frontends.values())
    assert "a host outside the cluster" in result.message


# --- BalancingPolicy backends -------------------------------------------------------------------------

WEB = {"app": "web"}
NODES = {
    "node-1": node("node-1", "192.168.0.1", "fd00:1::1"),
    "node-2": node("node-2", "192.168.0.2", nodeProxyIpv4="10.200.0.2", nodeProxyIpv6="fd00:200::2"),
    "node-3": node("node-3", "192.168.0.3", nodeProxyIpv4="not-an-ip"),
}
WEB_PODS = [
    pod("w1", "10.1.0.1", "fd00:10::1", ns="default", labels=WEB, node="node-1",
        container_ports=[{"containerPort": 8080, "hostPort": 20080}]),
    pod("w2", "10.1.0.2", ns="default", labels=WEB, node="node-2"),
    pod("w3", "10.1.0.3", ns="default", labels=WEB, node="node-2"),
    pod("w4", "10.1.0.4", ns="default", labels=WEB, node="node-3"),
    pod("w5", "10.1.0.5", ns="default", labels=WEB, node="node-9"),  # no Node object
    pod("w6", "10.1.0.6", ns="default", labels=WEB, node="node-1", ready=False),
]  # fmt: skip
CLUSTER_CTX = PolicyContext("node-1", nodes=NODES)


@pytest.mark.parametrize(
    ("mode", "vip", "expect"),
    [
        ("podEndpoint", "169.254.0.90",
         ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080", "10.1.0.4:8080", "10.1.0.5:8080"]),
        ("podEndpoint", "fd00::90", ["[fd00:10::1]:8080"]),
        # the container's hostPort for 8080 where declared, else the port; pods without a Node are skipped
        ("hostPort", "169.254.0.90", ["192.168.0.1:20080", "192.168.0.2:8080", "192.168.0.3:8080"]),
        ("hostPort", "fd00::90", ["[fd00:1::1]:20080"]),
        # the nodeProxy annotation, else (absent or invalid) the InternalIP
        ("nodeProxy", "169.254.0.90", ["10.200.0.2:8080", "192.168.0.1:8080", "192.168.0.3:8080"]),
        ("nodeProxy", "fd00::90", ["[fd00:1::1]:8080", "[fd00:200::2]:8080"]),
    ],
)  # fmt: skip
def test_redirect_modes(mode: str, vip: str, expect: list[str]) -> None:
    result = compute(bp(mode=mode, vip=vip), None, WEB_PODS, CLUSTER_CTX)
    assert list(shown(result).values()) == [expect]
    layer = next(iter(result.frontends.values()))
    assert layer.backend_pods == () and not layer.refuse_when_empty
    assert layer.reason == f"{len(expect)} backend{'s' if len(expect) > 1 else ''} ({mode})"


def test_host_port_matches_the_protocol_too() -> None:
    udp = pod("u", "10.1.0.1", ns="default", labels=WEB,
              container_ports=[{"containerPort": 8080, "hostPort": 20080, "protocol": "UDP"}])  # fmt: skip
    result = compute(bp(mode="hostPort"), None, [udp], CLUSTER_CTX)
    assert list(shown(result).values()) == [["192.168.0.1:8080"]]


def test_node_modes_without_node_address() -> None:
    result = compute(bp(mode="hostPort", vip="fd00::90"), None, [WEB_PODS[1]], CLUSTER_CTX)
    assert not result.backends
    assert result.message == "no IPv6 node address for the 1 ready pod (hostPort)"


def test_pods_anywhere_in_any_namespace() -> None:
    result = compute(bp(), None, [pod("x", "10.9.0.1", ns="other", labels=WEB, node="node-7")])
    assert list(shown(result).values()) == [["10.9.0.1:8080"]]


@pytest.mark.parametrize(
    ("vip", "expect", "reason"),
    [
        ("169.254.0.90", ["192.0.2.1:8080", "192.0.2.2:8080"], "2 addresses"),
        ("fd00::90", ["[2001:db8::1]:8080"], "1 address"),
    ],
)
def test_address_endpoint_matching_family(vip: str, expect: list[str], reason: str) -> None:
    policy = bp(vip=vip, addresses=["192.0.2.2", "2001:db8::1", "192.0.2.1", "192.0.2.2"])
    result = compute(policy, None, WEB_PODS, CLUSTER_CTX)
    assert list(shown(result).values()) == [expect]
    assert next(iter(result.frontends.values())).reason == reason


def test_address_endpoint_without_the_family() -> None:
    result = compute(bp(vip="fd00::90", addresses=["192.0.2.1"]), None)
    assert result.reason == "NoBackends" and result.message == "no IPv6 address"


def test_bp_service_matcher_replaces_service_ports() -> None:
    policy = bp(service=("default", "web"), vip=None, front=None, back=[("8080", "TCP", "")])
    service = svc("web", "default", svc_ports=[("http", 80, "TCP")])
    result = compute(policy, service, WEB_PODS[:2], CLUSTER_CTX)
    assert shown(result) == {"10.96.0.10:80/TCP": ["10.1.0.1:8080", "10.1.0.2:8080"]}
    assert str(next(iter(result.frontends.values())).owner) == "BalancingPolicy web:http"


# --- where a policy applies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "ctx", "expect"),
    [
        (lrp(), CTX, None),
        (lrp(enabled=False), CTX, ("Disabled", "spec.enabled is false")),
        (lrp(node_selector={"matchLabels": {"dns": "local"}}),
         PolicyContext("node-1", own_labels={"dns": "local"}), None),
        (lrp(node_selector={"matchLabels": {"dns": "local"}}), PolicyContext("node-1", own_labels={}),
         ("NodeNotSelected", "nodeLabelSelector dns=local does not match Node node-1")),
        (lrp(node_selector={"matchLabels": {"dns": "local"}}), PolicyContext("node-1"),
         ("NodeNotSelected", "nodeLabelSelector dns=local: there is no Node node-1")),
        (lrp(node_selector={}), PolicyContext("node-1"), None),  # an empty selector selects every node
        (bp(node_selector={"matchExpressions": [{"key": "edge", "operator": "DoesNotExist"}]}),
         PolicyContext("node-1", own_labels={"edge": ""}),
         ("NodeNotSelected", "nodeLabelSelector !edge does not match Node node-1")),
        # outside the cluster enableOutCluster decides, whatever the nodeLabelSelector
        (lrp(node_selector={"matchLabels": {"dns": "local"}}), PolicyContext("bm", external_client=True),
         None),
        (lrp(out_cluster=False), PolicyContext("bm", external_client=True),
         ("OutOfClusterDisabled", "enableOutCluster is false and bm is outside the cluster")),
        (bp(out_cluster=False), PolicyContext("bm", external_client=True),
         ("OutOfClusterDisabled", "enableOutCluster is false and bm is outside the cluster")),
        (bp(out_cluster=False), CTX, None),  # enableOutCluster says nothing about nodes of the cluster
    ],
)  # fmt: skip
def test_not_applied(policy: policies.Policy, ctx: PolicyContext, expect: tuple[str, str] | None) -> None:
    assert not_applied(policy, ctx) == expect
    result = compute(policy, svc(), [pod("p", "10.1.0.1")], ctx)
    if expect is not None:
        assert (result.frontends, result.reason, result.message) == ({}, *expect)
    else:
        assert result.frontends


def test_result_ignores_pod_order() -> None:
    forward = compute(bp(mode="nodeProxy"), None, WEB_PODS, CLUSTER_CTX)
    backward = compute(bp(mode="nodeProxy"), None, list(reversed(WEB_PODS)), CLUSTER_CTX)
    assert forward == backward
    forward = compute(lrp(), svc(), [pod("a", "10.1.0.1"), pod("b", "10.1.0.2")])
    backward = compute(lrp(), svc(), [pod("b", "10.1.0.2"), pod("a", "10.1.0.1")])
    assert forward == backward


def test_node_entry_reads_only_addresses_and_proxy_annotations() -> None:
    plain = node("n", "192.168.0.1")
    assert node_entry(plain) == node_entry(node("n", "192.168.0.1", labels={"x": "y"}, other="z"))
    assert node_entry(plain) != node_entry(node("n", "192.168.0.2"))
    assert node_entry(plain) != node_entry(node("n", "192.168.0.1", nodeProxyIpv4="10.0.0.1"))
    assert node_entry(None) == ()


# === in the store: layering, incremental recomputation, conflicts, status ================================


DNS_SVC_PORTS = [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"), ("metrics", 9153, "TCP")]
UDP, TCP, METRICS = key("10.96.0.10:53/UDP"), key("10.96.0.10:53/TCP"), key("10.96.0.10:9153/TCP")
VIP = key("169.254.0.90:80/TCP")


def slice_of(
    service: str, ns: str, *addrs: str, svc_ports: list[tuple[str, int, str]] | None = None
) -> objects.EndpointSlice:
    doc = {"metadata": {"name": f"{service}-1", "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": [{"addresses": [a]} for a in addrs],
           "ports": [{"name": n, "port": p, "protocol": pr}
                     for n, p, pr in (svc_ports or DNS_SVC_PORTS)]}  # fmt: skip
    return objects.EndpointSlice.model_validate(doc)


def loaded(*objs: objects.KubeObject, config: ModelConfig | None = None) -> ClusterStore:
    store = ClusterStore(config or ModelConfig("node-1"))
    for obj in objs:
        store.upsert(obj)
    return store


def backends(store: ClusterStore, fkey: FrontendKey) -> tuple[str, list[str], list[str] | None, str]:
    """(owner, backends, fallback, fallback owner) of one frontend, as text."""
    f = store.desired().frontends[fkey]
    fallback = None if f.fallback is None else [str(b) for b in f.fallback]
    return str(f.owner), [str(b) for b in f.backends], fallback, str(f.fallback_owner or "")


DNS: list[objects.KubeObject] = [svc(), slice_of("kube-dns", "kube-system", "10.0.0.5")]
CACHE = {"app": "dns-cache"}
CLUSTER_BP = bp("dns-cache", service=("kube-system", "kube-dns"), vip=None, selector={"matchLabels": CACHE},
                back=DNS_PORTS)  # fmt: skip


def test_all_three_kinds_on_one_frontend_and_each_fallback() -> None:
    store = loaded(*DNS, lrp(), CLUSTER_BP, pod("nld-1", "10.1.0.7"),
                   pod("cache-1", "10.2.0.9", labels=CACHE, node="node-2"))  # fmt: skip
    store.take_changes()
    assert backends(store, UDP) == ("LocalRedirectPolicy nld:dns", ["10.1.0.7:53"], ["10.2.0.9:53"],
                                    "BalancingPolicy dns-cache:dns")  # fmt: skip
    assert backends(store, METRICS)[0] == "Service kube-system/kube-dns:metrics"
    frontend = store.desired().frontends[UDP]
    assert frontend.backend_pods == (BackendPod(PodRef("kube-system", "nld-1", "uid-nld-1"),
                                                Backend(ipaddress.ip_address("10.1.0.7"), 53)),)  # fmt: skip
    # no local backend: the BalancingPolicy, with the Service as its fallback
    store.delete(("Pod", "kube-system", "nld-1"))
    assert set(store.take_changes().upsert) == {UDP, TCP}
    assert backends(store, UDP) == ("BalancingPolicy dns-cache:dns", ["10.2.0.9:53"], ["10.0.0.5:53"],
                                    "Service kube-system/kube-dns:dns")  # fmt: skip
    # nothing from either policy: the Service itself
    store.upsert(pod("cache-1", "10.2.0.9", labels=CACHE, node="node-2", ready=False))
    assert set(store.take_changes().upsert) == {UDP, TCP}
    assert backends(store, UDP) == ("Service kube-system/kube-dns:dns", ["10.0.0.5:53"], None, "")
    assert store.desired().frontends[UDP].reason.startswith("ready (LocalRedirectPolicy nld: no ready pod")
    # the local pod is back: the LRP again, with the Service as fallback
    store.upsert(pod("nld-1", "10.1.0.7"))
    assert backends(store, UDP) == ("LocalRedirectPolicy nld:dns", ["10.1.0.7:53"], ["10.0.0.5:53"],
                                    "Service kube-system/kube-dns:dns")  # fmt: skip


def test_service_endpoint_change_updates_the_fallback_without_recomputing_the_policy() -> None:
    store = loaded(*DNS, lrp(), pod("nld-1", "10.1.0.7"))
    store.take_changes()
    before = store.policy_recomputed
    store.upsert(slice_of("kube-dns", "kube-system", "10.0.0.5", "10.0.0.6"))
    changes = store.take_changes()
    assert store.policy_recomputed == before
    assert set(changes.upsert) == {UDP, TCP, METRICS}
    assert backends(store, UDP)[2] == ["10.0.0.5:53", "10.0.0.6:53"]


def test_address_lrp_refuses_without_local_backend_even_over_a_balancing_policy() -> None:
    address_lrp = lrp("vip", service=None, vip="169.254.0.90", front=[("80", "TCP", "http")],
                      back=[("8080", "TCP", "http")], selector={"matchLabels": {"app": "web"}})  # fmt: skip
    web_elsewhere = pod("w", "10.1.0.2", ns="default", labels=WEB, node="node-2")
    store = loaded(address_lrp, bp(), web_elsewhere)
    assert backends(store, VIP) == ("LocalRedirectPolicy vip:http", [], None, "")
    assert store.desired().frontends[VIP].reason.endswith("; refused")
    store.upsert(pod("here", "10.1.0.1", ns="default", labels=WEB))
    assert backends(store, VIP) == ("LocalRedirectPolicy vip:http", ["10.1.0.1:8080"],
                                    ["10.1.0.1:8080", "10.1.0.2:8080"],
                                    "BalancingPolicy web:http")  # fmt: skip
    store.delete(("BalancingPolicy", "", "web"))
    assert backends(store, VIP) == ("LocalRedirectPolicy vip:http", ["10.1.0.1:8080"], None, "")


def test_balancing_policy_replaces_service_backends_while_it_has_backends() -> None:
    ports = [("http", 80, "TCP")]
    web: list[objects.KubeObject] = [svc("web", "default", svc_ports=ports),
                                     slice_of("web", "default", "10.0.0.1", svc_ports=ports)]  # fmt: skip
    policy = bp(service=("default", "web"), vip=None, front=None, back=[("8080", "TCP", "")])
    store = loaded(*web, policy)
    web_key = key("10.96.0.10:80/TCP")
    assert backends(store, web_key)[:2] == ("Service default/web:http", ["10.0.0.1:80"])
    store.upsert(pod("w1", "10.1.0.1", ns="default", labels=WEB, node="node-2"))
    assert backends(store, web_key) == ("BalancingPolicy web:http", ["10.1.0.1:8080"], ["10.0.0.1:80"],
                                        "Service default/web:http")  # fmt: skip


def test_pod_changes_recompute_only_the_policies_that_select_them() -> None:
    store = loaded(*DNS, lrp(), bp(), pod("nld-1", "10.1.0.7"))
    store.take_changes()

    def recomputed_by(obj: objects.KubeObject | tuple[str, str, str]) -> int:
        before = store.policy_recomputed
        if isinstance(obj, tuple):
            store.delete(obj)
        else:
            store.upsert(obj)
        store.take_changes()
        return store.policy_recomputed - before

    assert recomputed_by(pod("unrelated", "10.1.0.8", labels={"app": "other"})) == 0
    assert recomputed_by(pod("nld-remote", "10.1.0.9", node="node-2")) == 0  # an LRP only sees this node
    assert recomputed_by(pod("web-1", "10.1.0.10", ns="default", labels=WEB, node="node-2")) == 1  # the BP
    assert recomputed_by(pod("nld-2", "10.1.0.11")) == 1
    assert recomputed_by(pod("nld-2", "10.1.0.11", labels={"app": "other"})) == 1  # old labels matched
    assert recomputed_by(pod("nld-2", "10.1.0.11", labels={"app": "other"}, ready=False)) == 0
    assert recomputed_by(("Pod", "kube-system", "nld-1")) == 1
    assert recomputed_by(("Pod", "kube-system", "nld-1")) == 0
    assert recomputed_by(lrp()) == 0  # identical
    assert backends(store, UDP)[:2] == ("Service kube-system/kube-dns:dns", ["10.0.0.5:53"])


def test_node_label_selector_follows_node_label_changes() -> None:
    policy = lrp(node_selector={"matchLabels": {"node-local-dns": "true"}})
    store = loaded(*DNS, policy, pod("nld-1", "10.1.0.7"))
    assert backends(store, UDP)[0] == "Service kube-system/kube-dns:dns"  # no Node object: not selected
    assert store.policy_status()["LocalRedirectPolicy", "nld"].reason == "NodeNotSelected"
    store.take_changes()
    store.upsert(node("node-1", "192.168.0.1", labels={"node-local-dns": "true"}))
    assert set(store.take_changes().upsert) == {UDP, TCP}
    assert backends(store, UDP)[0] == "LocalRedirectPolicy nld:dns"
    before = store.policy_recomputed
    store.upsert(node("node-2", "192.168.0.2", labels={}))  # another node: nothing
    store.upsert(node("node-1", "192.168.0.9", labels={"node-local-dns": "true"}))  # not its labels: nothing
    assert store.policy_recomputed == before
    store.take_changes()
    store.upsert(node("node-1", "192.168.0.9", labels={"node-local-dns": "false"}))
    assert set(store.take_changes().upsert) == {UDP, TCP}
    assert backends(store, UDP)[0] == "Service kube-system/kube-dns:dns"
    store.delete(("Node", "", "node-1"))
    assert not store.take_changes()


def test_out_of_cluster_mode() -> None:
    bare_metal = ModelConfig("bm", external_client=True)
    address_lrp = lrp("vip", service=None, vip="169.254.0.90", front=[("80", "TCP", "http")],
                      back=[("8080", "TCP", "http")])  # fmt: skip
    local_pod = pod("nld-1", "10.1.0.7", node="bm")  # a pod named on the host: still not local
    store = loaded(*DNS, lrp(), address_lrp, local_pod, config=bare_metal)
    assert backends(store, UDP)[:2] == ("Service kube-system/kube-dns:dns", ["10.0.0.5:53"])
    assert backends(store, VIP)[:2] == ("LocalRedirectPolicy vip:http", [])  # refused
    # enableOutCluster false: the policy does not apply at all (here the BalancingPolicy would otherwise win)
    store.upsert(lrp("vip", service=None, vip="169.254.0.90", front=[("80", "TCP", "http")],
                     back=[("8080", "TCP", "http")], out_cluster=False))  # fmt: skip
    store.upsert(bp(out_cluster=False))
    assert VIP not in store.desired().frontends
    store.upsert(bp())
    store.upsert(pod("w", "10.1.0.2", ns="default", labels=WEB, node="node-2"))
    assert backends(store, VIP) == ("BalancingPolicy web:http", ["10.1.0.2:8080"], None, "")
    assert store.policy_status()["LocalRedirectPolicy", "vip"] == PolicyStatus(
        "LocalRedirectPolicy",
        "vip",
        False,
        "OutOfClusterDisabled",
        "enableOutCluster is false and bm is outside the cluster",
    )


def test_delete_and_recreate_under_the_same_name() -> None:
    store = loaded(
        *DNS, lrp(), pod("nld-1", "10.1.0.7"), bp(), pod("w", "10.1.0.2", ns="default", labels=WEB)
    )
    applied = store.take_changes().upsert
    assert {applied[UDP].owner.kind, applied[VIP].owner.kind} == {"LocalRedirectPolicy", "BalancingPolicy"}
    store.delete(("LocalRedirectPolicy", "", "nld"))
    store.delete(("BalancingPolicy", "", "web"))
    changes = store.take_changes()
    assert changes.remove == {VIP} and set(changes.upsert) == {UDP, TCP}
    assert store.policy_status() == {}
    store.upsert(lrp())
    store.upsert(bp())
    changes = store.take_changes()
    assert set(changes.upsert) == {UDP, TCP, VIP} and not changes.remove
    assert changes.upsert[UDP] == applied[UDP] and changes.upsert[VIP] == applied[VIP]


def test_selector_update_moves_the_backends() -> None:
    store = loaded(*DNS, lrp(), pod("nld-1", "10.1.0.7"), pod("other", "10.1.0.8", labels={"app": "nld2"}))
    assert backends(store, UDP)[1] == ["10.1.0.7:53"]
    store.take_changes()
    store.upsert(lrp(selector={"matchExpressions": [{"key": "app", "operator": "In", "values": ["nld2"]}]}))
    assert set(store.take_changes().upsert) == {UDP, TCP}
    assert backends(store, UDP)[1] == ["10.1.0.8:53"]
    store.upsert(pod("nld-1", "10.1.0.7", labels={"app": "nld2"}))  # the new selector sees pod changes too
    assert backends(store, UDP)[1] == ["10.1.0.7:53", "10.1.0.8:53"]


def test_service_changes_move_a_service_matcher_policy() -> None:
    store = loaded(*DNS, lrp(), pod("nld-1", "10.1.0.7"))
    store.take_changes()
    store.upsert(svc(ips=("10.96.0.11",)))
    changes = store.take_changes()
    assert changes.remove == {UDP, TCP, METRICS}
    assert backends(store, key("10.96.0.11:53/UDP"))[0] == "LocalRedirectPolicy nld:dns"
    store.delete(("Service", "kube-system", "kube-dns"))
    assert store.take_changes().remove == {key("10.96.0.11:53/UDP"), key("10.96.0.11:53/TCP"),
                                           key("10.96.0.11:9153/TCP")}  # fmt: skip
    assert store.policy_status()["LocalRedirectPolicy", "nld"] == PolicyStatus(
        "LocalRedirectPolicy", "nld", False, "ServiceNotFound", "Service kube-system/kube-dns does not exist"
    )
    assert store.desired().frontends == {}


def test_older_policy_of_a_kind_wins_and_the_newer_is_reported() -> None:
    old = lrp("old", created="2024-01-01T00:00:00Z")
    new = lrp("new", created="2024-05-01T00:00:00Z", selector={"matchLabels": {"app": "new"}})
    store = loaded(*DNS, new, old, pod("nld-1", "10.1.0.7"), pod("n", "10.1.0.8", labels={"app": "new"}))
    assert backends(store, UDP)[:2] == ("LocalRedirectPolicy old:dns", ["10.1.0.7:53"])
    assert store.conflicts() == [
        "frontend 10.96.0.10:53/TCP is claimed by LocalRedirectPolicy old:dns-tcp and LocalRedirectPolicy "
        "new:dns-tcp; LocalRedirectPolicy old:dns-tcp wins (older: 2024-01-01T00:00:00Z)",
        "frontend 10.96.0.10:53/UDP is claimed by LocalRedirectPolicy old:dns and LocalRedirectPolicy "
        "new:dns; LocalRedirectPolicy old:dns wins (older: 2024-01-01T00:00:00Z)",
    ]
    status = store.policy_status()
    assert status["LocalRedirectPolicy", "new"] == PolicyStatus(
        "LocalRedirectPolicy",
        "new",
        False,
        "Conflict",
        "every frontend (2) is held by an older LocalRedirectPolicy old",
    )
    assert status["LocalRedirectPolicy", "old"].ready
    store.take_changes()
    store.delete(("LocalRedirectPolicy", "", "old"))
    assert backends(store, UDP)[:2] == ("LocalRedirectPolicy new:dns", ["10.1.0.8:53"])
    assert store.conflicts() == []
    assert store.policy_status()["LocalRedirectPolicy", "new"].ready


def test_conflict_tie_broken_by_name_and_kinds_do_not_conflict() -> None:
    store = loaded(bp("b"), bp("a"), lrp("a", service=None, vip="169.254.0.90", front=[("80", "TCP", "http")],
                                         back=[("8080", "TCP", "http")]))  # fmt: skip
    assert store.desired().frontends[VIP].owner.kind == "LocalRedirectPolicy"
    assert store.conflicts() == [
        "frontend 169.254.0.90:80/TCP is claimed by BalancingPolicy a:http and BalancingPolicy b:http; "
        "BalancingPolicy a:http wins (older: no creationTimestamp)"
    ]


def test_partial_conflict_is_in_the_status_message() -> None:
    one_port = lrp(
        "late", front=[("53", "UDP", "dns")], back=[("53", "UDP", "dns")], created="2024-06-01T00:00:00Z"
    )
    both = lrp("first", front=[("53", "TCP", "dns-tcp")], back=[("53", "TCP", "dns-tcp")],
               created="2024-01-01T00:00:00Z")  # fmt: skip
    store = loaded(
        *DNS, one_port, both, lrp("late2", created="2024-07-01T00:00:00Z"), pod("nld-1", "10.1.0.7")
    )
    status = store.policy_status()
    assert status["LocalRedirectPolicy", "late2"] == PolicyStatus(
        "LocalRedirectPolicy",
        "late2",
        False,
        "Conflict",
        "every frontend (2) is held by an older LocalRedirectPolicy first, LocalRedirectPolicy late",
    )
    assert status["LocalRedirectPolicy", "late"] == PolicyStatus(
        "LocalRedirectPolicy", "late", True, "Ready", "1 backend for 1 frontend", 1, 1
    )


def test_node_address_changes_recompute_node_mode_policies_only() -> None:
    store = loaded(node("node-2", "192.168.0.2"), bp("pods"),
                   bp("hosts", vip="169.254.0.91", mode="hostPort"),
                   pod("w", "10.1.0.2", ns="default", labels=WEB, node="node-2"))  # fmt: skip
    assert backends(store, key("169.254.0.91:80/TCP"))[1] == ["192.168.0.2:8080"]
    before = store.policy_recomputed
    store.upsert(node("node-2", "192.168.0.2", labels={"x": "y"}))  # not an address: nothing
    store.upsert(node("node-3", "192.168.0.3"))  # no selected pod there: nothing
    store.take_changes()
    assert store.policy_recomputed == before
    store.upsert(node("node-2", "192.168.0.22"))
    store.take_changes()
    assert store.policy_recomputed == before + 1
    assert backends(store, key("169.254.0.91:80/TCP"))[1] == ["192.168.0.22:8080"]


def test_policy_status() -> None:
    store = loaded(*DNS, lrp(), pod("nld-1", "10.1.0.7", "fd00::7"), bp(), lrp("off", enabled=False),
                   bp("missing", service=("default", "nope"), vip=None, front=None,
                      back=[("8080", "TCP", "")]))  # fmt: skip
    assert store.policy_status() == {
        ("BalancingPolicy", "missing"): PolicyStatus("BalancingPolicy", "missing", False, "ServiceNotFound",
                                                     "Service default/nope does not exist"),
        ("BalancingPolicy", "web"): PolicyStatus("BalancingPolicy", "web", False, "NoBackends",
                                                 "no ready pod matches endpointSelector app=web (IPv4)",
                                                 0, 1),
        ("LocalRedirectPolicy", "nld"): PolicyStatus(
            "LocalRedirectPolicy", "nld", True, "Ready",
            "1 backend for 2 frontends; frontend port 9153/TCP (metrics) has no backend port named "
            "'metrics'", 1, 2,
        ),
        ("LocalRedirectPolicy", "off"): PolicyStatus("LocalRedirectPolicy", "off", False, "Disabled",
                                                     "spec.enabled is false"),
    }  # fmt: skip


def test_delete_ignores_a_namespace_in_the_ref() -> None:
    store = loaded(bp())
    store.delete(("BalancingPolicy", "default", "web"))
    assert store.desired().frontends == {} and store.policy_status() == {}


def test_changes_are_a_diff() -> None:
    store = loaded(*DNS, lrp(), pod("nld-1", "10.1.0.7"))
    store.take_changes()
    store.upsert(lrp(skip=True))
    changes = store.take_changes()
    assert set(changes.upsert) == {UDP, TCP} and changes.upsert[UDP].skip_redirect_from_backends
    store.upsert(lrp(skip=True))
    assert store.take_changes() == FrontendChanges({}, frozenset())
