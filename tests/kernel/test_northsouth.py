"""North-south on a real kernel: an external client reaches NodePorts, load-balancer IPs and externalIPs.

The topology (``balancing_testkit.nstopology``): client -> router -> node-a, node-b (each with its agent,
north-south on ``uplink0``) -> pods behind each node's bridge (pod-a1, pod-a2 on node-a; pod-b1 on node-b),
dual-stack. Each pod answers ``<pod> <client ip> <client port>``, so a test sees which backend answered and
whose address it saw. Nothing else translates: without the TC programs a node drops these packets (the
frontend ranges are ``unreachable`` in the nodes), so every answer proves a translation, and a completed TCP
handshake (or an answer on a connected UDP socket) proves the reply came back as the address the client
sent to.

One module-wide cluster serves every test; each test owns a Service (its own NodePort, load-balancer IP)
and a block of client source ports (``Ports``): a fixed source port makes a flow's backend a pure function
of the Maglev table, so the spreads below are the same on every run. A dropped flow is a TCP connect that
times out (the SYN was dropped, nothing was refused); its reason is read from the agent's
``balancing_resolutions_total`` series. The agents run with ``--events all`` and their own event logs. The
cleanup test stops node-b's agent, cleans up, and restarts it (so it is last, and leaves the cluster whole).

Neighbours: ``helpers.nsagents`` (the agents and manifests), ``test_northsouth_robust.py`` (faults, limits,
restarts), ``test_nstopology.py`` (the topology alone).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancing.datapath import abi, libbpf, maps, programmed, tcattach
from balancing_testkit.nstopology import ECMP, Answer, NsTopology
from balancing_testkit.topology import Pod, in_netns
from helpers.nsagents import Doc, NsAgent, NsCluster, external_service, slices
from helpers.support import parse_key, wait_until

pytestmark = [pytest.mark.kernel]

CLUSTER_IPS = ("10.96.0.50", "fd00:96::50")
PORTS = (("http", 80, "TCP", 8080, 30080), ("dns", 53, "UDP", 8080, 30053))
SLICE_PORTS = (("http", 8080, "TCP"), ("dns", 8080, "UDP"))
HTTP_SLICE = (("http", 8080, "TCP"),)
LB_IP4, LB_IP6 = "198.51.100.10", "2001:db8:100::10"
EXT_IP4 = "198.51.100.130"
PROXY_LB_IP, VIP_LB_IP = "198.51.100.20", "198.51.100.21"  # ipMode Proxy / VIP, one Service
RANGED_LB_IP, FENCED_LB_IP = "198.51.100.30", "198.51.100.31"
CLIENT_RANGE, OTHER_RANGE = "203.0.113.0/24", "192.0.2.0/24"
DROP_WAIT = 1.0  # seconds a dropped TCP connect is given before it counts as dropped (a SYN is sent at 0 s)
MULTIPATH_SEED = 20260101  # the router's ECMP hash seed: the same choice of node per flow on every run


class Ports:
    """Blocks of client source ports, one per test (below Linux's ephemeral range, so never in use)."""

    NODEPORT4, NODEPORT6, UDP4, VIA_B = 20000, 20100, 20200, 20300
    LOCAL_VIA_A, LOCAL_VIA_B = 20400, 20500
    LB4, LB6, EXTERNAL_IP, VIP_MODE = 20600, 20700, 20800, 20900
    RANGES = 21000
    MAGLEV_NODEPORT, MAGLEV_ECMP = 21100, 21200
    SHRINK_BEFORE, SHRINK_AFTER, REUSE = 21300, 21400, 21800
    EVENTS, CONNTRACK = 21500, 21600
    CLEANUP = 21700
    STICKY = 21900


# --- the Services -------------------------------------------------------------------------------------------


def _web(ns: NsTopology) -> list[Doc]:
    """LoadBalancer, eTP Cluster, on every pod: NodePorts 30080/TCP and 30053/UDP, both LB IPs, an
    externalIP."""
    svc = external_service(
        "web", CLUSTER_IPS, PORTS, kind="LoadBalancer", lb_ips=(LB_IP4, LB_IP6), external_ips=(EXT_IP4,)
    )
    return [svc, *slices("web", ns.backends, SLICE_PORTS)]


def _http(
    name: str,
    cluster_ip: str,
    node_port: int,
    pods: Iterable[Pod],
    *,
    local: bool = False,
    lb_ips: Sequence[str] = (),
    ranges: Sequence[str] = (),
) -> list[Doc]:
    """A single-stack IPv4 Service with one TCP port ``http`` 80 -> 8080 on ``node_port``, and its slices:
    a LoadBalancer when it has ``lb_ips``, else a NodePort."""
    svc = external_service(
        name,
        (cluster_ip,),
        (("http", 80, "TCP", 8080, node_port),),
        kind="LoadBalancer" if lb_ips else "NodePort",
        local=local,
        lb_ips=lb_ips,
        source_ranges=ranges,
    )
    return [svc, *slices(name, pods, HTTP_SLICE)]


def _proxied(ns: NsTopology) -> list[Doc]:
    """A LoadBalancer with one ``ipMode: Proxy`` ingress IP and one ``VIP`` one, on every pod."""
    docs = _http("proxied", "10.96.0.53", 30083, ns.backends, lb_ips=(PROXY_LB_IP, VIP_LB_IP))
    docs[0]["status"]["loadBalancer"]["ingress"] = [
        {"ip": PROXY_LB_IP, "ipMode": "Proxy"},
        {"ip": VIP_LB_IP, "ipMode": "VIP"},
    ]
    return docs


def _fenced(ns: NsTopology, ranges: Sequence[str]) -> list[Doc]:
    """A LoadBalancer on FENCED_LB_IP for the clients in ``ranges`` only."""
    return _http("fenced", "10.96.0.55", 30085, ns.backends, lb_ips=(FENCED_LB_IP,), ranges=ranges)


def _shrink(pods: Iterable[Pod]) -> list[Doc]:
    return _http("shrink", "10.96.0.56", 30086, pods)


def _reuse(pods: Iterable[Pod]) -> list[Doc]:
    return _http("reuse", "10.96.0.57", 30087, pods)


def _sticky(pods: Iterable[Pod]) -> list[Doc]:
    svc, *rest = _http("sticky", "10.96.0.58", 30088, pods)
    svc["spec"]["sessionAffinity"] = "ClientIP"
    return [svc, *rest]


def _apply_all(c: NsCluster) -> None:
    ns = c.ns
    c.apply("web", _web(ns))
    c.apply("web-local", _http("web-local", "10.96.0.51", 30081, ns.backends, local=True))
    c.apply("a-only", _http("a-only", "10.96.0.52", 30082, ns.a.pods, local=True))
    c.apply("proxied", _proxied(ns))
    c.apply(
        "ranged",
        _http("ranged", "10.96.0.54", 30084, ns.backends, lb_ips=(RANGED_LB_IP,), ranges=(CLIENT_RANGE,)),
    )
    c.apply("fenced", _fenced(ns, (OTHER_RANGE,)))
    c.apply("shrink", _shrink(ns.backends))
    c.apply("reuse", _reuse(ns.backends))
    c.apply("sticky", _sticky(ns.backends))


def _frontends(ns: NsTopology) -> list[str]:
    a = ns.a
    return [
        f"{a.ip4}:30080/TCP",
        f"[{a.ip6}]:30080/TCP",
        f"{a.ip4}:30053/UDP",
        f"{ns.b.ip4}:30080/TCP",
        f"{LB_IP4}:80/TCP",
        f"[{LB_IP6}]:80/TCP",
        f"{EXT_IP4}:80/TCP",
        f"{a.ip4}:30081/TCP",
        f"{a.ip4}:30082/TCP",
        f"{VIP_LB_IP}:80/TCP",
        f"{RANGED_LB_IP}:80/TCP",
        f"{FENCED_LB_IP}:80/TCP",
        f"{a.ip4}:30086/TCP",
        f"{a.ip4}:30087/TCP",
        f"{a.ip4}:30088/TCP",
    ]


@pytest.fixture(scope="module")
def events_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ns-events")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, events_dir: Path) -> Iterator[NsCluster]:
    with NsTopology(pods_per_node=(2, 1)) as ns:
        c = NsCluster(ns, tmp_path_factory.mktemp("ns-manifests"), extra=["--events", "all"])
        for name, agent in c.agents.items():  # each agent its own event log and stream socket
            agent.extra += [
                "--event-log",
                str(events_dir / f"{name}.jsonl"),
                "--events-socket",
                str(events_dir / f"{name}.sock"),
            ]
        _apply_all(c)
        c.start()
        c.wait_programmed(_frontends(ns))
        try:
            yield c
        except BaseException:
            print(ns.diagnostics())
            raise


# --- what the client and the agents see ---------------------------------------------------------------------


def _answers(
    cluster: NsCluster, addr: str, port: int, base: int, n: int = 30, udp: bool = False
) -> dict[int, Answer]:
    """One exchange per client source port ``base .. base+n-1`` to ``addr:port``: source port -> answer."""
    exchange = cluster.ns.udp if udp else cluster.ns.tcp
    return {p: exchange(addr, port, source_port=p) for p in range(base, base + n)}


def _spread(
    cluster: NsCluster, addr: str, port: int, base: int, n: int = 30, udp: bool = False
) -> Counter[tuple[str, str]]:
    """(backend, address it saw) over ``n`` flows from the client, source ports from ``base``."""
    answers = _answers(cluster, addr, port, base, n, udp).values()
    return Counter((a.backend, a.seen[0]) for a in answers)


def _seen_by(seen: Counter[tuple[str, str]]) -> dict[str, set[str]]:
    """backend -> the client addresses it saw."""
    out: dict[str, set[str]] = {}
    for backend, addr in seen:
        out.setdefault(backend, set()).add(addr)
    return out


def _dropped(ns: NsTopology, addr: str, port: int) -> None:
    """A TCP connect to ``addr:port`` times out: its SYN was dropped, not refused, not answered."""
    with pytest.raises(TimeoutError):
        ns.tcp(addr, port, timeout=DROP_WAIT)


def _resolutions(agent: NsAgent, service: str, result: str, hook: str = "tc_ingress") -> float:
    """The agent's ``balancing_resolutions_total`` for Service ``service`` (all ports) with ``result``."""
    total = 0.0
    for family in text_string_to_metric_families(agent.metrics()):
        if family.name != "balancing_resolutions":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (labels.get("name"), labels.get("result"), labels.get("hook")) == (service, result, hook):
                total += sample.value
    return total


def _wait_counted(agent: NsAgent, service: str, result: str, above: float) -> None:
    wait_until(
        lambda: _resolutions(agent, service, result) > above,
        5.0,
        f"{result} counted for {service} on {agent.node}",
    )


@contextmanager
def _programmed(
    agent: NsAgent,
) -> Iterator[tuple[programmed.ProgrammedState, dict[int, str], maps.KernelMaps]]:
    """The agent's maps as programmed, its backend ids as ``ip:port``, and the open maps (for tables)."""
    io = maps.KernelMaps(agent.bpffs / "maps")
    try:
        names = {
            abi.unpack_backend_id(raw_id): str(programmed.backend_of(raw))
            for raw_id, raw in io.items(abi.MAP_BACKENDS)
        }
        yield programmed.read_state(io), names, io
    finally:
        io.close()


def _maglev(agent: NsAgent, key: str) -> list[str]:
    """The Maglev table of frontend ``key`` in the agent's maps, each entry as its backend's ``ip:port``."""
    with _programmed(agent) as (state, names, io):
        table = state.frontends[parse_key(key)].maglev
        return [] if table is None else [names[i] for i in io.read_table(table)]


def _source_ranges(agent: NsAgent, key: str) -> int:
    """How many loadBalancerSourceRanges entries frontend ``key`` has in the agent's maps."""
    with _programmed(agent) as (state, _, _io):
        frontend = state.frontends.get(parse_key(key))
        return 0 if frontend is None else len(frontend.source_ranges)


def _addr(pod_name: str, ns: NsTopology, v6: bool = False) -> str:
    pod = ns.pods[pod_name]
    return f"[{pod.ip6}]:8080" if v6 else f"{pod.ip4}:8080"


# --- 1, 2: NodePorts ----------------------------------------------------------------------------------------


def test_nodeport_reaches_local_and_remote_backends(cluster: NsCluster) -> None:
    """node-a's NodePort: its own pods see the client's address, node-b's pod sees node-a's (SNAT)."""
    ns = cluster.ns
    by_backend = _seen_by(_spread(cluster, ns.a.ip4, 30080, Ports.NODEPORT4))
    assert by_backend == {"pod-a1": {ns.client.ip4}, "pod-a2": {ns.client.ip4}, "pod-b1": {ns.a.ip4}}


def test_nodeport_over_ipv6(cluster: NsCluster) -> None:
    """The same over IPv6 (node-a's v6 address): the v6 programs translate, SNAT to node-a's v6 address."""
    ns = cluster.ns
    by_backend = _seen_by(_spread(cluster, ns.a.ip6, 30080, Ports.NODEPORT6))
    assert by_backend == {"pod-a1": {ns.client.ip6}, "pod-a2": {ns.client.ip6}, "pod-b1": {ns.a.ip6}}


def test_nodeport_over_udp(cluster: NsCluster) -> None:
    """UDP NodePort 30053: a connected socket gets every answer (so it came from node-a:30053, the reply
    translated back), local pods see the client, the remote one node-a."""
    ns = cluster.ns
    by_backend = _seen_by(_spread(cluster, ns.a.ip4, 30053, Ports.UDP4, udp=True))
    assert by_backend == {"pod-a1": {ns.client.ip4}, "pod-a2": {ns.client.ip4}, "pod-b1": {ns.a.ip4}}


def test_nodeport_through_node_b(cluster: NsCluster) -> None:
    """node-b's NodePort: its own pod sees the client, node-a's pods see node-b's address."""
    ns = cluster.ns
    by_backend = _seen_by(_spread(cluster, ns.b.ip4, 30080, Ports.VIA_B))
    assert by_backend == {"pod-a1": {ns.b.ip4}, "pod-a2": {ns.b.ip4}, "pod-b1": {ns.client.ip4}}


# --- 3: externalTrafficPolicy Local -------------------------------------------------------------------------


def test_external_traffic_policy_local_keeps_flows_on_the_node(cluster: NsCluster) -> None:
    """eTP Local: through node-a only node-a's pods answer, through node-b only node-b's, and every pod sees
    the client's real address (nothing is source-NATed)."""
    ns = cluster.ns
    via_a = _seen_by(_spread(cluster, ns.a.ip4, 30081, Ports.LOCAL_VIA_A))
    via_b = _seen_by(_spread(cluster, ns.b.ip4, 30081, Ports.LOCAL_VIA_B))
    assert via_a == {"pod-a1": {ns.client.ip4}, "pod-a2": {ns.client.ip4}}
    assert via_b == {"pod-b1": {ns.client.ip4}}


def test_external_traffic_policy_local_without_a_local_endpoint_drops(cluster: NsCluster) -> None:
    """eTP Local with every endpoint on node-a: through node-b the SYN is dropped (a timeout, not a refusal)
    and node-b counts ``dropped_no_local_endpoint``; through node-a it is served."""
    ns = cluster.ns
    node_b = cluster.agents["node-b"]
    before = _resolutions(node_b, "a-only", "dropped_no_local_endpoint")
    _dropped(ns, ns.b.ip4, 30082)
    _wait_counted(node_b, "a-only", "dropped_no_local_endpoint", before)
    assert ns.tcp(ns.a.ip4, 30082).backend in {"pod-a1", "pod-a2"}


# --- 4: load-balancer IPs and externalIPs -------------------------------------------------------------------


def test_load_balancer_ips_and_external_ip_reach_every_backend(cluster: NsCluster) -> None:
    """The LB IPs (v4, v6) and the externalIP, routed by the router to node-a, reach every pod: node-a's
    with the client's address, node-b's through node-a's SNAT."""
    ns = cluster.ns
    cases = [(LB_IP4, Ports.LB4, 4), (LB_IP6, Ports.LB6, 6), (EXT_IP4, Ports.EXTERNAL_IP, 4)]
    for addr, base, family in cases:
        client, node_a = ns.client.ip(family), ns.a.ip(family)
        by_backend = _seen_by(_spread(cluster, addr, 80, base))
        assert by_backend == {"pod-a1": {client}, "pod-a2": {client}, "pod-b1": {node_a}}, addr


def test_proxy_mode_load_balancer_ip_is_not_translated(cluster: NsCluster) -> None:
    """``ipMode: Proxy``: the load balancer proxies, so its IP is no frontend; the node's own stack gets the
    packet and answers that it has no route (the ``unreachable`` route of the LB range), while the same
    Service's VIP-mode IP is translated."""
    ns = cluster.ns
    assert f"{PROXY_LB_IP}:80/TCP" not in cluster.agents["node-a"].frontends()
    with pytest.raises(OSError) as unreachable:
        ns.tcp(PROXY_LB_IP, 80, timeout=DROP_WAIT)
    assert unreachable.value.errno == errno.EHOSTUNREACH, unreachable.value
    assert ns.tcp(VIP_LB_IP, 80, source_port=Ports.VIP_MODE).backend in {"pod-a1", "pod-a2", "pod-b1"}


# --- 5: loadBalancerSourceRanges ----------------------------------------------------------------------------


def test_source_ranges_admit_drop_and_follow_the_manifest(cluster: NsCluster) -> None:
    """loadBalancerSourceRanges: a range with the client admits it; one without drops its SYN (timeout) and
    counts ``dropped_source_range``, while the same Service's NodePort still admits the client (the ranges
    fence load-balancer IPs, as kube-proxy's); the ranges edited to include the client admit it."""
    ns = cluster.ns
    node_a = cluster.agents["node-a"]
    assert ns.tcp(RANGED_LB_IP, 80, source_port=Ports.RANGES).backend in {"pod-a1", "pod-a2", "pod-b1"}
    before = _resolutions(node_a, "fenced", "dropped_source_range")
    _dropped(ns, FENCED_LB_IP, 80)
    _wait_counted(node_a, "fenced", "dropped_source_range", before)
    assert ns.tcp(ns.a.ip4, 30085, source_port=Ports.RANGES + 1).backend  # the ranges fence the LB IP only
    cluster.apply("fenced", _fenced(ns, (OTHER_RANGE, CLIENT_RANGE)))
    key = f"{FENCED_LB_IP}:80/TCP"
    wait_until(lambda: _source_ranges(node_a, key) == 2, 10.0, f"two source ranges of {key} on node-a")
    assert ns.tcp(FENCED_LB_IP, 80, source_port=Ports.RANGES + 2).backend in {"pod-a1", "pod-a2", "pod-b1"}


# --- 6: Maglev ----------------------------------------------------------------------------------------------


def test_both_nodes_build_the_same_maglev_tables(cluster: NsCluster) -> None:
    """eTP Cluster: both nodes have the same backends, so the same Maglev table entry for entry (the
    precondition of the two tests below); eTP Local: different backends, different tables."""
    ns = cluster.ns
    a, b = cluster.agents["node-a"], cluster.agents["node-b"]
    for key in (f"{LB_IP4}:80/TCP", f"[{LB_IP6}]:80/TCP"):
        table = _maglev(a, key)
        assert set(table) == {_addr(p, ns, key.startswith("[")) for p in ("pod-a1", "pod-a2", "pod-b1")}
        assert table == _maglev(b, key), key
    assert _maglev(a, f"{ns.a.ip4}:30080/TCP") == _maglev(b, f"{ns.b.ip4}:30080/TCP")
    assert set(_maglev(a, f"{ns.a.ip4}:30081/TCP")) == {_addr("pod-a1", ns), _addr("pod-a2", ns)}
    assert set(_maglev(b, f"{ns.b.ip4}:30081/TCP")) == {_addr("pod-b1", ns)}


def test_maglev_one_flow_same_backend_through_either_node(cluster: NsCluster) -> None:
    """The same flow (client address and source port) sent to node-a's and to node-b's NodePort reaches the
    same backend, for 20 source ports (together reaching every pod): no state is shared, the Maglev tables
    agree."""
    ns = cluster.ns
    via_a = _answers(cluster, ns.a.ip4, 30080, Ports.MAGLEV_NODEPORT, n=20)
    via_b = _answers(cluster, ns.b.ip4, 30080, Ports.MAGLEV_NODEPORT, n=20)
    assert {p: a.backend for p, a in via_a.items()} == {p: a.backend for p, a in via_b.items()}
    assert {a.backend for a in via_a.values()} == {"pod-a1", "pod-a2", "pod-b1"}


def test_session_affinity_keeps_an_outside_client_on_one_backend_through_either_node(
    cluster: NsCluster,
) -> None:
    """sessionAffinity ClientIP: the client's address alone picks the Maglev entry, so 20 connections from
    20 source ports reach one backend, through node-a and through node-b alike (no state shared), while the
    same ports spread over the backends of a Service without affinity (test above)."""
    ns = cluster.ns
    via_a = _answers(cluster, ns.a.ip4, 30088, Ports.STICKY, n=20)
    via_b = _answers(cluster, ns.b.ip4, 30088, Ports.STICKY + 50, n=20)
    backends = {a.backend for a in (*via_a.values(), *via_b.values())}
    assert len(backends) == 1, {p: a.backend for p, a in (*via_a.items(), *via_b.items())}


def _node_that_served(ns: NsTopology, answer: Answer) -> str:
    """Which node translated a flow, from what its backend saw: a local pod sees the client, a remote one
    the translating node's address."""
    if answer.seen[0] == ns.client.ip4:
        return str(ns.pods[answer.backend].node)
    for node in ns.nodes:
        if node.ip4 == answer.seen[0]:
            return node.name
    raise AssertionError(f"{answer.backend} saw {answer.seen[0]}: neither the client nor a node")


def test_maglev_load_balancer_ip_through_ecmp(cluster: NsCluster) -> None:
    """The router spreads the LB IP over both nodes (ECMP): each of 20 flows reaches a backend through the
    node the router chose, and the same flow then routed to the other node only reaches the same backend
    there (a new flow for that node: the two nodes chose alike); both nodes served some flows."""
    ns = cluster.ns
    with in_netns(ns.router):
        seed = Path("/proc/sys/net/ipv4/fib_multipath_hash_seed")  # Linux >= 6.11; else a random seed
        if seed.exists():
            seed.write_text(f"{MULTIPATH_SEED}\n")
    ns.set_external_routes(ECMP)
    try:
        first = _answers(cluster, LB_IP4, 80, Ports.MAGLEV_ECMP, n=20)
        served = {p: _node_that_served(ns, a) for p, a in first.items()}
        assert set(served.values()) == {"node-a", "node-b"}, served
        for node in ns.nodes:
            other = next(n.name for n in ns.nodes if n is not node)
            ns.set_external_routes((other,))
            for port in (p for p, name in served.items() if name == node.name):
                again = ns.tcp(LB_IP4, 80, source_port=port)
                assert _node_that_served(ns, again) == other
                assert again.backend == first[port].backend, port
    finally:
        ns.set_external_routes(("node-a",))


# --- 7: a removed backend -----------------------------------------------------------------------------------


def test_a_removed_backend_gets_no_new_flows(cluster: NsCluster) -> None:
    """pod-b1 removed from the EndpointSlices: once node-a's Maglev table no longer names it, 30 new flows
    go to node-a's pods only (before, the same number of flows reached it too)."""
    ns = cluster.ns
    before = _spread(cluster, ns.a.ip4, 30086, Ports.SHRINK_BEFORE)
    assert "pod-b1" in _seen_by(before)
    cluster.apply("shrink", _shrink(ns.a.pods))
    key, gone = f"{ns.a.ip4}:30086/TCP", _addr("pod-b1", ns)
    node_a = cluster.agents["node-a"]
    wait_until(lambda: gone not in _maglev(node_a, key), 10.0, f"{gone} out of {key}'s Maglev table")
    after = _spread(cluster, ns.a.ip4, 30086, Ports.SHRINK_AFTER)
    assert set(_seen_by(after)) == {"pod-a1", "pod-a2"}, after


def test_a_reused_client_port_after_its_backend_left_picks_again(cluster: NsCluster) -> None:
    """A new connection from a client port whose earlier (closed) connection went to pod-b1, made after
    pod-b1 left the Service, is a new flow: it reaches a current backend, never pod-b1. Clients behind a NAT
    reuse source ports; pod-b1 still serves other Services, so its backend entry lives on, and only the
    closed flow's tracking entry still names it (netfilter's conntrack, kube-proxy's datapath, also takes a
    SYN on a closed connection as a new one)."""
    ns = cluster.ns
    before = _answers(cluster, ns.a.ip4, 30087, Ports.REUSE)
    to_b1 = [p for p, a in before.items() if a.backend == "pod-b1"]
    assert to_b1, before
    cluster.apply("reuse", _reuse(ns.a.pods))
    key, gone = f"{ns.a.ip4}:30087/TCP", _addr("pod-b1", ns)
    node_a = cluster.agents["node-a"]
    wait_until(lambda: gone not in _maglev(node_a, key), 10.0, f"{gone} out of {key}'s Maglev table")
    again = {p: ns.tcp(ns.a.ip4, 30087, source_port=p).backend for p in to_b1}
    assert set(again.values()) <= {"pod-a1", "pod-a2"}, again


# --- 8, 9: events and inspect -------------------------------------------------------------------------------


def _events(path: Path) -> list[dict[str, Any]]:
    """The events in an agent's log so far (whole lines only: the agent may be writing the last one)."""
    if not path.exists():
        return []
    *lines, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in lines if line]


