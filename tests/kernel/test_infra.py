"""The test harness itself, without any BPF program: topology, backend, client, cleanup."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balancing_testkit.topology import (
    BACKEND_PY,
    Cluster,
    HarnessError,
    Leftover,
    Pod,
    Topology,
    in_netns,
    list_leftovers,
    pid_alive,
    sweep_leftovers,
)

FAMILIES = ["4", "6", "mapped"]
PROBE_ENV = "BLT_HARNESS_PROBE"
PROBE_OUT_ENV = "BLT_HARNESS_PROBE_OUT"
REPO = Path(__file__).resolve().parents[2]


def leftovers_with(prefix: str) -> list[Leftover]:
    return [lo for lo in list_leftovers() if lo.name == prefix or lo.name.startswith(prefix + "-")]


def target(cluster: Cluster, pod_index: int, family: str) -> str:
    return cluster.pods[pod_index].ip(family)


def client_ip(cluster: Cluster, family: str) -> str:
    return cluster.client.ip6 if family == "6" else cluster.client.ip4


def cgroup_rel(path: Path, topo: Topology) -> str:
    return "/" + str(path.relative_to(topo.cgroup_root.parent))


# ---------------------------------------------------------------------------------------------- traffic


@pytest.mark.parametrize("family", FAMILIES)
def test_tcp_direct_to_pod(cluster: Cluster, family: str, host_netns_inode: int) -> None:
    topo = cluster.topo
    for i, pod in enumerate(cluster.pods):
        res = topo.run_client(
            cluster.client, None, ["tcp", target(cluster, i, family), 8080, "--family", family, "--count", 3]
        )
        assert res["errors"] == {}, res
        assert res["backends"] == {pod.name: 3}
        assert res["seen_by_backend"] == [client_ip(cluster, family)]
        assert res["peernames"] == [[pod.ip(family), 8080]]
        assert res["latency_us"]["n"] == 3
    # the client ran in the client's netns and in the node cgroup
    assert res["self"]["netns"] != host_netns_inode
    assert res["self"]["cgroup"] == cgroup_rel(cluster.cgroup, topo)


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_unconnected_direct_to_pod(cluster: Cluster, family: str) -> None:
    pod = cluster.pods[1]
    res = cluster.topo.run_client(
        cluster.client, None, ["udp-unconnected", pod.ip(family), 8080, "--family", family, "--count", 5]
    )
    assert res["errors"] == {}, res
    assert res["backends"] == {pod.name: 5}
    assert res["reply_sources"] == [[pod.ip(family), 8080]]
    assert res["seen_by_backend"] == [client_ip(cluster, family)]


@pytest.mark.parametrize("reuse", [False, True], ids=["new-socket", "reuse"])
@pytest.mark.parametrize("family", FAMILIES)
def test_udp_connected_direct_to_pod(cluster: Cluster, family: str, reuse: bool) -> None:
    pod = cluster.pods[2]
    args: list[str | int] = ["udp-connected", pod.ip(family), 8080, "--family", family, "--count", 4]
    res = cluster.topo.run_client(cluster.client, None, args + (["--reuse"] if reuse else []))
    assert res["errors"] == {}, res
    assert res["backends"] == {pod.name: 4}
    assert res["peernames"] == [[pod.ip(family), 8080]]
    assert res["reply_sources"] == [[pod.ip(family), 8080]]


@pytest.mark.parametrize("family", FAMILIES)
def test_getpeername_direct(cluster: Cluster, family: str) -> None:
    pod = cluster.pods[0]
    res = cluster.topo.run_client(
        cluster.client, None, ["getpeername", pod.ip(family), 8080, "--family", family]
    )
    assert res["error"] is None, res
    assert res["peername"] == [pod.ip(family), 8080]
    assert res["sockname"][0] == (
        f"::ffff:{cluster.client.ip4}" if family == "mapped" else client_ip(cluster, family)
    )
    assert res["backend"] == pod.name


VIPS = {"4": "10.96.0.10", "6": "fd00:96::10", "mapped": "10.96.0.10"}


@pytest.mark.parametrize("mode", ["tcp", "udp-unconnected", "udp-connected"])
@pytest.mark.parametrize("family", FAMILIES)
def test_untranslated_vip_fails_fast(cluster: Cluster, family: str, mode: str) -> None:
    res = cluster.topo.run_client(
        cluster.client, None, [mode, VIPS[family], 80, "--family", family, "--count", 5, "--timeout", 5]
    )
    assert res["errors"] == {"EHOSTUNREACH": 5}, res
    assert res["ok"] == 0
    assert res["elapsed_s"] < 0.5  # no timeout: the unreachable route answers at once


def test_other_destinations_do_not_leave(cluster: Cluster) -> None:
    res = cluster.topo.run_client(cluster.client, None, ["tcp", "192.0.2.1", 80, "--timeout", 5])
    assert res["errors"] == {"ENETUNREACH": 1}, res


def test_pod_can_be_a_client_too(cluster: Cluster) -> None:
    topo = cluster.topo
    res = topo.run_client(cluster.pods[0], "node-b", ["tcp", cluster.pods[1].ip4, 8080, "--count", 2])
    assert res["backends"] == {"pod-b": 2}
    assert res["seen_by_backend"] == [cluster.pods[0].ip4]
    assert res["self"]["cgroup"] == cgroup_rel(topo.node_cgroup("node-b"), topo)


def test_client_in_current_netns_to_loopback(topology: Topology, host_netns_inode: int) -> None:
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    topology.spawn(
        [sys.executable, str(BACKEND_PY), "--name", "lo", "--addr", "127.0.0.1", "--port", str(port)],
        ready="READY",
    )
    res = topology.run_client(None, None, ["tcp", "127.0.0.1", port, "--count", 2])
    assert res["backends"] == {"lo": 2}, res
    assert res["self"]["netns"] == host_netns_inode
    assert res["self"]["cgroup"] == Path("/proc/self/cgroup").read_text().split("0::", 1)[1].split()[0]


def test_dual_stack_backend_reports_plain_ipv4(topology: Topology) -> None:
    pod = topology.add_pod("pod-a")
    client = topology.add_client()
    topology.start_backend(pod, port=9000, extra_args=["--addr", "::"])
    for family in FAMILIES:
        res = topology.run_client(client, None, ["tcp", pod.ip(family), 9000, "--family", family])
        assert res["seen_by_backend"] == [client.ip6 if family == "6" else client.ip4], res
        res = topology.run_client(client, None, ["udp-unconnected", pod.ip(family), 9000, "--family", family])
        assert res["backends"] == {"pod-a": 1}, res


def test_backend_keep_open_and_in_netns(topology: Topology, host_netns_inode: int) -> None:
    pod = topology.add_pod("pod-a")
    client = topology.add_client()
    topology.start_backend(pod, port=8081, extra_args=["--keep-open"])
    with in_netns(client.netns):
        sock = socket.create_connection((pod.ip4, 8081), timeout=2)
    with sock:
        assert sock.recv(100) == f"pod-a {client.ip4} {sock.getsockname()[1]}\n".encode()
        sock.sendall(b"hello")
        assert sock.recv(100) == b"hello"
    assert os.stat("/proc/thread-self/ns/net").st_ino == host_netns_inode  # in_netns switched back


def test_loop_client_counts_errors(cluster: Cluster) -> None:
    topo = cluster.topo
    proc = topo.spawn_client(cluster.client, None, ["loop", cluster.pods[0].ip4, 8080, "--timeout", 1])
    time.sleep(0.3)
    topo.stop(topo.backends["pod-a"])  # the backend goes away: ECONNREFUSED from now on
    time.sleep(0.2)
    res = topo.finish_client(proc)
    assert res["mode"] == "loop"
    assert res["backends"].get("pod-a", 0) > 10, res
    # connections still queued in the dying listener are reset: allow that for the switch-over
    assert "ECONNREFUSED" in res["errors"], res
    assert set(res["errors"]) <= {"ECONNREFUSED", "recv:ECONNRESET", "recv:EOF"}, res
    assert res["error_timeline"][-1][1] == "ECONNREFUSED"
    assert res["ok"] + res["failed"] == res["attempts"]


def test_loop_client_duration(cluster: Cluster) -> None:
    res = cluster.topo.run_client(
        cluster.client, None, ["loop", cluster.pods[1].ip6, 8080, "--proto", "udp", "--duration", "0.3"]
    )
    assert res["errors"] == {}, res
    assert res["backends"]["pod-b"] == res["attempts"] > 10
    assert 0.25 < res["duration_s"] < 2


def test_client_failure_message_has_stderr(topology: Topology) -> None:
    with pytest.raises(HarnessError, match="needs an IPv4"):
        topology.run_client(None, None, ["tcp", "fd00::1", 80, "--family", "4"])


def test_backend_start_failure_message(topology: Topology) -> None:
    pod = topology.add_pod("pod-a")
    topology.start_backend(pod, port=8080)
    with pytest.raises(
        HarnessError, match=r"(?s)exited with 1 before printing 'READY'.*Address already in use"
    ):
        topology.start_backend(pod, name="again", port=8080)


def test_sysctl_is_per_netns(topology: Topology) -> None:
    client = topology.add_client()
    before = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    topology.sysctl(client, "net.ipv4.ip_local_port_range", "20000 20100")
    out = topology.run(["cat", "/proc/sys/net/ipv4/ip_local_port_range"], netns=client).stdout
    assert out.split() == ["20000", "20100"]
    assert Path("/proc/sys/net/ipv4/ip_local_port_range").read_text() == before


def test_cgroup_and_bpffs_fixtures(cgroup_dir: Path, bpffs_dir: Path, topology: Topology) -> None:
    assert cgroup_dir.parent == topology.cgroup_root.parent
    assert (cgroup_dir / "cgroup.procs").exists()
    assert bpffs_dir.parent == topology.bpffs.parent == Path("/sys/fs/bpf")
    res = topology.run(["cat", "/proc/self/cgroup"], cgroup=cgroup_dir)
    assert f"0::/{cgroup_dir.name}\n" in res.stdout


# ---------------------------------------------------------------------------------------------- cleanup

_BPF_NR = {"x86_64": 321, "aarch64": 280}


def pin_array_map(path: Path) -> None:
    """Create a tiny BPF array map (no program) and pin it at `path`, to exercise unpinning at teardown."""
    nr = _BPF_NR.get(platform.machine())
    if nr is None:
        pytest.skip("bpf syscall number unknown on this arch")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 128)()
    ctypes.memmove(attr, (ctypes.c_uint32 * 4)(2, 4, 8, 1), 16)  # BPF_MAP_TYPE_ARRAY, key 4, value 8, 1 entry
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(0), attr, ctypes.c_uint(128))  # BPF_MAP_CREATE
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        name = ctypes.create_string_buffer(str(path).encode())
        pin = (ctypes.c_uint8 * 128)()
        ctypes.memmove(pin, ctypes.byref(ctypes.c_uint64(ctypes.addressof(name))), 8)
        ctypes.memmove(ctypes.addressof(pin) + 8, ctypes.byref(ctypes.c_uint32(fd)), 4)
        rc = libc.syscall(ctypes.c_long(nr), ctypes.c_int(6), pin, ctypes.c_uint(128))  # BPF_OBJ_PIN
        assert rc == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


def populate(topo: Topology) -> tuple[list[int], Path]:
    """Pods, client, backends, escaped processes and pinned objects; returns the escaped pids."""
    pod = topo.add_pod("pod-a", node="node-a")
    client = topo.add_client("client", node="node-b")
    topo.start_backend(pod)
    topo.spawn([sys.executable, "-c", "import time; time.sleep(300)"], netns=client, cgroup="node-b")
    escaped: list[int] = []
    # escapees: in the pod netns only, in the node cgroup only, in neither (only in the process group)
    netns_cgroup: list[tuple[Pod | None, str | None]] = [(pod, None), (None, "node-a"), (None, None)]
    for netns, cgroup in netns_cgroup:
        proc = topo.spawn(
            ["sh", "-c", "sleep 300 </dev/null >/dev/null 2>&1 & echo $!; echo READY"],
            netns=netns,
            cgroup=cgroup,
            ready="READY",
        )
        escaped.append(int(topo.logs(proc)[0].split()[0]))
    pin_dir = topo.bpffs / "maps" / "deeper"
    pin_dir.mkdir(parents=True)
    pin_array_map(pin_dir / "some_map")
    pin_array_map(topo.bpffs / "top_map")
    for pid in escaped:
        assert pid_alive(pid)
    return escaped, pin_dir


def assert_all_gone(prefix: str, pids: list[int]) -> None:
    assert leftovers_with(prefix) == []
    assert not any(p.name.startswith(prefix) for p in Path("/run/netns").iterdir())
    for pid in pids:
        deadline = time.monotonic() + 2
        while pid_alive(pid) and time.monotonic() < deadline:  # zombies are reaped by init
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                break
            time.sleep(0.01)
        else:
            assert not pid_alive(pid), f"escaped process {pid} survived teardown"


def test_teardown_removes_everything() -> None:
    with Topology() as topo:
        prefix = topo.prefix
        escaped, pin_dir = populate(topo)
        assert len(leftovers_with(prefix)) == 6  # fabric, pod, client netns; cgroup; bpffs; logs
        assert (pin_dir / "some_map").exists()
    assert_all_gone(prefix, escaped)


def test_teardown_when_body_raises() -> None:
    escaped: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), Topology() as topo:
        prefix = topo.prefix
        escaped, _ = populate(topo)
        raise RuntimeError("boom")
    assert_all_gone(prefix, escaped)


def test_setup_failure_cleans_up() -> None:
    with Topology() as topo:
        prefix = topo.prefix
        topo.add_pod("pod-a")
        with pytest.raises(ValueError, match="already used"):
            topo.add_pod("pod-a")
    assert leftovers_with(prefix) == []
    with pytest.raises(ValueError, match="prefix"):
        Topology(prefix="not-ours")


def run_probe(probe: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **{PROBE_ENV: probe, PROBE_OUT_ENV: str(out)})
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"{__file__}::test_probe_{probe}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_fixture_teardown_after_failing_test(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    cp = run_probe("fail", out)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "probe failure" in cp.stdout
    assert "harness diagnostics" in cp.stdout  # the fixture printed its diagnostics for the failed test
    info = json.loads(out.read_text())
    assert_all_gone(info["prefix"], info["escaped"])


def test_sweep_after_killed_session(tmp_path: Path, topology: Topology) -> None:
    out = tmp_path / "probe.json"
    cp = run_probe("sigkill", out)
    assert cp.returncode == -signal.SIGKILL, cp.stdout + cp.stderr
    info = json.loads(out.read_text())
    assert not pid_alive(info["pid"])
    assert {lo.kind for lo in leftovers_with(info["prefix"])} == {"netns", "cgroup", "bpffs", "tmp"}
    removed = sweep_leftovers()  # what a new session does first
    assert info["prefix"] in {lo.name for lo in removed}
    assert_all_gone(info["prefix"], info["escaped"])
    # live sessions (this one) are left alone
    assert {lo.kind for lo in leftovers_with(topology.prefix)} >= {"netns", "cgroup", "bpffs"}


@pytest.mark.skipif(os.environ.get(PROBE_ENV) != "fail", reason="probe, run by test_fixture_teardown_...")
def test_probe_fail(topology: Topology) -> None:
    escaped, _ = populate(topology)
    Path(os.environ[PROBE_OUT_ENV]).write_text(json.dumps({"prefix": topology.prefix, "escaped": escaped}))
    raise AssertionError("probe failure")


@pytest.mark.skipif(os.environ.get(PROBE_ENV) != "sigkill", reason="probe, run by test_sweep_after_...")
def test_probe_sigkill(topology: Topology) -> None:
    escaped, _ = populate(topology)
    Path(os.environ[PROBE_OUT_ENV]).write_text(
        json.dumps({"prefix": topology.prefix, "escaped": escaped, "pid": os.getpid()})
    )
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- timing


def test_setup_time_three_pods_one_client(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    with Topology() as topo:
        pods = [topo.add_pod(f"pod-{c}") for c in "abc"]
        topo.add_client("client", node="node-a")
        t_net = time.perf_counter() - t0
        topo.start_backends(pods)
        t_all = time.perf_counter() - t0
        t1 = time.perf_counter()
    t_down = time.perf_counter() - t1
    with capsys.disabled():
        print(
            f"\n[harness] 3 pods + 1 client: network {t_net * 1e3:.0f} ms, with 3 backends ready "
            f"{t_all * 1e3:.0f} ms, teardown {t_down * 1e3:.0f} ms"
        )
    assert t_all < 10
