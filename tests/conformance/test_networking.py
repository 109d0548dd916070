"""Networking Granular Checks: a NodePort Service over one "netserver" pod per node, dialled from a test pod,
from the nodes' host network and from the endpoints themselves, over the cluster IP and every node's node
port; endpoints and node ports changing; endpoints on the host network.

Mirrors "[sig-network] Networking Granular Checks: Services ..." of test/e2e/network/networking.go
(``NetworkingTestConfig``: http on service port 80, udp on 90; every dial must reach every endpoint, or
none once it is gone).
"""

from __future__ import annotations

from collections.abc import Sequence

from balancing_testkit.topology import Host
from helpers.twonodes import TwoNodes, ep, ep6, key, service, slice_for

VIP, VIP6 = "10.96.0.100", "fd00:96::100"
HTTP_NODE_PORT, UDP_NODE_PORT = 30080, 30090
NETSERVERS = ("pod-a1", "pod-b1")  # one per node
NAME = "node-port-service"


def _config(
    c: TwoNodes,
    ips: tuple[str, ...] = (VIP,),
    *,
    name: str = NAME,
    endpoints: tuple[Host, ...] | None = None,
    target: int = 8080,
    node_ports: tuple[int, int] = (HTTP_NODE_PORT, UDP_NODE_PORT),
) -> None:
    """NewNetworkingTestConfig: the NodePort Service ``name`` over ``endpoints`` (default: the netservers)."""
    hosts = endpoints if endpoints is not None else tuple(c.pod(n) for n in NETSERVERS)
    ports = [("http", 80, "TCP", target), ("udp", 90, "UDP", target)]
    svc = service(
        name, list(ips), ports, type="NodePort", node_ports={"http": node_ports[0], "udp": node_ports[1]}
    )
    slice_ports = [("http", target, "TCP"), ("udp", target, "UDP")]
    docs = [svc, slice_for(name, [ep(h) for h in hosts], slice_ports, name=f"{name}-v4")]
    if len(ips) > 1:
        docs.append(slice_for(name, [ep6(h) for h in hosts], slice_ports, name=f"{name}-v6"))
    c.apply(name, docs)
    keys = [key(ip, 80) for ip in ips] + [key(ip, 90, "UDP") for ip in ips]
    keys += c.node_port_keys(node_ports[0], "TCP", v6=len(ips) > 1)
    keys += c.node_port_keys(node_ports[1], "UDP", v6=len(ips) > 1)
    c.wait_frontends(*keys, backends=len(hosts))


def _dial(
    c: TwoNodes,
    sources: Sequence[Host],
    proto: str,
    targets: list[tuple[str, int]],
    expect: frozenset[str] = frozenset(NETSERVERS),
) -> None:
    """DialFrom...: from every source, every target reaches every expected endpoint and nothing else.
    (40 tries over at most 2 endpoints: one is missed with probability 2 * 2^-40.)"""
    for src in sources:
        for host, port in targets:
            res = (c.tcp if proto == "http" else c.udp)(src, host, port, 40)
            where = (src.name, host, port, res)
            assert set(res["backends"]) == expect and res["ok"] == 40, where
            # the connected socket's peer is what the client dialled, never the endpoint behind it
            assert res["peernames"] == [[host, port]], where


def _dial_nothing(c: TwoNodes, sources: list[Host], proto: str, targets: list[tuple[str, int]]) -> None:
    """DialFrom... expecting ZERO endpoints: nothing answers."""
    for src in sources:
        for host, port in targets:
            res = (c.tcp if proto == "http" else c.udp)(src, host, port, 3, timeout=0.5)
            assert res["ok"] == 0, (src.name, host, port, res)


def _pods(c: TwoNodes) -> list[Host]:
    """The test container: a pod on each node."""
    return [c.a.client, c.b.client]


def _hosts(c: TwoNodes) -> list[Host]:
    """The nodes' host network."""
    return [c.a.host, c.b.host]


def _node_ports(c: TwoNodes, port: int) -> list[tuple[str, int]]:
    return [(n.ip4, port) for n in c.nodes]


