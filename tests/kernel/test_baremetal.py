"""Bare-metal host mode: a host outside the cluster, with its own agent, reaching Services whose pods sit
behind "node" namespaces, directly when pod IPs are routable and through node addresses (BalancingPolicy
``hostPort`` and ``nodeProxy``) when they are not.

The routed topology is built here from ``Topology.add_netns``, so it carries the topology's prefix and goes
at teardown (namespaces with their links and nftables rules, cgroups, bpffs pins, processes)::

    bm       the bare-metal host: eth0 192.168.200.1/24 on the node LAN (bridge lan0 in the fabric netns),
             unreachable routes for the VIP ranges, a route 10.244.N.0/24 via node N only when pod IPs are
             routable, no default route (anything else fails with ENETUNREACH)
    node-N   eth0 192.168.200.(10+N)/24 (its InternalIP) and 192.168.200.(100+N) (its nodeProxy address),
             bridge cbr0 10.244.N.1/24 towards its pods, ip_forward=1
    pods     eth0 10.244.N.(10+k)/24, default route via their node; backend.py on TCP and UDP 8080
    cgroups  the agent attaches to cgroup "bm-host", where the clients run; backends run in their node's
             cgroup, which no agent attaches to

The agent runs as a process, ``--out-of-cluster`` with node name "bm-host" (no Node has it) and the bm
namespace as ``--host-netns``, fed by a fake API server (``--api-server``) or, for the same scenarios, by a
manifest directory (``--manifests``, which sees every Pod). The first case starts it with the shipped
systemd unit's ExecStart line instead (``deploy/systemd/balancing-agent.service``, read by
``helpers.systemd_unit``): the unit's environment, then an EnvironmentFile of this test's pointing it at the
test's bpffs, cgroup and ports, and at the fake API server through a kubeconfig (or the manifest
directory); only the executable becomes this interpreter's ``-m balancing``.

The node's hop (hostPort, and the nodeProxy address) is an nftables DNAT rule in the node's namespace, the
way the CNI portmap plugin implements hostPort: packets really cross the node, conntrack reverses the
translation, and the pod sees the bare-metal host's own address. A forwarder process would terminate the
connection on the node instead (the pod would see the node as its client, and UDP would need a proxy).

In Kubernetes mode hostPort and nodeProxy need the Pods a BalancingPolicy selects on other nodes, which
the agent follows with label-selector watches besides its own node's Pods.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from balancing_testkit.fakeapi import ThreadedApi
from balancing_testkit.topology import Host, Topology, ip_batch, netns_path
from helpers import systemd_unit
from helpers.support import (
    POLICY_API,
    SMALL_MAPS,
    AgentProcess,
    balancing_policy,
    endpoint,
    endpoint_slice,
    free_port,
    node,
    pod,
    service,
    write_manifest,
)

AGENT_NODE = "bm-host"  # the agent's --node-name: no Node object has it
HOST_IP = "192.168.200.1"
LAN_PREFIX = 24
VIP = "10.96.0.50"
KEY_TCP, KEY_UDP = f"{VIP}:80/TCP", f"{VIP}:53/UDP"
SERVICE_PORTS = [("http", 80, "TCP", 8080), ("dns", 53, "UDP", 8080)]
SLICE_PORTS = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]
POD_PORT, HOST_PORT = 8080, 30080
LABELS = {"app": "web"}
NFT = shutil.which("nft") or "/usr/sbin/nft"

API_PATHS = {
    "Service": "/api/v1/services",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices",
    "Node": "/api/v1/nodes",
    "Pod": "/api/v1/pods",
    "BalancingPolicy": f"/apis/{POLICY_API}/balancingpolicies",
}


def node_ip(n: int) -> str:
    return f"192.168.200.{10 + n}"


def proxy_ip(n: int) -> str:
    return f"192.168.200.{100 + n}"


# --- where the agent reads the cluster ------------------------------------------------------------------


@dataclass
class Feed:
    """The cluster's objects, one at a time: into the fake API server (``api``) or a manifest directory."""

    directory: Path
    api: ThreadedApi | None = None

    def put(self, *docs: dict[str, Any]) -> None:
        for doc in docs:
            if self.api is not None:
                self.api.call(self.api.fake.put, API_PATHS[doc["kind"]], copy.deepcopy(doc))
            else:
                write_manifest(self.directory, _file_name(doc), [doc])

    def delete(self, doc: dict[str, Any]) -> None:
        meta = doc["metadata"]
        if self.api is not None:
            path = API_PATHS[doc["kind"]]
            self.api.call(self.api.fake.delete, path, meta.get("namespace", ""), meta["name"])
        else:
            (self.directory / _file_name(doc)).unlink()

    def agent_args(self) -> list[str]:
        return [] if self.api is None else ["--api-server", self.api.url]

    def unit_source(self) -> str:
        """The unit's ``AGENT_SOURCE``: a kubeconfig naming the fake API server, or the manifest directory."""
        if self.api is None:
            return f"--manifests {self.directory}"
        kubeconfig = self.directory.parent / "kubeconfig"
        kubeconfig.write_text(
            f"""
            apiVersion: v1
            kind: Config
            current-context: bm
            contexts: [{{name: bm, context: {{cluster: fake, user: agent}}}}]
            clusters: [{{name: fake, cluster: {{server: "{self.api.url}"}}}}]
            users: [{{name: agent, user: {{token: host-agent-token}}}}]
            """
        )
        return f"--kubeconfig {kubeconfig}"


