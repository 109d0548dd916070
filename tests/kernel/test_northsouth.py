"""North-south on a real kernel: an external client reaches NodePorts, load-balancer IPs and externalIPs.

The topology (``balancing_testkit.nstopology``): client -> router -> node-a, node-b (each with its agent,
north-south on ``uplink0``) -> pods behind each node's bridge (pod-a1, pod-a2 on node-a; pod-b1 on node-b),
dual-stack. Each pod answers ``<pod> <client ip> <client port>``, so a test sees which backend answered and
whose address it saw. Nothing else translates: without the TC programs a node drops these packets (the
frontend ranges are ``unreachable`` in the nodes), so every answer proves a translation, and a completed TCP
handshake proves the reply came back as the address the client connected to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from balancing_testkit.nstopology import NsTopology
from helpers.nsagents import NsCluster, external_service, slices

pytestmark = [pytest.mark.kernel]

CLUSTER_IPS = ("10.96.0.50", "fd00:96::50")
PORTS = (("http", 80, "TCP", 8080, 30080), ("dns", 53, "UDP", 8080, 30053))
SLICE_PORTS = (("http", 8080, "TCP"), ("dns", 8080, "UDP"))
LB_IP4, LB_IP6 = "198.51.100.10", "2001:db8:100::10"
EXT_IP4 = "198.51.100.130"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsCluster]:
    with NsTopology(pods_per_node=(2, 1)) as ns:
        c = NsCluster(ns, tmp_path_factory.mktemp("ns-manifests"))
        pods = ns.backends
        c.apply(
            "web",
            [
                external_service(
                    "web",
                    CLUSTER_IPS,
                    PORTS,
                    kind="LoadBalancer",
                    lb_ips=(LB_IP4, LB_IP6),
                    external_ips=(EXT_IP4,),
                ),
                *slices("web", pods, SLICE_PORTS),
            ],
        )
        c.start()
        c.wait_programmed(
            [
                f"{ns.a.ip4}:30080/TCP",
                f"[{ns.a.ip6}]:30080/TCP",
                f"{LB_IP4}:80/TCP",
                f"{EXT_IP4}:80/TCP",
            ]
        )
        try:
            yield c
        except BaseException:
            print(ns.diagnostics())
            raise


def _spread(
    cluster: NsCluster, addr: str, port: int, n: int = 30, udp: bool = False
) -> Counter[tuple[str, str]]:
    """(backend, address it saw) over ``n`` connections from the client."""
    seen: Counter[tuple[str, str]] = Counter()
    for _ in range(n):
        answer = (cluster.ns.udp if udp else cluster.ns.tcp)(addr, port)
        seen[(answer.backend, answer.seen[0])] += 1
    return seen


def test_nodeport_reaches_local_and_remote_backends(cluster: NsCluster) -> None:
    """node-a's NodePort: its own pods see the client's address, node-b's pod sees node-a's (SNAT)."""
    ns = cluster.ns
    seen = _spread(cluster, ns.a.ip4, 30080, n=40)
    by_backend = {backend: addr for backend, addr in seen}
    assert set(by_backend) == {"pod-a1", "pod-a2", "pod-b1"}, seen
    assert by_backend["pod-a1"] == by_backend["pod-a2"] == ns.client.ip4
    assert by_backend["pod-b1"] == ns.a.ip4
