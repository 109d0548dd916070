"""The upgrade from 0.3 on the real kernel: connected sockets keep showing their frontend.

A 0.3 node is simulated by hand, without 0.3's objects: the current datapath is loaded into the test cluster's
node cgroup, then 0.3's leftovers are added beside its pins, a ``bl_sock_v2`` hash (socket cookie -> struct
bl_sock_rev) and a ``links/bl_sock_release`` cgroup link of a trivial ``cgroup/sock_release`` program
compiled here. Client sockets (``CLIENT`` below, in the client namespace and node cgroup) are connected
straight to a pod, so the current programs give them no state, and the test writes legacy entries for their
cookies naming a frontend, as 0.3's connect4/6 would have. Loading the datapath again (the upgrade) must run
``sockmigrate`` before retiring 0.3's hook and map: afterwards getpeername() of those sockets shows the
frontend, UDP socket termination finds them, and nothing of 0.3 is left attached or pinned.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from balancing.datapath import abi, libbpf, loader, sockmigrate, sockterm
from balancing.model.desired import Backend
from balancing_testkit.topology import Cluster
from helpers.support import ROOT, Datapath, parse_key, wait_until

VIP4, VIP6, VIP4_OTHER = "10.96.0.10", "fd00:96::10", "10.96.0.11"
KEEP_PORT = 9090  # pod-a's extra TCP backend that keeps connections open
BPF_MAP_TYPE_HASH = 1
LEGACY_ENTRIES = 4096  # 0.3's --max-sockets: the pin's size, not the declared 262144, is the one reused
LEGACY_SVC_ID = 7
NO_SOCKET = 1 << 62  # a cookie no socket has (an entry 0.3 left behind)
OBJECTS = (ROOT / "build/bpf/sockmigrate.o", ROOT / "build/bpf/sockterm.o")
# What the warning names when the migration object is not usable.
BROKEN = {"missing": "not found", "garbage": "bpf_object__open_file", "another object": "has programs"}

SOCK_RELEASE = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("cgroup/sock_release")
int bl_sock_release(struct bpf_sock *ctx)
{
    return 1;
}
"""

# Connected sockets held for the process's life. argv: a JSON list of [proto, host, port] (or
# ["udp-many", host, port, count]). Prints {"cookies", "peers"} and READY once connected, then
# {"peers"} again on each SIGUSR1 (getpeername() of every socket, or the error's name).
CLIENT = textwrap.dedent("""
    import errno, json, resource, signal, socket, sys
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    for proto, host, port, *count in json.loads(sys.argv[1]):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        for _ in range(count[0] if count else 1):
            s = socket.socket(family, kind)
            s.settimeout(2.0)
            s.connect((host, port))
            socks.append(s)

    def cookie(s):
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")  # SO_COOKIE

    def peer(s):
        try:
            return list(s.getpeername()[:2])
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))

    print(json.dumps({"cookies": [cookie(s) for s in socks], "peers": [peer(s) for s in socks]}), flush=True)
    print("READY", flush=True)
    signals = {signal.SIGUSR1, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    while signal.sigwait(signals) == signal.SIGUSR1:
        print(json.dumps({"peers": [peer(s) for s in socks]}), flush=True)
""")


class Client:
    """A CLIENT process in the cluster's client namespace and node cgroup."""

    def __init__(self, cluster: Cluster, targets: list[list[Any]], timeout: float = 10.0) -> None:
        self.topo = cluster.topo
        self.proc = cluster.topo.spawn(
            [sys.executable, "-c", CLIENT, json.dumps(targets)],
            netns=cluster.client,
            cgroup=cluster.cgroup,
            ready="READY",
            ready_timeout=timeout,
            label="upgrade-client",
        )
        first = self.lines()[0]
        self.cookies: list[int] = first["cookies"]
        self.first_peers: list[Any] = first["peers"]

    def lines(self) -> list[dict[str, Any]]:
        out, _ = self.topo.logs(self.proc)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def peers(self) -> list[Any]:
        """getpeername() of every socket, now."""
        before = len(self.lines())
        os.kill(self.proc.pid, signal.SIGUSR1)
        wait_until(lambda: len(self.lines()) > before, 10.0, "the client's peer names")
        peers: list[Any] = self.lines()[-1]["peers"]
        return peers


@pytest.fixture(scope="module")
def sock_release_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.3's sock_release hook, as far as the upgrade cares: a cgroup/sock_release program named like it."""
    d = tmp_path_factory.mktemp("legacy")
    (d / "release.c").write_text(SOCK_RELEASE)
    arch = subprocess.run(["gcc", "-print-multiarch"], check=True, capture_output=True, text=True).stdout
    cflags = ["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I/usr/include/{arch.strip()}"]
    subprocess.run(["clang", *cflags, "-c", str(d / "release.c"), "-o", str(d / "release.o")], check=True)
    return d / "release.o"


@pytest.fixture(scope="module")
def migration_object() -> Path:
    """``sockmigrate.o`` (and ``sockterm.o``, which a test runs after the upgrade), built if stale."""
    subprocess.run(["make", "-s", "-C", str(ROOT), *(str(p.relative_to(ROOT)) for p in OBJECTS)], check=True)
    return OBJECTS[0]


