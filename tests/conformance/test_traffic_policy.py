"""Traffic policies across two nodes: internalTrafficPolicy Local, the terminating fallback under each
policy, and healthCheckNodePort.

Mirrors "[sig-network] Services ..." tests of test/e2e/network/service.go. "Fails" in the e2e tests means
any connection error; here it is ECONNREFUSED at once (kube-proxy drops instead: see
docs/kube-proxy-differences.md).
"""

from __future__ import annotations

from typing import Any

from balancing_testkit.topology import Host
from helpers.twonodes import (
    READY,
    TERMINATING,
    Node,
    TwoNodes,
    ep,
    key,
    require_flags,
    service,
    slice_for,
)

VIP = "10.96.0.60"
NODE_PORT = 30600
HC_PORT = 32600


def _itp_local(c: TwoNodes, name: str, endpoint: dict[str, object], target: int = 8080) -> None:
    """A ClusterIP Service with internalTrafficPolicy Local and one endpoint on node-a."""
    svc = service(name, [VIP], [("http", 80, "TCP", target)], internalTrafficPolicy="Local")
    c.apply(name, [svc, slice_for(name, [endpoint], [("http", target, "TCP")])])
    c.wait_on(c.a, key(VIP, 80), 1)
    c.wait_on(c.b, key(VIP, 80), 0)  # node-b has no local endpoint: known frontend, nothing to use


def _serves(c: TwoNodes, src: Host, host: str, port: int, backend: str) -> None:
    for _ in range(5):  # "assert 5 times"
        res = c.tcp(src, host, port, 1)
        assert res["backends"] == {backend: 1}, (host, port, res)


def _fails(c: TwoNodes, src: Host, host: str, port: int) -> None:
    res = c.tcp(src, host, port, 5)
    assert res["ok"] == 0 and res["errors"] == {"ECONNREFUSED": 5}, (host, port, res)