def test_a_north_south_event_names_the_client_and_the_hook(cluster: NsCluster, events_dir: Path) -> None:
    """With ``--events all`` a new north-south flow is one event in node-a's log: hook ``tc_ingress``, the
    external client's address and port, the NodePort it asked for, the backend and the owning Service."""
    ns = cluster.ns
    answer = ns.tcp(ns.a.ip4, 30080, source_port=Ports.EVENTS)
    client = f"{ns.client.ip4}:{Ports.EVENTS}"
    log = events_dir / "node-a.jsonl"

    def mine() -> list[dict[str, Any]]:
        return [e for e in _events(log) if (e["client"] or {}).get("address") == client]

    wait_until(lambda: bool(mine()), 5.0, f"an event of {client} in {log}")
    (event,) = mine()
    assert event["hook"] == "tc_ingress"
    assert event["frontend"] == f"{ns.a.ip4}:30080"
    assert event["backend"] == _addr(answer.backend, ns)
    assert event["result"] == ("translated_local" if answer.seen[0] == ns.client.ip4 else "translated_snat")
    assert event["client"]["deviceIfindex"] == ns.a.uplink_ifindex
    assert event["owner"]["name"] == "web"


def test_inspect_conntrack_shows_the_flows(cluster: NsCluster) -> None:
    """``balancing inspect conntrack -o json`` on node-a lists each flow: the client's address and port, the
    NodePort, the backend that answered, and for a remote backend the SNAT address and port it saw."""
    ns = cluster.ns
    answers = _answers(cluster, ns.a.ip4, 30080, Ports.CONNTRACK, n=12)
    assert {a.backend for a in answers.values()} == {"pod-a1", "pod-a2", "pod-b1"}
    doc = json.loads(cluster.agents["node-a"].run_cli("inspect", "conntrack", "-o", "json"))
    rows = {row["client"]: row for row in doc["conntrack"]}
    for port, answer in answers.items():
        row = rows[f"{ns.client.ip4}:{port}"]
        assert row["frontend"] == f"{ns.a.ip4}:30080/TCP"
        assert row["backend"] == _addr(answer.backend, ns)
        remote = answer.backend == "pod-b1"
        assert row["local"] is not remote
        assert row["snat"] == (f"{ns.a.ip4}:{answer.seen[1]}" if remote else None)
        assert row["note"] is None  # both entries of the flow are there


