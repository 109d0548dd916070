"""Socket termination on the real kernel: connected UDP sockets of a removed backend go, nothing else does.

The datapath is loaded into the test cluster's node cgroup and programmed by the real writer; the sockets are
held by small long-lived client processes (``HOLDER`` below) in the client namespace and node cgroup, which
connect once and then, on a signal, exchange one more datagram on the same socket (SIGUSR1) or connect it
again first (SIGUSR2), printing one JSON line per step. ``SocketTerminator`` (bpf/sockterm.o) then runs with
what the writer reports removed, as the agent will.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancing.datapath import abi, libbpf, sockterm
from balancing.datapath.maps import FakeMaps
from balancing.datapath.writer import MapWriter
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendChanges, FrontendKey, Owner
from balancing_testkit.topology import Cluster, Host, netns_path
from helpers.sockets import HOLDER, Holder, NetnsDir
from helpers.support import ROOT, Datapath, parse_key, wait_until

OBJECT = ROOT / "build/bpf/sockterm.o"
VIP4, VIP6, VIP4_OTHER = "10.96.0.10", "fd00:96::10", "10.96.0.11"
KEEP_PORT = 9090  # pod-a's extra TCP backend that keeps connections open (echo)


@pytest.fixture(scope="module")
def sockterm_object() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT), "build/bpf/sockterm.o"], check=True)
    return OBJECT


@pytest.fixture
def term(cluster: Cluster, dp: Datapath, sockterm_object: Path) -> Iterator[sockterm.SocketTerminator]:
    """A terminator finding namespaces through the cgroup's processes only (the machine's /run/netns holds
    every namespace of the topology, and maybe others: netns_dir below stands in for it)."""
    with sockterm.SocketTerminator(dp.bpffs, cluster.cgroup, sockterm_object, netns_dirs=()) as t:
        assert t.available, t.reason
        yield t


@pytest.fixture
def netns_dir(cluster: Cluster, tmp_path: Path) -> Iterator[NetnsDir]:
    """Torn down before ``cluster``: the bind mounts go before the namespaces are deleted."""
    d = NetnsDir(tmp_path / "netns")
    try:
        yield d
    finally:
        d.close()


def doomed_entries(term: sockterm.SocketTerminator) -> list[bytes]:
    return libbpf.map_keys(term._doom_fd, abi.DOOM_KEY.size)


def pods(cluster: Cluster, *names: str, port: int = 8080, family: int = 4) -> list[str]:
    chosen = [p for p in cluster.pods if p.name in names]
    return [f"{p.ip4}:{port}" if family == 4 else f"[{p.ip6}]:{port}" for p in chosen]


def backend(host: Host, port: int = 8080, family: int = 4) -> Backend:
    return Backend(ipaddress.ip_address(host.ip4 if family == 4 else host.ip6), port)


def test_connected_udp_sockets_of_a_removed_backend_are_destroyed_and_nothing_else(
    cluster: Cluster, dp: Datapath, term: sockterm.SocketTerminator
) -> None:
    pod_a = cluster.pods[0]
    cluster.topo.start_backend(pod_a, "pod-a-keep", port=KEEP_PORT, extra_args=["--keep-open", "--no-udp"])

    def program(*names: str, tcp: tuple[str, ...] = ("pod-a",)) -> dict[FrontendKey, frozenset[Backend]]:
        return dp.program(
            {
                f"{VIP4}:53/UDP": pods(cluster, *names),
                f"[{VIP6}]:53/UDP": pods(cluster, *names, family=6),
                f"{VIP4}:90/TCP": pods(cluster, *tcp, port=KEEP_PORT),
            }
        ).udp_backends_removed

    # Deterministic backends: only pod-b while the pod-b holder connects, only pod-a for the pod-a ones.
    program("pod-b")
    on_b = Holder(cluster, "udp", VIP4, 53)
    program("pod-a")
    on_a = [Holder(cluster, "udp", VIP4, 53), Holder(cluster, "udp", VIP6, 53)]
    on_a.append(Holder(cluster, "udp", f"::ffff:{VIP4}", 53))  # v4-mapped: AF_INET6 socket, IPv4 backend
    direct = Holder(cluster, "udp", pod_a.ip4, 8080)  # straight to the pod: never translated
    tcp_a = Holder(cluster, "tcp", VIP4, 90)  # TCP through the VIP to pod-a (kept open, echoing)
    assert on_b.first["reply"] == "pod-b"
    assert [h.first["reply"] for h in on_a] == ["pod-a"] * 3
    assert direct.first["reply"] == "pod-a" and tcp_a.first["hello"] == "pod-a-keep"

    # pod-a leaves both UDP frontends and the TCP one; the writer reports the UDP pairs only
    removed = program("pod-b", "pod-c", tcp=())
    assert removed == {
        parse_key(f"{VIP4}:53/UDP"): {backend(pod_a)},
        parse_key(f"[{VIP6}]:53/UDP"): {backend(pod_a, family=6)},
    }
    with_tcp = {**removed, parse_key(f"{VIP4}:90/TCP"): {backend(pod_a, KEEP_PORT)}}  # TCP pairs are ignored
    report = term.terminate(with_tcp)

    assert (report.pairs, report.destroyed, report.namespaces, report.errors) == (2, 3, 1, [])
    assert doomed_entries(term) == []
    for holder in on_a:
        # the destroyed socket is disconnected: a send has no destination, a receive gets the abort
        assert holder.again() == {"step": "again", "send": "EDESTADDRREQ", "recv": "ECONNABORTED"}
        assert holder.reconnect()["reply"] in ("pod-b", "pod-c")
    assert on_b.again()["reply"] == "pod-b"  # another backend of the same frontend: untouched
    assert direct.again()["reply"] == "pod-a"  # connected to the pod address itself: untouched
    assert tcp_a.again()["reply"] == "ping"  # TCP: untouched (kube-proxy does not kill TCP either)

    # again with the same pairs: the reconnected sockets talk to other backends now, nothing is destroyed
    again = term.terminate(with_tcp)
    assert (again.destroyed, again.namespaces, again.errors) == (0, 1, [])
    assert doomed_entries(term) == []
    reconnected_to = [h.steps()[-1]["reply"] for h in on_a]
    assert [h.again()["reply"] for h in on_a] == reconnected_to


def test_a_backend_leaving_one_frontend_keeps_the_sockets_of_another_frontend(
    cluster: Cluster, dp: Datapath, term: sockterm.SocketTerminator
) -> None:
    """pod-a serves two UDP VIPs and leaves one: only that VIP's sockets to pod-a go (the doomed key names the
    frontend). Holders in two client namespaces: each namespace is visited once, whatever its processes."""
    pod_a = cluster.pods[0]
    other_client = cluster.topo.add_client("client-2", node=cluster.node)
    dp.program({f"{VIP4}:53/UDP": pods(cluster, "pod-a"), f"{VIP4_OTHER}:53/UDP": pods(cluster, "pod-a")})
    leaving = [Holder(cluster, "udp", VIP4, 53), Holder(cluster, "udp", VIP4, 53)]
    staying = [Holder(cluster, "udp", VIP4_OTHER, 53)]
    other = cluster.topo.spawn(
        [sys.executable, "-c", HOLDER, "udp", VIP4, "53"],
        netns=other_client,
        cgroup=cluster.cgroup,
        ready="READY",
        label="holder-client-2",
    )

    removed = dp.program(
        {f"{VIP4}:53/UDP": pods(cluster, "pod-b"), f"{VIP4_OTHER}:53/UDP": pods(cluster, "pod-a")}
    ).udp_backends_removed
    assert removed == {parse_key(f"{VIP4}:53/UDP"): {backend(pod_a)}}
    report = term.terminate(removed)

    assert (report.destroyed, report.namespaces, report.errors) == (3, 2, [])
    assert [h.again().get("recv") for h in leaving] == ["ECONNABORTED"] * 2
    assert [h.again()["reply"] for h in staying] == ["pod-a"]
    out, _ = cluster.topo.logs(other)
    assert json.loads(out.splitlines()[0])["reply"] == "pod-a"


# A SocketTerminator in a PID namespace of its own (run under `unshare --pid --fork --mount-proc`), as the
# chart's agent (hostPID: false): the cgroup's processes are pid 0 there. argv: bpffs cgroup object netns-dir
# VIP PORT BACKEND-IP BACKEND-PORT. Terminates the UDP pair twice, with no netns directory, then with
# netns-dir, and prints the two reports as one JSON list; warnings go to stderr.
IN_OWN_PID_NAMESPACE = textwrap.dedent("""
    import ipaddress, json, logging, os, sys
    from pathlib import Path
    from balancing.datapath import sockterm
    from balancing.model.desired import Backend, FrontendKey, Protocol

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    bpffs, cgroup, obj, netns_dir, vip, port, ip, backend_port = sys.argv[1:]
    removed = {
        FrontendKey(ipaddress.ip_address(vip), int(port), Protocol.UDP):
        {Backend(ipaddress.ip_address(ip), int(backend_port))}
    }
    reports = []
    with sockterm.SocketTerminator(Path(bpffs), Path(cgroup), Path(obj), netns_dirs=()) as term:
        assert term.available, term.reason
        for dirs in ((), (Path(netns_dir),)):
            term.netns_dirs = dirs
            r = term.terminate(removed)
            reports.append({"pid": os.getpid(), "namespaces": r.namespaces, "destroyed": r.destroyed,
                            "hidden": r.hidden_processes, "errors": r.errors})
    print(json.dumps(reports))
