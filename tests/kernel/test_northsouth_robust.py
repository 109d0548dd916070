"""North-south when things go wrong: agent crashes and upgrades, backends leaving, SNAT ports running out,
ICMP errors, a change of TC mechanism, and bad input.

Each test builds its own ``balancing_testkit.nstopology`` topology (client -> router -> node-a, node-b ->
pods; ``helpers.nsagents`` runs one agent per node, north-south on ``uplink0``), so a test that kills,
upgrades or reconfigures an agent leaves nothing behind for the next. Long-lived flows are TCP connections to
``backend.py --keep-open`` servers on ``KEEP_PORT`` in every pod: the first line names the backend, then
every exchange must come back echoed. A TCP connection exists only at the backend that accepted it, so an
exchange that comes back proves the flow still reaches that backend, and a connection never reset proves
no packet of it was sent elsewhere. ``balancing inspect conntrack`` and the agent's metrics show what the
datapath itself recorded. Neighbours: ``test_northsouth.py`` (the translations themselves),
``test_tcattach.py`` (the attachment mechanisms on their own), ``helpers.nsagents``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence, Set
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancing.datapath import libbpf, northsouth, tcattach
from balancing_testkit.nstopology import NsNode, NsTopology
from balancing_testkit.topology import in_netns, netns_path
from helpers.nsagents import Doc, NsAgent, NsCluster, external_service, slices
from helpers.support import OBJECT, ROOT, service, wait_until

pytestmark = [pytest.mark.kernel]

KEEP_PORT = 9090  # backend.py --keep-open in every pod (TCP): long-lived flows
DEAD_PORT = 9999  # nothing listens here (UDP): the pod answers with a port unreachable
WEB_PORT = 30080  # NodePort of "web": every pod on KEEP_PORT
LB_IP4 = "198.51.100.20"
CLIENT_RANGE = "203.0.113.0/24"  # the client's network
LOCAL_PODS = frozenset({"pod-a1", "pod-a2"})  # node-a's own pods
IO_TIMEOUT = 3.0


# --- the cluster of one test ----------------------------------------------------------------------------


def nodeport_service(name: str, node_port: int, protocol: str, pods: Sequence[Any], target: int) -> list[Doc]:
    """A dual-stack NodePort Service on ``pods``' ``target`` port, with its EndpointSlices; its ClusterIPs
    10.96.0.<nodePort % 200> and fd00:96::<the same, hex>."""
    ips = (f"10.96.0.{node_port % 200}", f"fd00:96::{node_port % 200:x}")
    port = (name, 80, protocol, target, node_port)
    return [external_service(name, ips, [port]), *slices(name, pods, [(name, target, protocol)])]


def web(ns: NsTopology) -> list[Doc]:
    """The Service most tests use: NodePort WEB_PORT on every pod's keep-open server."""
    return nodeport_service("web", WEB_PORT, "TCP", ns.backends, KEEP_PORT)


@contextlib.contextmanager
def running(
    tmp_path: Path,
    services: Callable[[NsTopology], dict[str, list[Doc]]],
    extra: Sequence[str] = (),
    ready: Sequence[str] = (),
) -> Iterator[NsCluster]:
    """A topology with keep-open servers in every pod, ``services`` (file name -> documents) and both agents
    (``extra`` flags), once node-a's maps hold the frontends ``ready``; everything removed afterwards."""
    with NsTopology(pods_per_node=(2, 1)) as ns:
        procs = [
            ns.topo.start_backend(p, port=KEEP_PORT, extra_args=["--keep-open", "--no-udp"], wait=False)
            for p in ns.backends
        ]
        for proc in procs:
            ns.topo.wait_ready(proc)
        cluster = NsCluster(ns, tmp_path / "manifests", extra)
        for name, docs in services(ns).items():
            cluster.apply(name, docs)
        try:
            cluster.start()
            cluster.wait_programmed(ready)
            yield cluster
        except BaseException:
            print(ns.diagnostics())
            for agent in cluster.agents.values():
                if agent.proc is not None:
                    print(f"--- {agent.node} agent stderr ---\n{agent.stderr()[-6000:]}")
            raise


