"""Service type changes to and from ExternalName: an ExternalName Service is a DNS alias, ignored by proxies.

Mirrors the four Conformance "[sig-network] Services should be able to change the type from ... to ..."
tests of test/e2e/network/service.go. Their DNS half (the name resolves to the external service) is the DNS
server's business; what a proxy must do is serve the cluster IP (and node ports) exactly while the type is
ClusterIP or NodePort, and nothing while it is ExternalName.
"""

from __future__ import annotations

from helpers.twonodes import TwoNodes, ep, external_name_service, key, service, slice_for

VIP = "10.96.0.40"
NODE_PORT = 30400
NAME = "externalname-service"


def _pods(c: TwoNodes) -> dict[str, object]:
    """jig.CreateServicePods(2): two pods on different nodes."""
    return slice_for(NAME, [ep(c.pod("pod-a1")), ep(c.pod("pod-b1"))])


def _reachable(c: TwoNodes, targets: list[tuple[str, int]]) -> None:
    for node in c.nodes:
        for host, port in targets:
            res = c.tcp(node.client, host, port, 40)
            assert set(res["backends"]) == {"pod-a1", "pod-b1"} and res["ok"] == 40, (node.name, host, res)


def _not_translated(c: TwoNodes, targets: list[tuple[str, int]]) -> None:
    for node in c.nodes:
        for host, port in targets:
            assert c.tcp(node.client, host, port, 1)["ok"] == 0


def test_should_be_able_to_change_the_type_from_externalname_to_clusterip(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be able to change the type from ExternalName to ClusterIP
    [Conformance]"""
    c = two_nodes
    c.apply(NAME, [external_name_service(NAME), _pods(c)])  # nothing to translate
    c.apply(NAME, [service(NAME, [VIP], [("http", 80, "TCP", 8080)]), _pods(c)])
    c.wait_frontends(key(VIP, 80), backends=2)
    _reachable(c, [(VIP, 80)])


def test_should_be_able_to_change_the_type_from_externalname_to_nodeport(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be able to change the type from ExternalName to NodePort [Conformance]"""
    c = two_nodes
    c.apply(NAME, [external_name_service(NAME), _pods(c)])  # nothing to translate
    nodeport = service(
        NAME, [VIP], [("http", 80, "TCP", 8080)], type="NodePort", node_ports={"http": NODE_PORT}
    )
    c.apply(NAME, [nodeport, _pods(c)])
    c.wait_frontends(key(VIP, 80), *(key(n.ip4, NODE_PORT) for n in c.nodes), backends=2)
    _reachable(c, [(VIP, 80), *((n.ip4, NODE_PORT) for n in c.nodes)])


def test_should_be_able_to_change_the_type_from_clusterip_to_externalname(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be able to change the type from ClusterIP to ExternalName
    [Conformance]"""
    c = two_nodes
    c.apply(NAME, [service(NAME, [VIP], [("http", 80, "TCP", 8080)]), _pods(c)])
    c.wait_frontends(key(VIP, 80), backends=2)
    _reachable(c, [(VIP, 80)])
    c.apply(NAME, [external_name_service(NAME), _pods(c)])  # the API server clears spec.clusterIP(s)
    c.wait_gone(key(VIP, 80))
    _not_translated(c, [(VIP, 80)])


def test_should_be_able_to_change_the_type_from_nodeport_to_externalname(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be able to change the type from NodePort to ExternalName [Conformance]"""
    c = two_nodes
    nodeport = service(
        NAME, [VIP], [("http", 80, "TCP", 8080)], type="NodePort", node_ports={"http": NODE_PORT}
    )
    c.apply(NAME, [nodeport, _pods(c)])
    node_ports = [key(n.ip4, NODE_PORT) for n in c.nodes]
    c.wait_frontends(key(VIP, 80), *node_ports, backends=2)
    _reachable(c, [(VIP, 80), *((n.ip4, NODE_PORT) for n in c.nodes)])
    c.apply(NAME, [external_name_service(NAME), _pods(c)])  # cluster IP and node port released
    c.wait_gone(key(VIP, 80), *node_ports, key("127.0.0.1", NODE_PORT))
    _not_translated(c, [(VIP, 80), *((n.ip4, NODE_PORT) for n in c.nodes)])
