"""The arm64 guest's test runner: run by the guest's /init (``/guest/main``), it reports on the console.

Inside the guest (Debian's arm64 kernel under qemu-system-aarch64, see ``scripts/build-arm64-guest.sh``) this
builds the kernel tests' topology with the shared harness (``balancing_testkit.topology``: pods and a client
in network namespaces on a bridge, a node cgroup, a bpffs directory), loads the datapath from the installed
wheel with the product's own loader, programs Services with the product's writer (as the kernel tests'
``helpers.support.Datapath`` does) and checks real traffic; the wheel's ``balancing agent`` runs on a
manifest directory for a second node, started before the first case (so that its start-up, slow under
emulation, overlaps them) and stopped with SIGTERM by the last.

Each case prints one line ``BLT-ARM64-RESULT {json}`` (``case``, ``outcome`` passed/failed, ``seconds``,
``message``), between ``BLT-ARM64-START {json}`` (machine, kernel, Python, the case names) and
``BLT-ARM64-END {json}``. The host (``tests/kernel/test_arm64.py``) turns each into a pytest result. The
cases share one topology and one datapath and run in the order of ``CASES``; a case that fails leaves the
next ones to run. Standard library, ``balancing`` and ``balancing_testkit`` only (the host imports this
module for the case names).
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from balancing.datapath import (
    abi,
    bpfobjects,
    libbpf,
    loader,
    maps,
    percpu,
    programmed,
    ringbuf,
    settings,
    writer,
)
from balancing.model.desired import (
    Backend,
    BackendPod,
    DesiredState,
    Frontend,
    FrontendKey,
    Owner,
    PodRef,
    Protocol,
)
from balancing_testkit import client
from balancing_testkit.topology import Cluster, Host, Topology, build_cluster

START, RESULT, END = "BLT-ARM64-START", "BLT-ARM64-RESULT", "BLT-ARM64-END"
VIP4, VIP6, VIP_EMPTY4, VIP_EMPTY6 = "10.96.0.10", "fd00:96::10", "10.96.0.30", "fd00:96::30"
VIP_AGENT = "10.96.0.20"
SOCKET_PROGRAMS = sorted(
    f"bl_{h}{v}" for h in ("connect", "sendmsg", "recvmsg", "getpeername") for v in (4, 6)
)
SMALL_MAPS = {"max_services": 4096, "max_backends": 4096, "max_reverse": 4096, "max_affinity": 4096}
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
CASE_TIMEOUT = 90  # seconds; an alarm fails a case that hangs, so the others still report
VARIANT_OBJECT = Path("/guest/objects/balancing-v3.o")  # the same programs for BPF ISA v3 (the host's make)

# Every socket refused at once (no timeout): TCP connect() and a UDP sendto() to frontends without endpoints.
REFUSE_PROBE = textwrap.dedent(f"""
    import json, socket, time
    out = {{}}
    for family, host in ((socket.AF_INET, "{VIP_EMPTY4}"), (socket.AF_INET6, "{VIP_EMPTY6}")):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(family, kind)
            t0 = time.perf_counter()
            try:
                s.connect((host, 80)) if kind == socket.SOCK_STREAM else s.sendto(b"x", (host, 80))
                out[f"{{family.name}}/{{kind.name}}"] = ["ok", 0]
            except OSError as e:
                out[f"{{family.name}}/{{kind.name}}"] = [e.strerror, (time.perf_counter() - t0) * 1000]
    print(json.dumps(out))