# --- 10: cleanup --------------------------------------------------------------------------------------------


def _tcx_links() -> dict[int, int]:
    """Every tcx link of the machine as ``bpftool -j link list`` shows them: link id -> prog id (bpftool 7.1
    prints the type as a number it does not know)."""
    out = subprocess.run(["bpftool", "-j", "link", "list"], check=True, capture_output=True, text=True).stdout
    return {
        link["id"]: link["prog_id"]
        for link in json.loads(out or "[]")
        if link.get("type") in (libbpf.BPF_LINK_TYPE_TCX, "tcx")
    }


def _link_ids(agent: NsAgent) -> set[int]:
    """The ids of the tcx links pinned under the agent's ``links/`` (the TC programs on its uplink)."""
    ids = set()
    for pin in sorted((agent.bpffs / "links").glob("bl_ns_*")):
        fd = libbpf.obj_get(str(pin))
        try:
            info = libbpf.TcxLinkInfo()
            libbpf.obj_get_info(fd, info)
            ids.add(int(info.id))
        finally:
            os.close(fd)
    return ids


def test_cleanup_detaches_the_tc_programs(cluster: NsCluster) -> None:
    """``balancing cleanup`` in node-b's namespace, its agent stopped: the two tcx links on node-b's uplink
    are gone from the kernel (checked by link id in ``bpftool link list``, which lists every link whatever
    its namespace) and node-b's NodePort is refused by node-b's own stack (no program translates it any
    more). The agent started again attaches anew and the NodePort answers again."""
    ns = cluster.ns
    node_b = cluster.agents["node-b"]
    links = _link_ids(node_b)
    assert len(links) == 2 and links <= set(_tcx_links())
    for pin in (node_b.bpffs / "links").glob("bl_ns_*"):
        info = tcattach.attached(pin)
        assert info is not None and info.live and info.ifindex == ns.b.uplink_ifindex
    node_b.stop()
    try:
        assert ns.tcp(ns.b.ip4, 30080, source_port=Ports.CLEANUP).backend  # detaching is cleanup's job
        node_b.run_cli("cleanup")
        assert not links & set(_tcx_links())
        assert not (node_b.bpffs / "links").exists()
        with pytest.raises(ConnectionRefusedError):
            ns.tcp(ns.b.ip4, 30080, timeout=DROP_WAIT)
    finally:
        node_b.start()
        cluster.wait_programmed([f"{ns.b.ip4}:30080/TCP"])
    assert ns.tcp(ns.b.ip4, 30080, source_port=Ports.CLEANUP + 1).backend in {"pod-a1", "pod-a2", "pod-b1"}