def _file_name(doc: dict[str, Any]) -> str:
    meta = doc["metadata"]
    return f"{doc['kind'].lower()}-{meta.get('namespace', 'cluster')}-{meta['name']}.yaml"


# --- the routed cluster -------------------------------------------------------------------------------------


@dataclass
class WebPod:
    """A pod behind node number ``node``, as its Pod object and endpoint describe it."""

    name: str
    node: int
    ip: str
    ready: bool = True

    def doc(self) -> dict[str, Any]:
        d = pod(
            self.name,
            [self.ip],
            LABELS,
            [("http", POD_PORT, "TCP"), ("dns", POD_PORT, "UDP")],
            ready=self.ready,
            node=f"node-{self.node}",
        )
        d["metadata"]["uid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"pod/{self.name}"))
        for port in d["spec"]["containers"][0]["ports"]:
            port["hostPort"] = HOST_PORT
        return d

    def endpoint(self) -> dict[str, Any]:
        return endpoint(self.ip, ready=self.ready, node=f"node-{self.node}")


@dataclass
class BareMetal:
    """The bare-metal host, nodes with pods behind them, the agent on the host and what feeds it."""

    topo: Topology
    feed: Feed
    routable: bool
    nodes: dict[int, str] = field(default_factory=dict)  # node number -> netns
    pods: dict[str, WebPod] = field(default_factory=dict)
    _starting: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        ip_batch(
            self.topo.fabric, ["link add lan0 type bridge forward_delay 0 stp_state 0", "link set lan0 up"]
        )
        netns = self.topo.add_netns("bm")
        self._uplink(netns, "bm0", HOST_IP)
        ip_batch(netns, [f"route add unreachable {cidr}" for cidr in self.topo.vip_cidrs])
        self.host = Host("bm", netns, HOST_IP, "", node=AGENT_NODE)
        self.host_args = ["--out-of-cluster", "--host-netns", str(netns_path(netns))]
        self.agent = AgentProcess(
            self.topo, self.feed.directory, AGENT_NODE, extra=[*self.host_args, *self.feed.agent_args()]
        )

    def _uplink(self, netns: str, port: str, *addresses: str) -> None:
        ip_batch(
            self.topo.fabric,
            [f"link add {port} type veth peer name eth0 netns {netns}", f"link set {port} master lan0 up"],
        )
        ip_batch(netns, ["link set eth0 up", *(f"addr add {a}/{LAN_PREFIX} dev eth0" for a in addresses)])

    def add_node(self, n: int) -> str:
        """Node ``n``: InternalIP and nodeProxy address on the LAN, pod subnet 10.244.n.0/24 behind it."""
        netns = self.topo.add_netns(f"node-{n}")
        self._uplink(netns, f"n{n}", node_ip(n), proxy_ip(n))
        ip_batch(
            netns,
            [
                "link add cbr0 type bridge forward_delay 0 stp_state 0",
                "link set cbr0 up",
                f"addr add 10.244.{n}.1/24 dev cbr0",
            ],
        )
        self.topo.sysctl(netns, "net.ipv4.ip_forward", 1)
        if self.routable:
            ip_batch(self.host.netns, [f"route add 10.244.{n}.0/24 via {node_ip(n)}"])
        self.nodes[n] = netns
        return netns

    def add_pod(self, name: str, n: int, *, ready: bool = True) -> WebPod:
        """A pod on node ``n`` answering ``name`` on TCP and UDP 8080 (backend in node-n's cgroup)."""
        k = sum(1 for p in self.pods.values() if p.node == n) + 1
        wp = WebPod(name, n, f"10.244.{n}.{10 + k}", ready)
        netns = self.topo.add_netns(name)
        ip_batch(
            self.nodes[n],
            [f"link add v{k} type veth peer name eth0 netns {netns}", f"link set v{k} master cbr0 up"],
        )
        ip_batch(
            netns,
            ["link set eth0 up", f"addr add {wp.ip}/24 dev eth0", f"route add default via 10.244.{n}.1"],
        )
        host = Host(name, netns, wp.ip, "", node=f"node-{n}")
        self._starting.append(self.topo.start_backend(host, port=POD_PORT, udp_port=POD_PORT, wait=False))
        self.pods[name] = wp
        return wp

    def dnat(self, n: int, address: str, port: int, to: WebPod) -> None:
        """Node ``n`` forwards ``address:port`` (TCP and UDP) to ``to``'s port 8080, as hostPort does."""
        if not Path(NFT).is_file():
            pytest.skip("needs nft (nftables) for the nodes' DNAT")
        rules = f"""
            table ip blt {{
                chain prerouting {{
                    type nat hook prerouting priority dstnat; policy accept;
                    ip daddr {address} meta l4proto {{ tcp, udp }} th dport {port} dnat to {to.ip}:{POD_PORT}
                }}
            }}
        """
        self.topo.run([NFT, "-f", "-"], netns=self.nodes[n], input=rules)

    # objects

    def node_doc(self, n: int, *, proxy: bool = False) -> dict[str, Any]:
        annotations = {"balancing.elf.io/nodeProxyIpv4": proxy_ip(n)} if proxy else {}
        return node(f"node-{n}", [node_ip(n)], annotations=annotations)

    def service_docs(self) -> list[dict[str, Any]]:
        eps = [p.endpoint() for p in self.pods.values()]
        return [service("web", [VIP], SERVICE_PORTS), endpoint_slice("web", eps, SLICE_PORTS)]

    def set_ready(self, name: str, ready: bool) -> None:
        """The pod's Ready condition and its endpoint's, as the kubelet and the endpoints controller do."""
        self.pods[name].ready = ready
        self.feed.put(self.pods[name].doc(), self.service_docs()[1])

    def remove_pod(self, name: str) -> None:
        gone = self.pods.pop(name)
        self.feed.delete(gone.doc())
        self.feed.put(self.service_docs()[1])

    # the agent and the client

    def start(self, *, unit: bool = False) -> None:
        """Start the agent: with the harness's argv, or (``unit``) with the systemd unit's ExecStart line."""
        for proc in self._starting:
            self.topo.wait_ready(proc)
        self._starting.clear()
        if not unit:
            self.agent.start(manifests_flag=self.feed.api is None)
            return
        a = self.agent
        env_file = self.feed.directory.parent / "balancing-agent.env"
        env_file.write_text(
            "\n".join(
                [
                    f"BALANCING_NODE_NAME={AGENT_NODE}",
                    f"BALANCING_BPFFS={a.bpffs}",
                    f"BALANCING_HEALTH_ADDR=127.0.0.1:{a.port}",
                    f"BALANCING_METRICS_ADDR=127.0.0.1:{free_port()}",
                    f"BALANCING_EVENTS__SOCKET={self.feed.directory.parent / 'events.sock'}",
                    f'AGENT_SOURCE="{self.feed.unit_source()}"',
                    "AGENT_ARGS="
                    + " ".join(
                        [
                            f"--cgroup {a.cgroup} --state-addr 127.0.0.1:{a.state_port}",
                            f"--bpf-object {a.bpf_object}",
                            *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MAPS.items()),
                            *self.host_args,
                        ]
                    ),
                ]
            )
        )
        shipped = systemd_unit.read(host=AGENT_NODE)
        env = {**shipped.environment, **systemd_unit.environment_file(env_file.read_text())}
        argv = systemd_unit.argv(shipped.exec_start, env)
        assert argv[0] == "/usr/local/bin/balancing"
        argv = [sys.executable, "-m", "balancing", *argv[1:]]
        a.proc = self.topo.spawn(argv, env={**os.environ, **env}, label=f"agent-{AGENT_NODE}-unit")
        a.wait_ready()

    def stop(self) -> None:
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.stop()

    def wait(self, key: str, backends: Iterable[str]) -> None:
        """Wait until the maps give ``key`` exactly ``backends``."""
        want = sorted(backends)
        self.agent.wait_frontends(
            lambda f: f.get(key) == want, what=f"{key} -> {want} (now {self.agent.frontends().get(key)})"
        )

    def run(self, mode: str, target: str, port: int, count: int = 30) -> dict[str, Any]:
        args = [mode, target, str(port), "--count", str(count), "--timeout", "1"]
        return self.topo.run_client(self.host, None, args)

    def answers(self, mode: str, target: str, port: int, count: int = 30) -> dict[str, int]:
        """Who answered ``count`` connects (tcp) or sockets (udp-connected); all must succeed, and every pod
        must see the bare-metal host's own address (routed or DNATed, never masqueraded)."""
        res = self.run(mode, target, port, count)
        assert res["ok"] == count, res["errors"]
        assert res["seen_by_backend"] == [HOST_IP]
        return dict(res["backends"])

    def errors(self, target: str, port: int, count: int = 3) -> dict[str, int]:
        return dict(self.run("tcp", target, port, count)["errors"])


