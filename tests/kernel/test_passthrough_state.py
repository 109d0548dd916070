"""Pass-through sockets leave no state behind: connections to anything that is not a frontend are untouched.

With a frontend programmed, clients in the node cgroup talk straight to the pods (TCP over IPv4 and IPv6,
connected and unconnected UDP, getpeername): the hooks run for those sockets, and afterwards the shared
per-socket maps (unconnected-UDP reverse map, session affinity) and the resolution counters hold nothing for
them, and not even a socket cookie was generated for them. A connected socket keeps its reverse translation
in its own socket storage (``bl_sks_v1``), which cannot be dumped by key but which a process can look up
with its own socket's fd: translated sockets, interleaved with pass-through ones, hold exactly their frontend
and backend, pass-through ones have none. No hook runs at close (the kernel frees the storage with the
socket), so a pass-through TCP socket runs one program in its whole life, counted with the kernel's BPF run
statistics.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from balancing.datapath import abi, libbpf, maps
from balancing_testkit.topology import Cluster
from helpers.support import SOCKET_PROGRAMS, Datapath, parse_key

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
STATE_MAPS = ["bl_rev_v1", "bl_stats_v1", "bl_aff_v1"]
SO_COOKIE = 57


def client(cluster: Cluster, *args: object) -> dict[str, Any]:
    return cluster.topo.run_client(cluster.client, None, [str(a) for a in args])


def entries(dp: Datapath) -> dict[str, int]:
    io = maps.KernelMaps(dp.cfg.map_dir, names=STATE_MAPS)
    try:
        return {name: len(io.items(name)) for name in STATE_MAPS}
    finally:
        io.close()


def test_pass_through_sockets_leave_no_entries(cluster: Cluster, dp: Datapath) -> None:
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:80/TCP": [f"{pod.ip4}:8080"], f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"]})
    assert client(cluster, "tcp", pod.ip4, 8080, "--count", 100)["ok"] == 100
    assert client(cluster, "tcp", pod.ip6, 8080, "--count", 30, "--family", 6)["ok"] == 30
    assert client(cluster, "tcp", pod.ip4, 8080, "--count", 30, "--family", "mapped")["ok"] == 30
    assert client(cluster, "getpeername", pod.ip4, 8080, "--count", 20)["peernames"] == [[pod.ip4, 8080]]
    udp = client(cluster, "udp-unconnected", pod.ip4, 8080, "--count", 50)
    assert udp["ok"] == 50 and udp["reply_sources"] == [[pod.ip4, 8080]]
    assert client(cluster, "udp-connected", pod.ip4, 8080, "--count", 30)["ok"] == 30
    assert entries(dp) == dict.fromkeys(STATE_MAPS, 0)


# Run in the client's netns and cgroup: connects one socket per case (name, tcp|udp, 4|6|mapped, host, port),
# then looks each one's socket storage up by its fd (the pinned map opened by path) and reads its cookie.
# Pinned to one CPU, a socket whose cookie is first asked for after a fresh socket's has the larger one: a
# socket with the smaller one had its cookie generated before (by the hooks).
STORAGE_PROBE = textwrap.dedent(
    """
    import json, os, socket, struct, sys
    from balancing.datapath import abi, libbpf

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pin, cases = sys.argv[1], json.loads(sys.argv[2])
    storage_fd = libbpf.obj_get(pin)

    def cookie(s):
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")  # SO_COOKIE

    def endpoint(addr, port):
        return [str(abi.unpack_addr(addr)), abi.unpack_port(port)]

    def storage(s):
        raw = libbpf.map_lookup(storage_fd, struct.pack("=i", s.fileno()), abi.SOCK_REV.size)
        if raw is None:  # ENOENT: the socket has no storage in this map
            return None
        front, backend, backend_port, _pad, _pad2 = abi.SOCK_REV.packer.unpack(raw)
        addr, port, _pad, svc_id = abi.REV_VAL.packer.unpack(front)
        backend = endpoint(backend, backend_port)
        return {"frontend": endpoint(addr, port), "backend": backend, "svc_id": svc_id}

    sockets = {}
    for name, kind, family, host, port in cases:
        af = socket.AF_INET if family == "4" else socket.AF_INET6
        s = socket.socket(af, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect((f"::ffff:{host}" if family == "mapped" else host, port))
        sockets[name] = s
    found = {name: storage(s) for name, s in sockets.items()}
    fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fresh_cookie = cookie(fresh)
    print(json.dumps({
        "storage": found,
        "cookie_before_fresh": {name: cookie(s) < fresh_cookie for name, s in sockets.items()},
    }))
    """
)


def probe_storage(cluster: Cluster, dp: Datapath, cases: list[tuple[str, str, str, str, int]]) -> Any:
    pin = dp.cfg.map_dir / abi.MAP_SOCK_REVERSE
    argv = [sys.executable, "-c", STORAGE_PROBE, str(pin), json.dumps(cases)]
    return json.loads(cluster.topo.run(argv, netns=cluster.client, cgroup=cluster.cgroup).stdout)


def svc_id(dp: Datapath, frontend: str) -> int:
    """The identity the writer gave a frontend ("10.96.0.10:80/TCP"): its primary tier's master entry."""
    key = parse_key(frontend)
    master = abi.svc_key(key.ip, key.port, key.protocol, abi.MASTER_SLOT).pack()
    return abi.SvcVal.unpack(dict(dp.io.items(abi.MAP_SERVICES))[master]).svc_id


def test_translated_connected_sockets_hold_their_reverse_state_in_socket_storage(
    cluster: Cluster, dp: Datapath
) -> None:
    """Each translated connected socket (TCP, UDP; IPv4, IPv6, v4-mapped) has storage naming the frontend it
    connected to, the backend it went to and the frontend's identity; a socket connected straight to a pod has
    none, and no cookie either (a translated UDP socket got one at connect: recvmsg relies on that)."""
    pod = cluster.pods[0]
    frontends = {
        f"{VIP4}:80/TCP": [f"{pod.ip4}:8080"],
        f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"],
        f"[{VIP6}]:80/TCP": [f"[{pod.ip6}]:8080"],
        f"[{VIP6}]:53/UDP": [f"[{pod.ip6}]:8080"],
    }
    dp.program(frontends)
    translated = {
        "tcp4": ("tcp", "4", VIP4, 80, f"{VIP4}:80/TCP", pod.ip4),
        "tcp6": ("tcp", "6", VIP6, 80, f"[{VIP6}]:80/TCP", pod.ip6),
        "tcp-mapped": ("tcp", "mapped", VIP4, 80, f"{VIP4}:80/TCP", pod.ip4),
        "udp4": ("udp", "4", VIP4, 53, f"{VIP4}:53/UDP", pod.ip4),
        "udp6": ("udp", "6", VIP6, 53, f"[{VIP6}]:53/UDP", pod.ip6),
        "udp-mapped": ("udp", "mapped", VIP4, 53, f"{VIP4}:53/UDP", pod.ip4),
    }
    passed = {
        "tcp4-pod": ("tcp", "4", pod.ip4, 8080),
        "tcp6-pod": ("tcp", "6", pod.ip6, 8080),
        "tcp-mapped-pod": ("tcp", "mapped", pod.ip4, 8080),
        "udp4-pod": ("udp", "4", pod.ip4, 8080),
        "udp6-pod": ("udp", "6", pod.ip6, 8080),
    }
    cases = [(n, k, f, h, p) for n, (k, f, h, p, _fe, _be) in translated.items()]
    cases += [(n, k, f, h, p) for n, (k, f, h, p) in passed.items()]
    for order in (cases, cases[::-1]):  # interleaved both ways: no socket's state depends on another's
        got = probe_storage(cluster, dp, order)
        for name, (kind, _family, host, port, frontend, backend) in translated.items():
            want = {"frontend": [host, port], "backend": [backend, 8080], "svc_id": svc_id(dp, frontend)}
            assert got["storage"][name] == want, name
            if kind == "udp":
                assert got["cookie_before_fresh"][name], f"{name}: a translated UDP socket has a cookie"
        for name in passed:
            assert got["storage"][name] is None, f"{name}: a pass-through socket has storage"
            assert not got["cookie_before_fresh"][name], f"{name}: a cookie was generated"
    assert entries(dp)["bl_rev_v1"] == 0  # connected sockets keep nothing in the shared reverse map


def _bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def attached(cgroup: Path) -> dict[str, tuple[str, int]]:
    """The programs attached to ``cgroup``: name -> (attach type, program id)."""
    return {p["name"]: (p["attach_type"], int(p["id"])) for p in _bpftool("cgroup", "show", str(cgroup))}


def run_counts(cgroup: Path) -> dict[str, int]:
    """How many times each program attached to ``cgroup`` ran (needs the run statistics on)."""
    return {
        name: int(_bpftool("prog", "show", "id", str(prog_id)).get("run_cnt", 0))
        for name, (_type, prog_id) in attached(cgroup).items()
    }


@contextlib.contextmanager
def bpf_run_stats() -> Iterator[None]:
    """The kernel's BPF run statistics, on while the fd BPF_ENABLE_STATS returns is open (it counts with, and
    does not change, the kernel.bpf_stats_enabled sysctl)."""
    enable_stats = ctypes.CDLL(libbpf.LIBRARY, use_errno=True).bpf_enable_stats
    fd = enable_stats(0)  # BPF_STATS_RUN_TIME
    assert fd >= 0, f"bpf_enable_stats: {os.strerror(-fd)}"
    try:
        yield
    finally:
        os.close(fd)


def test_a_pass_through_socket_runs_one_program_in_its_life(cluster: Cluster, dp: Datapath) -> None:
    """There is no sock_release hook (the kernel frees socket storage with the socket), so a TCP socket that
    connects to a pod, reads its answer and closes runs connect4 once and nothing else, even when the
    application asked for its cookie."""
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:80/TCP": [f"{pod.ip4}:8080"]})
    hooks = attached(cluster.cgroup)
    assert sorted(hooks) == SOCKET_PROGRAMS, hooks
    assert not any("release" in attach_type for attach_type, _id in hooks.values()), hooks
    script = textwrap.dedent(
        f"""
        import socket
        for i in range(20):
            s = socket.create_connection(({pod.ip4!r}, 8080), timeout=2)
            assert s.recv(256)
            if i % 2:
                assert int.from_bytes(s.getsockopt(socket.SOL_SOCKET, {SO_COOKIE}, 8), "little")
            s.close()
        """
    )
    with bpf_run_stats():
        before = run_counts(cluster.cgroup)
        cluster.topo.run([sys.executable, "-c", script], netns=cluster.client, cgroup=cluster.cgroup)
        after = run_counts(cluster.cgroup)
    runs = {name: after[name] - before[name] for name in SOCKET_PROGRAMS}
    assert runs == {**dict.fromkeys(SOCKET_PROGRAMS, 0), "bl_connect4": 20}, runs


def test_translated_and_pass_through_sockets_interleaved(cluster: Cluster, dp: Datapath) -> None:
    """Translated sockets keep working (getpeername shows the VIP) beside pass-through ones, and leave
    nothing in the shared maps but their counters (their own storage goes with them)."""
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:80/TCP": [f"{pod.ip4}:8080"], f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"]})
    for _ in range(3):
        assert client(cluster, "tcp", VIP4, 80, "--count", 30)["peernames"] == [[VIP4, 80]]
        assert client(cluster, "tcp", pod.ip4, 8080, "--count", 30)["peernames"] == [[pod.ip4, 8080]]
        assert client(cluster, "udp-connected", VIP4, 53, "--count", 10)["peernames"] == [[VIP4, 53]]
    left = entries(dp)
    assert left["bl_rev_v1"] == 0 and left["bl_aff_v1"] == 0  # connected sockets: nothing shared
    assert left["bl_stats_v1"] > 0  # the translations were counted (the pass-through ones were not)


