"""Session affinity (``sessionAffinity: ClientIP``): stickiness, switching it off and on, the idle timeout;
on the cluster IP and on a node port.

Mirrors "[sig-network] Services should have session affinity ..." / "... switch session affinity ..." of
test/e2e/network/service.go. The e2e "client IP" is the client's network namespace here (a pod, or the
node's host network shared by every host-network process), which is what a pod's IP identifies anyway; see
docs/kube-proxy-differences.md for what differs (records are per frontend, not per service port).

Probabilities (backends are picked uniformly at random per connection when no affinity record applies):
- "sticky" = all 15 connections of a check reach one backend (e2e's AffinityConfirmCount). With affinity
  working this holds always; were affinity ignored it would still hold by chance with probability
  3 * (1/3)^15 < 1e-7 for 3 backends, so a pass means something.
- "not sticky" (affinity None) = at least two backends among 15 connections: a correct proxy fails this
  check with probability 3 * (1/3)^15 < 1e-7.
- timeout: after the idle timeout each of K clients picks afresh; the test fails only if every one of them
  picks the backend it had before, probability (1/N)^K = (1/4)^6 < 2.5e-4 < 0.1% with N = 4 backends and
  K = 6 clients (one wait of the timeout for all of them, instead of e2e's up to 10 sequential waits).
  Meanwhile a 7th client connects every 0.4 s for 3 s and must keep its backend (an idle timeout).
"""

from __future__ import annotations

import time
from typing import Any

from balancing_testkit.topology import Host
from helpers.twonodes import TwoNodes, affinity, ep, key, service, slice_for

VIP = "10.96.0.80"
NODE_PORT = 30800
CONFIRM = 15  # e2e's AffinityConfirmCount
DEFAULT_TIMEOUT = 10800  # sessionAffinityConfig.clientIP.timeoutSeconds when not given
SHORT_TIMEOUT = 2


def _hostname_service(c: TwoNodes, name: str, node_port: bool, spec: dict[str, Any], pods: int = 3) -> str:
    """StartServeHostnameService with ``pods`` endpoints spread over both nodes; returns the frontend key
    the clients use (the cluster IP, or node-a's InternalIP on the node port: "the first node's")."""
    backends = [c.pod(n) for n in ("pod-a1", "pod-b1", "pod-a2", "pod-b2")[:pods]]
    extra: dict[str, Any] = {"type": "NodePort", "node_ports": {"http": NODE_PORT}} if node_port else {}
    svc = service(name, [VIP], [("http", 80, "TCP", 8080)], **extra, **spec)
    c.apply(name, [svc, slice_for(name, [ep(p) for p in backends])])
    k = key(c.a.ip4, NODE_PORT) if node_port else key(VIP, 80)
    c.wait_frontends(k, backends=pods)
    return k


def _target(c: TwoNodes, node_port: bool) -> tuple[str, int]:
    return (c.a.ip4, NODE_PORT) if node_port else (VIP, 80)


def _backends(c: TwoNodes, src: Host, target: tuple[str, int], processes: int = 3) -> list[str]:
    """Who answered ``CONFIRM`` connections from ``src``, made by ``processes`` separate client processes
    (as e2e runs one curl per request): the record is the netns's, not a socket's or a process's."""
    seen: list[str] = []
    per = CONFIRM // processes
    for _ in range(processes):
        res = c.tcp(src, *target, per)
        assert res["ok"] == per, res
        for name, n in res["backends"].items():
            seen += [name] * n
    return seen


def _check_affinity(c: TwoNodes, target: tuple[str, int], should_hold: bool) -> None:
    """e2e's checkAffinity, from a pod on each node and from a node's host network."""
    for src in (c.a.client, c.b.client, c.b.host):
        distinct = set(_backends(c, src, target))
        if should_hold:
            assert len(distinct) == 1, f"{src.name}: affinity should hold, reached {distinct}"
        else:
            assert len(distinct) > 1, f"{src.name}: no affinity expected, always reached {distinct}"


def _affinity_test(c: TwoNodes, name: str, node_port: bool) -> None:
    k = _hostname_service(c, name, node_port, affinity())
    c.wait_affinity(k, DEFAULT_TIMEOUT)
    _check_affinity(c, _target(c, node_port), should_hold=True)


def _transition_test(c: TwoNodes, name: str, node_port: bool) -> None:
    k = _hostname_service(c, name, node_port, affinity())
    c.wait_affinity(k, DEFAULT_TIMEOUT)
    _hostname_service(c, name, node_port, {"sessionAffinity": "None"})
    c.wait_affinity(k, 0)
    _check_affinity(c, _target(c, node_port), should_hold=False)
    _hostname_service(c, name, node_port, affinity())
    c.wait_affinity(k, DEFAULT_TIMEOUT)
    _check_affinity(c, _target(c, node_port), should_hold=True)


