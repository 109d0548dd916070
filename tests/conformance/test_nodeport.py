"""NodePort: every Node's InternalIPs and ExternalIPs (and the node's loopback) on the nodePort; type changes
that add and remove node ports; Balancing's ``--nodeport-addresses``.

Mirrors "[sig-network] Services ..." (test/e2e/network/service.go) and "[sig-network] LoadBalancers ..."
(loadbalancer.go); the dials from pods, nodes and endpoints are in test_networking.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from helpers.twonodes import (
    TwoNodes,
    ep,
    ep6,
    key,
    require_flags,
    service,
    slice_for,
)

VIP = "10.96.0.30"
VIP6 = "fd00:96::30"
NODE_PORT = 30080


def _nodeport_service(name: str, ips: list[str], **spec: Any) -> dict[str, object]:
    return service(
        name, ips, [("http", 80, "TCP", 8080)], type="NodePort", node_ports={"http": NODE_PORT}, **spec
    )


def test_should_be_able_to_create_a_functioning_nodeport_service(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be able to create a functioning NodePort service [Conformance]"""
    c = two_nodes
    pods = [c.pod("pod-a1"), c.pod("pod-b1")]  # jig.CreateServicePods(2)
    c.apply(
        "nodeport-test",
        [_nodeport_service("nodeport-test", [VIP]), slice_for("nodeport-test", [ep(p) for p in pods])],
    )
    c.wait_frontends(key(VIP, 80), *c.node_port_keys(NODE_PORT), backends=2)
    # CheckServiceReachability from an exec pod: the cluster IP on the service port, every node's
    # InternalIP and ExternalIP on the nodePort; 40 connects reach both endpoints (a miss: probability 2^-39)
    c.wait_frontends(*(key(n.external_ip, NODE_PORT) for n in c.nodes), backends=2)
    for node in c.nodes:
        for host, port in [(VIP, 80), *((ip, NODE_PORT) for n in c.nodes for ip in (n.ip4, n.external_ip))]:
            res = c.tcp(node.client, host, port, 40)
            assert set(res["backends"]) == {"pod-a1", "pod-b1"} and res["ok"] == 40, (node.name, host, res)