def test_should_respect_internaltrafficpolicy_local_pod_to_pod(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should respect internalTrafficPolicy=Local Pod to Pod"""
    c = two_nodes
    _itp_local(c, "svc-itp", ep(c.pod("pod-a1")))  # "echo-hostname-0" on node-a
    _serves(c, c.a.client, VIP, 80, "pod-a1")  # pause-pod-0 on the same node
    _fails(c, c.b.client, VIP, 80)  # pause-pod-1 on the other node


def test_should_respect_internaltrafficpolicy_local_pod_hostnetwork_true_to_pod(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should respect internalTrafficPolicy=Local Pod (hostNetwork: true) to Pod"""
    c = two_nodes
    _itp_local(c, "svc-itp", ep(c.pod("pod-a1")))
    _serves(c, c.a.host, VIP, 80, "pod-a1")  # hostNetwork pause pods: the nodes' host network
    _fails(c, c.b.host, VIP, 80)


def test_should_respect_internaltrafficpolicy_local_pod_and_node_to_pod_hostnetwork_true(
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should respect internalTrafficPolicy=Local Pod and Node, to Pod (hostNetwork:
    true)"""
    c = two_nodes
    # the webserver is a hostNetwork pod on node-a: it listens in node-a's host netns, its endpoint address
    # is node-a's InternalIP, and it answers with the node's name
    c.topo.start_backend(c.a.host, name="node-a", port=10180)
    _itp_local(c, "svc-itp", ep(c.a.host, node="node-a"), target=10180)
    for src_a, src_b in ((c.a.client, c.b.client), (c.a.host, c.b.host)):  # pods, then hostNetwork pods
        _serves(c, src_a, VIP, 80, "node-a")
        _fails(c, src_b, VIP, 80)


def _terminating_endpoint(c: TwoNodes, name: str, **spec: Any) -> dict[str, object]:
    """The e2e sequence: one webserver on node-a, ready; then deleted with a 100 s grace period: only a
    serving, terminating endpoint is left. Returns the Service."""
    svc = service(name, [VIP], [("http", 80, "TCP", 8080)], **spec)
    node_ports = [key(n.ip4, NODE_PORT) for n in c.nodes] if "node_ports" in spec else []
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1"), **READY)])])
    c.wait_on(c.a, key(VIP, 80), 1)
    c.wait_frontends(*node_ports, backends=1)
    c.apply_synced(name, [svc, slice_for(name, [ep(c.pod("pod-a1"), **TERMINATING)])])
    return svc


def test_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_cluster(  # noqa: E501 (the e2e name)
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should fallback to terminating endpoints when there are no ready endpoints
    with internalTrafficPolicy=Cluster"""
    c = two_nodes
    _terminating_endpoint(c, "svc-proxy-terminating")
    c.wait_frontends(key(VIP, 80), backends=1)
    _serves(c, c.a.client, VIP, 80, "pod-a1")  # pause-pod-0, same node
    _serves(c, c.b.client, VIP, 80, "pod-a1")  # pause-pod-1, other node


def test_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_local(  # noqa: E501 (the e2e name)
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should fallback to local terminating endpoints when there are no ready
    endpoints with internalTrafficPolicy=Local"""
    c = two_nodes
    _terminating_endpoint(c, "svc-proxy-terminating", internalTrafficPolicy="Local")
    c.wait_on(c.a, key(VIP, 80), 1)
    c.wait_on(c.b, key(VIP, 80), 0)
    _serves(c, c.a.client, VIP, 80, "pod-a1")
    _fails(c, c.b.client, VIP, 80)


def test_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_cluster(  # noqa: E501 (the e2e name)
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should fallback to terminating endpoints when there are no ready endpoints
    with externallTrafficPolicy=Cluster

    (sic: upstream spells it "externallTrafficPolicy")"""
    c = two_nodes
    _terminating_endpoint(c, "svc-proxy-terminating", type="NodePort", node_ports={"http": NODE_PORT})
    c.wait_frontends(key(c.a.ip4, NODE_PORT), backends=1)
    _serves(c, c.a.client, c.a.ip4, NODE_PORT, "pod-a1")  # pause-pod-0 -> node0's node port
    _serves(c, c.b.client, c.a.ip4, NODE_PORT, "pod-a1")  # pause-pod-1 -> node0's node port


def test_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_local(  # noqa: E501 (the e2e name)
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should fallback to local terminating endpoints when there are no ready
    endpoints with externalTrafficPolicy=Local

    DELIBERATE DIFFERENCE (docs/kube-proxy-differences.md, "externalTrafficPolicy: Local for in-cluster
    clients"): the e2e test expects pause-pod-0 (node0) -> node1's node port to FAIL, because in kube-proxy
    that connection leaves node0 untranslated and arrives at node1 as external traffic with no local
    endpoint. A socket load balancer translates it on node0, inside the cluster, where kube-proxy's own
    short-circuit rule for in-cluster clients applies: every endpoint (here the terminating one) is used.
    """
    c = two_nodes
    _terminating_endpoint(
        c,
        "svc-proxy-terminating",
        type="NodePort",
        node_ports={"http": NODE_PORT},
        externalTrafficPolicy="Local",
    )
    c.wait_frontends(key(c.a.ip4, NODE_PORT), key(c.b.ip4, NODE_PORT), backends=1)
    _serves(c, c.a.client, c.a.ip4, NODE_PORT, "pod-a1")  # pause-pod-0 -> node0: as upstream
    _serves(c, c.b.client, c.a.ip4, NODE_PORT, "pod-a1")  # pause-pod-1 -> node0: as upstream
    _serves(c, c.a.client, c.b.ip4, NODE_PORT, "pod-a1")  # pause-pod-0 -> node1: upstream expects failure


def _local_lb_service(name: str, **spec: Any) -> dict[str, object]:
    """A LoadBalancer Service with externalTrafficPolicy Local (so a healthCheckNodePort), no ingress yet."""
    return service(
        name,
        [VIP],
        [("http", 80, "TCP", 8080)],
        type="LoadBalancer",
        node_ports={"http": NODE_PORT},
        externalTrafficPolicy="Local",
        healthCheckNodePort=HC_PORT,
        **spec,
    )


def _health(c: TwoNodes, node: Node, status: int, name: str, local: int) -> None:
    body = c.wait_healthcheck(node, HC_PORT, status)
    assert body.get("service") == {"namespace": "default", "name": name}, body
    assert body.get("localEndpoints") == local, body


def test_should_fail_health_check_node_port_if_there_are_only_terminating_endpoints(
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should fail health check node port if there are only terminating endpoints"""
    require_flags("--healthcheck-address")
    c = two_nodes
    name = "svc-proxy-terminating"
    svc = _local_lb_service(name)
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1"), **READY)])])
    _health(c, c.a, 200, name, 1)  # the node with the ready endpoint
    _health(c, c.b, 503, name, 0)

    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1"), **TERMINATING)])])  # the webserver is deleted
    _health(c, c.a, 503, name, 0)  # only a terminating endpoint: fail the health check ...
    _health(c, c.b, 503, name, 0)
    _serves(c, c.a.client, c.a.ip4, NODE_PORT, "pod-a1")  # ... while it still serves the node port


def test_should_only_target_nodes_with_endpoints(two_nodes: TwoNodes) -> None:
    """[sig-network] LoadBalancers ESIPP [Slow] should only target nodes with endpoints

    (The load balancer is the cloud's; what the proxies own is the healthCheckNodePort answer per node.)"""
    require_flags("--healthcheck-address")
    c = two_nodes
    name = "external-local-nodes"
    svc = _local_lb_service(name)
    for node, pod in ((c.a, c.pod("pod-a2")), (c.b, c.pod("pod-b2"))):  # the endpoint on each node in turn
        c.apply(name, [svc, slice_for(name, [ep(pod)])])
        for n in c.nodes:
            _health(c, n, 200 if n is node else 503, name, 1 if n is node else 0)
    c.delete(name)  # the Service goes: its health check port closes on every node
    for n in c.nodes:
        c.wait_healthcheck(n, HC_PORT, 0)


def test_internal_traffic_policy_local_applies_to_the_cluster_ip_only(two_nodes: TwoNodes) -> None:
    """No e2e counterpart (KEP-2086): internalTrafficPolicy restricts the cluster IP; node ports and
    external IPs of the same Service follow externalTrafficPolicy (Cluster here)."""
    c = two_nodes
    name, external_ip = "itp-scope", "203.0.113.60"
    svc = service(
        name,
        [VIP],
        [("http", 80, "TCP", 8080)],
        type="NodePort",
        node_ports={"http": NODE_PORT},
        externalIPs=[external_ip],
        internalTrafficPolicy="Local",
    )
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1"))])])
    c.wait_on(c.b, key(VIP, 80), 0)
    c.wait_frontends(key(c.a.ip4, NODE_PORT), key(c.b.ip4, NODE_PORT), key(external_ip, 80), backends=1)
    _fails(c, c.b.client, VIP, 80)  # node-b has no local endpoint for the cluster IP ...
    for host, port in ((c.a.ip4, NODE_PORT), (c.b.ip4, NODE_PORT), (external_ip, 80)):
        _serves(c, c.b.client, host, port, "pod-a1")  # ... but its node ports and external IP work


def test_local_terminating_fallback_is_decided_per_node(two_nodes: TwoNodes) -> None:
    """No e2e counterpart (kube-proxy's CategorizeEndpoints): with internalTrafficPolicy Local each node
    falls back to its own serving-terminating endpoints when it has no ready local one, whatever the
    other nodes have."""
    c = two_nodes
    name = "itp-fallback-per-node"
    svc = service(name, [VIP], [("http", 80, "TCP", 8080)], internalTrafficPolicy="Local")
    eps = [ep(c.pod("pod-a1"), **TERMINATING), ep(c.pod("pod-b1"), **READY)]
    c.apply(name, [svc, slice_for(name, eps)])
    c.wait_frontends(key(VIP, 80), backends=1)
    _serves(c, c.a.client, VIP, 80, "pod-a1")  # node-a: only a terminating local endpoint
    _serves(c, c.b.client, VIP, 80, "pod-b1")  # node-b: its ready one