def test_should_function_for_pod_service_http(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for pod-Service: http"""
    c = two_nodes
    _config(c)
    _dial(c, _pods(c), "http", [(VIP, 80), *_node_ports(c, HTTP_NODE_PORT)])


def test_should_function_for_pod_service_udp(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for pod-Service: udp"""
    c = two_nodes
    _config(c)
    _dial(c, _pods(c), "udp", [(VIP, 90), *_node_ports(c, UDP_NODE_PORT)])


def test_should_function_for_node_service_http(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for node-Service: http

    From the node's host network: the cluster IPs, every node's InternalIPs (IPv4 and IPv6) and the node's
    loopback (127.0.0.1 and ::1) on the node port."""
    c = two_nodes
    _config(c, (VIP, VIP6))
    targets = [(VIP, 80), (VIP6, 80), ("127.0.0.1", HTTP_NODE_PORT), ("::1", HTTP_NODE_PORT)]
    targets += [(ip, HTTP_NODE_PORT) for n in c.nodes for ip in (n.ip4, n.ip6)]
    _dial(c, _hosts(c), "http", targets)


def test_should_function_for_node_service_udp(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for node-Service: udp"""
    c = two_nodes
    _config(c, (VIP, VIP6))
    targets = [(VIP, 90), (VIP6, 90), ("127.0.0.1", UDP_NODE_PORT), ("::1", UDP_NODE_PORT)]
    targets += [(ip, UDP_NODE_PORT) for n in c.nodes for ip in (n.ip4, n.ip6)]
    _dial(c, _hosts(c), "udp", targets)


def test_should_function_for_endpoint_service_http(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for endpoint-Service: http

    From the endpoints themselves: each reaches every endpoint, itself included (a hairpin)."""
    c = two_nodes
    _config(c)
    _dial(c, [c.pod(n) for n in NETSERVERS], "http", [(VIP, 80), *_node_ports(c, HTTP_NODE_PORT)])


def test_should_function_for_endpoint_service_udp(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for endpoint-Service: udp"""
    c = two_nodes
    _config(c)
    _dial(c, [c.pod(n) for n in NETSERVERS], "udp", [(VIP, 90), *_node_ports(c, UDP_NODE_PORT)])


def test_should_function_for_multiple_endpoint_services_with_same_selector(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for multiple endpoint-Services
    with same selector"""
    c = two_nodes
    vip2, node_ports2 = "10.96.0.101", (30081, 30091)
    _config(c)
    _config(c, (vip2,), name="node-port-service-2", node_ports=node_ports2)  # same endpoints
    endpoints = [c.pod(n) for n in NETSERVERS]
    for vip, port in ((VIP, HTTP_NODE_PORT), (vip2, node_ports2[0])):
        _dial(c, endpoints, "http", [(vip, 80), *_node_ports(c, port)])
    c.delete(NAME)  # the original Service goes; the second one is unaffected
    c.wait_gone(key(VIP, 80), *c.node_port_keys(HTTP_NODE_PORT))
    _dial(c, endpoints, "http", [(vip2, 80), *_node_ports(c, node_ports2[0])])


def _update_endpoints(c: TwoNodes, proto: str, port: int) -> None:
    _config(c)
    _dial(c, [c.a.client], proto, [(VIP, port)])
    _config(c, endpoints=(c.pod("pod-a1"),))  # DeleteNetProxyPod: pod-b1 goes
    _dial(c, [c.a.client], proto, [(VIP, port)], expect=frozenset({"pod-a1"}))


def test_should_update_endpoints_http(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should update endpoints: http"""
    _update_endpoints(two_nodes, "http", 80)


def test_should_update_endpoints_udp(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should update endpoints: udp"""
    _update_endpoints(two_nodes, "udp", 90)


def _update_node_port(c: TwoNodes, proto: str, node_port: int) -> None:
    _config(c)
    _dial(c, [c.a.host], proto, [(c.a.ip4, node_port)])
    c.delete(NAME)  # DeleteNodePortService
    c.wait_gone(*c.node_port_keys(node_port, "TCP" if proto == "http" else "UDP"))
    _dial_nothing(c, [c.a.host], proto, [(c.a.ip4, node_port)])


def test_should_update_nodeport_http(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should update nodePort: http [Slow]"""
    _update_node_port(two_nodes, "http", HTTP_NODE_PORT)


def test_should_update_nodeport_udp(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should update nodePort: udp [Slow]"""
    _update_node_port(two_nodes, "udp", UDP_NODE_PORT)


def test_should_support_basic_nodeport_udp_functionality(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should support basic nodePort: udp functionality"""
    c = two_nodes
    _config(c)
    _dial(c, [c.a.host], "udp", [(c.a.ip4, UDP_NODE_PORT)])


def test_should_function_for_service_endpoints_using_hostnetwork(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking Granular Checks: Services should function for service endpoints using
    hostNetwork

    The netservers run in the nodes' host network: their endpoint addresses are the nodes' InternalIPs and
    they answer with the node names."""
    c = two_nodes
    for node in c.nodes:
        c.topo.start_backend(node.host, name=node.name, port=10180)
    _config(c, endpoints=tuple(n.host for n in c.nodes), target=10180)
    nodes = frozenset(n.name for n in c.nodes)
    for proto, port, node_port in (("http", 80, HTTP_NODE_PORT), ("udp", 90, UDP_NODE_PORT)):
        targets = [(VIP, port), *_node_ports(c, node_port)]
        _dial(c, _pods(c), proto, targets, nodes)  # pod-Service(hostNetwork)
        _dial(c, _hosts(c), proto, targets, nodes)  # node-Service(hostNetwork)
