"""The north-south topology itself (``balancing_testkit.nstopology``), with plain routing only: no agent, no
BPF, no netfilter. It comes up and goes away without leftovers (also when building it fails), the external
client reaches every pod by routing and the pod sees the client's own address, a pod on the other node is
reached through the router, the load-balancer ranges go where the router's routes say (one node or ECMP), and
two instances coexist. The north-south datapath tests build on what is checked here.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest

from balancing_testkit.nstopology import ECMP, LB_RANGES, NsTopology
from balancing_testkit.topology import HarnessError, in_netns, list_leftovers, pid_alive, run_cmd
from helpers.support import wait_until

FAMILIES = [4, 6]
PROTOS = ["tcp", "udp"]


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> Iterator[NsTopology]:
    with NsTopology() as topo:
        yield topo
        rep = getattr(request.node, "_blt_rep_call", None)
        if rep is not None and rep.failed:
            print(topo.diagnostics())


def machine_state() -> tuple[list[str], list[str]]:
    """The named network namespaces, and the links of this (the root) network namespace."""
    netns = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    links = run_cmd(["ip", "-o", "link", "show"]).stdout.splitlines()
    return netns, sorted(line.split(":")[1].strip() for line in links)


def prefix_leftovers(prefix: str) -> list[str]:
    return [str(lo.path) for lo in list_leftovers() if lo.name.startswith(prefix)]


def exchange(
    ns: NsTopology, proto: str, addr: str, source_port: int | None = None
) -> tuple[str, tuple[str, int]]:
    """(backend, client address it saw) of one TCP or UDP exchange; the client address is the socket's."""
    call = ns.tcp if proto == "tcp" else ns.udp
    answer = call(addr, ns.port, source_port=source_port)
    assert answer.seen == answer.local, answer
    return answer.backend, answer.seen


def send_datagrams(ns: NsTopology, addr: str, count: int) -> None:
    """``count`` datagrams from the client to ``addr``:80, each from a fresh socket (a new source port)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for _ in range(count):
        with in_netns(ns.client), socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", (addr, 80))


# --- lifecycle ---------------------------------------------------------------------------------------------


def test_comes_up_and_goes_away_without_leftovers() -> None:
    before = machine_state()
    with NsTopology() as ns:
        prefix = ns.topo.prefix
        paths = [ns.netns_path(name) for name in ns.namespaces().values()]
        assert all(p.exists() for p in paths), paths
        assert len(set(paths)) == 2 + len(ns.nodes) + 3
        servers = list(ns.topo.backends.values())
        assert servers and all(pid_alive(p.pid) for p in servers)
        assert {n.uplink_ifindex for n in ns.nodes} == {2}  # lo is 1 in every new namespace
        assert machine_state()[1] == before[1], "a link was made in the root network namespace"
    assert machine_state() == before
    assert prefix_leftovers(prefix) == []
    assert not any(pid_alive(p.pid) for p in servers)


def test_failed_build_and_failing_body_leave_nothing() -> None:
    before = machine_state()
    broken = NsTopology(uplink="uplink-name-too-long")  # 20 characters: `ip link add` refuses it
    with pytest.raises(HarnessError, match="uplink-name-too-long"):
        broken.open()
    assert prefix_leftovers(broken.topo.prefix) == []
    with pytest.raises(RuntimeError, match="boom"), NsTopology() as ns:
        prefix = ns.topo.prefix
        raise RuntimeError("boom")
    assert prefix_leftovers(prefix) == []
    assert machine_state() == before


# --- routing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("proto", PROTOS)
def test_client_reaches_every_pod_directly_with_its_own_address(
    ns: NsTopology, proto: str, family: int
) -> None:
    for pod in ns.backends:
        backend, seen = exchange(ns, proto, pod.ip(family))
        assert (backend, seen[0]) == (pod.name, ns.client.ip(family))
    pod = ns.b.pods[0]
    for _ in range(2):  # a fixed source port, twice in a row: "the same flow" again
        assert exchange(ns, proto, pod.ip(family), source_port=40123) == (
            pod.name,
            (ns.client.ip(family), 40123),
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_pod_is_reached_through_the_router(ns: NsTopology, family: int) -> None:
    forwarded = "Ip.ForwDatagrams" if family == 4 else "Ip6OutForwDatagrams"
    here, there = ns.a.pods[0], ns.b.pods[0]
    before = {w: ns.counters(w)[forwarded] for w in (ns.router, ns.a.netns, ns.b.netns)}
    uplink_before = ns.link_counters(ns.a, ns.a.uplink)["tx_packets"]
    answer = ns.tcp(there.ip(family), ns.port, src=here)
    assert (answer.backend, answer.seen) == (there.name, answer.local)
    assert answer.seen[0] == here.ip(family)
    after = {w: ns.counters(w)[forwarded] for w in before}
    # SYN, ACK, FIN/ACK... each way: every hop forwards at least the 3 packets of the handshake
    assert all(after[w] - before[w] >= 3 for w in before), (before, after)
    assert ns.link_counters(ns.a, ns.a.uplink)["tx_packets"] - uplink_before >= 3


@pytest.mark.parametrize("family", FAMILIES)
def test_load_balancer_range_goes_to_node_a_or_ecmp(ns: NsTopology, family: int) -> None:
    target = str(ipaddress.ip_network(LB_RANGES[family == 6])[10])
    count = 64

    def received() -> dict[str, int]:
        return {n.name: ns.link_counters(n, n.uplink)["rx_packets"] for n in ns.nodes}

    def delta_after_sending() -> dict[str, int]:
        start = received()
        send_datagrams(ns, target, count)
        wait_until(lambda: sum(received().values()) - sum(start.values()) >= count, 2.0, "the datagrams")
        return {name: n - start[name] for name, n in received().items()}

    plain = delta_after_sending()
    assert plain["node-a"] >= count and plain["node-b"] < 10, plain  # a few ND/MLD packets at most
    ns.set_external_routes(ECMP)
    spread = delta_after_sending()
    assert min(spread.values()) >= 10 and sum(spread.values()) >= count, spread  # ~32 each, L4 hash


def test_node_addresses_answer_from_the_node(ns: NsTopology) -> None:
    """Nothing listens on the nodes: a connect to a node address is refused by that node's kernel."""
    for node in ns.nodes:
        for family in FAMILIES:
            with pytest.raises(ConnectionRefusedError):
                ns.tcp(node.ip(family), 30080)


def test_two_topologies_coexist(ns: NsTopology) -> None:
    with NsTopology(pods_per_node=(1, 2)) as other:
        mine, theirs = ns.namespaces(), other.namespaces()
        assert mine.keys() == theirs.keys() - {"pod-b2"} | {"pod-a2"}
        assert not set(mine.values()) & set(theirs.values())
        assert [p.name for p in other.backends] == ["pod-a1", "pod-b1", "pod-b2"]
        for topo in (ns, other):
            for pod in topo.backends:
                assert exchange(topo, "tcp", pod.ip4)[0] == pod.name
    for pod in ns.backends:  # the first one is untouched by the second's teardown
        assert exchange(ns, "udp", pod.ip6)[0] == pod.name