""")


def processes_in(cgroup: Path) -> int:
    return sum(len((Path(d) / "cgroup.procs").read_text().split()) for d, _, _ in os.walk(cgroup))


def test_in_its_own_pid_namespace_the_terminator_finds_the_client_in_a_netns_directory(
    cluster: Cluster, dp: Datapath, sockterm_object: Path, netns_dir: NetnsDir
) -> None:
    """The chart's agent has its own PID namespace, where every process of its cgroup is pid 0 and
    /proc/0/ns/net does not exist. Without a netns directory nothing is found but its own namespace (the
    reviewed bug: nothing destroyed; now with one warning); with the directory holding the client's
    namespace file (a runtime's cni-<uuid>) the socket is destroyed."""
    dp.program({f"{VIP4}:53/UDP": pods(cluster, "pod-a")})
    holder = Holder(cluster, "udp", VIP4, 53)
    assert holder.first["reply"] == "pod-a"
    netns_dir.add(cluster.client.netns, "cni-3f0c9a52-6d1e-4c7b-9a0e-2b8d5f1c7e44")
    removed = dp.program({f"{VIP4}:53/UDP": pods(cluster, "pod-b")}).udp_backends_removed
    assert removed == {parse_key(f"{VIP4}:53/UDP"): {backend(cluster.pods[0])}}
    hidden = processes_in(cluster.cgroup)
    assert hidden >= 1

    args = [str(dp.bpffs), str(cluster.cgroup), str(sockterm_object), str(netns_dir.path)]
    args += [VIP4, "53", cluster.pods[0].ip4, "8080"]
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", IN_OWN_PID_NAMESPACE, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    blind, with_dir = json.loads(done.stdout)
    assert blind["pid"] == 1  # really a PID namespace of its own
    # its own network namespace only (the test's, where no holder is): the client's is out of sight
    assert (blind["namespaces"], blind["destroyed"], blind["hidden"], blind["errors"]) == (1, 0, hidden, [])
    assert (with_dir["namespaces"], with_dir["destroyed"], with_dir["errors"]) == (2, 1, [])
    warnings = [line for line in done.stderr.splitlines() if "cannot see the processes" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING"), done.stderr  # once per terminator
    assert "hostPID" in warnings[0] and "/run/netns" in warnings[0]
    assert holder.again() == {"step": "again", "send": "EDESTADDRREQ", "recv": "ECONNABORTED"}
    assert holder.reconnect()["reply"] == "pod-b"


def test_a_namespace_found_by_pid_and_in_netns_directories_is_visited_once(
    cluster: Cluster, dp: Datapath, term: sockterm.SocketTerminator, netns_dir: NetnsDir, tmp_path: Path
) -> None:
    """The pids and the directory agree on the client's namespace: one visit. The directory also holds the
    same namespace under a second name, a namespace with no process in the cgroup (visited, nothing to
    destroy there), a file left after its namespace was unmounted and a subdirectory; it is listed twice
    (through a symlink) next to a directory that does not exist."""
    other = cluster.topo.add_client("client-2", node=cluster.node)  # no process: found by the directory only
    dp.program({f"{VIP4}:53/UDP": pods(cluster, "pod-a")})
    holder = Holder(cluster, "udp", VIP4, 53)
    netns_dir.add(cluster.client.netns, "cni-client")
    netns_dir.add(cluster.client.netns, "cni-client-again")
    netns_dir.add(other.netns, "cni-other")
    (netns_dir.path / "cni-stale").touch()
    (netns_dir.path / "subdir").mkdir()
    (tmp_path / "alias").symlink_to(netns_dir.path)
    term.netns_dirs = (netns_dir.path, tmp_path / "alias", tmp_path / "missing")

    errors: list[str] = []
    found = sockterm.discover_namespaces(cluster.cgroup, term.netns_dirs, errors)
    inodes = sorted(found.fds)
    counts = (found.from_pids, found.from_dirs, found.hidden, found.pids_hidden)
    found.close()
    expected = sorted(os.stat(netns_path(h.netns)).st_ino for h in (cluster.client, other))
    assert (inodes, counts, errors) == (expected, (1, 1, 0, False), [])

    removed = dp.program({f"{VIP4}:53/UDP": pods(cluster, "pod-b")}).udp_backends_removed
    report = term.terminate(removed)
    assert (report.namespaces, report.destroyed, report.hidden_processes, report.errors) == (2, 1, 0, [])
    assert holder.again().get("recv") == "ECONNABORTED"


def test_namespace_discovery_deduplicates_by_inode(tmp_path: Path) -> None:
    """Without BPF or other namespaces: a fake cgroup tree and netns directories pointing at this process's
    own namespace. However often and however it is found, it is opened once; pid 0, an exited pid, a stale
    file, another kind of namespace and a missing directory are no errors; nothing stays open."""
    me = os.getpid()
    own = os.stat(f"/proc/{me}/ns/net").st_ino
    nsdir = tmp_path / "netns"
    nsdir.mkdir()
    (nsdir / "cni-self").symlink_to(f"/proc/{me}/ns/net")
    (nsdir / "cni-self-again").symlink_to(f"/proc/{me}/ns/net")
    (nsdir / "cni-uts").symlink_to(f"/proc/{me}/ns/uts")  # a namespace, not a network one
    (nsdir / "cni-stale").touch()
    (tmp_path / "alias").symlink_to(nsdir)
    all_dirs = [nsdir, tmp_path / "alias", tmp_path / "missing"]

    def cgroup(name: str, *procs: str) -> Path:
        path = tmp_path / name
        (path / "pod").mkdir(parents=True)
        (path / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs[:1]))
        (path / "pod" / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs[1:]))
        return path

    gone = str((1 << 22) + 1)  # above the largest pid_max: a process that exited
    cases = [
        # cgroup.procs entries, directories -> inodes, (from_pids, from_dirs, hidden, pids_hidden)
        ((str(me), str(me), gone), all_dirs, [own], (1, 0, 0, False)),
        ((), all_dirs, [own], (0, 1, 0, False)),  # no process: the directories alone
        (("0", "0"), [], [own], (1, 0, 2, True)),  # out of sight: its own namespace at least
        (("0", str(me)), all_dirs, [own], (1, 0, 1, True)),
        ((), [], [], (0, 0, 0, False)),
    ]
    fds_before = len(os.listdir("/proc/self/fd"))
    for n, (procs, dirs, inodes, counts) in enumerate(cases):
        errors: list[str] = []
        found = sockterm.discover_namespaces(cgroup(f"cg{n}", *procs), dirs, errors)
        got = (list(found.fds), (found.from_pids, found.from_dirs, found.hidden, found.pids_hidden), errors)
        found.close()
        assert got == (inodes, counts, []), (procs, dirs)
        assert found.processes == len(procs)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_nothing_doomed_visits_nothing(
    cluster: Cluster, dp: Datapath, term: sockterm.SocketTerminator
) -> None:
    dp.program({f"{VIP4}:53/UDP": pods(cluster, "pod-a"), f"{VIP4}:80/TCP": pods(cluster, "pod-a")})
    holder = Holder(cluster, "udp", VIP4, 53)
    pod_a = backend(cluster.pods[0])

    nothing: list[dict[FrontendKey, set[Backend]]] = [
        {},
        {parse_key(f"{VIP4}:80/TCP"): {pod_a}},  # TCP is never terminated
        {parse_key(f"{VIP4}:53/UDP"): set()},
    ]
    for removed in nothing:
        report = term.terminate(removed)
        assert (report.pairs, report.namespaces, report.destroyed, report.errors) == (0, 0, 0, []), removed
    # a pair no socket uses: every namespace is visited, nothing destroyed
    report = term.terminate({parse_key(f"{VIP4}:53/UDP"): {backend(cluster.pods[2])}})
    assert (report.pairs, report.namespaces, report.destroyed, report.errors) == (1, 1, 0, [])
    assert doomed_entries(term) == []
    assert holder.again()["reply"] == "pod-a"


