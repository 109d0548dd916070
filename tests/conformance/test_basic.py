"""ClusterIP basics: endpoints coming and going, several ports, services created, deleted and recreated,
same port with two protocols, refusal without endpoints, hairpin and source IP.

Each test mirrors one Kubernetes e2e test of ``test/e2e/network/service.go`` ("[sig-network] Services ...")
whose docstring names it; the e2e steps that need an API server (creating pods, waiting for the endpoint
controller) are replaced by the EndpointSlices (or Pods) the controllers would write.
"""

from __future__ import annotations

from helpers.twonodes import (
    TwoNodes,
    addresses_of,
    ep,
    ep6,
    evicted_pod,
    key,
    service,
    slice_for,
)

VIP = "10.96.0.10"
VIP6 = "fd00:96::10"
HTTP = [("http", 80, "TCP", 8080)]


def test_should_serve_a_basic_endpoint_from_pods(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should serve a basic endpoint from pods [Conformance]"""
    c = two_nodes
    pod1, pod2 = c.pod("pod-a1"), c.pod("pod-b1")
    c.apply("endpoint-test2", [service("endpoint-test2", [VIP], HTTP), slice_for("endpoint-test2", [])])
    c.wait_frontends(key(VIP, 80), backends=0)

    c.apply(
        "endpoint-test2", [service("endpoint-test2", [VIP], HTTP), slice_for("endpoint-test2", [ep(pod1)])]
    )
    c.wait_frontends(key(VIP, 80), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80)["backends"] == {"pod-a1": 20}

    both = [ep(pod1), ep(pod2)]
    c.apply("endpoint-test2", [service("endpoint-test2", [VIP], HTTP), slice_for("endpoint-test2", both)])
    c.wait_frontends(key(VIP, 80), backends=2)
    for node in c.nodes:
        assert set(c.tcp(node.client, VIP, 80, 40)["backends"]) == {"pod-a1", "pod-b1"}

    c.apply(
        "endpoint-test2", [service("endpoint-test2", [VIP], HTTP), slice_for("endpoint-test2", [ep(pod2)])]
    )
    c.wait_frontends(key(VIP, 80), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80)["backends"] == {"pod-b1": 20}

    c.apply("endpoint-test2", [service("endpoint-test2", [VIP], HTTP), slice_for("endpoint-test2", [])])
    c.wait_frontends(key(VIP, 80), backends=0)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 1)["errors"] == {"ECONNREFUSED": 1}


def test_should_serve_multiport_endpoints_from_pods(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should serve multiport endpoints from pods [Conformance]"""
    c = two_nodes
    c.topo.start_backend(c.pod("pod-a2"), name="pod1", port=100)  # containerPort 100 named svc1
    c.topo.start_backend(c.pod("pod-b2"), name="pod2", port=101)  # containerPort 101 named svc2
    svc = service(
        "multi-endpoint-test", [VIP], [("portname1", 80, "TCP", "svc1"), ("portname2", 81, "TCP", "svc2")]
    )
    # the endpoint-slice controller writes one slice per distinct set of resolved ports
    pod1 = slice_for(svc["metadata"]["name"], [ep(c.pod("pod-a2"))], [("portname1", 100, "TCP")], name="m-1")
    pod2 = slice_for(svc["metadata"]["name"], [ep(c.pod("pod-b2"))], [("portname2", 101, "TCP")], name="m-2")
    p80, p81 = key(VIP, 80), key(VIP, 81)

    c.apply("multi", [svc])
    c.wait_frontends(p80, p81, backends=0)
    c.apply("multi", [svc, pod1])
    c.wait(lambda f: len(f[p80]) == 1 and len(f[p81]) == 0, "pod1 on port 80 only")
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80)["backends"] == {"pod1": 20}
        assert c.tcp(node.client, VIP, 81, 1)["errors"] == {"ECONNREFUSED": 1}

    c.apply("multi", [svc, pod1, pod2])
    c.wait_frontends(p80, p81, backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80)["backends"] == {"pod1": 20}
        assert c.tcp(node.client, VIP, 81)["backends"] == {"pod2": 20}

    c.apply("multi", [svc, pod2])
    c.wait(lambda f: len(f[p80]) == 0 and len(f[p81]) == 1, "pod2 on port 81 only")
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 1)["errors"] == {"ECONNREFUSED": 1}
        assert c.tcp(node.client, VIP, 81)["backends"] == {"pod2": 20}

    c.apply("multi", [svc])
    c.wait_frontends(p80, p81, backends=0)


