"""Unready and terminating endpoints, and ``publishNotReadyAddresses``.

Mirrors "[sig-network] Services ..." tests of test/e2e/network/service.go. A pod's readiness and deletion
reach a proxy only through the EndpointSlice conditions the endpoint-slice controller writes (with
``publishNotReadyAddresses`` it forces ``ready: true``); each step below writes the slice that controller
would write for the e2e step (see the condition sets in ``twonodes.py``).
"""

from __future__ import annotations

from helpers.twonodes import (
    PUBLISHED_TERMINATING_UNREADY,
    PUBLISHED_UNREADY,
    READY,
    TERMINATING_UNREADY,
    TwoNodes,
    ep,
    key,
    service,
    slice_for,
)

VIP = "10.96.0.50"
NODE_PORT = 30500


def test_should_create_endpoints_for_unready_pods(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should create endpoints for unready pods"""
    c = two_nodes
    name, pod = "tolerate-unready", c.pod("pod-a2")  # readiness probe /bin/false: never ready

    def svc(publish: bool) -> dict[str, object]:
        return service(name, [VIP], [("http", 80, "TCP", 8080)], publishNotReadyAddresses=publish)

    c.apply(name, [svc(True), slice_for(name, [ep(pod, **PUBLISHED_UNREADY)])])
    c.wait_frontends(key(VIP, 80), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 5)["backends"] == {"pod-a2": 5}

    # RC scaled to zero (the pod terminates slowly: preStop sleep) and publishNotReadyAddresses=false
    c.apply(name, [svc(False), slice_for(name, [ep(pod, **TERMINATING_UNREADY)])])
    c.wait_frontends(key(VIP, 80), backends=0)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 2)["errors"] == {"ECONNREFUSED": 2}

    # publishNotReadyAddresses=true again: the terminating pod is reachable through the Service
    c.apply(name, [svc(True), slice_for(name, [ep(pod, **PUBLISHED_TERMINATING_UNREADY)])])
    c.wait_frontends(key(VIP, 80), backends=1)
    for node in c.nodes:
        assert c.tcp(node.client, VIP, 80, 5)["backends"] == {"pod-a2": 5}


def _webserver_service(c: TwoNodes, name: str, publish: bool) -> dict[str, object]:
    """A NodePort Service and "webserver-pod" on node-a, ready; returns the Service."""
    svc = service(
        name,
        [VIP],
        [("http", 80, "TCP", 8080)],
        type="NodePort",
        node_ports={"http": NODE_PORT},
        publishNotReadyAddresses=publish,
    )
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1"), **READY)])])
    c.wait_frontends(key(VIP, 80), *(key(n.ip4, NODE_PORT) for n in c.nodes), backends=1)
    return svc


def test_should_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_true(
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should be able to connect to terminating and unready endpoints if
    PublishNotReadyAddresses is true"""
    c = two_nodes
    name = "svc-tolerate-unready"
    svc = _webserver_service(c, name, publish=True)
    # the webserver pod is deleted (300 s grace period) and becomes unready
    c.apply_synced(name, [svc, slice_for(name, [ep(c.pod("pod-a1"), **PUBLISHED_TERMINATING_UNREADY)])])
    # the pause pod on node-b: cluster IP, node-a's and node-b's node port, 5 times each
    for host, port in [(VIP, 80), (c.a.ip4, NODE_PORT), (c.b.ip4, NODE_PORT)]:
        assert c.tcp(c.b.client, host, port, 5)["backends"] == {"pod-a1": 5}, (host, port)


def test_should_not_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_false(  # noqa: E501 (the e2e name)
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should not be able to connect to terminating and unready endpoints if
    PublishNotReadyAddresses is false"""
    c = two_nodes
    name = "svc-not-tolerate-unready"
    svc = _webserver_service(c, name, publish=False)
    c.apply(name, [svc, slice_for(name, [ep(c.pod("pod-a1"), **TERMINATING_UNREADY)])])
    c.wait_frontends(key(VIP, 80), *(key(n.ip4, NODE_PORT) for n in c.nodes), backends=0)
    for host, port in [(VIP, 80), (c.a.ip4, NODE_PORT), (c.b.ip4, NODE_PORT)]:
        res = c.tcp(c.b.client, host, port, 5)
        assert res["ok"] == 0 and res["errors"] == {"ECONNREFUSED": 5}, (host, port, res)
