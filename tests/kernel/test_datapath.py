"""The BPF datapath on the real kernel: programs loaded into a test cgroup, real TCP/UDP between namespaces.

Each test programs the maps with the real writer (no agent) and checks what clients in the node's cgroup
experience: spread, stickiness, reverse translation, refusal, make-before-break under load, atomic upgrade.
A connected socket's reverse translation is in its own socket storage, which a process in the cgroup looks
up with the socket's fd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from balancing import errors
from balancing.datapath import abi, loader, writer
from balancing.model.desired import BackendPod, Frontend, Owner, PodRef
from balancing_testkit.topology import Cluster, Host
from helpers.support import (
    ROOT,
    SMALL_MAPS,
    SOCKET_PROGRAMS,
    Datapath,
    backends_of,
    parse_key,
    programmed_frontends,
)

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"


def backends4(cluster: Cluster, port: int = 8080) -> list[str]:
    return [f"{p.ip4}:{port}" for p in cluster.pods]


def backends6(cluster: Cluster, port: int = 8080) -> list[str]:
    return [f"[{p.ip6}]:{port}" for p in cluster.pods]


def client(cluster: Cluster, *args: object) -> dict[str, Any]:
    return cluster.topo.run_client(cluster.client, None, [str(a) for a in args])


def test_tcp_spreads_over_three_backends_without_snat(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)})
    res = client(cluster, "tcp", VIP4, 80, "--count", 300)
    assert res["errors"] == {}
    assert set(res["backends"]) == {"pod-a", "pod-b", "pod-c"}
    assert min(res["backends"].values()) > 50, res["backends"]  # random per connect: roughly even
    assert res["seen_by_backend"] == [cluster.client.ip4]  # the backend sees the real client address


def test_getpeername_shows_the_vip(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster), f"[{VIP6}]:80/TCP": backends6(cluster)})
    assert client(cluster, "tcp", VIP4, 80, "--count", 20)["peernames"] == [[VIP4, 80]]
    assert client(cluster, "tcp", VIP6, 80, "--count", 20, "--family", 6)["peernames"] == [[VIP6, 80]]


def test_unconnected_udp_sticks_to_one_backend_and_replies_come_from_the_vip(
    cluster: Cluster, dp: Datapath
) -> None:
    dp.program({f"{VIP4}:53/UDP": backends4(cluster), f"[{VIP6}]:53/UDP": backends6(cluster)})
    res = client(cluster, "udp-unconnected", VIP4, 53, "--count", 50)
    assert res["errors"] == {} and res["ok"] == 50
    assert len(res["backends"]) == 1, "every datagram of one socket reaches the same backend"
    assert res["reply_sources"] == [[VIP4, 53]]
    res6 = client(cluster, "udp-unconnected", VIP6, 53, "--count", 20, "--family", 6)
    assert len(res6["backends"]) == 1 and res6["reply_sources"] == [[VIP6, 53]]
    # different sockets spread: 30 separate one-datagram clients reach more than one backend
    seen = {
        next(iter(client(cluster, "udp-unconnected", VIP4, 53, "--count", 1)["backends"])) for _ in range(12)
    }
    assert len(seen) > 1


def test_connected_udp_spreads_and_shows_the_vip(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:53/UDP": backends4(cluster)})
    res = client(cluster, "udp-connected", VIP4, 53, "--count", 60)
    assert res["errors"] == {} and res["ok"] == 60
    assert len(res["backends"]) > 1
    assert res["peernames"] == [[VIP4, 53]]


def test_v4_mapped_sockets_are_translated_both_ways(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster), f"{VIP4}:53/UDP": backends4(cluster)})
    tcp = client(cluster, "tcp", VIP4, 80, "--count", 60, "--family", "mapped")
    assert tcp["errors"] == {} and len(tcp["backends"]) == 3
    assert tcp["peernames"] == [[f"::ffff:{VIP4}", 80]]
    udp = client(cluster, "udp-unconnected", VIP4, 53, "--count", 10, "--family", "mapped")
    assert udp["errors"] == {} and udp["reply_sources"] == [[f"::ffff:{VIP4}", 53]]


def test_ipv6_frontend_with_ipv6_backends(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"[{VIP6}]:80/TCP": backends6(cluster)})
    res = client(cluster, "tcp", VIP6, 80, "--count", 120, "--family", 6)
    assert res["errors"] == {} and len(res["backends"]) == 3
    assert res["seen_by_backend"] == [cluster.client.ip6]


REFUSE_TIMER = textwrap.dedent("""
    import json, socket, sys, time
    out = {}
    for family, host in ((socket.AF_INET, "10.96.0.30"), (socket.AF_INET6, "fd00:96::30")):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(family, kind)
            t0 = time.perf_counter()
            try:
                s.connect((host, 80)) if kind == socket.SOCK_STREAM else s.sendto(b"x", (host, 80))
                out[f"{family.name}/{kind.name}"] = ["ok", 0]
            except OSError as e:
                out[f"{family.name}/{kind.name}"] = [e.strerror, (time.perf_counter() - t0) * 1000]
    print(json.dumps(out))