def legacy_value(frontend: str, backend: str) -> bytes:
    """struct bl_sock_rev as 0.3 wrote it: "VIP:port" -> "backend:port" (v4-mapped, network-order ports)."""
    fk, bk = parse_key(f"{frontend}/TCP"), parse_key(f"{backend}/TCP")
    front = abi.REV_VAL.packer.pack(abi.pack_addr(fk.ip), abi.pack_port(fk.port), 0, LEGACY_SVC_ID)
    return abi.SOCK_REV.packer.pack(front, abi.pack_addr(bk.ip), abi.pack_port(bk.port), 0, 0)


def make_legacy_node(
    dp: Datapath, release_object: Path, entries: dict[int, bytes], capacity: int = LEGACY_ENTRIES
) -> None:
    """0.3's leftovers beside the loaded datapath: its bl_sock_v2 pin holding ``entries`` (cookie -> pair)
    and its sock_release hook attached to the datapath's cgroup, its link pinned as 0.3 pinned it."""
    fd = libbpf.map_create(BPF_MAP_TYPE_HASH, abi.MAP_LEGACY_SOCK_REVERSE, 8, abi.SOCK_REV.size, capacity)
    try:
        libbpf.obj_pin(fd, str(dp.cfg.map_dir / abi.MAP_LEGACY_SOCK_REVERSE))
        if entries:
            keys = b"".join(struct.pack("=Q", c) for c in entries)
            libbpf.map_update_batch(fd, keys, b"".join(entries.values()), len(entries))
    finally:
        os.close(fd)
    obj = libbpf.object_open(str(release_object))
    cg_fd = os.open(dp.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libbpf.object_load(obj)
        prog = next(libbpf.programs(obj))
        link = libbpf.program_attach_cgroup(prog, cg_fd)
        try:
            libbpf.link_pin(link, str(dp.cfg.link_dir / "bl_sock_release"))
        finally:
            libbpf.link_destroy(link)
    finally:
        os.close(cg_fd)
        libbpf.object_close(obj)
    assert attached_names(dp.cgroup, "sock_release") == ["bl_sock_release"]


def attached_names(cgroup: Path, attach_type: str) -> list[str]:
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], check=True, capture_output=True, text=True
    ).stdout
    # bpftool names the attach types "sock_release" or "cgroup_inet_sock_release", depending on its version
    progs = json.loads(out or "[]")
    return [p.get("name", "") for p in progs if str(p.get("attach_type", "")).endswith(attach_type)]


def legacy_left(dp: Datapath) -> list[str]:
    return [
        p.name
        for p in (dp.cfg.map_dir / abi.MAP_LEGACY_SOCK_REVERSE, dp.cfg.link_dir / "bl_sock_release")
        if p.exists()
    ]