def test_receiving_on_a_pass_through_socket_generates_no_cookie(cluster: Cluster, dp: Datapath) -> None:
    """recvmsg4/getpeername4 of a socket that was never translated read its cookie without generating one:
    cookies are handed out in increasing order on a CPU, so a socket whose cookie is first asked for after
    another's has the larger one. Pinned to one CPU, a pass-through UDP socket that sent, received and asked
    its peer's name still gets its cookie only when the test asks (after a fresh socket's); a socket sent
    through the VIP (translated: its cookie made at sendmsg) has the smaller one."""
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"]})
    script = textwrap.dedent(
        f"""
        import json, os, socket
        os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})

        def cookie(s):
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")  # SO_COOKIE

        def exchanged(dest):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(b"x", dest)
            s.recvfrom(2048)
            s.connect(dest)
            s.getpeername()
            return s

        passed = exchanged(({pod.ip4!r}, 8080))
        translated = exchanged(({VIP4!r}, 53))
        fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        later = cookie(fresh)
        print(json.dumps({{"passed": cookie(passed), "translated": cookie(translated), "fresh": later}}))
        """
    )
    out = cluster.topo.run([sys.executable, "-c", script], netns=cluster.client, cgroup=cluster.cgroup)
    cookies = json.loads(out.stdout)
    assert cookies["translated"] < cookies["fresh"] < cookies["passed"], cookies