def test_should_be_updated_after_adding_or_deleting_ports(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be updated after adding or deleting ports"""
    c = two_nodes
    c.topo.start_backend(c.pod("pod-a2"), name="pod1", port=100)
    c.topo.start_backend(c.pod("pod-b2"), name="pod2", port=101)
    one = [("portname1", 80, "TCP", "svc1")]
    two = [*one, ("portname2", 81, "TCP", "svc2")]
    pod1 = slice_for("edit-port-test", [ep(c.pod("pod-a2"))], [("portname1", 100, "TCP")], name="e-1")
    pod2 = slice_for("edit-port-test", [ep(c.pod("pod-b2"))], [("portname2", 101, "TCP")], name="e-2")

    c.apply("edit-port-test", [service("edit-port-test", [VIP], one), pod1])
    c.wait_frontends(key(VIP, 80), backends=1)
    assert c.tcp(c.a.client, VIP, 80)["backends"] == {"pod1": 20}

    c.apply("edit-port-test", [service("edit-port-test", [VIP], two), pod1, pod2])  # a port is added
    c.wait_frontends(key(VIP, 80), key(VIP, 81), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80)["backends"] == {"pod1": 20}
        assert c.tcp(node.client, VIP, 81)["backends"] == {"pod2": 20}

    c.apply("edit-port-test", [service("edit-port-test", [VIP], one), pod1, pod2])  # and deleted again
    c.wait_gone(key(VIP, 81))
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80)["backends"] == {"pod1": 20}
        # the slice still names pod2's port, but the Service has no such port: not translated any more
        assert c.tcp(node.client, VIP, 81, 1)["errors"] == {"EHOSTUNREACH": 1}


def test_should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]"""
    c = two_nodes
    echo = c.pod("pod-a1")  # "echo-sourceip", on node-a; the pause pods run on both nodes
    c.apply(
        "sourceip-test",
        [
            service("sourceip-test", [VIP, VIP6], [("http", 8080, "TCP", 8080)]),
            slice_for("sourceip-test", [ep(echo)]),
            slice_for("sourceip-test", [ep6(echo)]),
        ],
    )
    c.wait_frontends(key(VIP, 8080), key(VIP6, 8080), backends=1)
    for node in c.nodes:
        res = c.tcp(node.client, VIP, 8080, 5)
        assert res["backends"] == {"pod-a1": 5}
        assert addresses_of(res) == [node.client.ip4]
        res = c.tcp(node.client, VIP6, 8080, 5)
        assert res["backends"] == {"pod-a1": 5}
        assert addresses_of(res) == [node.client.ip6]
        # and from the node itself (host network): the node's own address
        assert addresses_of(c.tcp(node.host, VIP, 8080, 5)) == [node.ip4]


def test_should_allow_pods_to_hairpin_back_to_themselves_through_services(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should allow pods to hairpin back to themselves through services"""
    c = two_nodes
    for n, (name, vip) in enumerate((("pod-a1", "10.96.0.11"), ("pod-b1", "10.96.0.12"))):
        hairpin = c.pod(name)
        c.apply(
            f"hairpin-{n}", [service(f"hairpin-{n}", [vip], HTTP), slice_for(f"hairpin-{n}", [ep(hairpin)])]
        )
        c.wait_frontends(key(vip, 80), backends=1)
        res = c.tcp(hairpin, vip, 80, 10)  # the client runs in the backend pod itself, on its node
        assert res["backends"] == {name: 10}
        assert addresses_of(res) == [hairpin.ip4]  # it sees itself as the client


def _hostname_service(c: TwoNodes, name: str, vip: str, port: int) -> set[str]:
    """e2e's StartServeHostnameService: a Service and 3 "serve-hostname" pods; returns their names."""
    names: set[str] = set()
    eps = []
    for i, pod in enumerate((c.pod("pod-a1"), c.pod("pod-a2"), c.pod("pod-b1"))):
        names.add(f"{name}-{i}")
        c.topo.start_backend(pod, name=f"{name}-{i}", port=port, wait=False)
        eps.append(ep(pod))
    for i in range(3):
        c.topo.wait_ready(c.topo.backends[f"{name}-{i}"])
    c.apply(name, [service(name, [vip], [("", 80, "TCP", port)]), slice_for(name, eps, [("", port, "TCP")])])
    c.wait_frontends(key(vip, 80), backends=3)
    return names


def _assert_up(c: TwoNodes, vip: str, names: set[str]) -> None:
    """e2e's verifyServeHostnameServiceUp: every pod answers, from a pod and from a node, nothing else does.
    (60 connects over 3 endpoints: the chance that one is never picked is 3 * (2/3)^60 < 1e-10.)"""
    for src in (c.a.client, c.b.host):
        res = c.tcp(src, vip, 80, 60)
        assert set(res["backends"]) == names and res["ok"] == 60, res


def _assert_down(c: TwoNodes, vip: str) -> None:
    """e2e's verifyServeHostnameServiceDown: nothing answers on the VIP any more."""
    for src in (c.a.client, c.b.host):
        res = c.tcp(src, vip, 80, 3)
        assert res["ok"] == 0 and res["errors"] == {"EHOSTUNREACH": 3}, res


def test_should_be_able_to_up_and_down_services(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be able to up and down services"""
    c = two_nodes
    vip1, vip2, vip3 = "10.96.1.1", "10.96.1.2", "10.96.1.3"
    pods1 = _hostname_service(c, "up-down-1", vip1, 9001)
    pods2 = _hostname_service(c, "up-down-2", vip2, 9002)
    _assert_up(c, vip1, pods1)
    _assert_up(c, vip2, pods2)

    c.delete("up-down-1")  # stop service 1
    c.wait_gone(key(vip1, 80))
    _assert_down(c, vip1)
    _assert_up(c, vip2, pods2)

    pods3 = _hostname_service(c, "up-down-3", vip3, 9003)
    _assert_up(c, vip2, pods2)
    _assert_up(c, vip3, pods3)


def test_should_work_after_the_service_has_been_recreated(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should work after the service has been recreated"""
    c = two_nodes
    pod = c.pod("pod-b2")
    docs = [service("service-deletion", [VIP], HTTP), slice_for("service-deletion", [ep(pod)])]
    c.apply("service-deletion", docs)
    c.wait_frontends(key(VIP, 80), backends=1)
    assert c.tcp(c.a.client, VIP, 80)["backends"] == {"pod-b2": 20}

    c.delete("service-deletion")
    c.wait_gone(key(VIP, 80))
    assert c.tcp(c.a.client, VIP, 80, 1)["errors"] == {"EHOSTUNREACH": 1}

    # recreated: the allocator hands out a new cluster IP; the old one stays dead
    recreated = "10.96.0.20"
    c.apply("service-deletion", [service("service-deletion", [recreated], HTTP), docs[1]])
    c.wait_frontends(key(recreated, 80), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, recreated, 80)["backends"] == {"pod-b2": 20}
        assert c.tcp(node.client, VIP, 80, 1)["errors"] == {"EHOSTUNREACH": 1}


def test_should_serve_endpoints_on_same_port_and_different_protocols(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should serve endpoints on same port and different protocols [Conformance]"""
    c = two_nodes
    pod1 = c.pod("pod-a2")
    c.topo.start_backend(pod1, name="pod1", port=80)  # netexec --http-port 80 --udp-port 80
    tcp_port, udp_port = ("tcp-port", 80, "TCP", 80), ("udp-port", 80, "UDP", 80)
    eps = slice_for("multiprotocol-test", [ep(pod1)], [("tcp-port", 80, "TCP"), ("udp-port", 80, "UDP")])

    c.apply("multiprotocol-test", [service("multiprotocol-test", [VIP], [tcp_port, udp_port]), eps])
    c.wait_frontends(key(VIP, 80, "TCP"), key(VIP, 80, "UDP"), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 5)["backends"] == {"pod1": 5}
        assert c.udp(node.client, VIP, 80, 5)["backends"] == {"pod1": 5}

    c.apply("multiprotocol-test", [service("multiprotocol-test", [VIP], [tcp_port]), eps])  # TCP only
    c.wait_gone(key(VIP, 80, "UDP"))
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 5)["backends"] == {"pod1": 5}
        assert c.udp(node.client, VIP, 80, 1, timeout=0.5)["ok"] == 0

    c.apply("multiprotocol-test", [service("multiprotocol-test", [VIP], [udp_port]), eps])  # UDP only
    c.wait_gone(key(VIP, 80, "TCP"))
    c.wait_frontends(key(VIP, 80, "UDP"), backends=1)
    for node in c.nodes:
        assert c.udp(node.client, VIP, 80, 5)["backends"] == {"pod1": 5}
        assert c.tcp(node.client, VIP, 80, 1, timeout=0.5)["ok"] == 0


def test_should_serve_endpoints_on_same_port_and_different_protocol_for_internal_traffic_on_type_loadbalancer(
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should serve endpoints on same port and different protocol for internal traffic
    on Type LoadBalancer"""
    c = two_nodes
    pod1 = c.pod("pod-b2")
    c.topo.start_backend(pod1, name="pod1", port=100)  # containerPort 100: TCP named svc1, UDP named svc2
    ports = [("portname1", 80, "TCP", "svc1"), ("portname2", 80, "UDP", "svc2")]
    svc = service(
        "multiprotocol-lb-test",
        [VIP],
        ports,
        type="LoadBalancer",
        node_ports={"portname1": 30101, "portname2": 30102},
    )  # no status.loadBalancer yet: the e2e waits for the cluster IP only
    eps = slice_for(
        "multiprotocol-lb-test", [ep(pod1)], [("portname1", 100, "TCP"), ("portname2", 100, "UDP")]
    )
    c.apply("multiprotocol-lb-test", [svc, eps])
    c.wait_frontends(key(VIP, 80, "TCP"), key(VIP, 80, "UDP"), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 5)["backends"] == {"pod1": 5}
        assert c.udp(node.client, VIP, 80, 5)["backends"] == {"pod1": 5}


def test_should_be_rejected_when_no_endpoints_exist(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be rejected when no endpoints exist"""
    c = two_nodes
    svc = service("no-pods", [VIP], HTTP, selector={"app": "no-pods"})
    c.apply("no-pods", [svc])  # no Pod matches, and no EndpointSlice yet
    c.wait_frontends(key(VIP, 80), backends=0)
    for src in (c.a.client, c.b.host):
        res = c.tcp(src, VIP, 80, 3)
        assert res["errors"] == {"ECONNREFUSED": 3}, res  # REFUSED, as the e2e asserts: not a timeout
        assert res["elapsed_s"] < 1.0  # at once (the client timeout is 2 s)
    c.apply_synced("no-pods", [svc, slice_for("no-pods", [])])  # the controller's empty slice: the same
    assert c.tcp(c.b.client, VIP, 80, 3)["errors"] == {"ECONNREFUSED": 3}


def test_should_be_rejected_for_evicted_pods_no_endpoints_exist(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be rejected for evicted pods (no endpoints exist)"""
    c = two_nodes
    labels = {"app": "evicted-pods"}
    svc = service("evicted-pods", [VIP], HTTP, selector=labels, publishNotReadyAddresses=True)
    # no EndpointSlice: the agent reads the Pods itself, and an evicted (Failed) pod is no endpoint,
    # even with publishNotReadyAddresses
    evicted = evicted_pod("evicted-pod", c.pod("pod-a1"), labels)
    c.apply_synced("evicted-pods", [svc, evicted])
    assert c.tcp(c.a.client, VIP, 80, 3)["errors"] == {"ECONNREFUSED": 3}
    c.apply_synced("evicted-pods", [svc, evicted, slice_for("evicted-pods", [])])  # the controller's slice
    assert c.tcp(c.a.client, VIP, 80, 3)["errors"] == {"ECONNREFUSED": 3}


def test_should_work_after_restarting_kube_proxy(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should work after restarting kube-proxy [Disruptive]

    Both agents are killed (as the e2e deletes the kube-proxy pods with no grace period) and started again;
    the pinned datapath keeps translating meanwhile, so a client looping on a Service sees no error."""
    c = two_nodes
    vip1, vip2 = "10.96.2.1", "10.96.2.2"
    pods1 = _hostname_service(c, "restart-proxy-1", vip1, 9101)
    pods2 = _hostname_service(c, "restart-proxy-2", vip2, 9102)
    _assert_up(c, vip1, pods1)
    _assert_up(c, vip2, pods2)
    loop = c.topo.spawn_client(c.b.client, None, ["loop", vip1, 80, "--interval", 0.01, "--timeout", 2])
    c.restart_agents(kill=True)
    _assert_up(c, vip1, pods1)
    _assert_up(c, vip2, pods2)
    res = c.topo.finish_client(loop)
    assert res["ok"] > 20 and res["errors"] == {}, res


def test_should_check_kube_proxy_urls(two_nodes: TwoNodes) -> None:
    """[sig-network] Networking should check kube-proxy urls

    /healthz answers 200 with kube-proxy's body ("lastUpdated", "currentTime"). Not mirrored: /proxyMode on
    kube-proxy's metrics port 10249 (Balancing has no proxy modes; see docs/kube-proxy-differences.md)."""
    for node in two_nodes.nodes:
        code, body = node.agent.get("/healthz")
        assert code == 200 and {"lastUpdated", "currentTime"} <= set(body), body