""")


def test_frontend_without_backends_is_refused_at_once(cluster: Cluster, dp: Datapath) -> None:
    dp.program(
        {
            "10.96.0.30:80/TCP": [],
            "10.96.0.30:80/UDP": [],
            "[fd00:96::30]:80/TCP": [],
            "[fd00:96::30]:80/UDP": [],
        }
    )
    res = cluster.topo.run([sys.executable, "-c", REFUSE_TIMER], netns=cluster.client, cgroup=cluster.cgroup)
    outcome = json.loads(res.stdout)
    for case, (error, ms) in outcome.items():
        assert error == "Connection refused", (case, error)
        assert ms < 100, (case, ms)


def test_other_traffic_is_untouched(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)})
    direct = client(cluster, "tcp", cluster.pods[1].ip4, 8080, "--count", 5)
    assert direct["backends"] == {"pod-b": 5} and direct["peernames"] == [[cluster.pods[1].ip4, 8080]]
    # a port the VIP does not serve is not translated: it meets the namespace's unreachable route
    assert client(cluster, "tcp", VIP4, 81, "--count", 1)["errors"] == {"EHOSTUNREACH": 1}


def test_clients_outside_the_node_cgroup_are_not_translated(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)})
    other = cluster.topo.node_cgroup("node-b")
    res = cluster.topo.run_client(cluster.client, other, ["tcp", VIP4, "80", "--count", "1"])
    assert res["errors"] == {"EHOSTUNREACH": 1}


def test_writer_on_kernel_maps_is_idempotent_and_recovers(cluster: Cluster, dp: Datapath) -> None:
    want = {
        f"{VIP4}:80/TCP": backends4(cluster),
        f"[{VIP6}]:80/TCP": backends6(cluster),
        "10.96.0.30:80/TCP": [],
    }
    assert dp.program(want).ops > 0
    assert dp.program(want).ops == 0
    restarted = writer.MapWriter(dp.io)
    assert restarted.programmed() == dp.writer.programmed()
    assert programmed_frontends(dp.bpffs) == {
        "10.96.0.10:80/TCP": sorted(backends4(cluster)),
        "[fd00:96::10]:80/TCP": sorted(b for b in backends6(cluster)),
        "10.96.0.30:80/TCP": [],
    }


def test_backend_churn_under_load_never_fails_a_connect(cluster: Cluster, dp: Datapath) -> None:
    """Make-before-break on the kernel: 300 backend-set changes while a client connects in a loop."""
    sets = [[0, 1, 2], [0], [1, 2], [2], [0, 2], [1], [0, 1]]
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)})
    loop = cluster.topo.spawn_client(cluster.client, None, ["loop", VIP4, "80", "--timeout", "2"])
    for i in range(300):
        chosen = [backends4(cluster)[j] for j in sets[i % len(sets)]]
        dp.program({f"{VIP4}:80/TCP": chosen})
    res = cluster.topo.finish_client(loop)
    assert res["ok"] > 100
    assert res["errors"] == {}, res["errors"]


@pytest.fixture(scope="module")
def variant_object() -> Path:
    """The same programs built for BPF ISA v3: different instructions (tags), same behaviour."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "build/bpf/balancing-v3.o"], check=True)
    return ROOT / "build/bpf/balancing-v3.o"


