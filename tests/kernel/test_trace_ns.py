"""``balancing trace --from-address`` on a real north-south node: its verdicts are what real packets get.

The north-south topology (``balancing_testkit.nstopology``: client -> router -> node-a, node-b, one agent per
node, north-south on ``uplink0``). For each of many client ports the replay (``datapath.replay_ns``, on
node-a's pinned maps) predicts the backend before the client sends a packet from that port; the pod that
answers must be the predicted one, and the address it saw must be the client's (a pod on node-a: DNAT) or
node-a's (a pod elsewhere: SNAT). Afterwards the flow's conntrack entry, written by the program, names the
backend id the Maglev entry of ``flow_hash`` named: the program hashed the flow exactly as the Python does,
for TCP and UDP, IPv4 and IPv6; it decides the replay of a UDP flow, while a closed TCP flow's next SYN
picks again (the same backend here: the tables did not change). Drops (a loadBalancerSourceRanges miss,
externalTrafficPolicy Local without a local endpoint) are predicted and then not answered. A pod of node-a
reaching the load-balancer IP through the router (node-a's route for that range made to go out, as in
tests/kernel/test_northsouth_hairpin.py) is predicted hairpinned with node-a's own routes (``ip route get`` in
its namespace). The command itself runs in node-a's namespace as an operator would run it, for the JSON and
the text.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator

import pytest

from balancing.cli import trace
from balancing.cli.inspect_common import READ_MAPS
from balancing.datapath import abi, libbpf, maps, replay_ns
from balancing.model.desired import Backend, FrontendKey, Protocol, parse_ip
from balancing_testkit.nstopology import LB_RANGES, ROUTER_LAN4, NsTopology
from balancing_testkit.topology import in_netns
from helpers.nsagents import NsAgent, NsCluster, external_service, slices

pytestmark = [pytest.mark.kernel]

WEB_IPS = ("10.96.0.60", "fd00:96::60")
WEB_PORTS = (("http", 80, "TCP", 8080, 30080), ("dns", 53, "UDP", 8080, 30053))
SLICE_PORTS = (("http", 8080, "TCP"), ("dns", 8080, "UDP"))
HTTP = (("http", 80, "TCP", 8080, 30081),)
HTTP_SLICE = (("http", 8080, "TCP"),)
LB_WEB, LB_RANGED, LB_CLOSED = "198.51.100.20", "198.51.100.21", "198.51.100.22"
LOCAL_ONLY_PORT = 30083


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsCluster]:
    with NsTopology(pods_per_node=(2, 1)) as ns:
        c = NsCluster(ns, tmp_path_factory.mktemp("trace-ns-manifests"))
        pods, pod_b1 = ns.backends, ns.pods["pod-b1"]
        web = external_service("web", WEB_IPS, WEB_PORTS, kind="LoadBalancer", lb_ips=(LB_WEB,))
        c.apply("web", [web, *slices("web", pods, SLICE_PORTS)])
        ranged = external_service(
            "ranged",
            ("10.96.0.61",),
            HTTP,
            kind="LoadBalancer",
            lb_ips=(LB_RANGED,),
            source_ranges=("203.0.113.0/24", "203.0.113.10/32"),
        )
        closed = external_service(
            "closed",
            ("10.96.0.62",),
            (("http", 80, "TCP", 8080, 30082),),
            kind="LoadBalancer",
            lb_ips=(LB_CLOSED,),
            source_ranges=("192.0.2.0/24",),
        )
        local = external_service(
            "local-only", ("10.96.0.63",), (("http", 80, "TCP", 8080, LOCAL_ONLY_PORT),), local=True
        )
        c.apply("ranged", [ranged, *slices("ranged", pods, HTTP_SLICE)])
        c.apply("closed", [closed, *slices("closed", pods, HTTP_SLICE)])
        c.apply("local-only", [local, *slices("local-only", [pod_b1], HTTP_SLICE)])
        c.start()
        c.wait_programmed(
            [
                f"{ns.a.ip4}:30080/TCP",
                f"{ns.a.ip4}:30053/UDP",
                f"[{ns.a.ip6}]:30080/TCP",
                f"{LB_WEB}:80/TCP",
                f"{LB_RANGED}:80/TCP",
                f"{LB_CLOSED}:80/TCP",
                f"{ns.a.ip4}:{LOCAL_ONLY_PORT}/TCP",
            ]
        )
        try:
            yield c
        except BaseException:
            print(ns.diagnostics())
            raise


def node_a(cluster: NsCluster) -> NsAgent:
    return cluster.agents["node-a"]


def replay_on(
    agent: NsAgent, key: FrontendKey, client: str, port: int | None, *, routes: bool = False
) -> replay_ns.NsTrace:
    """The replay on the agent's pins; ``routes``: with its node's routing (``ip route get`` there)."""
    io = maps.KernelMaps(agent.bpffs / "maps", (*READ_MAPS, *trace.NORTH_SOUTH_MAPS))
    ip = shutil.which("ip")
    assert ip is not None
    try:
        with in_netns(agent.ns_node.netns):
            via = trace.IpRoutes(ip) if routes else None
            return replay_ns.replay(io, key, replay_ns.Client(parse_ip(client), port), via)
    finally:
        io.close()


def pod_of(cluster: NsCluster, backend: Backend | None) -> str:
    """The pod holding a backend's address."""
    assert backend is not None
    host = str(backend.ip)
    return next(p.name for p in cluster.ns.backends if host in (p.ip4, p.ip6))