def test_should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols(  # noqa: E501 (the e2e name)
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should be able to update service type to NodePort listening on same port number
    but different protocols"""
    c = two_nodes
    name = "nodeport-update-service"
    pods = [c.pod("pod-a2"), c.pod("pod-b2")]
    tcp_port, udp_port = ("tcp-port", 80, "TCP", 8080), ("udp-port", 80, "UDP", 8080)
    eps = slice_for(name, [ep(p) for p in pods], [("tcp-port", 8080, "TCP"), ("udp-port", 8080, "UDP")])
    c.apply(name, [service(name, [VIP], [tcp_port]), eps])  # type ClusterIP
    c.wait_frontends(key(VIP, 80), backends=2)

    c.apply(name, [service(name, [VIP], [tcp_port], type="NodePort", node_ports={"tcp-port": 30080}), eps])
    c.wait_frontends(*c.node_port_keys(30080, "TCP"), backends=2)
    for node in c.nodes:
        for host, port in [(VIP, 80), *((n.ip4, 30080) for n in c.nodes)]:
            assert set(c.tcp(node.client, host, port, 40)["backends"]) == {"pod-a2", "pod-b2"}

    both = service(
        name, [VIP], [tcp_port, udp_port], type="NodePort", node_ports={"tcp-port": 30080, "udp-port": 30081}
    )
    c.apply(name, [both, eps])
    c.wait_frontends(key(VIP, 80, "UDP"), *c.node_port_keys(30081, "UDP"), backends=2)
    for node in c.nodes:
        for host, port in [(VIP, 80), *((n.ip4, 30080) for n in c.nodes)]:
            assert set(c.tcp(node.client, host, port, 40)["backends"]) == {"pod-a2", "pod-b2"}
        for host, port in [(VIP, 80), *((n.ip4, 30081) for n in c.nodes)]:
            assert set(c.udp(node.client, host, port, 40)["backends"]) == {"pod-a2", "pod-b2"}


def _check_reachable(c: TwoNodes, proto: str, targets: list[tuple[str, int]], expect: set[str]) -> None:
    """CheckServiceReachability from the exec pod (on node-a; the endpoint is on node-b)."""
    for host, port in targets:
        res = (c.tcp if proto == "TCP" else c.udp)(c.a.client, host, port, 5)
        assert set(res["backends"]) == expect and res["ok"] == 5, (host, port, res)


def _check_refused(c: TwoNodes, proto: str, targets: list[tuple[str, int]]) -> None:
    for node in c.nodes:
        for host, port in targets:
            res = (c.tcp if proto == "TCP" else c.udp)(node.client, host, port, 2, timeout=0.5)
            assert res["ok"] == 0, (node.name, host, port, res)


def _type_and_ports_lifecycle(c: TwoNodes, proto: str) -> None:
    """loadbalancer.go's mutability test: ClusterIP → NodePort → LoadBalancer → new nodePort → new port →
    no endpoints → one endpoint → back to ClusterIP, checking reachability at every step."""
    name, lb_ip = "mutability-test", "198.51.100.40"
    pod = c.pod("pod-b1")
    eps_one = [slice_for(name, [ep(pod)], [("", 8080, proto)])]
    eps_none = [slice_for(name, [], [("", 8080, proto)])]

    def svc(port: int = 80, **spec: Any) -> dict[str, object]:
        return service(name, [VIP], [("", port, proto, 8080)], **spec)

    c.apply(name, [svc(), *eps_one])
    c.wait_frontends(key(VIP, 80, proto), backends=1)
    _check_reachable(c, proto, [(VIP, 80)], {"pod-b1"})

    c.apply(name, [svc(type="NodePort", node_ports={"": 30200}), *eps_one])
    c.wait_frontends(*c.node_port_keys(30200, proto), backends=1)
    _check_reachable(c, proto, [(VIP, 80), *((n.ip4, 30200) for n in c.nodes)], {"pod-b1"})

    ingress = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    c.apply(name, [svc(type="LoadBalancer", node_ports={"": 30200}, status=ingress), *eps_one])
    c.wait_frontends(key(lb_ip, 80, proto), backends=1)
    _check_reachable(c, proto, [(VIP, 80), (lb_ip, 80), *((n.ip4, 30200) for n in c.nodes)], {"pod-b1"})

    c.apply(name, [svc(type="LoadBalancer", node_ports={"": 30201}, status=ingress), *eps_one])  # nodePort
    c.wait_frontends(*c.node_port_keys(30201, proto), backends=1)
    c.wait_gone(*c.node_port_keys(30200, proto))
    _check_reachable(c, proto, [(lb_ip, 80), *((n.ip4, 30201) for n in c.nodes)], {"pod-b1"})

    c.apply(name, [svc(81, type="LoadBalancer", node_ports={"": 30201}, status=ingress), *eps_one])  # port
    c.wait_frontends(key(VIP, 81, proto), key(lb_ip, 81, proto), backends=1)
    c.wait_gone(key(VIP, 80, proto), key(lb_ip, 80, proto))
    _check_reachable(c, proto, [(VIP, 81), (lb_ip, 81), *((n.ip4, 30201) for n in c.nodes)], {"pod-b1"})

    c.apply(
        name, [svc(81, type="LoadBalancer", node_ports={"": 30201}, status=ingress), *eps_none]
    )  # scale 0
    c.wait_frontends(key(lb_ip, 81, proto), backends=0)
    _check_refused(c, proto, [(lb_ip, 81)])

    c.apply(name, [svc(81, type="LoadBalancer", node_ports={"": 30201}, status=ingress), *eps_one])  # scale 1
    c.wait_frontends(key(lb_ip, 81, proto), backends=1)
    _check_reachable(c, proto, [(lb_ip, 81)], {"pod-b1"})

    c.apply(name, [svc(81), *eps_one])  # back to ClusterIP: node ports and load-balancer IP are gone
    c.wait_gone(key(lb_ip, 81, proto), *c.node_port_keys(30201, proto))
    _check_reachable(c, proto, [(VIP, 81)], {"pod-b1"})
    _check_refused(c, proto, [(lb_ip, 81)])


def test_should_be_able_to_change_the_type_and_ports_of_a_tcp_service(two_nodes: TwoNodes) -> None:
    """[sig-network] LoadBalancers should be able to change the type and ports of a TCP service [Slow]"""
    _type_and_ports_lifecycle(two_nodes, "TCP")


def test_should_be_able_to_change_the_type_and_ports_of_a_udp_service(two_nodes: TwoNodes) -> None:
    """[sig-network] LoadBalancers should be able to change the type and ports of a UDP service [Slow]"""
    _type_and_ports_lifecycle(two_nodes, "UDP")


@pytest.mark.agent_args("--nodeport-addresses=10.244.2.0/24")
def test_nodeport_addresses_limits_the_node_port_frontends(two_nodes: TwoNodes) -> None:
    """No e2e counterpart: kube-proxy's ``--nodeport-addresses`` (here: ``--nodeport-addresses CIDR``).

    Only node addresses inside the CIDRs get NodePort frontends; loopback, the IPv6 InternalIPs and the
    ExternalIPs are outside 10.244.2.0/24, so they are left alone (the ClusterIP still works)."""
    require_flags("--nodeport-addresses")
    c = two_nodes
    pods = [c.pod("pod-a1"), c.pod("pod-b1")]
    c.apply(
        "np",
        [
            _nodeport_service("np", [VIP, VIP6]),
            slice_for("np", [ep(p) for p in pods]),
            slice_for("np", [ep6(p) for p in pods]),
        ],
    )
    c.wait_frontends(key(VIP, 80), key(VIP6, 80), *(key(n.ip4, NODE_PORT) for n in c.nodes), backends=2)
    excluded = [key("127.0.0.1", NODE_PORT), key("::1", NODE_PORT)]
    excluded += [key(ip, NODE_PORT) for n in c.nodes for ip in (n.ip6, n.external_ip)]
    c.wait(lambda f: not any(k in f for k in excluded), "no NodePort frontend outside the CIDR")
    for node in c.nodes:
        for n in c.nodes:
            assert c.tcp(node.host, n.ip4, NODE_PORT, 10)["ok"] == 10
        # untranslated: nothing listens on these addresses in the host netns
        assert c.tcp(node.host, "127.0.0.1", NODE_PORT, 1)["errors"] == {"ECONNREFUSED": 1}
        assert c.tcp(node.host, node.ip6, NODE_PORT, 1)["errors"] == {"ECONNREFUSED": 1}


def test_loopback_node_port_in_a_pod_is_the_pods_own_loopback(two_nodes: TwoNodes) -> None:
    """No e2e counterpart: ``localhost:nodePort`` is a node-port frontend on the node's host network only.

    Inside a pod, 127.0.0.1 and ::1 are the pod's own loopback: kube-proxy has no rule in a pod's network
    namespace, and Cilium's socket LB looks loopback/wildcard NodePorts up only in the host namespace. A
    program talking to its own sidecar on 127.0.0.1:<port in the NodePort range> must reach the sidecar."""
    c = two_nodes
    pod = c.a.client
    c.topo.start_backend(
        pod, name="sidecar", port=NODE_PORT, extra_args=["--addr", "127.0.0.1", "--addr", "::1"]
    )
    c.apply(
        "np", [_nodeport_service("np", [VIP]), slice_for("np", [ep(c.pod("pod-a1")), ep(c.pod("pod-b1"))])]
    )
    c.wait_frontends(*c.node_port_keys(NODE_PORT), backends=2)
    assert set(c.tcp(c.a.host, "127.0.0.1", NODE_PORT, 20)["backends"]) == {"pod-a1", "pod-b1"}  # host: yes
    assert c.tcp(pod, "127.0.0.1", NODE_PORT, 5)["backends"] == {"sidecar": 5}
    assert c.tcp(pod, "::1", NODE_PORT, 5)["backends"] == {"sidecar": 5}