def test_reload_reuses_pins_and_swaps_changed_programs_without_a_failed_connect(
    cluster: Cluster, dp: Datapath, variant_object: Path
) -> None:
    assert sorted(dp.report.programs_attached) == SOCKET_PROGRAMS
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)})
    loop = cluster.topo.spawn_client(cluster.client, None, ["loop", VIP4, "80", "--timeout", "2"])
    same = loader.load(dp.cfg)
    assert sorted(same.programs_unchanged) == SOCKET_PROGRAMS and not same.programs_swapped
    assert not same.programs_attached and not same.programs_detached
    assert sorted(same.maps_reused) == sorted(abi.ALL_MAPS)
    swapped = loader.load(loader.DatapathConfig(variant_object, dp.bpffs, dp.cgroup, **SMALL_MAPS))
    assert sorted(swapped.programs_swapped) == SOCKET_PROGRAMS
    back = loader.load(dp.cfg)
    assert sorted(back.programs_swapped) == SOCKET_PROGRAMS
    res = cluster.topo.finish_client(loop)
    assert res["ok"] > 20 and res["errors"] == {}, res
    assert client(cluster, "tcp", VIP4, 80, "--count", 30)["errors"] == {}


def test_pinned_links_keep_translating_after_the_loading_process_exits(cluster: Cluster) -> None:
    bpffs = cluster.topo.bpffs / "node-a"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from helpers.support import Datapath
        d = Datapath(Path({str(cluster.cgroup)!r}), Path({str(bpffs)!r}))
        d.program({{"{VIP4}:80/TCP": {backends4(cluster)!r}}})
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # helpers, as pytest's `pythonpath` has it
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30, env=env)
    try:
        assert client(cluster, "tcp", VIP4, 80, "--count", 30)["errors"] == {}
    finally:
        loader.cleanup(bpffs)
    assert client(cluster, "tcp", VIP4, 80, "--count", 1)["errors"] == {"EHOSTUNREACH": 1}
    assert loader.cleanup(bpffs) == []  # twice is fine


def test_two_datapaths_on_one_kernel_stay_isolated(cluster: Cluster) -> None:
    topo = cluster.topo
    other_client = topo.add_client("client-b", node="node-b")
    a = Datapath(cluster.cgroup, topo.bpffs / "node-a")
    b = Datapath(topo.node_cgroup("node-b"), topo.bpffs / "node-b")
    try:
        a.program({f"{VIP4}:80/TCP": [f"{cluster.pods[0].ip4}:8080"]})
        b.program({f"{VIP4}:80/TCP": [f"{cluster.pods[2].ip4}:8080"]})
        assert client(cluster, "tcp", VIP4, 80, "--count", 20)["backends"] == {"pod-a": 20}
        res = topo.run_client(other_client, None, ["tcp", VIP4, "80", "--count", "20"])
        assert res["backends"] == {"pod-c": 20}
        b.close()
        assert client(cluster, "tcp", VIP4, 80, "--count", 5)["backends"] == {"pod-a": 5}
    finally:
        a.close()
        b.close()


BROKEN_PROGRAM = textwrap.dedent("""
    #include <linux/bpf.h>
    #include <bpf/bpf_helpers.h>
    char LICENSE[] SEC("license") = "GPL";
    SEC("cgroup/connect4")
    int bl_broken(struct bpf_sock_addr *ctx)
    {
        *(volatile __u16 *)&ctx->user_port = 0;  /* 2-byte context stores are rejected */
        return 1;
    }
""")


def test_a_rejected_program_surfaces_the_verifier_log(cluster: Cluster, tmp_path: Path) -> None:
    src, obj = tmp_path / "broken.c", tmp_path / "broken.o"
    src.write_text(BROKEN_PROGRAM)
    arch = subprocess.run(
        ["gcc", "-print-multiarch"], check=True, capture_output=True, text=True
    ).stdout.strip()
    clang = shutil.which("clang")
    assert clang
    subprocess.run(
        [clang, "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c", str(src), "-o", str(obj)],
        check=True,
    )
    cfg = loader.DatapathConfig(obj, cluster.topo.bpffs / "broken", cluster.cgroup)
    with pytest.raises(errors.BpfLoadError) as info:
        loader.load(cfg)
    assert info.value.program == "bl_broken"
    assert "invalid bpf_context access" in info.value.log
    assert loader.cleanup(cfg.bpffs) == []