""")


def emit(marker: str, payload: dict[str, Any]) -> None:
    """One line on the console, in one write (so nothing else lands inside it)."""
    os.write(1, f"\n{marker} {json.dumps(payload, sort_keys=True)}\n".encode())


class CaseTimeout(Exception):
    """A case ran past CASE_TIMEOUT."""


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise CaseTimeout(f"no result after {CASE_TIMEOUT} s")


# --- the node: topology, datapath, writer ---------------------------------------------------------------


@dataclass
class Node:
    """What the cases share: the topology (pods pod-a/b/c with TCP+UDP backends on 8080, a client in the
    cgroup of node-a) and the datapath loaded into node-a's cgroup from the installed wheel."""

    topo: Topology
    cluster: Cluster
    cfg: loader.DatapathConfig
    report: loader.LoadReport
    io: maps.KernelMaps
    agent: Agent | None = None
    pod_cgroups: dict[PodRef, list[Path]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.writer = writer.MapWriter(
            self.io, lambda pod: [p.stat().st_ino for p in self.pod_cgroups.get(pod, [])]
        )

    @classmethod
    def start(cls) -> Node:
        topo = Topology().open()
        agent = Agent.start(topo)  # first: its start-up is the longest thing here
        cluster = build_cluster(topo)
        agent.write_manifests(list(cluster.pods))
        cfg = loader.DatapathConfig(
            bpfobjects.default_object(), topo.bpffs / cluster.node, cluster.cgroup, **SMALL_MAPS
        )
        report = loader.load(cfg)
        return cls(topo, cluster, cfg, report, maps.KernelMaps(cfg.map_dir), agent)

    def backends4(self, port: int = 8080) -> list[str]:
        return [f"{p.ip4}:{port}" for p in self.cluster.pods]

    def backends6(self, port: int = 8080) -> list[str]:
        return [f"[{p.ip6}]:{port}" for p in self.cluster.pods]

    def program(self, frontends: dict[str, list[str] | Frontend]) -> None:
        """{"ip:port/PROTO": [backend, ...] or a Frontend} -> the maps, through the product's writer."""
        self.writer.sync(
            DesiredState(
                {
                    _key(k): v if isinstance(v, Frontend) else _frontend(v, owner="svc")
                    for k, v in frontends.items()
                }
            )
        )

    def client(self, *args: object, host: Host | None = None, cgroup: Path | None = None) -> dict[str, Any]:
        """testkit's client in the client's netns (or ``host``'s), in its node's cgroup (or ``cgroup``)."""
        host = host or self.cluster.client
        return forked_client(host, cgroup or self.topo.node_cgroup(host.node or self.cluster.node), args)

    def stat(self, key: str, result: str, hook: str) -> int:
        """bl_stats_v1 summed over the CPUs: resolutions of frontend ``key`` with this result and hook."""
        svc_id = self.writer.svc_id(_key(key))
        assert svc_id is not None, key
        codes = {v: k for k, v in abi.RESULTS.items()}
        hooks = {v: k for k, v in abi.HOOKS.items()}
        proto = socket.IPPROTO_UDP if key.endswith("/UDP") else socket.IPPROTO_TCP
        fd = libbpf.obj_get(str(self.cfg.map_dir / abi.MAP_STATS))
        try:
            raw_key = abi.STAT_KEY.packer.pack(svc_id, codes[result], proto, hooks[hook], 0)
            return percpu.sum_u64(fd, raw_key) or 0
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
        self.io.close()
        loader.cleanup(self.cfg.bpffs)
        self.topo.close()


def forked_client(host: Host, cgroup: Path, args: Sequence[object], timeout: float = 60.0) -> dict[str, Any]:
    """testkit's client (``client.main``) in a child forked from this process that first joins ``cgroup``
    and ``host``'s network namespace, as the harness's ``run_client`` has an exec'd client do: the same code
    and sockets, without starting Python again (a second per run under emulation). Its JSON result."""
    argv = [str(a) for a in args]
    sys.stdout.flush()
    r, w = os.pipe()
    procs_fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    netns_fd = os.open(host.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            signal.alarm(0)
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.write(procs_fd, str(os.getpid()).encode())
            if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            code = client.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    os.close(procs_fd)
    os.close(netns_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if os.waitstatus_to_exitcode(status) != 0 or not lines or not lines[-1].startswith("{"):
        raise AssertionError(f"client {' '.join(argv)} failed ({status}):\n{out[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _key(text: str) -> FrontendKey:
    addr, proto = text.split("/")
    host, _, port = addr.rpartition(":")
    return FrontendKey(ipaddress.ip_address(host.strip("[]")), int(port), Protocol[proto])


def _backends(texts: list[str]) -> tuple[Backend, ...]:
    parsed = [b.rpartition(":") for b in texts]
    return tuple(sorted(Backend(ipaddress.ip_address(h.strip("[]")), int(p)) for h, _, p in parsed))


def _frontend(backends: list[str], *, owner: str, affinity: int = 0) -> Frontend:
    return Frontend(Owner("Service", "test", owner), _backends(backends), affinity_timeout=affinity)


# --- the cases ------------------------------------------------------------------------------------------


def case_load_and_attach(node: Node) -> str:
    """The wheel's object loads, its maps are created and pinned, every socket hook attaches and is JITed."""
    assert platform.machine() == "aarch64", platform.machine()
    assert "/dist-packages/balancing/bpf/" in str(node.cfg.object_path), node.cfg.object_path
    assert sorted(node.report.programs_attached) == SOCKET_PROGRAMS, node.report
    assert sorted(node.report.maps_created) == sorted(abi.ALL_MAPS), node.report
    jited = {}
    for name in SOCKET_PROGRAMS:
        link = libbpf.link_open(str(node.cfg.link_dir / name))
        try:
            info = libbpf.LinkInfo()
            libbpf.obj_get_info(libbpf.link_fd(link), info)
            fd = libbpf.prog_get_fd_by_id(info.prog_id)
            try:
                prog = libbpf.ProgInfoWithName()
                libbpf.obj_get_info(fd, prog)
                jited[name] = int(prog.jited_prog_len)
            finally:
                os.close(fd)
        finally:
            libbpf.link_destroy(link)
    assert all(jited.values()), f"not JIT-compiled: {jited}"
    return f"{len(jited)} programs JITed for arm64 ({sum(jited.values())} bytes)"


def case_tcp(node: Node) -> str:
    """TCP through a VIP spreads over the three pods, which see the client's own address."""
    node.program({f"{VIP4}:80/TCP": node.backends4()})
    res = node.client("tcp", VIP4, 80, "--count", 60)
    assert res["errors"] == {}, res
    assert set(res["backends"]) == {"pod-a", "pod-b", "pod-c"}, res["backends"]
    assert res["seen_by_backend"] == [node.cluster.client.ip4], res
    return f"backends {res['backends']}"


def case_getpeername(node: Node) -> str:
    """getpeername() on a translated TCP socket shows the VIP, IPv4 and IPv6."""
    node.program({f"{VIP4}:80/TCP": node.backends4(), f"[{VIP6}]:80/TCP": node.backends6()})
    v4 = node.client("tcp", VIP4, 80, "--count", 10)
    v6 = node.client("tcp", VIP6, 80, "--count", 10, "--family", 6)
    assert v4["peernames"] == [[VIP4, 80]], v4
    assert v6["peernames"] == [[VIP6, 80]], v6
    return "peer names show the VIPs"


def case_udp_unconnected(node: Node) -> str:
    """Unconnected UDP: one socket sticks to one pod; replies come from the VIP (recvmsg), IPv4 and IPv6."""
    node.program({f"{VIP4}:53/UDP": node.backends4(), f"[{VIP6}]:53/UDP": node.backends6()})
    res = node.client("udp-unconnected", VIP4, 53, "--count", 20)
    assert res["errors"] == {} and res["ok"] == 20, res
    assert len(res["backends"]) == 1, res["backends"]
    assert res["reply_sources"] == [[VIP4, 53]], res
    res6 = node.client("udp-unconnected", VIP6, 53, "--count", 10, "--family", 6)
    assert res6["errors"] == {} and len(res6["backends"]) == 1, res6
    assert res6["reply_sources"] == [[VIP6, 53]], res6
    return f"replies from {res['reply_sources'][0]} and {res6['reply_sources'][0]}"


def case_udp_connected(node: Node) -> str:
    """Connected UDP spreads per socket; getpeername() and the replies show the VIP."""
    node.program({f"{VIP4}:53/UDP": node.backends4()})
    res = node.client("udp-connected", VIP4, 53, "--count", 30)
    assert res["errors"] == {} and res["ok"] == 30, res
    assert len(res["backends"]) > 1, res["backends"]
    assert res["peernames"] == [[VIP4, 53]], res
    return f"backends {res['backends']}"


def case_ipv6(node: Node) -> str:
    """An IPv6 frontend with IPv6 backends; v4-mapped sockets to an IPv4 VIP are translated both ways."""
    node.program({f"[{VIP6}]:80/TCP": node.backends6(), f"{VIP4}:80/TCP": node.backends4()})
    res = node.client("tcp", VIP6, 80, "--count", 45, "--family", 6)
    assert res["errors"] == {} and len(res["backends"]) == 3, res
    assert res["seen_by_backend"] == [node.cluster.client.ip6], res
    mapped = node.client("tcp", VIP4, 80, "--count", 20, "--family", "mapped")
    assert mapped["errors"] == {}, mapped
    assert mapped["peernames"] == [[f"::ffff:{VIP4}", 80]], mapped
    return f"backends {res['backends']}"


def case_refused(node: Node) -> str:
    """A frontend without endpoints refuses at once (ECONNREFUSED), TCP and UDP, IPv4 and IPv6."""
    node.program(
        {
            **{f"{VIP_EMPTY4}:80/{p}": [] for p in ("TCP", "UDP")},
            **{f"[{VIP_EMPTY6}]:80/{p}": [] for p in ("TCP", "UDP")},
        }
    )
    res = node.topo.run(
        [sys.executable, "-c", REFUSE_PROBE], netns=node.cluster.client, cgroup=node.cluster.cgroup
    )
    outcome = json.loads(res.stdout)
    assert len(outcome) == 4, outcome
    for what, (error, ms) in outcome.items():
        assert error == "Connection refused", (what, error)
        assert ms < 200, (what, ms)
    return "refused: " + ", ".join(f"{k} {v[1]:.1f} ms" for k, v in sorted(outcome.items()))


def case_counters(node: Node) -> str:
    """bl_stats_v1 (per-CPU hash) counts each resolution by frontend, result and hook."""
    key, empty = f"{VIP4}:80/TCP", f"{VIP_EMPTY4}:80/TCP"
    node.program({key: node.backends4(), empty: []})
    before = node.stat(key, "translated", "connect4"), node.stat(empty, "refused", "connect4")
    assert node.client("tcp", VIP4, 80, "--count", 17)["ok"] == 17
    assert node.client("tcp", VIP_EMPTY4, 80, "--count", 5)["errors"] == {"ECONNREFUSED": 5}
    after = node.stat(key, "translated", "connect4"), node.stat(empty, "refused", "connect4")
    assert (after[0] - before[0], after[1] - before[1]) == (17, 5), (before, after)
    return f"translated +17, refused +5 (totals {after})"


def case_events(node: Node) -> str:
    """With events on, each connect is one record in the ring buffer; off again, none."""
    node.program({f"{VIP4}:80/TCP": node.backends4()})
    records: list[bytes] = []
    with ringbuf.RingBuffer(node.cfg.map_dir / abi.MAP_EVENTS, records.append) as rb:
        rb.consume()
        records.clear()
        settings.write_config(node.cfg.map_dir, abi.EVENTS_ALL)
        try:
            assert node.client("tcp", VIP4, 80, "--count", 12)["ok"] == 12
            rb.consume()
        finally:
            settings.write_config(node.cfg.map_dir, abi.EVENTS_OFF)
        events = [abi.Event.unpack(r) for r in records]
        assert len(events) == 12, events
        backends = {f"{p.ip4}:8080" for p in node.cluster.pods}
        for ev in events:
            assert (ev.hook, ev.proto, ev.result) == ("connect4", socket.IPPROTO_TCP, "translated"), ev
            assert f"{ev.orig[0]}:{ev.orig[1]}" == f"{VIP4}:80", ev
            assert ev.backend is not None and f"{ev.backend[0]}:{ev.backend[1]}" in backends, ev
            assert ev.cgroup_id == node.cluster.cgroup.stat().st_ino, ev
        records.clear()
        assert node.client("tcp", VIP4, 80, "--count", 3)["ok"] == 3
        rb.consume()
        assert records == [], "events while off"
    assert ringbuf.read_lost(node.cfg.map_dir) == 0
    return f"12 events, e.g. {events[0].comm} pid {events[0].pid} -> {events[0].backend}"


def case_session_affinity(node: Node) -> str:
    """ClientIP affinity (the LRU affinity map): one client namespace stays on one backend."""
    node.program({f"{VIP4}:80/TCP": _frontend(node.backends4(), owner="sticky", affinity=60)})
    res = node.client("tcp", VIP4, 80, "--count", 20)
    assert res["errors"] == {} and len(res["backends"]) == 1, res
    return f"all 20 on {next(iter(res['backends']))}"


def case_policy_redirect(node: Node) -> str:
    """A LocalRedirectPolicy frontend with a fallback: a backend pod never gets its own connection back
    (its cgroup in the client map), the others reach the local backends."""
    a, b, c = node.backends4()
    cgroup = node.cluster.cgroup / "kubepods" / "podaaaa"
    cgroup.mkdir(parents=True, exist_ok=True)
    ref = PodRef("default", "pod-a", "aaaa")
    node.pod_cgroups[ref] = [cgroup]
    lrp = Frontend(
        Owner("LocalRedirectPolicy", "", "node-local-dns"),
        _backends([a, b]),
        fallback=_backends([c]),
        backend_pods=(BackendPod(ref, _backends([a])[0]),),
    )
    node.program({f"{VIP4}:53/TCP": lrp})
    own = node.client("tcp", VIP4, 53, "--count", 20, host=node.cluster.pods[0], cgroup=cgroup)
    assert own["backends"] == {"pod-b": 20}, own
    others = node.client("tcp", VIP4, 53, "--count", 30)
    assert set(others["backends"]) == {"pod-a", "pod-b"}, others
    return f"pod-a's own -> {own['backends']}, others -> {others['backends']}"


def case_reload_and_pins(node: Node) -> str:
    """Reloading reuses every pinned map and leaves unchanged programs; another build of the programs is
    swapped in atomically and back, and a new writer reads back what the pinned maps hold, all under a connect
    loop that sees no failure."""
    node.program({f"{VIP4}:80/TCP": node.backends4()})
    loop = node.topo.spawn_client(
        node.cluster.client, None, ["loop", VIP4, "80", "--timeout", "2", "--interval", "0.005"]
    )
    same = loader.load(node.cfg)
    assert sorted(same.programs_unchanged) == SOCKET_PROGRAMS and not same.programs_swapped, same
    assert sorted(same.maps_reused) == sorted(abi.ALL_MAPS), same
    variant = loader.DatapathConfig(VARIANT_OBJECT, node.cfg.bpffs, node.cfg.cgroup, **SMALL_MAPS)
    swapped = loader.load(variant)
    assert sorted(swapped.programs_swapped) == SOCKET_PROGRAMS, swapped
    back = loader.load(node.cfg)
    assert sorted(back.programs_swapped) == SOCKET_PROGRAMS, back
    # what a restarted agent does first: a new writer over the pinned maps reads back what they hold
    io = maps.KernelMaps(node.cfg.map_dir)
    try:
        read_back = writer.MapWriter(io).programmed()
    finally:
        io.close()
    assert read_back == node.writer.programmed() and len(read_back) == 1, read_back
    time.sleep(0.5)
    res = node.topo.finish_client(loop)
    assert res["errors"] == {} and res["ok"] > 5, res
    return f"{res['ok']} connects across two swaps, none failed"


def _agent_manifests(directory: Path, pods: list[Host]) -> None:
    """Service ``web`` (VIP_AGENT:80 -> 8080) and its EndpointSlice with every pod, as JSON manifests."""
    eps = [{"addresses": [p.ip4], "conditions": {"ready": True}, "nodeName": "node-b"} for p in pods]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "clusterIP": VIP_AGENT,
            "clusterIPs": [VIP_AGENT],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-ipv4",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }
    (directory / "web.json").write_text(json.dumps(service))
    (directory / "web-slice.json").write_text(json.dumps(slice_))


@dataclass
class Agent:
    """The wheel's ``balancing agent`` (its console script, its locked dependencies for aarch64) for a second
    node, node-b, on a manifest directory, in the guest's root network namespace as a DaemonSet's runs.
    Started in the background before anything else: its start-up (mostly importing, emulated) overlaps the
    set-up and the datapath cases."""

    topo: Topology
    client: Host  # client-b, in node-b's cgroup
    port: int = 10256  # /readyz
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready_after: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, topo: Topology) -> Agent:
        """Spawned on an empty manifest directory (the pods do not exist yet): see ``write_manifests``."""
        agent = cls(topo, topo.add_client("client-b", node="node-b"))
        agent.manifests.mkdir()
        agent.spawn()
        return agent

    @property
    def manifests(self) -> Path:
        return self.topo.workdir / "manifests"

    def write_manifests(self, pods: list[Host]) -> None:
        """The Service for the pods, written while the agent starts: it sees them when they appear."""
        _agent_manifests(self.manifests, pods)

    @property
    def bpffs(self) -> Path:
        return self.topo.bpffs / "node-b"

    def spawn(self) -> None:
        argv = [
            "/usr/local/bin/balancing",
            "agent",
            f"--manifests={self.manifests}",
            "--node-name=node-b",
            f"--cgroup={self.topo.node_cgroup('node-b')}",
            f"--bpffs={self.bpffs}",
            f"--health-addr=127.0.0.1:{self.port}",
            "--state-addr=",
            "--metrics-addr=",
            *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MAPS.items()),
        ]
        self.started = time.monotonic()
        self.proc = self.topo.spawn(argv, label="agent")

    def wait_ready(self, timeout: float = 75.0) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                err = self.topo.logs(self.proc)[1][-3000:]
                raise AssertionError(f"the agent exited {self.proc.returncode}:\n{err}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        self.ready_after.append(time.monotonic() - self.started)
                        return
            except OSError:  # not listening yet, or 503 (urllib's HTTPError is an OSError)
                pass
            if time.monotonic() - self.started > timeout:
                raise AssertionError(
                    f"the agent not ready in {timeout} s:\n{self.topo.logs(self.proc)[1][-3000:]}"
                )
            time.sleep(0.2)

    def frontends(self) -> dict[str, int]:
        """What its pinned maps hold: {"ip:port/PROTO": number of backend slots}."""
        io = maps.KernelMaps(self.bpffs / "maps")
        try:
            state = programmed.read_state(io)
        finally:
            io.close()
        return {str(k): len(f.slots) for k, f in state.frontends.items()}

    def wait_programmed(self, timeout: float = 10.0) -> None:
        """Until the maps hold the Service with its three pods (manifests written after its start)."""
        want, deadline = {f"{VIP_AGENT}:80/TCP": 3}, time.monotonic() + timeout
        while (got := self.frontends()) != want:
            assert time.monotonic() < deadline, f"the agent programmed {got}, not {want}"
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, as the kubelet stops it: a clean exit, no traceback."""
        assert self.proc is not None
        stopped = self.topo.stop(self.proc, timeout=30)
        self.proc = None
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]

    def connect(self, node: Node, count: int) -> dict[str, Any]:
        return node.client("tcp", VIP_AGENT, 80, "--count", count, host=self.client)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.topo.stop(self.proc, timeout=10)
        loader.cleanup(self.bpffs)


def case_agent(node: Node) -> str:
    """The agent programs the Service from manifests that appear while it starts; on SIGTERM it exits
    cleanly and the datapath it pinned keeps translating without it. (A restart on those pins is what
    ``reload_and_pins`` does with the loader and a new writer; a second start of the agent would cost as much
    emulated time as all the other cases together, mostly importing.)"""
    agent = node.agent
    assert agent is not None
    agent.wait_ready()
    agent.wait_programmed()
    res = agent.connect(node, 30)
    assert res["errors"] == {} and set(res["backends"]) == {"pod-a", "pod-b", "pod-c"}, res
    agent.stop()
    alone = agent.connect(node, 10)
    assert alone["errors"] == {} and alone["ok"] == 10, alone
    assert agent.frontends() == {f"{VIP_AGENT}:80/TCP": 3}, "the pins changed after the agent left"
    return f"ready {agent.ready_after[0]:.1f} s after its start; translating after SIGTERM"


CASES: list[tuple[str, Callable[[Node], str]]] = [
    ("load_and_attach", case_load_and_attach),
    ("tcp", case_tcp),
    ("getpeername", case_getpeername),
    ("udp_unconnected", case_udp_unconnected),
    ("udp_connected", case_udp_connected),
    ("ipv6", case_ipv6),
    ("refused", case_refused),
    ("counters", case_counters),
    ("events", case_events),
    ("session_affinity", case_session_affinity),
    ("policy_redirect", case_policy_redirect),
    ("reload_and_pins", case_reload_and_pins),
    ("agent", case_agent),  # last: started before the first case, it has had them all to start
]
CASE_NAMES = [name for name, _ in CASES]


def run_case(name: str, fn: Callable[[Node], str], node: Node) -> dict[str, Any]:
    """Run one case under the alarm: passed with what it reports, or failed with the traceback."""
    t0 = time.monotonic()
    signal.alarm(CASE_TIMEOUT)
    try:
        result = {"case": name, "outcome": "passed", "message": fn(node)}
    except BaseException as exc:
        message = "".join(traceback.format_exception(exc))[-6000:]
        result = {"case": name, "outcome": "failed", "message": message}
    finally:
        signal.alarm(0)
    return {**result, "seconds": round(time.monotonic() - t0, 2)}


def main() -> int:
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.monotonic()
    emit(
        START,
        {
            "machine": platform.machine(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "uptime": float(Path("/proc/uptime").read_text().split()[0]),
            "cases": CASE_NAMES,
        },
    )
    try:
        signal.alarm(CASE_TIMEOUT)
        node = Node.start()
        signal.alarm(0)
    except BaseException as exc:
        signal.alarm(0)
        error = "setting up the topology and the datapath failed:\n" + "".join(
            traceback.format_exception(exc)
        )
        for name in CASE_NAMES:
            emit(RESULT, {"case": name, "outcome": "failed", "message": error[-6000:], "seconds": 0})
        emit(END, {"seconds": round(time.monotonic() - t0, 2), "setup_failed": True})
        return 1
    setup = time.monotonic() - t0
    try:
        for name, fn in CASES:
            emit(RESULT, run_case(name, fn, node))
    finally:
        node.close()
    emit(END, {"seconds": round(time.monotonic() - t0, 2), "setup_seconds": round(setup, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
