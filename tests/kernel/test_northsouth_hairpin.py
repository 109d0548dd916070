"""North-south hairpin: a pod reaching a load-balancer IP that the router sends back to its own node.

The pod's process is not below the agent's cgroup, so the socket hooks leave its connect alone (as for a pod
excluded from socket LB): its packets leave node-a, the router routes the load-balancer range back to node-a,
and node-a's TC program translates them. A backend on node-a would answer the pod directly across the
bridge, past the node's devices, so the program translates the source to the load-balancer IP: the replies
go back out through the uplink, where the egress program translates them, and the pod only ever talks to
the load-balancer IP. A remote backend needs nothing special (SNAT to the node, as for any remote flow).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from balancing_testkit.nstopology import LB_RANGES, ROUTER_LAN4, ROUTER_LAN6, NsTopology
from helpers.nsagents import NsCluster, external_service, slices

pytestmark = [pytest.mark.kernel]

LB_IP4, LB_IP6 = "198.51.100.20", "2001:db8:100::20"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsCluster]:
    with NsTopology(pods_per_node=(2, 1)) as ns:
        c = NsCluster(ns, tmp_path_factory.mktemp("ns-hairpin"))
        ports = (("http", 80, "TCP", 8080, 30180),)
        c.apply(
            "lb",
            [
                external_service(
                    "lb", ("10.96.0.60", "fd00:96::60"), ports, kind="LoadBalancer", lb_ips=(LB_IP4, LB_IP6)
                ),
                *slices("lb", ns.backends, (("http", 8080, "TCP"),)),
            ],
        )
        c.start()
        c.wait_programmed([f"{LB_IP4}:80/TCP", f"[{LB_IP6}]:80/TCP"])
        # as in a real node: the load-balancer range is routed out (here to the router, which sends it back)
        v4, v6 = LB_RANGES
        ns.run(ns.a, ["ip", "route", "replace", v4, "via", ROUTER_LAN4])
        ns.run(ns.a, ["ip", "-6", "route", "replace", v6, "via", ROUTER_LAN6])
        yield c


@pytest.mark.parametrize("lb_ip", [LB_IP4, LB_IP6], ids=["ipv4", "ipv6"])
def test_a_pod_reaches_its_own_nodes_load_balancer_ip(cluster: NsCluster, lb_ip: str) -> None:
    """Every backend answers, the pod's own included; local backends see the load-balancer IP as the
    client (their replies must come back through the uplink), the remote one sees node-a."""
    ns = cluster.ns
    pod = ns.pods["pod-a1"]
    node_a = ns.a.ip6 if ":" in lb_ip else ns.a.ip4
    seen: dict[str, set[str]] = {}
    for _ in range(40):
        answer = ns.tcp(lb_ip, 80, src=pod)
        assert answer.local[0] == (pod.ip6 if ":" in lb_ip else pod.ip4)
        seen.setdefault(answer.backend, set()).add(answer.seen[0])
    assert seen == {"pod-a1": {lb_ip}, "pod-a2": {lb_ip}, "pod-b1": {node_a}}, seen