@pytest.fixture(params=["kubernetes", "manifests"])
def feed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Feed]:
    directory = tmp_path / "manifests"
    directory.mkdir()
    if request.param == "manifests":
        yield Feed(directory)
        return
    with ThreadedApi() as api:
        yield Feed(directory, api)


def _lab(topology: Topology, feed: Feed, *, routable: bool) -> Iterator[BareMetal]:
    lab = BareMetal(topology, feed, routable)
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def routed(topology: Topology, feed: Feed) -> Iterator[BareMetal]:
    """Pod IPs routable from the host (through their node)."""
    yield from _lab(topology, feed, routable=True)


@pytest.fixture
def isolated(topology: Topology, feed: Feed) -> Iterator[BareMetal]:
    """Pod IPs not routable from the host: only node addresses are."""
    yield from _lab(topology, feed, routable=False)


def policy(mode: str) -> dict[str, Any]:
    return balancing_policy(
        f"web-{mode.lower()}",
        service="default/web",
        selector=LABELS,
        back_ports=[("http", POD_PORT, "TCP"), ("dns", POD_PORT, "UDP")],
        mode=mode,
    )


def status(lab: BareMetal, name: str) -> dict[str, Any]:
    code, body = lab.agent.get("/state")
    assert code == 200
    (found,) = [p for p in body["policies"] if p["name"] == name]
    return dict(found)