def test_map_full_is_an_error_naming_the_map(cluster: Cluster) -> None:
    """The frontend that does not fit fails alone, with an error naming the full map."""
    tiny = {**SMALL_MAPS, "max_services": 64, "max_backends": 4, "max_reverse": 64}
    d = Datapath(cluster.cgroup, cluster.topo.bpffs / "tiny", sizes=tiny)
    try:
        d.program({f"{VIP4}:80/TCP": backends4(cluster)})
        stats = d.program({f"{VIP4}:80/TCP": backends4(cluster), f"{VIP4}:81/TCP": backends4(cluster, 9090)})
        assert [str(k) for k in stats.failed] == [f"{VIP4}:81/TCP"]
        error = stats.failed[parse_key(f"{VIP4}:81/TCP")]
        assert isinstance(error.__cause__, errors.MapFull) or "is full" in str(error)
        assert error.map == "bl_be_v1" and "4 entries" in str(error)
        # the first frontend still works and the writer's view is the kernel's
        assert client(cluster, "tcp", VIP4, 80, "--count", 10)["errors"] == {}
        assert d.writer.programmed() == writer.MapWriter(d.io).programmed()
    finally:
        d.close()


def test_concurrent_readers_see_consistent_services_during_bulk_sync(cluster: Cluster, dp: Datapath) -> None:
    """Bulk syncs of 2000 frontends (batched) while a client keeps connecting to one present throughout."""
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)})
    loop = cluster.topo.spawn_client(cluster.client, None, ["loop", VIP4, "80", "--timeout", "2"])
    for round_ in range(3):
        many = {
            f"10.97.{i // 250}.{i % 250 + 1}:80/TCP": [f"10.250.0.{(i + round_) % 200 + 1}:80"]
            for i in range(2000)
        }
        many[f"{VIP4}:80/TCP"] = backends4(cluster)[round_ % 3 :]
        dp.program(many)
    res = cluster.topo.finish_client(loop)
    assert res["errors"] == {} and res["ok"] > 0


# Run in the client's netns and cgroup: connects COUNT TCP and COUNT connected UDP sockets to VIP (ports 80
# and 53), reads which backend answered each, and looks each one's socket storage up by its fd (the pinned
# map, opened by path): socket storage has no keys to dump, a socket is its key.
STORAGE_OF_CONNECTED = textwrap.dedent("""
    import json, socket, struct, sys
    from balancing.datapath import abi, libbpf

    pin, vip, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    storage_fd = libbpf.obj_get(pin)

    def endpoint(addr, port):
        return [str(abi.unpack_addr(addr)), abi.unpack_port(port)]

    out = []
    for kind, port in ((socket.SOCK_STREAM, 80), (socket.SOCK_DGRAM, 53)):
        for _ in range(count):
            s = socket.socket(socket.AF_INET, kind)
            s.settimeout(2)
            s.connect((vip, port))
            if kind == socket.SOCK_DGRAM:
                s.send(b"x")
            answered = s.recv(256).split()[0].decode()  # "<pod name> <peer ip> <peer port>"
            raw = libbpf.map_lookup(storage_fd, struct.pack("=i", s.fileno()), abi.SOCK_REV.size)
            assert raw is not None, "a translated connected socket without storage"
            front, backend, backend_port, _pad, _pad2 = abi.SOCK_REV.packer.unpack(raw)
            addr, front_port, _pad, _svc_id = abi.REV_VAL.packer.unpack(front)
            out.append({
                "answered": answered,
                "peer": list(s.getpeername()),
                "frontend": endpoint(addr, front_port),
                "backend": endpoint(backend, backend_port),
            })
            s.close()
    print(json.dumps(out))
""")


