"""External frontends seen from inside the cluster: externalIPs, load-balancer ingress IPs and NodePorts with
externalTrafficPolicy Local, reached from pods (every client a socket load balancer translates is on a node).

Mirrors "[sig-network] Services ..." (service.go) and "[sig-network] LoadBalancers ESIPP [Slow] ..."
(loadbalancer.go). The last two tests cover Balancing's options that make it deviate on purpose.
"""

from __future__ import annotations

import pytest

from helpers.twonodes import (
    TwoNodes,
    addresses_of,
    ep,
    key,
    require_flags,
    service,
    slice_for,
)

VIP = "10.96.0.70"
EXTERNAL_IP = "203.0.113.250"  # RFC 5737 documentation range: no route to it anywhere here
LB_IP = "198.51.100.70"
NODE_PORT = 30700


def test_should_be_possible_to_connect_to_a_service_via_externalip_when_the_external_ip_is_not_assigned_to_a_node(  # noqa: E501 (the e2e name)
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should be possible to connect to a service via ExternalIP when the external IP
    is not assigned to a node"""
    c = two_nodes
    name = "externalip-test"
    svc = service(name, [VIP], [("http", 80, "TCP", 8080)], externalIPs=[EXTERNAL_IP])
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1")), ep(c.pod("pod-b1"))])])
    c.wait_frontends(key(VIP, 80), key(EXTERNAL_IP, 80), backends=2)
    for node in c.nodes:
        for host in (VIP, EXTERNAL_IP):
            res = c.tcp(node.client, host, 80, 40)
            assert set(res["backends"]) == {"pod-a1", "pod-b1"} and res["ok"] == 40, (node.name, host, res)


def test_should_work_for_type_nodeport(two_nodes: TwoNodes) -> None:
    """[sig-network] LoadBalancers ESIPP [Slow] should work for type=NodePort

    The test container pod reads its client IP through the node port of every node with an endpoint: the
    source IP is preserved."""
    c = two_nodes
    name = "external-local-nodeport"
    svc = service(
        name,
        [VIP],
        [("http", 80, "TCP", 8080)],
        type="NodePort",
        node_ports={"http": NODE_PORT},
        externalTrafficPolicy="Local",
    )
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1")), ep(c.pod("pod-b1"))])])
    c.wait_frontends(*(key(n.ip4, NODE_PORT) for n in c.nodes), backends=2)
    for node in c.nodes:  # the test container, on either node
        for endpoint_node in c.nodes:
            res = c.tcp(node.client, endpoint_node.ip4, NODE_PORT, 10)
            assert res["ok"] == 10 and addresses_of(res) == [node.client.ip4], res


def _local_lb(c: TwoNodes, name: str, ip_mode: str | None = None) -> None:
    """CreateOnlyLocalLoadBalancerService: type LoadBalancer, externalTrafficPolicy Local, an ingress IP;
    its one endpoint is on node-a."""
    ingress: dict[str, str] = {"ip": LB_IP}
    if ip_mode:
        ingress["ipMode"] = ip_mode
    svc = service(
        name,
        [VIP],
        [("http", 80, "TCP", 8080)],
        type="LoadBalancer",
        node_ports={"http": NODE_PORT},
        externalTrafficPolicy="Local",
        healthCheckNodePort=32700,
        status={"loadBalancer": {"ingress": [ingress]}},
    )
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1"))])])


def test_should_work_from_pods(two_nodes: TwoNodes) -> None:
    """[sig-network] LoadBalancers ESIPP [Slow] should work from pods

    A pod hits the load balancer's ingress IP and reads its client IP: it is the pod's own. The connection is
    short-circuited to the endpoints inside the cluster (kube-proxy does the same for in-cluster clients of
    an ingress IP, even with externalTrafficPolicy Local), so it works from a node without local endpoints
    too."""
    c = two_nodes
    _local_lb(c, "external-local-pods")
    c.wait_frontends(key(LB_IP, 80), backends=1)
    for node in c.nodes:
        res = c.tcp(node.client, LB_IP, 80, 5)
        assert res["backends"] == {"pod-a1": 5} and addresses_of(res) == [node.client.ip4], res


def test_load_balancer_ip_with_ipmode_proxy_is_not_short_circuited(two_nodes: TwoNodes) -> None:
    """No e2e counterpart (KEP-1860, ``status.loadBalancer.ingress[].ipMode: Proxy``): the load balancer
    proxies, so its IP must reach it: not translated (kube-proxy does not program it either)."""
    c = two_nodes
    _local_lb(c, "lb-proxy-mode", ip_mode="Proxy")
    c.wait_frontends(key(VIP, 80), key(c.a.ip4, NODE_PORT), backends=1)
    c.wait(lambda f: key(LB_IP, 80) not in f, "no frontend for the Proxy-mode ingress IP")
    for node in c.nodes:
        assert c.tcp(node.client, LB_IP, 80, 1)["errors"] == {"ENETUNREACH": 1}  # untranslated: no route


@pytest.mark.agent_args("--external-ips-local-only")
def test_external_ips_local_only_translates_only_this_nodes_own_addresses(two_nodes: TwoNodes) -> None:
    """No e2e counterpart: ``--external-ips-local-only``, Cilium's CVE-2020-8554 mitigation.

    DELIBERATE DIFFERENCE when enabled (off by default): an externalIP is translated only by the node that
    owns the address. The e2e case above then fails by design: 203.0.113.250 is nobody's address."""
    require_flags("--external-ips-local-only")
    c = two_nodes
    name = "externalip-local"
    svc = service(name, [VIP], [("http", 80, "TCP", 8080)], externalIPs=[EXTERNAL_IP, c.a.ip4])
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-b1"))])])
    c.wait_on(c.a, key(c.a.ip4, 80), 1)  # node-a's own address: translated on node-a
    c.wait(lambda f: key(EXTERNAL_IP, 80) not in f, "no frontend for an address no node owns")
    c.b.agent.wait_frontends(lambda f: key(c.a.ip4, 80) not in f, what="node-b leaves node-a's address alone")
    assert c.tcp(c.a.client, c.a.ip4, 80, 5)["backends"] == {"pod-b1": 5}
    assert c.tcp(c.a.host, c.a.ip4, 80, 5)["backends"] == {"pod-b1": 5}
    for node in c.nodes:
        assert c.tcp(node.client, EXTERNAL_IP, 80, 1)["errors"] == {"ENETUNREACH": 1}
    # from node-b the packet goes to node-a's host network untranslated, where nothing listens on port 80
    assert c.tcp(c.b.client, c.a.ip4, 80, 1)["errors"] == {"ECONNREFUSED": 1}