@pytest.mark.parametrize(
    ("family", "protocol", "first_port"),
    [(4, Protocol.TCP, 42000), (4, Protocol.UDP, 43000), (6, Protocol.TCP, 44000), (6, Protocol.UDP, 45000)],
)
def test_the_replay_predicts_each_flow(
    cluster: NsCluster, family: int, protocol: Protocol, first_port: int
) -> None:
    ns, agent = cluster.ns, node_a(cluster)
    node_ip = ns.a.ip4 if family == 4 else ns.a.ip6
    client_ip = ns.client.ip4 if family == 4 else ns.client.ip6
    key = FrontendKey(parse_ip(node_ip), 30080 if protocol is Protocol.TCP else 30053, protocol)
    send = ns.tcp if protocol is Protocol.TCP else ns.udp
    reached = set()
    for port in range(first_port, first_port + 16):
        before = replay_on(agent, key, client_ip, port)
        assert before.decided_by == "maglev" and before.deterministic, before
        predicted = before.outcomes[0]
        assert predicted.action == "translate", before
        answer = send(node_ip, key.port, source_port=port)
        assert answer.backend == pod_of(cluster, predicted.backend), (port, before)
        assert answer.seen[0] == (client_ip if predicted.local else node_ip), (port, predicted)
        after = replay_on(agent, key, client_ip, port)
        if protocol is Protocol.TCP:  # closed: a new connection on the tuple picks again
            assert after.decided_by == "maglev" and after.outcomes[0].backend == predicted.backend, after
            assert any("was closed" in note for note in after.notes), after
            entry = tracked_entry(agent, key, client_ip, port)
        else:
            assert after.decided_by == "conntrack" and after.tracked is not None, after
            entry = after.tracked.entry
        assert entry.backend_id == predicted.backend_id, (port, before, after)
        reached.add(answer.backend)
    assert reached == {"pod-a1", "pod-a2", "pod-b1"}  # 16 flows over three backends: each was predicted


def test_without_a_port_the_shares_cover_the_table(cluster: NsCluster) -> None:
    ns = cluster.ns
    t = replay_on(node_a(cluster), FrontendKey(parse_ip(ns.a.ip4), 30080, Protocol.TCP), ns.client.ip4, None)
    assert t.action == "translate" and t.decided_by == "maglev" and t.table_entries == t.maglev_size
    assert {pod_of(cluster, o.backend) for o in t.outcomes} == {"pod-a1", "pod-a2", "pod-b1"}
    assert sum(o.entries for o in t.outcomes) == t.maglev_size
    assert all(abs(o.probability - 1 / 3) < 0.001 for o in t.outcomes)


def test_drops_are_predicted_and_happen(cluster: NsCluster) -> None:
    ns, agent = cluster.ns, node_a(cluster)
    closed = replay_on(agent, FrontendKey(parse_ip(LB_CLOSED), 80, Protocol.TCP), ns.client.ip4, 46000)
    assert [(o.action, o.result) for o in closed.outcomes] == [("drop", "dropped_source_range")]
    with pytest.raises(OSError):
        ns.tcp(LB_CLOSED, 80, source_port=46000, timeout=1.0)
    key = FrontendKey(parse_ip(ns.a.ip4), LOCAL_ONLY_PORT, Protocol.TCP)
    local = replay_on(agent, key, ns.client.ip4, 46001)
    assert [(o.action, o.result) for o in local.outcomes] == [("drop", "dropped_no_local_endpoint")]
    with pytest.raises(OSError):
        ns.tcp(ns.a.ip4, LOCAL_ONLY_PORT, source_port=46001, timeout=1.0)
    ranged = replay_on(agent, FrontendKey(parse_ip(LB_RANGED), 80, Protocol.TCP), ns.client.ip4, 46002)
    assert ranged.source_ranges is not None and ranged.source_ranges.matched == f"{ns.client.ip4}/32"
    answer = ns.tcp(LB_RANGED, 80, source_port=46002)
    assert answer.backend == pod_of(cluster, ranged.outcomes[0].backend)