def test_sockets_connected_before_the_upgrade_keep_their_frontend(
    cluster: Cluster, dp: Datapath, sock_release_object: Path, migration_object: Path
) -> None:
    """TCP and connected UDP, IPv4 and IPv6: migrated. A socket with no entry, and one with newer state of
    its own, keep what they show; an entry whose socket is gone changes nothing. Then UDP socket termination
    finds the migrated socket by its frontend and backend."""
    pod = cluster.pods[0]
    cluster.topo.start_backend(pod, "pod-a-keep", port=KEEP_PORT, extra_args=["--keep-open", "--no-udp"])
    dp.program({f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"]})
    client = Client(
        cluster,
        [
            ["tcp", pod.ip4, KEEP_PORT],  # 0.3 had translated these from a frontend
            ["tcp", pod.ip6, KEEP_PORT],
            ["udp", pod.ip4, 8080],
            ["udp", pod.ip6, 8080],
            ["tcp", pod.ip4, KEEP_PORT],  # really connected to the pod: no entry
            ["udp", VIP4, 53],  # connected through the current programs: its own (newer) state
        ],
    )
    pod4, pod6 = [pod.ip4, KEEP_PORT], [pod.ip6, KEEP_PORT]
    assert client.first_peers == [pod4, pod6, [pod.ip4, 8080], [pod.ip6, 8080], pod4, [VIP4, 53]]
    c = client.cookies
    make_legacy_node(
        dp,
        sock_release_object,
        {
            c[0]: legacy_value(f"{VIP4}:80", f"{pod.ip4}:{KEEP_PORT}"),
            c[1]: legacy_value(f"[{VIP6}]:80", f"[{pod.ip6}]:{KEEP_PORT}"),
            c[2]: legacy_value(f"{VIP4}:53", f"{pod.ip4}:8080"),
            c[3]: legacy_value(f"[{VIP6}]:53", f"[{pod.ip6}]:8080"),
            c[5]: legacy_value(f"{VIP4_OTHER}:53", f"{pod.ip4}:8080"),
            NO_SOCKET: legacy_value(f"{VIP4}:80", f"{pod.ip4}:{KEEP_PORT}"),
        },
    )
    assert client.peers() == client.first_peers  # the current programs read only socket storage

    report = loader.load(dp.cfg, netns_dirs=())

    assert (report.sockets_migrated, report.warnings) == (4, [])
    assert (
        report.programs_detached == ["bl_sock_release"] and abi.MAP_LEGACY_SOCK_REVERSE in report.maps_retired
    )
    assert "4 sockets migrated" in report.summary()
    assert legacy_left(dp) == [] and attached_names(dp.cgroup, "sock_release") == []
    assert client.peers() == [[VIP4, 80], [VIP6, 80], [VIP4, 53], [VIP6, 53], pod4, [VIP4, 53]]

    # UDP socket termination finds the migrated socket (and the one with its own state) by their pair
    with sockterm.SocketTerminator(dp.bpffs, cluster.cgroup, OBJECTS[1], netns_dirs=()) as t:
        assert t.available, t.reason
        done = t.terminate({parse_key(f"{VIP4}:53/UDP"): {Backend(ipaddress.ip_address(pod.ip4), 8080)}})
    assert (done.destroyed, done.errors) == (2, [])
    peers = client.peers()
    assert peers[:2] == [[VIP4, 80], [VIP6, 80]] and peers[3:5] == [[VIP6, 53], pod4]
    assert peers[2] == peers[5] == "ENOTCONN"  # destroyed: disconnected


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_without_a_usable_migration_object_the_upgrade_only_warns(
    cluster: Cluster, dp: Datapath, sock_release_object: Path, tmp_path: Path, broken: str
) -> None:
    """The datapath loads, 0.3's hook and map are retired all the same; the warning says what was lost."""
    pod = cluster.pods[0]
    client = Client(cluster, [["udp", pod.ip4, 8080]])
    make_legacy_node(
        dp, sock_release_object, {client.cookies[0]: legacy_value(f"{VIP4}:53", f"{pod.ip4}:8080")}
    )
    d = tmp_path / "objects"
    d.mkdir()
    shutil.copy(dp.object_path, d / "balancing.o")
    if broken == "garbage":
        (d / "sockmigrate.o").write_bytes(b"\x7fELF not really")
    elif broken == "another object":
        shutil.copy(ROOT / "build/bpf/sockterm.o", d / "sockmigrate.o")

    report = loader.load(dataclasses.replace(dp.cfg, object_path=d / "balancing.o"), netns_dirs=())

    assert report.sockets_migrated == 0 and len(report.warnings) == 1, report.warnings
    warning = report.warnings[0]
    assert warning.startswith("upgrade from 0.3: the connected sockets of 0.3 (1 recorded) were not migrated")
    assert BROKEN[broken] in warning and "lose their reverse translation" in warning
    assert (
        report.programs_detached == ["bl_sock_release"] and abi.MAP_LEGACY_SOCK_REVERSE in report.maps_retired
    )
    assert legacy_left(dp) == [] and attached_names(dp.cgroup, "sock_release") == []
    assert client.peers() == [[pod.ip4, 8080]]  # lost: it shows the backend


def test_an_empty_legacy_map_loads_nothing(
    cluster: Cluster, dp: Datapath, sock_release_object: Path, tmp_path: Path
) -> None:
    """Nothing recorded: not even the object is needed (here it is missing), and no warning."""
    make_legacy_node(dp, sock_release_object, {})
    d = tmp_path / "objects"
    d.mkdir()
    shutil.copy(dp.object_path, d / "balancing.o")
    report = loader.load(dataclasses.replace(dp.cfg, object_path=d / "balancing.o"))
    assert (report.sockets_migrated, report.warnings, report.programs_detached) == (
        0,
        [],
        ["bl_sock_release"],
    )
    assert legacy_left(dp) == []


def test_many_sockets_are_migrated_at_once(
    cluster: Cluster, dp: Datapath, sock_release_object: Path, migration_object: Path
) -> None:
    """Thousands of connected UDP sockets in one namespace: every one migrated, in well under a second (the
    bound is loose for slow machines; the summary printed says how long it took)."""
    pod, count = cluster.pods[0], 10000
    client = Client(cluster, [["udp-many", pod.ip4, 8080, count]], timeout=60.0)
    value = legacy_value(f"{VIP4}:53", f"{pod.ip4}:8080")
    make_legacy_node(dp, sock_release_object, dict.fromkeys(client.cookies, value), capacity=2 * count)

    start = time.monotonic()
    report = sockmigrate.migrate_legacy_reverse(dp.cfg.map_dir, cluster.cgroup, migration_object, ())
    elapsed = time.monotonic() - start

    assert (report.recorded, report.migrated, report.kept, report.not_found, report.errors) == (
        count,
        count,
        0,
        0,
        [],
    )
    assert report.namespaces >= 1 and report.iterated
    print(f"\n{report.summary()}; {elapsed * 1000:.0f} ms with loading")
    assert elapsed < 5.0, report.summary()
    assert client.peers() == [[VIP4, 53]] * count
    again = sockmigrate.migrate_legacy_reverse(dp.cfg.map_dir, cluster.cgroup, migration_object, ())
    assert (again.migrated, again.kept) == (count, 0)  # a second run finds them migrated, changes nothing