# --- pod IPs routable from the host -------------------------------------------------------------------------


def test_host_reaches_ready_pods_behind_nodes_through_the_cluster_ip(routed: BareMetal) -> None:
    lab = routed
    lab.add_node(1)
    lab.add_node(2)
    pods = [lab.add_pod("web-1a", 1), lab.add_pod("web-1b", 1), lab.add_pod("web-2a", 2)]
    late = lab.add_pod("web-2b", 2, ready=False)
    lab.feed.put(*lab.service_docs(), *(lab.node_doc(n) for n in lab.nodes))
    lab.start(unit=True)  # the shipped systemd unit's ExecStart line

    ready = {p.name for p in pods}
    assert lab.agent.frontends()[KEY_TCP] == sorted(f"{p.ip}:{POD_PORT}" for p in pods)
    assert set(lab.answers("tcp", VIP, 80, 60)) == ready
    assert set(lab.answers("udp-connected", VIP, 53, 60)) == ready
    assert lab.answers("tcp", pods[2].ip, POD_PORT, 3) == {"web-2a": 3}  # routed: the host has the route
    assert lab.errors("10.96.0.99", 80) == {"EHOSTUNREACH": 3}  # no Service: untranslated, goes nowhere

    lab.set_ready(late.name, True)
    lab.wait(KEY_TCP, [f"{p.ip}:{POD_PORT}" for p in lab.pods.values()])
    assert set(lab.answers("tcp", VIP, 80, 80)) == ready | {late.name}
    if lab.feed.api is not None:  # through the kubeconfig the unit's source named
        assert lab.feed.api.fake.headers["authorization"] == "Bearer host-agent-token"