def test_connected_sockets_keep_their_reverse_translation_in_socket_storage(
    cluster: Cluster, dp: Datapath
) -> None:
    """Each translated connected socket's own storage names the frontend it connected to (what getpeername
    shows) and the backend that really answered it. The kernel frees the storage with the socket: no hook
    runs at close, and there is no entry of a closed socket for anything to delete."""
    dp.program({f"{VIP4}:80/TCP": backends4(cluster), f"{VIP4}:53/UDP": backends4(cluster)})
    pin = dp.cfg.map_dir / abi.MAP_SOCK_REVERSE
    argv = [sys.executable, "-c", STORAGE_OF_CONNECTED, str(pin), VIP4, "30"]
    sockets = json.loads(cluster.topo.run(argv, netns=cluster.client, cgroup=cluster.cgroup).stdout)
    pods = {p.name: p.ip4 for p in cluster.pods}
    assert [s["frontend"] for s in sockets] == [[VIP4, 80]] * 30 + [[VIP4, 53]] * 30
    for s in sockets:
        assert s["backend"] == [pods[s["answered"]], 8080], s
        assert s["peer"] == s["frontend"], s
    assert {s["answered"] for s in sockets} == set(pods)  # spread: each socket's own backend is recorded


def test_pins_of_map_versions_the_object_no_longer_defines_are_retired(
    cluster: Cluster, dp: Datapath
) -> None:
    from balancing.datapath import libbpf

    fd = libbpf.obj_get(str(dp.cfg.map_dir / "bl_rev_v1"))
    try:
        libbpf.obj_pin(fd, str(dp.cfg.map_dir / "bl_old_v0"))  # stands for a pin left by an older release
    finally:
        os.close(fd)
    report = loader.load(dp.cfg)
    assert report.maps_retired == ["bl_old_v0"]
    assert sorted(p.name for p in dp.cfg.map_dir.iterdir()) == sorted(abi.ALL_MAPS)


def one_backend_each(cluster: Cluster, clients: Sequence[Host], count: int = 20) -> list[str]:
    """For each client namespace: the single backend all its connects reached (fails if it moved)."""
    out = []
    for c in clients:
        res = cluster.topo.run_client(c, cluster.cgroup, ["tcp", VIP4, "80", "--count", str(count)])
        assert res["errors"] == {} and len(res["backends"]) == 1, res["backends"]
        out.append(next(iter(res["backends"])))
    return out


def test_session_affinity_keeps_each_client_namespace_on_one_backend(cluster: Cluster, dp: Datapath) -> None:
    clients = [cluster.client] + [cluster.topo.add_client(f"client-{i}") for i in range(7)]
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)}, affinity=10800)
    chosen = one_backend_each(cluster, clients)
    assert len(set(chosen)) > 1, "different clients are spread (8 clients all on one backend: p < 0.001)"
    assert one_backend_each(cluster, clients) == chosen, "and keep their backend"


def test_session_affinity_record_of_a_removed_backend_is_replaced(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)}, affinity=10800)
    (first,) = one_backend_each(cluster, [cluster.client])
    rest = [b for p, b in zip(cluster.pods, backends4(cluster), strict=True) if p.name != first]
    dp.program({f"{VIP4}:80/TCP": rest}, affinity=10800)
    (second,) = one_backend_each(cluster, [cluster.client])
    assert second != first
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)}, affinity=10800)
    assert one_backend_each(cluster, [cluster.client]) == [second], "the new record holds"


def test_session_affinity_switched_off_and_on_applies_to_new_connections(
    cluster: Cluster, dp: Datapath
) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)}, affinity=10800)
    one_backend_each(cluster, [cluster.client])
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)})
    assert len(client(cluster, "tcp", VIP4, 80, "--count", 60)["backends"]) == 3
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)}, affinity=10800)
    one_backend_each(cluster, [cluster.client], count=40)