def test_the_command_in_the_nodes_namespace(cluster: NsCluster) -> None:
    ns, agent = cluster.ns, node_a(cluster)
    target, client = f"{ns.a.ip4}:30080/TCP", f"{ns.client.ip4}:47000"
    doc = json.loads(agent.run_cli("trace", target, "--from-address", client, "-o", "json"))
    north = doc["northSouth"]
    assert north["loaded"] and north["served"] and north["flags"] == ["external", "nodeAddress"]
    uplink = {"ifindex": ns.a.uplink_ifindex, "name": "uplink0", "snatAddress": ns.a.ip4, "hairpin": False}
    assert north["devices"] == [uplink]
    assert north["routes"] == {
        "clientDevice": {"ifindex": ns.a.uplink_ifindex, "name": "uplink0"},
        "frontendLocal": True,
    }
    verdict = north["verdict"]
    assert verdict["decidedBy"] == "maglev" and verdict["nat"] in ("dnat", "snat")
    answer = ns.tcp(ns.a.ip4, 30080, source_port=47000)
    assert verdict["backend"] == f"{ns.pods[answer.backend].ip4}:8080"
    assert verdict["nat"] == ("snat" if answer.backend == "pod-b1" else "dnat")
    text = agent.run_cli("trace", target, "--from-address", client)
    assert "was closed" in text and "uplink0" in text
    spread = agent.run_cli("trace", target, "--from-address", ns.client.ip4)
    assert "decided by maglev" in spread


def test_a_pod_of_the_node_is_hairpinned(cluster: NsCluster) -> None:
    """pod-a1 -> the load-balancer IP, routed out by node-a and back by the router: the replay, with
    node-a's routes, predicts the backend and the address it sees (the LB IP for node-a's pods, node-a's
    own for pod-b1)."""
    ns, agent = cluster.ns, node_a(cluster)
    pod = ns.pods["pod-a1"]
    key = FrontendKey(parse_ip(LB_WEB), 80, Protocol.TCP)
    lb_range = LB_RANGES[0]
    with in_netns(ns.a.netns):
        bridge = socket.if_nametoindex(ns.a.bridge)
    ns.run(ns.a, ["ip", "route", "replace", lb_range, "via", ROUTER_LAN4])
    try:
        seen = set()
        for port in range(48000, 48012):
            t = replay_on(agent, key, pod.ip4, port, routes=True)
            assert t.frontend_local is False and t.client_device == bridge, t
            predicted = t.outcomes[0]
            answer = ns.tcp(LB_WEB, 80, src=pod, source_port=port)
            assert answer.backend == pod_of(cluster, predicted.backend), (port, t)
            assert predicted.hairpin == predicted.local and predicted.result == "translated_snat", t
            assert answer.seen[0] == (LB_WEB if predicted.hairpin else ns.a.ip4), (port, t)
            seen.add((answer.backend, predicted.hairpin))
        assert {"pod-a1", "pod-a2"} & {b for b, hairpin in seen if hairpin}, seen
    finally:
        ns.run(ns.a, ["ip", "route", "replace", "unreachable", lb_range])


def tracked_entry(agent: NsAgent, key: FrontendKey, client_ip: str, port: int) -> abi.ConntrackEntry:
    """The client-direction conntrack entry of one flow, read from the agent's pinned map."""
    raw_key = replay_ns.flow_key(parse_ip(client_ip), port, key)
    fd = libbpf.obj_get(str(agent.bpffs / "maps" / abi.MAP_CONNTRACK))
    try:
        raw = libbpf.map_lookup(fd, raw_key, abi.CT_VAL.size)
    finally:
        os.close(fd)
    assert raw is not None, f"no conntrack entry for {client_ip}:{port}"
    return abi.ConntrackEntry.unpack(raw_key, raw)