def test_the_doomed_map_is_emptied_when_a_run_fails(
    cluster: Cluster,
    dp: Datapath,
    term: sockterm.SocketTerminator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    dp.program({f"{VIP4}:53/UDP": pods(cluster, "pod-a")})
    holder = Holder(cluster, "udp", VIP4, 53)
    removed = {parse_key(f"{VIP4}:53/UDP"): {backend(cluster.pods[0])}}
    real = sockterm.discover_namespaces

    def with_a_bogus_namespace(cgroup: Path, dirs: Iterable[Path], errors: list[str]) -> sockterm.Namespaces:
        found = real(cgroup, dirs, errors)
        found.fds = {0: os.open(tmp_path, os.O_RDONLY), **found.fds}  # setns() refuses a directory: EINVAL
        return found

    monkeypatch.setattr(sockterm, "discover_namespaces", with_a_bogus_namespace)
    report = term.terminate(removed)
    assert report.destroyed == 1 and report.namespaces == 1
    assert len(report.errors) == 1 and "network namespace 0" in report.errors[0], report.errors
    assert doomed_entries(term) == []
    assert holder.again().get("recv") == "ECONNABORTED"

    def broken(_link_fd: int) -> bytes:
        raise RuntimeError("reader broke")

    monkeypatch.setattr(sockterm, "discover_namespaces", real)
    monkeypatch.setattr(sockterm, "_read_iterator", broken)
    report = term.terminate(removed)
    assert report.errors == ["socket termination failed: reader broke"]
    assert doomed_entries(term) == []


def test_unavailable_without_its_object_or_a_loaded_datapath(
    cluster: Cluster, dp: Datapath, sockterm_object: Path, bpffs_dir: Path, tmp_path: Path
) -> None:
    removed = {parse_key(f"{VIP4}:53/UDP"): {backend(cluster.pods[0])}}
    for bpffs, obj, why in (
        (dp.bpffs, tmp_path / "missing.o", "not found"),
        (bpffs_dir, sockterm_object, "no datapath pinned"),
        (dp.bpffs, ROOT / "build/bpf/balancing.o", "has no program"),
    ):
        t = sockterm.SocketTerminator(bpffs, cluster.cgroup, obj)
        assert not t.available and why in t.reason, t.reason
        assert t.terminate(removed).skipped == t.reason
    assert not (dp.cfg.map_dir / abi.MAP_DOOMED).exists(), "the terminator pins nothing"


def test_writer_reports_the_udp_backends_a_write_removed() -> None:
    """Per frontend, both tiers: a backend moving to the other tier stays; a removed frontend loses all."""
    owner = Owner("Service", "default", "dns")
    udp, udp2, tcp = (
        parse_key("10.96.0.10:53/UDP"),
        parse_key("10.96.0.11:53/UDP"),
        parse_key("10.96.0.10:53/TCP"),
    )
    b = [Backend(ipaddress.ip_address(f"10.244.1.{i}"), 53) for i in range(1, 5)]
    w = MapWriter(FakeMaps())

    def sync(frontends: dict[FrontendKey, Frontend]) -> dict[FrontendKey, frozenset[Backend]]:
        return w.sync(DesiredState(frontends)).udp_backends_removed

    full = Frontend(owner, (b[0], b[1], b[2]), fallback=(b[3],))
    assert sync({udp: full, udp2: full, tcp: full}) == {}
    assert sync({udp: full, udp2: full, tcp: full}) == {}  # the same objects: nothing looked at
    moved = Frontend(owner, (b[1], b[2]), fallback=(b[0],))  # b0 to the fallback tier, b3 gone
    assert sync({udp: moved, udp2: full, tcp: Frontend(owner, ())}) == {udp: {b[3]}}
    assert sync({udp: moved, udp2: Frontend(owner, (b[0], b[1], b[2]), fallback=(b[3],))}) == {}
    assert w.apply(FrontendChanges(upsert={}, remove=frozenset({udp}))).udp_backends_removed == {
        udp: {b[0], b[1], b[2]}
    }


def test_the_agent_destroys_the_sockets_of_an_endpoint_removed_from_its_service(
    cluster: Cluster, tmp_path: Path, sockterm_object: Path, netns_dir: NetnsDir
) -> None:
    """End to end: an EndpointSlice loses an endpoint; the agent writes the maps, then destroys the connected
    UDP sockets given that endpoint, counts them, and a reconnect lands on the endpoint that stayed. Its
    --netns-dir is the test's (the client's namespace twice over: by pid and by file), not the machine's."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from helpers.support import AgentProcess, endpoint, endpoint_slice, free_port, service, write_manifest

    manifests = tmp_path / "manifests"
    manifests.mkdir()
    pod_a, pod_b = cluster.pods[0], cluster.pods[1]

    def dns(*chosen: Host) -> list[dict[str, Any]]:
        return [
            service("dns", [VIP4], [("dns", 53, "UDP", 8080)]),
            endpoint_slice("dns", [endpoint(p.ip4) for p in chosen], [("dns", 8080, "UDP")]),
        ]

    write_manifest(manifests, "dns.yaml", dns(pod_a))
    metrics_port = free_port()
    netns_dir.add(cluster.client.netns)
    extra = [
        "--metrics-addr",
        f"127.0.0.1:{metrics_port}",
        "--netns-dir",
        f"{netns_dir.path},{tmp_path}/none",
    ]
    agent = AgentProcess(cluster.topo, manifests, cluster.node, extra=extra)
    try:
        agent.start()
        holder = Holder(cluster, "udp", VIP4, 53)
        assert holder.first["reply"] == "pod-a"
        write_manifest(manifests, "dns.yaml", dns(pod_b))

        def terminated() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                families = text_string_to_metric_families(r.read().decode())
                return sum(
                    s.value
                    for f in families
                    for s in f.samples
                    if s.name == "balancing_udp_sockets_terminated_total"
                )

        wait_until(lambda: terminated() == 1, 5.0, "the agent to destroy the socket")
        # one namespace: the directory's copy of the client's is deduplicated, the machine's are not searched
        assert "1 connected sockets destroyed in 1 network namespaces" in agent.stderr()
        assert holder.again() == {"step": "again", "send": "EDESTADDRREQ", "recv": "ECONNABORTED"}
        assert holder.reconnect()["reply"] == "pod-b"
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