def test_session_affinity_expires_after_the_idle_timeout(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": backends4(cluster)}, affinity=1)
    seen = set()
    for _ in range(8):
        seen.update(
            one_backend_each(cluster, [cluster.client], count=5)
        )  # 5 connects well within 1 s: sticky
        time.sleep(
            1.1
        )  # idle past the timeout: the next connect may move (8 rounds on one backend: p < 0.001)
    assert len(seen) > 1


# --- policy tiers: fallback, client rules (loop guard, skipRedirectFromBackend), QoS -----------------------


def lrp(
    primary: list[str],
    fallback: list[str] | None,
    pods: dict[PodRef, str],
    *,
    skip: bool = False,
    qos: int = 0,
) -> Frontend:
    return Frontend(
        Owner("LocalRedirectPolicy", "", "node-local-dns"),
        backends_of(primary),
        fallback=None if fallback is None else backends_of(fallback),
        backend_pods=tuple(BackendPod(pod, backends_of([b])[0]) for pod, b in pods.items()),
        skip_redirect_from_backends=skip,
        qos_limit=qos,
    )


def from_pod_a(cluster: Cluster, cgroup: Path, *args: object) -> dict[str, Any]:
    return cluster.topo.run_client(cluster.pods[0], cgroup, [str(a) for a in args])


def test_a_backend_pod_never_gets_its_own_connection_back(
    cluster: Cluster, dp: Datapath, pod_a_cgroup: tuple[PodRef, Path]
) -> None:
    ref, cg = pod_a_cgroup
    a, b, c = backends4(cluster)
    dp.program_frontends({f"{VIP4}:53/TCP": lrp([a, b], [c], {ref: a})})
    res = from_pod_a(cluster, cg, "tcp", VIP4, 53, "--count", 40)
    assert res["backends"] == {"pod-b": 40}, "pod-a's own connections go to the other local backend"
    assert set(client(cluster, "tcp", VIP4, 53, "--count", 60)["backends"]) == {"pod-a", "pod-b"}
    dp.program_frontends({f"{VIP4}:53/TCP": lrp([a], [c], {ref: a})})
    assert from_pod_a(cluster, cg, "tcp", VIP4, 53, "--count", 20)["backends"] == {"pod-c": 20}, (
        "its only local backend is itself: the fallback (the Service) serves it"
    )
    assert client(cluster, "tcp", VIP4, 53, "--count", 20)["backends"] == {"pod-a": 20}


def test_skip_redirect_from_backend_sends_backend_pods_to_the_fallback(
    cluster: Cluster, dp: Datapath, pod_a_cgroup: tuple[PodRef, Path]
) -> None:
    ref, cg = pod_a_cgroup
    a, b, c = backends4(cluster)
    dp.program_frontends({f"{VIP4}:53/UDP": lrp([a, b], [c], {ref: a}, skip=True)})
    res = from_pod_a(cluster, cg, "udp-connected", VIP4, 53, "--count", 20)
    assert res["backends"] == {"pod-c": 20} and res["peernames"] == [[VIP4, 53]]
    assert set(client(cluster, "udp-connected", VIP4, 53, "--count", 40)["backends"]) <= {"pod-a", "pod-b"}


def test_address_matcher_without_fallback_refuses_the_skipped_backend(
    cluster: Cluster, dp: Datapath, pod_a_cgroup: tuple[PodRef, Path]
) -> None:
    ref, cg = pod_a_cgroup
    a = backends4(cluster)[0]
    dp.program_frontends({"10.96.0.99:53/TCP": lrp([a], None, {ref: a})})
    assert from_pod_a(cluster, cg, "tcp", "10.96.0.99", 53, "--count", 1)["errors"] == {"ECONNREFUSED": 1}
    assert client(cluster, "tcp", "10.96.0.99", 53, "--count", 5)["backends"] == {"pod-a": 5}


def test_qos_limit_sends_the_overflow_to_the_fallback(cluster: Cluster, dp: Datapath) -> None:
    a, _, c = backends4(cluster)
    dp.program_frontends({f"{VIP4}:53/TCP": lrp([a], [c], {}, qos=10)})
    res = client(cluster, "tcp", VIP4, 53, "--count", 60)  # well within one or two one-second windows
    assert res["errors"] == {}
    assert 10 <= res["backends"].get("pod-a", 0) <= 25, res["backends"]
    assert res["backends"].get("pod-c", 0) >= 35, res["backends"]


def test_fallback_tier_is_added_and_removed_without_a_failed_connect(cluster: Cluster, dp: Datapath) -> None:
    a, b, c = backends4(cluster)
    dp.program_frontends({f"{VIP4}:53/TCP": lrp([a, b], None, {})})
    loop = cluster.topo.spawn_client(cluster.client, None, ["loop", VIP4, "53", "--timeout", "2"])
    for i in range(100):
        fallback = [c] if i % 2 else None
        dp.program_frontends({f"{VIP4}:53/TCP": lrp([a, b] if i % 3 else [b], fallback, {}, qos=i % 2)})
    res = cluster.topo.finish_client(loop)
    assert res["errors"] == {} and res["ok"] > 0
