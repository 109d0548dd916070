"""A north-south topology: an external client, a router and two routed nodes with pods, in network namespaces.

For the NodePort / LoadBalancer / externalIP tests and ``bench/nodeport.py``: traffic really arrives at a
node's uplink from outside, is forwarded by the node to a local or a remote pod, and the pods answer with
the client address they saw. Plain routing only here; whatever balances (kube-proxy-shaped iptables, the
TC datapath) is added by the caller inside the node namespaces. Dual-stack everywhere; every address is
from the documentation ranges or private ones, never a real one::

    client     eth0 203.0.113.10/24, 2001:db8:113::10/64; default routes via the router
      |
    router     to-client 203.0.113.1, 2001:db8:113::1
               lan0 (bridge; ports to-node-a, to-node-b) 192.0.2.1/24, 2001:db8:2::1/64: the nodes' LAN
               routes: each node's pod CIDRs via that node; the load-balancer ranges (198.51.100.0/25,
               2001:db8:100::/64) and the externalIP ranges (198.51.100.128/25, 2001:db8:101::/64) via
               node-a, or ECMP over both nodes (``external_via``; L4 multipath hash); no default route
      |
    node-a     uplink0 192.0.2.11/24, 2001:db8:2::11/64 (the node's address), default routes via the router
    node-b     uplink0 192.0.2.12/24, 2001:db8:2::12/64
               br0 10.244.N.1/24, fd00:244:N::1/64 (the pod gateway), one port per pod
               routes: the other node's pod CIDRs via the router (remote backends cross the uplink);
               ``unreachable`` for the cluster VIP ranges and the load-balancer/externalIP ranges (nothing
               answers for them unless the caller translates them: no routing loop through the router)
      |
    pod-a1, pod-a2 on node-a, pod-b1 (``pods_per_node``) on node-b
               eth0 10.244.N.(10+k)/24, fd00:244:N::(10+k)/64; default routes via br0's address;
               ``unreachable`` for the cluster VIP ranges; backend.py on TCP and UDP ``port`` (8080): each
               answer is ``<pod> <client ip> <client port>``, run in the node's cgroup

Forwarding is on and rp_filter off in the router and the nodes, ICMP errors are not rate-limited there (so
a test that expects an unreachable answer gets it at once), IPv6 DAD is off, and the router sends no ICMP
redirects (node-to-node traffic leaves lan0 the way it came in).

Everything lives in one ``balancing_testkit.topology.Topology`` (namespaces ``blt-<pid>-<n>-<name>``, so
two instances coexist; node cgroups; a bpffs directory): :meth:`NsTopology.close` (or leaving the ``with``)
stops the processes and deletes every namespace, and with it every veth, route and netfilter rule made
in it, also when the construction itself failed half-way.

Neighbours: ``balancing_testkit.topology`` (namespaces, processes, cleanup, leftover sweep),
``balancing_testkit.backend`` (the pods' servers), ``tests/kernel/test_nstopology.py`` (this topology's own
tests), ``tests/helpers/nsagents.py`` (agents on it), ``bench/nodeport.py`` (NodePort baselines in it).
Standard library and the testkit only. One module of about 500 lines because it is one thing: the layout, its
address plan, and the few helpers that read or drive it (client exchanges, counters, routes).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancing_testkit.topology import (
    Client,
    Host,
    Pod,
    ProcResult,
    Topology,
    in_netns,
    ip_batch,
    netns_path,
)

CLIENT4, CLIENT6 = "203.0.113.10", "2001:db8:113::10"
ROUTER_CLIENT_SIDE4, ROUTER_CLIENT_SIDE6 = "203.0.113.1", "2001:db8:113::1"
CLIENT_PREFIX4, CLIENT_PREFIX6 = 24, 64
ROUTER_LAN4, ROUTER_LAN6 = "192.0.2.1", "2001:db8:2::1"
LAN_PREFIX4, LAN_PREFIX6 = 24, 64
LB_RANGES = ("198.51.100.0/25", "2001:db8:100::/64")
EXTERNAL_IP_RANGES = ("198.51.100.128/25", "2001:db8:101::/64")
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:244::/48")  # every node's pod CIDR is inside
NODE_NAMES = ("node-a", "node-b")
ECMP = NODE_NAMES  # ``external_via`` for equal-cost multipath over both nodes
BACKEND_PORT = 8080

# sysctls, set in a namespace before its links exist, so every device inherits the "default" values
_EVERY_NETNS = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}
_FORWARDING = {
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.ipv6.conf.default.forwarding": 1,
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.icmp_ratelimit": 0,
    "net.ipv6.icmp.ratelimit": 0,
}
_ROUTER_ONLY = {
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
    "net.ipv4.fib_multipath_hash_policy": 1,  # L4: flows of one client spread over the ECMP next hops
    "net.ipv6.fib_multipath_hash_policy": 1,
}
_NET_DEV_FIELDS = [
    (d, k)
    for d, keys in (
        ("rx", ("bytes", "packets", "errs", "dropped", "fifo", "frame", "compressed", "multicast")),
        ("tx", ("bytes", "packets", "errs", "dropped", "fifo", "colls", "carrier", "compressed")),
    )
    for k in keys
]
_BRIDGE = "type bridge forward_delay 0 stp_state 0 mcast_snooping 0"


def node_address(index: int) -> tuple[str, str]:
    """The uplink (v4, v6) of node number ``index`` (0: node-a): 192.0.2.11, 2001:db8:2::11, ..."""
    return f"192.0.2.{11 + index}", f"2001:db8:2::{11 + index}"


def pod_cidrs(index: int) -> tuple[str, str]:
    """The pod CIDRs (v4, v6) of node number ``index``: 10.244.1.0/24 and fd00:244:1::/64 for node-a."""
    return f"10.244.{index + 1}.0/24", f"fd00:244:{index + 1}::/64"


def pod_address(index: int, k: int) -> tuple[str, str]:
    """The addresses (v4, v6) of pod number ``k`` (from 1) of node number ``index``: 10.244.1.11 and
    fd00:244:1::11 for pod-a1."""
    return f"10.244.{index + 1}.{10 + k}", f"fd00:244:{index + 1}::{10 + k}"


def _host(cidr: str, number: int) -> str:
    return str(ipaddress.ip_network(cidr)[number])


@dataclass(frozen=True)
class NsNode:
    """A node: its namespace, uplink (name and ifindex as seen inside it), addresses and pods."""

    name: str
    netns: str
    ip4: str
    ip6: str
    uplink: str
    uplink_ifindex: int
    bridge: str
    gateway4: str
    gateway6: str
    pod_cidr4: str
    pod_cidr6: str
    pods: tuple[Pod, ...]
    cgroup: Path  # the node's cgroup (its pods' servers run there): an agent's --cgroup
    bpffs: Path  # a free bpffs directory for an agent of this node (--bpffs); not created

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)

    def ip(self, family: int) -> str:
        return self.ip4 if family == 4 else self.ip6


@dataclass(frozen=True)
class Answer:
    """One exchange with a pod's server: who answered, whom it saw, and the client socket's own address."""

    backend: str
    seen: tuple[str, int]  # the client address:port as the pod saw it
    local: tuple[str, int]  # the client socket's address:port
    text: str


Where = Host | NsNode | str  # a pod or client, a node, or a namespace name


@dataclass(eq=False)
class NsTopology:
    """The topology above; ``with NsTopology() as ns:`` builds it and removes all of it afterwards.

    ``pods_per_node``: pods on node-a, node-b. ``external_via``: the nodes the router sends the
    load-balancer and externalIP ranges to (one: a plain route; several: ECMP). ``servers``: start
    backend.py in every pod on TCP and UDP ``port``."""

    pods_per_node: Sequence[int] = (2, 1)
    uplink: str = "uplink0"
    bridge: str = "br0"
    external_via: Sequence[str] = ("node-a",)
    port: int = BACKEND_PORT
    servers: bool = True

    topo: Topology = field(init=False)
    client: Client = field(init=False)
    router: str = field(init=False)  # the router's namespace name
    nodes: tuple[NsNode, ...] = field(init=False)
    pods: dict[str, Pod] = field(init=False, default_factory=dict)

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> NsTopology:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> NsTopology:
        """Build everything (on any failure: remove what was built, then raise)."""
        if len(self.pods_per_node) != len(NODE_NAMES):
            raise ValueError(f"pods_per_node needs one count per node {NODE_NAMES}")
        self.topo = Topology().open()
        try:
            self._build()
        except BaseException:
            self.topo.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process and delete every namespace (idempotent)."""
        topo: Topology | None = getattr(self, "topo", None)
        if topo is not None:
            topo.close()

    def _build(self) -> None:
        self.router = self.topo.add_netns("router")
        client_ns = self.topo.add_netns("client")
        node_ns = [self.topo.add_netns(name) for name in NODE_NAMES]
        pod_ns = {
            name: self.topo.add_netns(name)
            for i, count in enumerate(self.pods_per_node)
            for name in self._pod_names(i, count)
        }
        self._set_sysctls(client_ns, _EVERY_NETNS)
        for ns in pod_ns.values():
            self._set_sysctls(ns, _EVERY_NETNS)
        for ns in node_ns:
            self._set_sysctls(ns, {**_EVERY_NETNS, **_FORWARDING})
        self._set_sysctls(self.router, {**_EVERY_NETNS, **_FORWARDING, **_ROUTER_ONLY})
        self._wire_router(client_ns, node_ns)
        self.client = self._wire_client(client_ns)
        self.nodes = tuple(self._wire_node(i, ns, pod_ns) for i, ns in enumerate(node_ns))
        self.set_external_routes(self.external_via)
        if self.servers:
            self.start_servers(self.port)

    # -- what it holds -------------------------------------------------------------------------------

    @property
    def a(self) -> NsNode:
        return self.nodes[0]

    @property
    def b(self) -> NsNode:
        return self.nodes[1]

    def node(self, name: str) -> NsNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} (nodes: {[n.name for n in self.nodes]})")

    @property
    def backends(self) -> list[Pod]:
        """Every pod, node-a's first."""
        return [p for n in self.nodes for p in n.pods]

    def namespaces(self) -> dict[str, str]:
        """{"client", "router", node name, pod name: its network namespace's name}."""
        out = {"client": self.client.netns, "router": self.router}
        out.update({n.name: n.netns for n in self.nodes})
        out.update({p.name: p.netns for p in self.backends})
        return out

    @staticmethod
    def netns_path(where: Where) -> Path:
        """/run/netns/NAME of a pod, client, node or namespace name (for ``nsenter --net=PATH``)."""
        return netns_path(_netns_of(where))

    def nsenter(self, where: Where, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``where``'s network namespace (``nsenter``, keeping /sys)."""
        return ["nsenter", f"--net={self.netns_path(where)}", "--", *argv]

    # -- running things ------------------------------------------------------------------------------

    def run(
        self,
        where: Where,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        cgroup: Path | str | None = None,
    ) -> ProcResult:
        """Run a command to completion inside ``where``'s namespace (HarnessError, with its output, if it
        fails)."""
        return self.topo.run(
            argv, netns=_netns_of(where), timeout=timeout, check=check, input=input, cgroup=cgroup
        )

    def spawn(self, where: Where, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """A long-running process inside ``where``'s namespace (``Topology.spawn``: logged, stopped at
        close)."""
        return self.topo.spawn(argv, netns=_netns_of(where), **kwargs)

    def start_servers(self, port: int, *, udp_port: int | None = None) -> None:
        """backend.py in every pod (each in its node's cgroup) on TCP ``port`` and UDP ``udp_port`` (default:
        the same); returns when all listen."""
        udp = port if udp_port is None else udp_port
        procs = [self.topo.start_backend(p, port=port, udp_port=udp, wait=False) for p in self.backends]
        for proc in procs:
            self.topo.wait_ready(proc)

    def counters(self, where: Where) -> dict[str, int]:
        """The namespace's SNMP counters: ``Ip.ForwDatagrams``, ``Icmp.OutDestUnreachs``, ... from
        /proc/net/snmp and ``Ip6InNoRoutes``, ... from /proc/net/snmp6."""
        with in_netns(_netns_of(where)):
            snmp = Path("/proc/thread-self/net/snmp").read_text().splitlines()
            snmp6 = Path("/proc/thread-self/net/snmp6").read_text().splitlines()
        out: dict[str, int] = {}
        for head, values in zip(snmp[::2], snmp[1::2], strict=True):
            group, *names = head.split()
            for name, value in zip(names, values.split()[1:], strict=True):
                out[f"{group.rstrip(':')}.{name}"] = int(value)
        for line in snmp6:
            name, value = line.split()
            out[name] = int(value)
        return out

    def link_counters(self, where: Where, ifname: str) -> dict[str, int]:
        """A device's counters in ``where``'s namespace (/proc/net/dev): ``rx_packets``, ``tx_packets``,
        ``rx_bytes``, ``rx_dropped``, ..."""
        with in_netns(_netns_of(where)):
            lines = Path("/proc/thread-self/net/dev").read_text().splitlines()[2:]
        for line in lines:
            name, _, values = line.partition(":")
            if name.strip() == ifname:
                numbers = [int(v) for v in values.split()]
                return {f"{d}_{k}": numbers[i] for i, (d, k) in enumerate(_NET_DEV_FIELDS)}
        raise KeyError(f"no device {ifname!r} in {_netns_of(where)}")

    def diagnostics(self) -> str:
        """Processes, addresses and routes of every namespace (for a failing test's report)."""
        return self.topo.diagnostics()

    # -- the client side -----------------------------------------------------------------------------

    def tcp(
        self,
        addr: str,
        port: int,
        *,
        source_port: int | None = None,
        timeout: float = 2.0,
        src: Where | None = None,
    ) -> Answer:
        """Connect from the client (or ``src``) to ``addr:port``, read the server's line, close.

        ``source_port``: bind it (SO_REUSEADDR; closed with a RST so the port is free again at once), to
        send "the same flow" twice. Raises OSError (ConnectionRefusedError, TimeoutError, ...) on failure."""
        sock = self._socket(src, addr, socket.SOCK_STREAM, source_port, timeout)
        with sock:
            sock.connect((addr, port))
            local = _pair(sock.getsockname())
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            if source_port is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return _answer(data, local)

    def udp(
        self,
        addr: str,
        port: int,
        *,
        source_port: int | None = None,
        timeout: float = 2.0,
        src: Where | None = None,
    ) -> Answer:
        """One datagram from the client (or ``src``) to ``addr:port`` on a connected socket; its answer."""
        sock = self._socket(src, addr, socket.SOCK_DGRAM, source_port, timeout)
        with sock:
            sock.connect((addr, port))
            local = _pair(sock.getsockname())
            sock.send(b"ping\n")
            data = sock.recv(4096)
        return _answer(data, local)

    def _socket(
        self, src: Where | None, addr: str, kind: socket.SocketKind, source_port: int | None, timeout: float
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with in_netns(_netns_of(src if src is not None else self.client)):
            sock = socket.socket(family, kind)
        try:
            sock.settimeout(timeout)
            if source_port is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
        except BaseException:
            sock.close()
            raise
        return sock

    # -- routes --------------------------------------------------------------------------------------

    def set_external_routes(self, via: Sequence[str]) -> None:
        """Route the load-balancer and externalIP ranges from the router to node(s) ``via`` (node names;
        several: ECMP)."""
        if not via:
            raise ValueError("external routes need at least one node")
        targets = [self.node(name) for name in via]
        lines = []
        for cidr in (*LB_RANGES, *EXTERNAL_IP_RANGES):
            v6 = ":" in cidr
            hops = [n.ip6 if v6 else n.ip4 for n in targets]
            how = f"via {hops[0]}" if len(hops) == 1 else " ".join(f"nexthop via {h}" for h in hops)
            lines.append(f"route replace {cidr} {how}")
        ip_batch(self.router, lines)
        self.external_via = tuple(via)

    # -- building ------------------------------------------------------------------------------------

    @staticmethod
    def _pod_names(index: int, count: int) -> list[str]:
        letter = NODE_NAMES[index].removeprefix("node-")
        return [f"pod-{letter}{k}" for k in range(1, count + 1)]

    def _set_sysctls(self, netns: str, values: Mapping[str, int]) -> None:
        with in_netns(netns):
            for key, value in values.items():
                (Path("/proc/sys") / key.replace(".", "/")).write_text(f"{value}\n")

    def _wire_router(self, client_ns: str, node_ns: Sequence[str]) -> None:
        lines = [
            f"link add to-client type veth peer name eth0 netns {client_ns}",
            "link set to-client up",
            f"addr add {ROUTER_CLIENT_SIDE4}/{CLIENT_PREFIX4} dev to-client",
            f"addr add {ROUTER_CLIENT_SIDE6}/{CLIENT_PREFIX6} dev to-client nodad",
            f"link add lan0 {_BRIDGE}",
            "link set lan0 up",
            f"addr add {ROUTER_LAN4}/{LAN_PREFIX4} dev lan0",
            f"addr add {ROUTER_LAN6}/{LAN_PREFIX6} dev lan0 nodad",
        ]
        for i, (name, ns) in enumerate(zip(NODE_NAMES, node_ns, strict=True)):
            ip4, ip6 = node_address(i)
            lines += [
                f"link add to-{name} type veth peer name {self.uplink} netns {ns}",
                f"link set to-{name} master lan0 up",
                f"route add {pod_cidrs(i)[0]} via {ip4}",
                f"route add {pod_cidrs(i)[1]} via {ip6}",
            ]
        ip_batch(self.router, lines)

    def _wire_client(self, netns: str) -> Client:
        ip_batch(
            netns,
            [
                "link set eth0 up",
                f"addr add {CLIENT4}/{CLIENT_PREFIX4} dev eth0",
                f"addr add {CLIENT6}/{CLIENT_PREFIX6} dev eth0 nodad",
                f"route add default via {ROUTER_CLIENT_SIDE4}",
                f"route add ::/0 via {ROUTER_CLIENT_SIDE6}",
            ],
        )
        return Client(name="client", netns=netns, ip4=CLIENT4, ip6=CLIENT6)

    def _wire_node(self, index: int, netns: str, pod_ns: Mapping[str, str]) -> NsNode:
        name = NODE_NAMES[index]
        ip4, ip6 = node_address(index)
        cidr4, cidr6 = pod_cidrs(index)
        gw4, gw6 = _host(cidr4, 1), _host(cidr6, 1)
        others = [c for i in range(len(NODE_NAMES)) if i != index for c in pod_cidrs(i)]
        unreachable = [*self.topo.vip_cidrs, *LB_RANGES, *EXTERNAL_IP_RANGES]
        ip_batch(
            netns,
            [
                f"link set {self.uplink} up",
                f"addr add {ip4}/{LAN_PREFIX4} dev {self.uplink}",
                f"addr add {ip6}/{LAN_PREFIX6} dev {self.uplink} nodad",
                f"link add {self.bridge} {_BRIDGE}",
                f"link set {self.bridge} up",
                f"addr add {gw4}/24 dev {self.bridge}",
                f"addr add {gw6}/64 dev {self.bridge} nodad",
                f"route add default via {ROUTER_LAN4}",
                f"route add ::/0 via {ROUTER_LAN6}",
                *(f"route add {c} via {ROUTER_LAN6 if ':' in c else ROUTER_LAN4}" for c in others),
                *(f"route add unreachable {c}" for c in unreachable),
            ],
        )
        pods = tuple(
            self._wire_pod(index, netns, pod_name, pod_ns[pod_name], k)
            for k, pod_name in enumerate(self._pod_names(index, self.pods_per_node[index]), start=1)
        )
        with in_netns(netns):
            ifindex = socket.if_nametoindex(self.uplink)
        return NsNode(
            name=name, netns=netns, ip4=ip4, ip6=ip6, uplink=self.uplink, uplink_ifindex=ifindex,
            bridge=self.bridge, gateway4=gw4, gateway6=gw6, pod_cidr4=cidr4, pod_cidr6=cidr6, pods=pods,
            cgroup=self.topo.node_cgroup(name), bpffs=self.topo.bpffs / name,
        )  # fmt: skip

    def _wire_pod(self, index: int, node_ns: str, name: str, netns: str, k: int) -> Pod:
        ip4, ip6 = pod_address(index, k)
        gw4, gw6 = (_host(c, 1) for c in pod_cidrs(index))
        port = f"veth-{name}"[:15]
        ip_batch(
            node_ns,
            [
                f"link add {port} type veth peer name eth0 netns {netns}",
                f"link set {port} master {self.bridge} up",
            ],
        )
        ip_batch(
            netns,
            [
                "link set eth0 up",
                f"addr add {ip4}/24 dev eth0",
                f"addr add {ip6}/64 dev eth0 nodad",
                f"route add default via {gw4}",
                f"route add ::/0 via {gw6}",
                *(f"route add unreachable {c}" for c in self.topo.vip_cidrs),
            ],
        )
        pod = Pod(name=name, netns=netns, ip4=ip4, ip6=ip6, node=NODE_NAMES[index])
        self.pods[name] = pod
        return pod


def _netns_of(where: Where) -> str:
    if isinstance(where, Host | NsNode):
        return where.netns
    return where


def _pair(addr: Any) -> tuple[str, int]:
    return str(addr[0]).split("%", 1)[0], int(addr[1])


def _answer(data: bytes, local: tuple[str, int]) -> Answer:
    """Parse ``<pod> <ip> <port>`` (backend.py's answer)."""
    text = data.decode(errors="replace").strip()
    parts = text.split()
    if len(parts) < 3 or not parts[2].isdigit():
        raise ValueError(f"unexpected answer {text!r} (want '<pod> <ip> <port>')")
    return Answer(parts[0], (parts[1], int(parts[2])), local, text)