def restart(agent: NsAgent, *, extra: Sequence[str] | None = None, obj: Path | None = None) -> None:
    """Stop the agent (SIGTERM) and start it again, with other flags (``extra``) or another BPF object."""
    agent.stop()
    if extra is not None:
        agent.extra = ["--nodeport-devices", agent.ns_node.uplink, *extra]
    if obj is not None:
        agent.bpf_object = obj
    agent.start()


# --- long-lived flows -----------------------------------------------------------------------------------


class Flow:
    """A TCP connection from the client to a frontend, served by a keep-open backend: ``backend`` named it
    in its first line, ``seen`` is the client address it saw; ``exchange`` must come back echoed."""

    def __init__(self, ns: NsTopology, addr: str, port: int, timeout: float = IO_TIMEOUT) -> None:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with in_netns(ns.client.netns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect((addr, port))
            name = self.sock.getsockname()
            self.local: tuple[str, int] = (str(name[0]), int(name[1]))  # as inspect conntrack's "client"
            backend, seen_ip, _seen_port = self._line().split()
        except BaseException:
            self.sock.close()
            raise
        self.backend, self.seen, self.sent = backend, seen_ip, 0

    def _line(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.sock.recv(256)
            if not chunk:
                raise ConnectionError(f"closed by the backend after {data!r}")
            data += chunk
        return data.decode()

    def exchange(self) -> None:
        """Send one numbered line; the same line must come back (else the OSError: reset, timeout...)."""
        self.sent += 1
        line = f"{self.local[1]}-{self.sent}\n".encode()
        self.sock.sendall(line)
        data = b""
        while len(data) < len(line):
            chunk = self.sock.recv(len(line) - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        assert data == line

    def close(self) -> None:
        self.sock.close()


def open_flow(ns: NsTopology, addr: str, port: int, backends: Set[str], tries: int = 60) -> Flow:
    """A flow that reached one of ``backends``: connections are opened until one does (each picks its
    backend by its client port), the others closed."""
    for _ in range(tries):
        flow = Flow(ns, addr, port)
        if flow.backend in backends:
            return flow
        flow.close()
    raise AssertionError(f"no connection to {addr}:{port} reached {sorted(backends)} in {tries} tries")


@contextlib.contextmanager
def flows(ns: NsTopology, wanted: Sequence[tuple[str, Set[str]]]) -> Iterator[list[Flow]]:
    """A flow to ``WEB_PORT`` of each ``(address, backends)``, closed afterwards."""
    opened: list[Flow] = []
    try:
        for addr, backends in wanted:
            opened.append(open_flow(ns, addr, WEB_PORT, backends))
        yield opened
    finally:
        for flow in opened:
            flow.close()


def assert_new_flows_translated(ns: NsTopology) -> None:
    """New connections to node-a's NodePort, both families, reach the remote backend (which sees node-a's
    address: SNAT) and a local one (which sees the client's)."""
    for family in (4, 6):
        for backends, seen in (({"pod-b1"}, ns.a.ip(family)), (LOCAL_PODS, ns.client.ip(family))):
            with contextlib.closing(open_flow(ns, ns.a.ip(family), WEB_PORT, backends)) as flow:
                assert flow.seen == seen, (family, flow.backend, flow.seen)


def exchange_all(opened: Sequence[Flow]) -> None:
    """One exchange on each flow, in turn."""
    for flow in opened:
        flow.exchange()


class Pinger(threading.Thread):
    """Exchanges on one flow until stopped: counts the round trips and keeps the first error."""

    def __init__(self, flow: Flow) -> None:
        super().__init__(daemon=True)
        self.flow, self.round_trips = flow, 0
        self.error: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.flow.exchange()
            except (OSError, AssertionError) as exc:
                self.error = repr(exc)
                return
            self.round_trips += 1
            self.halt.wait(0.005)  # pacing, not synchronisation: leave the CPUs to the agent

    def finish(self) -> tuple[int, str | None]:
        self.halt.set()
        self.join(timeout=2 * IO_TIMEOUT)
        return self.round_trips, self.error


@contextlib.contextmanager
def pinging(
    ns: NsTopology, addr: str, port: int = WEB_PORT, backends: Set[str] = frozenset({"pod-b1"})
) -> Iterator[Pinger]:
    """A flow of its own (to the remote backend by default: SNAT) exchanging in the background."""
    flow = open_flow(ns, addr, port, backends)
    pinger = Pinger(flow)
    pinger.start()
    try:
        yield pinger
    finally:
        pinger.finish()
        flow.close()


# --- what the datapath recorded -------------------------------------------------------------------------


def _endpoint(text: str) -> tuple[str, int]:
    """``ip:port`` or ``[ip]:port`` as (ip, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def conntrack_rows(agent: NsAgent) -> dict[tuple[str, int], dict[str, Any]]:
    """``balancing inspect conntrack`` of the agent's node: its rows by client address and port."""
    doc = json.loads(agent.run_cli("inspect", "conntrack", "-o", "json"))
    return {_endpoint(row["client"]): row for row in doc["conntrack"]}


def backends_of(agent: NsAgent, opened: Sequence[Flow]) -> list[tuple[str, int]]:
    """The backend (address, id) conntrack holds for each flow."""
    rows = conntrack_rows(agent)
    return [(rows[f.local]["backend"], rows[f.local]["backendId"]) for f in opened]


def metric(agent: NsAgent, name: str, /, **labels: str) -> float:
    """The sum of the samples ``name`` of the agent whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(agent.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def pins(node: NsNode) -> list[Path]:
    """The pins of the node's north-south programs on its uplink (``northsouth.PROGRAMS`` order)."""
    return [node.bpffs / "links" / tcattach.pin_name(p, node.uplink) for p in northsouth.PROGRAMS]


def tcx_link_id(pin: Path) -> int:
    """The id of the tcx link pinned at ``pin``."""
    fd = libbpf.obj_get(str(pin))
    try:
        info = libbpf.TcxLinkInfo()
        libbpf.obj_get_info(fd, info)
        return int(info.id)
    finally:
        os.close(fd)


def tcx_programs(node: NsNode, direction: tcattach.Direction) -> list[int]:
    """The programs tcx runs on the node's uplink in ``direction`` (BPF_PROG_QUERY on the ifindex, which
    the kernel resolves in the calling thread's network namespace)."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    query = lib.bpf_prog_query
    u32p = ctypes.POINTER(ctypes.c_uint32)
    query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, u32p, u32p, u32p]
    ids = (ctypes.c_uint32 * 16)()
    count = ctypes.c_uint32(16)
    attach_type = libbpf.BPF_TCX_INGRESS if direction == "ingress" else libbpf.BPF_TCX_EGRESS
    with in_netns(node.netns):
        rc = query(node.uplink_ifindex, attach_type, 0, None, ids, ctypes.byref(count))
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"BPF_PROG_QUERY tcx {direction} on {node.uplink}")
    return list(ids[: count.value])


def clsact_programs(node: NsNode, direction: tcattach.Direction) -> list[int]:
    """The programs of the cls_bpf filters on the node's uplink in ``direction`` (``tc filter show``)."""
    argv = [
        "nsenter",
        f"--net={netns_path(node.netns)}",
        "tc",
        "-j",
        "filter",
        "show",
        "dev",
        node.uplink,
        direction,
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout
    shown = json.loads(out) if out.strip() else []
    return [int(f["options"]["prog"]["id"]) for f in shown if "prog" in f.get("options", {})]


def attachments(node: NsNode) -> dict[str, tuple[str, list[int], list[int]]]:
    """Per direction: the pin's mechanism, the tcx programs and the clsact programs on the uplink."""
    out: dict[str, tuple[str, list[int], list[int]]] = {}
    for pin, direction in zip(pins(node), northsouth.PROGRAMS.values(), strict=True):
        info = tcattach.attached(pin)
        mode = info.mode if info is not None else "none"
        out[direction] = (mode, tcx_programs(node, direction), clsact_programs(node, direction))
    return out


def assert_one_attachment(node: NsNode, mode: str) -> None:
    """Both programs attached on the uplink by ``mode`` only: one program per direction, none by the
    other mechanism."""
    for direction, (pinned, tcx, clsact) in attachments(node).items():
        ours = tcx if mode == "tcx" else clsact
        other = clsact if mode == "tcx" else tcx
        assert (pinned, len(ours), other) == (mode, 1, []), (direction, pinned, tcx, clsact)


# --- 1. an agent SIGKILLed and restarted ----------------------------------------------------------------


def test_established_flows_survive_an_agent_sigkill_and_restart(tmp_path: Path) -> None:
    """Flows through node-a's NodePort to a remote backend (SNAT) and to local ones, both families, keep
    their backend and are never reset while node-a's agent is SIGKILLed (the pinned programs and
    connection tracking keep translating them, and new connections, with no agent), and after it restarts
    (it reuses the pins and converges without touching the flows)."""
    with running(tmp_path, lambda ns: {"web": web(ns)}, ready=[f"192.0.2.11:{WEB_PORT}/TCP"]) as cluster:
        ns, agent = cluster.ns, cluster.agents["node-a"]
        wanted = [
            (ns.a.ip4, {"pod-b1"}),
            (ns.a.ip4, LOCAL_PODS),
            (ns.a.ip6, {"pod-b1"}),
            (ns.a.ip6, LOCAL_PODS),
        ]
        with flows(ns, wanted) as opened:
            exchange_all(opened)
            before = backends_of(agent, opened)
            assert [f.seen for f in opened] == [ns.a.ip4, ns.client.ip4, ns.a.ip6, ns.client.ip6]
            with pinging(ns, ns.a.ip4) as pinger:
                agent.kill()
                assert agent.proc is not None and agent.proc.returncode == -9
                exchange_all(opened)
                assert_new_flows_translated(ns)
                agent.start()
                exchange_all(opened)
            round_trips, error = pinger.finish()
            assert error is None and round_trips > 0, (round_trips, error)
            assert backends_of(agent, opened) == before
            assert [f.backend for f in opened][::2] == ["pod-b1", "pod-b1"]


# --- 2. an upgrade of the BPF object --------------------------------------------------------------------


@pytest.fixture(scope="module")
def variant_objects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the datapath object (a copy) and nodeport.o built for BPF ISA v3 with the
    Makefile's flags: other instructions (other program tags), the same behaviour. Returns its
    balancing.o, the agent's --bpf-object (it finds nodeport.o beside it)."""
    d = tmp_path_factory.mktemp("bpf-v3")
    make = [
        "make",
        "-s",
        "--no-print-directory",
        "--eval",
        "bl-bpf-cflags: ; @echo $(BPF_CFLAGS)",
        "bl-bpf-cflags",
    ]
    cflags = subprocess.run(
        make, cwd=ROOT, check=True, capture_output=True, text=True, timeout=60
    ).stdout.split()
    argv = ["clang", *cflags, "-mcpu=v3", "-c", str(ROOT / "bpf/nodeport.c"), "-o", str(d / "nodeport.o")]
    subprocess.run(argv, cwd=ROOT, check=True, timeout=120)
    for name in ("balancing.o", "sockterm.o"):
        shutil.copy(OBJECT.with_name(name), d / name)
    return d / "balancing.o"


def _program_ids(node: NsNode) -> list[tuple[int, int]]:
    """(tcx link id, program id) of each pin."""
    out = []
    for pin in pins(node):
        info = tcattach.attached(pin)
        assert info is not None and info.mode == "tcx" and info.live, (pin, info)
        out.append((tcx_link_id(pin), info.prog_id))
    return out


def test_a_bpf_object_upgrade_swaps_the_programs_under_established_flows(
    tmp_path: Path, variant_objects: Path
) -> None:
    """node-a's agent restarted with nodeport.o built for another ISA level (and back again) swaps the
    program of each pinned tcx link in place: the link ids stay, the program ids change, exactly one
    program per direction runs, and the remote (SNAT) and local flows carry on through both restarts with
    no reset, their backends unchanged, while a flow exchanges without pause."""
    if not tcattach.tcx_supported():
        pytest.skip("this kernel has no tcx (Linux >= 6.6)")
    with running(tmp_path, lambda ns: {"web": web(ns)}, ready=[f"192.0.2.11:{WEB_PORT}/TCP"]) as cluster:
        ns, agent = cluster.ns, cluster.agents["node-a"]
        wanted = [
            (ns.a.ip4, {"pod-b1"}),
            (ns.a.ip4, LOCAL_PODS),
            (ns.a.ip6, {"pod-b1"}),
        ]
        with flows(ns, wanted) as opened:
            exchange_all(opened)
            before = backends_of(agent, opened)
            for obj in (variant_objects, OBJECT):
                ids = _program_ids(ns.a)
                with pinging(ns, ns.a.ip4) as pinger:
                    restart(agent, obj=obj)
                    exchange_all(opened)
                round_trips, error = pinger.finish()
                assert error is None and round_trips > 0, (obj, round_trips, error)
                now = _program_ids(ns.a)
                assert [link for link, _ in now] == [link for link, _ in ids], (obj, ids, now)
                assert all(new != old for (_, new), (_, old) in zip(now, ids, strict=True)), (obj, ids, now)
                assert_one_attachment(ns.a, "tcx")
                assert_new_flows_translated(ns)
            assert backends_of(agent, opened) == before


# --- 3. a backend removed -------------------------------------------------------------------------------


DRAIN_PORT = 30081
KEEPER_IP = "10.96.0.90"


def _drain_services(ns: NsTopology, drain: Sequence[str], keeper: Sequence[str]) -> dict[str, list[Doc]]:
    """ "drain" (NodePort DRAIN_PORT) on pods ``drain``; "keeper" (a ClusterIP) on pods ``keeper``, both
    on KEEP_PORT: a backend of "keeper" stays in the backend map whatever "drain" does."""
    keeper_docs = [
        service("keeper", [KEEPER_IP], [("k", 80, "TCP", KEEP_PORT)]),
        *slices("keeper", [ns.pods[p] for p in keeper], [("k", KEEP_PORT, "TCP")]),
    ]
    drain_docs = nodeport_service("drain", DRAIN_PORT, "TCP", [ns.pods[p] for p in drain], KEEP_PORT)
    return {"drain": drain_docs, "keeper": keeper_docs}


def _backends_on(agent: NsAgent) -> set[str]:
    """Every backend some frontend of the agent's maps names."""
    return {b for backends in agent.frontends().values() for b in backends}


def test_a_removed_backend_gets_no_new_flows_and_its_flows_move_once_it_is_gone(tmp_path: Path) -> None:
    """pod-b1 removed from the NodePort Service "drain": new flows never reach it, while a flow already on
    it keeps it (and is never reset) as long as pod-b1 is still a backend of another frontend ("keeper").
    Once pod-b1 leaves every frontend, the flow's next packet finds its backend gone: the datapath counts it
    (balancing_northsouth_backend_gone_total), drops the flow's entries and picks again, so the packet lands
    on pod-a1, which knows no such connection and resets it. What a client sees is a reset, never data from
    another backend."""
    pb1 = f"10.244.2.11:{KEEP_PORT}"
    services = lambda ns: _drain_services(ns, ["pod-a1", "pod-b1"], ["pod-b1"])  # noqa: E731
    with running(tmp_path, services, ready=[f"192.0.2.11:{DRAIN_PORT}/TCP"]) as cluster:
        ns, agent = cluster.ns, cluster.agents["node-a"]
        flow = open_flow(ns, ns.a.ip4, DRAIN_PORT, {"pod-b1"})
        with contextlib.closing(flow):
            flow.exchange()
            for name, docs in _drain_services(ns, ["pod-a1"], ["pod-b1"]).items():
                cluster.apply(name, docs)
            key = f"{ns.a.ip4}:{DRAIN_PORT}/TCP"
            agent.wait_frontends(
                lambda f: f.get(key) == [f"10.244.1.11:{KEEP_PORT}"], 10, "drain without pod-b1"
            )
            assert pb1 in _backends_on(agent)  # still keeper's
            flow.exchange()
            assert {ns.tcp(ns.a.ip4, DRAIN_PORT).backend for _ in range(30)} == {"pod-a1"}
            flow.exchange()
            assert backends_of(agent, [flow])[0][0] == pb1
            gone = metric(agent, "balancing_northsouth_backend_gone_total")

            cluster.apply("keeper", _drain_services(ns, ["pod-a1"], ["pod-a2"])["keeper"])
            agent.wait_frontends(
                lambda _f: pb1 not in _backends_on(agent), 10, "pod-b1 out of every frontend"
            )
            with pytest.raises(ConnectionResetError):
                flow.exchange()
            assert metric(agent, "balancing_northsouth_backend_gone_total") == gone + 1
            row = conntrack_rows(agent)[flow.local]
            assert (row["backend"], row["state"]) == (f"10.244.1.11:{KEEP_PORT}", "closing"), row


# --- 4. SNAT ports exhausted ----------------------------------------------------------------------------


SOLO_PORT, LOCAL_ONLY_PORT = 30082, 30083


def test_snat_port_exhaustion_is_a_counted_drop(tmp_path: Path) -> None:
    """With two SNAT ports (--snat-ports 61000-61001) and a Service whose only backend is remote, two
    concurrent flows get the two ports; a third connection's SYNs are dropped (the connect times out) and
    counted as dropped_snat_ports, and nothing is corrupted: the first two flows keep working on their
    ports, and a Service with a local backend (no SNAT) still takes new flows."""

    def services(ns: NsTopology) -> dict[str, list[Doc]]:
        return {
            "solo": nodeport_service("solo", SOLO_PORT, "TCP", [ns.pods["pod-b1"]], KEEP_PORT),
            "home": nodeport_service("home", LOCAL_ONLY_PORT, "TCP", [ns.pods["pod-a1"]], KEEP_PORT),
        }

    ready = [f"192.0.2.11:{SOLO_PORT}/TCP", f"192.0.2.11:{LOCAL_ONLY_PORT}/TCP"]
    with running(tmp_path, services, extra=["--snat-ports", "61000-61001"], ready=ready) as cluster:
        ns, agent = cluster.ns, cluster.agents["node-a"]
        dropped = {"result": "dropped_snat_ports", "name": "solo"}
        with contextlib.ExitStack() as stack:
            first, second = (
                stack.enter_context(contextlib.closing(Flow(ns, ns.a.ip4, SOLO_PORT))) for _ in range(2)
            )
            exchange_all([first, second])
            assert (first.backend, second.backend) == ("pod-b1", "pod-b1")
            rows = conntrack_rows(agent)
            ports = sorted(_endpoint(rows[f.local]["snat"])[1] for f in (first, second))
            assert ports == [61000, 61001]
            assert metric(agent, "balancing_resolutions_total", **dropped) == 0
            with pytest.raises(TimeoutError):
                Flow(ns, ns.a.ip4, SOLO_PORT, timeout=1.5)  # the SYN and its retransmission at 1 s
            assert metric(agent, "balancing_resolutions_total", **dropped) >= 1
            assert metric(agent, "balancing_snat_ports_in_use") == 2
            exchange_all([first, second])
            assert ns.tcp(ns.a.ip4, LOCAL_ONLY_PORT).backend == "pod-a1"
            assert len(conntrack_rows(agent)) == 3  # the two SNAT flows and the local one, nothing else


# --- 5. ICMP errors -------------------------------------------------------------------------------------


DEAD_REMOTE, DEAD_LOCAL = 30091, 30092
ICMP_CASES = [
    pytest.param(4, "remote", id="ipv4-remote"),
    pytest.param(6, "remote", id="ipv6-remote"),
    pytest.param(4, "local", id="ipv4-local"),
    pytest.param(6, "local", id="ipv6-local"),
]


@pytest.fixture(scope="module")
def dead_port_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsCluster]:
    """UDP NodePorts whose one backend has nothing on the target port: DEAD_REMOTE -> pod-b1 (SNAT),
    DEAD_LOCAL -> pod-a1 (node-a's own pod)."""

    def services(ns: NsTopology) -> dict[str, list[Doc]]:
        return {
            "dead-remote": nodeport_service(
                "dead-remote", DEAD_REMOTE, "UDP", [ns.pods["pod-b1"]], DEAD_PORT
            ),
            "dead-local": nodeport_service("dead-local", DEAD_LOCAL, "UDP", [ns.pods["pod-a1"]], DEAD_PORT),
        }

    ready = [f"192.0.2.11:{DEAD_REMOTE}/UDP", f"192.0.2.11:{DEAD_LOCAL}/UDP"]
    with running(tmp_path_factory.mktemp("icmp"), services, ready=ready) as cluster:
        yield cluster


@pytest.mark.parametrize(("family", "where"), ICMP_CASES)
def test_a_port_unreachable_from_the_backend_reaches_the_client(
    dead_port_cluster: NsCluster, family: int, where: str
) -> None:
    """A datagram through node-a's UDP NodePort to a backend with no socket on the target port: the
    backend's ICMP port unreachable, about the translated datagram, is translated back (the quoted packet
    becomes the client's own to the NodePort) and reaches the client, whose connected socket gets
    ECONNREFUSED on its next recv. The kernel matches an ICMP error to a socket by the quoted packet only,
    so the error proves the quote was rewritten. Remote backend: the error comes back to node-a's SNAT
    address (ingress); local: it leaves through the uplink (egress)."""
    ns = dead_port_cluster.ns
    addr = ns.a.ip(family)
    port = DEAD_REMOTE if where == "remote" else DEAD_LOCAL
    with in_netns(ns.client.netns):
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect((addr, port))
        sock.send(b"ping\n")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)


# --- 6. tcx and clsact ----------------------------------------------------------------------------------


def test_clsact_mode_translates_and_a_change_of_mechanism_keeps_one_attachment(tmp_path: Path) -> None:
    """Agents with --tc-attach-mode clsact serve the NodePort (remote and local backends) with cls_bpf
    filters; node-a's agent restarted in the default mode (tcx here) moves both programs to tcx links, and
    back to clsact again, make-before-break: after each switch exactly one mechanism holds each program on
    the uplink, new connections are translated, and established flows carry on with no reset."""
    if not tcattach.tcx_supported():
        pytest.skip("this kernel has no tcx (Linux >= 6.6)")
    clsact = ["--tc-attach-mode", "clsact"]
    with running(
        tmp_path, lambda ns: {"web": web(ns)}, extra=clsact, ready=[f"192.0.2.11:{WEB_PORT}/TCP"]
    ) as cluster:
        ns, agent = cluster.ns, cluster.agents["node-a"]
        assert_one_attachment(ns.a, "clsact")
        wanted = [(ns.a.ip4, {"pod-b1"}), (ns.a.ip6, LOCAL_PODS)]
        with flows(ns, wanted) as opened:
            exchange_all(opened)
            before = backends_of(agent, opened)
            for mode, flags in (("tcx", ["--tc-attach-mode", "auto"]), ("clsact", clsact)):
                with pinging(ns, ns.a.ip4) as pinger:
                    restart(agent, extra=flags)
                    exchange_all(opened)
                round_trips, error = pinger.finish()
                assert error is None and round_trips > 0, (mode, round_trips, error)
                assert_one_attachment(ns.a, mode)
                assert_new_flows_translated(ns)
            assert backends_of(agent, opened) == before


# --- 7. bad input ---------------------------------------------------------------------------------------


def test_a_missing_or_unusable_device_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    """--nodeport-devices naming a device that does not exist stops the agent before anything runs (no pin
    at all), one naming a device without an address to translate sources to stops it when north-south
    loads: both with exit status 2, one error line naming the device and what is wrong, no traceback, and
    nothing attached to any device."""
    with NsTopology(pods_per_node=(1, 1), servers=False) as ns:
        ns.run(ns.a, ["ip", "link", "add", "bare0", "type", "veth", "peer", "name", "bare1"])
        agent = NsCluster(ns, tmp_path / "manifests").agents["node-a"]
        for device, reason in (
            ("nosuchdev", "no such network device"),
            ("bare0", "has no IPv4 or global IPv6 address"),
        ):
            agent.extra = ["--nodeport-devices", device]
            agent.start(wait=False)
            assert agent.proc is not None
            assert agent.proc.wait(timeout=30) == 2, agent.stderr()
            stderr = agent.stderr()
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and f"network device {device}: " in errors[0], stderr
            assert reason in errors[0] and "Traceback" not in stderr, stderr
            if device == "nosuchdev":
                assert not any(p.is_file() or p.is_symlink() for p in _walk(agent.bpffs)), list(
                    _walk(agent.bpffs)
                )
            assert not list(_walk(agent.bpffs / "links", "bl_ns_*"))
            for direction in northsouth.PROGRAMS.values():
                assert tcx_programs(ns.a, direction) == clsact_programs(ns.a, direction) == []


def _walk(directory: Path, pattern: str = "*") -> Iterator[Path]:
    """Everything below ``directory`` matching ``pattern`` (nothing when it does not exist)."""
    return directory.rglob(pattern) if directory.is_dir() else iter(())


def test_an_invalid_source_range_is_reported_and_the_other_services_keep_working(tmp_path: Path) -> None:
    """A LoadBalancer Service whose loadBalancerSourceRanges gets an entry that is no CIDR: the agent reports
    the file and the field, keeps the Service's last good version in force (its load-balancer IP still
    serves the client's range), keeps running and healthy, and the other Services keep working north-south."""

    def fenced(ns: NsTopology, ranges: Sequence[str]) -> list[Doc]:
        port = ("http", 80, "TCP", KEEP_PORT, 30095)
        doc = external_service(
            "fenced", ["10.96.0.95"], [port], kind="LoadBalancer", lb_ips=[LB_IP4], source_ranges=ranges
        )
        return [doc, *slices("fenced", [ns.pods["pod-a1"]], [("http", KEEP_PORT, "TCP")])]

    def services(ns: NsTopology) -> dict[str, list[Doc]]:
        return {"web": web(ns), "fenced": fenced(ns, [CLIENT_RANGE])}

    with running(tmp_path, services, ready=[f"192.0.2.11:{WEB_PORT}/TCP", f"{LB_IP4}:80/TCP"]) as cluster:
        ns, agent = cluster.ns, cluster.agents["node-a"]
        assert ns.tcp(LB_IP4, 80).backend == "pod-a1"
        cluster.apply("fenced", fenced(ns, [CLIENT_RANGE, "203.0.113.0/33"]))
        wait_until(lambda: "loadBalancerSourceRanges" in agent.stderr(), 10, "the error in node-a's log")
        reported = [line for line in agent.stderr().splitlines() if "loadBalancerSourceRanges" in line]
        assert "fenced.yaml" in reported[0] and "203.0.113.0/33" in reported[0], reported
        assert "keeping the last good version" in reported[0], reported
        assert agent.proc is not None and agent.proc.poll() is None
        assert agent.get("/healthz")[0] == 200
        assert ns.tcp(LB_IP4, 80).backend == "pod-a1"
        assert_new_flows_translated(ns)
