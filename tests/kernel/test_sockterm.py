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
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, Datapath, parse_key, wait_until

from balancing.datapath import abi, libbpf, sockterm
from balancing.datapath.maps import FakeMaps
from balancing.datapath.writer import MapWriter
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendChanges, FrontendKey, Owner
from helpers.topology import Cluster, Host

OBJECT = ROOT / "build/bpf/sockterm.o"
VIP4, VIP6, VIP4_OTHER = "10.96.0.10", "fd00:96::10", "10.96.0.11"
KEEP_PORT = 9090  # pod-a's extra TCP backend that keeps connections open (echo)

# One socket held for the process's life. argv: udp|tcp HOST PORT. Prints a JSON line per step, READY after
# the first: {"step", "connect"?, "hello"? (tcp: the backend's line), "send"?, "recv"? (errno names),
# "reply"? (the first word of the answer: the backend's name, or tcp's echo)}.
HOLDER = textwrap.dedent("""
    import errno, json, signal, socket, sys
    proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    target = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    sock.settimeout(1.0)

    def name(exc):
        return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__

    def step(what, connect):
        out = {"step": what}
        if connect:
            try:
                sock.connect(target)
                if proto == "tcp":
                    out["hello"] = sock.recv(256).decode().split()[0]
            except OSError as exc:
                out["connect"] = name(exc)
        try:
            sock.send(b"ping\\n")
        except OSError as exc:
            out["send"] = name(exc)
        try:
            data = sock.recv(256)
            out["reply"] = data.decode().split()[0] if data else "EOF"
        except OSError as exc:
            out["recv"] = name(exc)
        print(json.dumps(out), flush=True)

    signals = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    step("connect", True)
    print("READY", flush=True)
    while (sig := signal.sigwait(signals)) != signal.SIGTERM:
        step("again" if sig == signal.SIGUSR1 else "reconnect", sig == signal.SIGUSR2)
""")


class Holder:
    """A HOLDER process in the cluster's client namespace and node cgroup."""

    def __init__(self, cluster: Cluster, proto: str, host: str, port: int) -> None:
        self.topo = cluster.topo
        self.proc = cluster.topo.spawn(
            [sys.executable, "-c", HOLDER, proto, host, str(port)],
            netns=cluster.client,
            cgroup=cluster.cgroup,
            ready="READY",
            label=f"holder-{proto}-{host}",
        )

    def steps(self) -> list[dict[str, Any]]:
        out, _ = self.topo.logs(self.proc)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    @property
    def first(self) -> dict[str, Any]:
        return self.steps()[0]

    def step(self, sig: int = signal.SIGUSR1) -> dict[str, Any]:
        before = len(self.steps())
        os.kill(self.proc.pid, sig)
        wait_until(lambda: len(self.steps()) > before, 5.0, "the holder's next step")
        return self.steps()[-1]

    def again(self) -> dict[str, Any]:
        """One more exchange on the same socket."""
        return self.step(signal.SIGUSR1)

    def reconnect(self) -> dict[str, Any]:
        """connect() the same socket again, then exchange."""
        return self.step(signal.SIGUSR2)


@pytest.fixture(scope="module")
def sockterm_object() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT), "build/bpf/sockterm.o"], check=True)
    return OBJECT


@pytest.fixture
def term(cluster: Cluster, dp: Datapath, sockterm_object: Path) -> Iterator[sockterm.SocketTerminator]:
    with sockterm.SocketTerminator(dp.bpffs, cluster.cgroup, sockterm_object) as t:
        assert t.available, t.reason
        yield t


def doomed_entries(dp: Datapath) -> list[bytes]:
    fd = libbpf.obj_get(str(dp.cfg.map_dir / abi.MAP_DOOMED))
    try:
        return libbpf.map_keys(fd, abi.DOOM_KEY.size)
    finally:
        os.close(fd)


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
    assert doomed_entries(dp) == []
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
    assert doomed_entries(dp) == []
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
    assert doomed_entries(dp) == []
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
    real = sockterm.cgroup_namespaces

    def with_a_bogus_namespace(cgroup: Path, errors: list[str]) -> dict[int, int]:
        found = {0: os.open(tmp_path, os.O_RDONLY)}  # setns() refuses a directory: EINVAL
        found.update(real(cgroup, errors))
        return found

    monkeypatch.setattr(sockterm, "cgroup_namespaces", with_a_bogus_namespace)
    report = term.terminate(removed)
    assert report.destroyed == 1 and report.namespaces == 1
    assert len(report.errors) == 1 and "network namespace 0" in report.errors[0], report.errors
    assert doomed_entries(dp) == []
    assert holder.again().get("recv") == "ECONNABORTED"

    def broken(_link_fd: int) -> bytes:
        raise RuntimeError("reader broke")

    monkeypatch.setattr(sockterm, "cgroup_namespaces", real)
    monkeypatch.setattr(sockterm, "_read_iterator", broken)
    report = term.terminate(removed)
    assert report.errors == ["socket termination failed: reader broke"]
    assert doomed_entries(dp) == []


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
    assert not (dp.cfg.map_dir / abi.MAP_DOOMED).exists()


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
    cluster: Cluster, tmp_path: Path, sockterm_object: Path
) -> None:
    """End to end: an EndpointSlice loses an endpoint; the agent writes the maps, then destroys the connected
    UDP sockets given that endpoint, counts them, and a reconnect lands on the endpoint that stayed."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from support import AgentProcess, endpoint, endpoint_slice, free_port, service, write_manifest

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
    agent = AgentProcess(
        cluster.topo, manifests, cluster.node, extra=["--metrics-addr", f"127.0.0.1:{metrics_port}"]
    )
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
        assert holder.again() == {"step": "again", "send": "EDESTADDRREQ", "recv": "ECONNABORTED"}
        assert holder.reconnect()["reply"] == "pod-b"
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