# --- pod IPs not routable: hostPort and nodeProxy --------------------------------------------------------


def test_host_port_reaches_pods_through_nodes_with_ready_pods(isolated: BareMetal) -> None:
    lab = isolated
    for n in (1, 2, 3):
        lab.add_node(n)
        wp = lab.add_pod(f"web-{n}", n, ready=n != 3)  # node-3's pod is not ready yet
        lab.dnat(n, node_ip(n), HOST_PORT, wp)
    lab.feed.put(
        *lab.service_docs(), *(lab.node_doc(n) for n in lab.nodes), *(p.doc() for p in lab.pods.values())
    )
    lab.start()

    # without a policy the Service's endpoints are pod IPs, which the host cannot route to
    assert lab.errors(VIP, 80) == {"ENETUNREACH": 3}
    assert lab.errors(lab.pods["web-1"].ip, POD_PORT) == {"ENETUNREACH": 3}

    lab.feed.put(policy("hostPort"))
    lab.wait(KEY_TCP, [f"{node_ip(1)}:{HOST_PORT}", f"{node_ip(2)}:{HOST_PORT}"])
    lab.wait(KEY_UDP, [f"{node_ip(1)}:{HOST_PORT}", f"{node_ip(2)}:{HOST_PORT}"])
    assert set(lab.answers("tcp", VIP, 80, 60)) == {"web-1", "web-2"}  # node-3: no ready pod, no connection
    assert set(lab.answers("udp-connected", VIP, 53, 60)) == {"web-1", "web-2"}
    assert status(lab, "web-hostport")["ready"]

    lab.set_ready("web-3", True)  # node-3 now has a ready pod: added
    lab.wait(KEY_TCP, [f"{node_ip(n)}:{HOST_PORT}" for n in (1, 2, 3)])
    assert set(lab.answers("tcp", VIP, 80, 90)) == {"web-1", "web-2", "web-3"}

    lab.remove_pod("web-1")  # node-1 has no pod left: removed
    lab.wait(KEY_TCP, [f"{node_ip(n)}:{HOST_PORT}" for n in (2, 3)])
    assert set(lab.answers("tcp", VIP, 80, 60)) == {"web-2", "web-3"}


def test_node_proxy_reaches_pods_through_the_annotated_address_of_nodes_with_ready_pods(
    isolated: BareMetal,
) -> None:
    lab = isolated
    for n in (1, 2, 3):
        lab.add_node(n)
        wp = lab.add_pod(f"web-{n}", n, ready=n != 3)
        lab.dnat(n, proxy_ip(n), POD_PORT, wp)  # only the proxy address forwards, not the InternalIP
    lab.feed.put(
        *lab.service_docs(),
        *(lab.node_doc(n, proxy=True) for n in lab.nodes),
        *(p.doc() for p in lab.pods.values()),
        policy("nodeProxy"),
    )
    lab.start()

    lab.wait(KEY_TCP, [f"{proxy_ip(1)}:{POD_PORT}", f"{proxy_ip(2)}:{POD_PORT}"])
    assert lab.agent.frontends()[KEY_UDP] == sorted(
        [f"{proxy_ip(1)}:{POD_PORT}", f"{proxy_ip(2)}:{POD_PORT}"]
    )
    assert set(lab.answers("tcp", VIP, 80, 60)) == {"web-1", "web-2"}  # node-3: no ready pod, not chosen
    assert set(lab.answers("udp-connected", VIP, 53, 60)) == {"web-1", "web-2"}
    assert lab.errors(node_ip(1), POD_PORT) == {"ECONNREFUSED": 3}  # the InternalIP would not have worked

    lab.set_ready("web-3", True)
    lab.wait(KEY_TCP, [f"{proxy_ip(n)}:{POD_PORT}" for n in (1, 2, 3)])
    assert set(lab.answers("tcp", VIP, 80, 90)) == {"web-1", "web-2", "web-3"}
    assert status(lab, "web-nodeproxy")["ready"]