def _timeout_test(c: TwoNodes, name: str, node_port: bool) -> None:
    k = _hostname_service(c, name, node_port, affinity(SHORT_TIMEOUT), pods=4)
    c.wait_affinity(k, SHORT_TIMEOUT)
    target = _target(c, node_port)
    steady_client = c.a.client
    clients = [c.b.client, c.a.host, c.b.host, c.pod("pod-a1"), c.pod("pod-a2"), c.pod("pod-b2")]

    # sticky until the timeout expires
    before: dict[str, str] = {}
    for src in [steady_client, *clients]:
        distinct = set(_backends(c, src, target, processes=1))
        assert len(distinct) == 1, f"{src.name}: should be sticky, reached {distinct}"
        before[src.name] = distinct.pop()

    # the timeout is an idle timeout (as kube-proxy's `recent` match, refreshed by every connection): a
    # client connecting every 0.4 s keeps its backend longer than the timeout ...
    steady = c.topo.spawn_client(steady_client, None, ["loop", *target, "--interval", 0.4, "--duration", 3.0])
    # ... while the others stay idle longer than the timeout: a new connection may go anywhere
    time.sleep(SHORT_TIMEOUT + 0.5)
    after = {src.name: next(iter(c.tcp(src, *target, 1)["backends"])) for src in clients}
    moved = [n for n in after if after[n] != before[n]]
    assert moved, f"no client changed backend after the {SHORT_TIMEOUT}s timeout: {after} (before: {before})"

    kept = c.topo.finish_client(steady)
    assert kept["duration_s"] > SHORT_TIMEOUT + 0.5 and kept["ok"] == kept["attempts"], kept
    assert kept["backends"] == {before[steady_client.name]: kept["ok"]}, kept


def test_should_have_session_affinity_work_for_service_with_type_clusterip(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should have session affinity work for service with type clusterIP [LinuxOnly]
    [Conformance]"""
    _affinity_test(two_nodes, "affinity-clusterip", node_port=False)


def test_should_be_able_to_switch_session_affinity_for_service_with_type_clusterip(
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should be able to switch session affinity for service with type clusterIP
    [LinuxOnly] [Conformance]"""
    _transition_test(two_nodes, "affinity-clusterip-transition", node_port=False)


def test_should_have_session_affinity_timeout_work_for_service_with_type_clusterip(
    two_nodes: TwoNodes,
) -> None:
    """[sig-network] Services should have session affinity timeout work for service with type clusterIP
    [LinuxOnly]"""
    _timeout_test(two_nodes, "affinity-clusterip-timeout", node_port=False)


def test_should_have_session_affinity_work_for_nodeport_service(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should have session affinity work for NodePort service [LinuxOnly]
    [Conformance]"""
    _affinity_test(two_nodes, "affinity-nodeport", node_port=True)


def test_should_be_able_to_switch_session_affinity_for_nodeport_service(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should be able to switch session affinity for NodePort service [LinuxOnly]
    [Conformance]"""
    _transition_test(two_nodes, "affinity-nodeport-transition", node_port=True)


def test_should_have_session_affinity_timeout_work_for_nodeport_service(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should have session affinity timeout work for NodePort service [LinuxOnly]"""
    _timeout_test(two_nodes, "affinity-nodeport-timeout", node_port=True)


def test_affinity_to_a_backend_that_left_is_forgotten(two_nodes: TwoNodes) -> None:
    """No e2e counterpart: a client whose backend left the Service is not refused nor sent to the departed
    backend; it gets (and keeps) another one, as with kube-proxy (the departed endpoint's chain and its
    `recent` list are gone)."""
    c = two_nodes
    name = "affinity-departed"
    k = _hostname_service(c, name, False, affinity())
    c.wait_affinity(k, DEFAULT_TIMEOUT)
    target = _target(c, False)
    first = set(_backends(c, c.a.client, target))
    assert len(first) == 1, first
    gone = first.pop()
    remaining = [p for p in ("pod-a1", "pod-b1", "pod-a2") if p != gone]
    svc = service(name, [VIP], [("http", 80, "TCP", 8080)], **affinity())
    c.apply(name, [svc, slice_for(name, [ep(c.pod(p)) for p in remaining])])
    c.wait_frontends(k, backends=2)
    after = _backends(c, c.a.client, target)
    assert len(after) == CONFIRM and len(set(after)) == 1 and after[0] in remaining, after


def test_session_affinity_holds_for_udp_too(two_nodes: TwoNodes) -> None:
    """No e2e counterpart (the e2e affinity tests use HTTP): ClientIP affinity applies to UDP as well, so
    every new UDP socket of a client reaches the same backend (without affinity each socket is hashed to
    a backend of its own)."""
    c = two_nodes
    name = "affinity-udp"
    pods = ("pod-a1", "pod-b1", "pod-a2")
    svc = service(name, [VIP], [("dns", 53, "UDP", 8080)], **affinity())
    c.apply(name, [svc, slice_for(name, [ep(c.pod(p)) for p in pods], [("dns", 8080, "UDP")])])
    c.wait_frontends(key(VIP, 53, "UDP"), backends=3)
    c.wait_affinity(key(VIP, 53, "UDP"), DEFAULT_TIMEOUT)
    for src in (c.a.client, c.b.host):
        res = c.udp(src, VIP, 53, CONFIRM)
        assert res["ok"] == CONFIRM and len(res["backends"]) == 1, res
