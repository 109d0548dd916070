"""Benchmarks for the datapath and the control plane (not tests: figures, measured side by side).

1. Connect rate and latency through a VIP vs directly to the backend, with 1 and with 10,000 services
   programmed, interleaved rounds in one run, reported as ratios (C probe: bench/tcp_connect.c).
2. Time to program 10,000 services x 10 endpoints from model objects to kernel maps.
3. Time from one endpoint change being seen to its map write, with 10,000 services present (p50/p99).

Run as root: ``make bench`` (or ``.venv/bin/python bench/run.py [--services N] [--rounds R]``). Uses the test
harness topology (network namespaces, a test-owned cgroup and bpffs directory) and removes all of it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from balancing.datapath import loader, maps, writer
from balancing.gcpause import paused as gc_paused
from balancing.model import objects, store
from balancing_testkit.topology import Pod, Topology

ROOT = Path(__file__).resolve().parents[1]
OBJECT = ROOT / "build/bpf/balancing.o"
PROBE_SRC = ROOT / "bench/tcp_connect.c"
PROBE = ROOT / "build/bench/tcp_connect"
UDP_PROBE_SRC = ROOT / "bench/udp_echo.c"  # the datagram echo probe of bench/hooks.py
UDP_PROBE = ROOT / "build/bench/udp_echo"


def build_probe(src: Path = PROBE_SRC, out: Path = PROBE) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def service_objects(
    index: int, endpoints: list[str], port: int = 80, target: int = 8080, protocol: str = "TCP"
) -> list[Any]:
    vip = ipaddress.IPv4Address("10.96.0.0") + 1 + index
    name = f"svc-{index}"
    svc = objects.Service.model_validate(
        {
            "metadata": {"name": name, "namespace": "bench", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {
                "clusterIPs": [str(vip)],
                "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": protocol}],
            },
        }
    )
    eps = objects.EndpointSlice.model_validate(
        {
            "metadata": {
                "name": f"{name}-1",
                "namespace": "bench",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": target, "protocol": protocol}],
            "endpoints": [{"addresses": [ip]} for ip in endpoints],
        }
    )
    return [svc, eps]


def fake_endpoints(index: int, count: int) -> list[str]:
    base = ipaddress.IPv4Address("10.128.0.0") + index * count
    return [str(base + i) for i in range(count)]


def connect_round(topo: Topology, client: Any, node: Path, ip: str, port: int, n: int) -> tuple[float, ...]:
    res = topo.run(["sh", "-c", f"{PROBE} client {ip} {port} {n}"], netns=client, cgroup=node, timeout=120)
    rate, p50, p99, errs = res.stdout.split()[:4]  # then the CPU time per connect (bench/hooks.py)
    if int(errs):
        raise RuntimeError(f"{errs} connects to {ip}:{port} failed")
    return float(rate), float(p50), float(p99)


STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def bpftool_json(*args: str) -> Any:
    """``bpftool -j ARGS``'s answer."""
    done = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def linked_prog(link_pin: Path) -> str:
    """The id of the program behind a pinned link."""
    return str(bpftool_json("link", "show", "pinned", str(link_pin))["prog_id"])


def hook_stats(link_pin: Path) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind a pinned link (needs kernel.bpf_stats_enabled=1)."""
    prog = bpftool_json("prog", "show", "id", linked_prog(link_pin))
    return int(prog.get("run_time_ns", 0)), int(prog.get("run_cnt", 0))


def connect_bench(topo: Topology, client: Any, node: Path, pod: Pod, rounds: int, n: int) -> dict[str, float]:
    samples: dict[str, list[tuple[float, ...]]] = {"direct": [], "vip": []}
    targets = {"direct": (pod.ip4, 8080), "vip": ("10.96.0.1", 80)}
    for ip, port in targets.values():  # warm-up, not counted
        connect_round(topo, client, node, ip, port, n // 4)
    for r in range(rounds):  # interleaved, alternating which goes first
        for name in ("direct", "vip") if r % 2 == 0 else ("vip", "direct"):
            samples[name].append(connect_round(topo, client, node, *targets[name], n))
    med = {k: [statistics.median(s[i] for s in v) for i in range(3)] for k, v in samples.items()}
    link = topo.bpffs / "node-a/links/bl_connect4"
    t0, c0 = hook_stats(link)
    connect_round(topo, client, node, *targets["vip"], n)
    t1, c1 = hook_stats(link)
    return {
        "connect4_hook_ns": (t1 - t0) / max(c1 - c0, 1),
        "direct_rate": med["direct"][0],
        "vip_rate": med["vip"][0],
        "direct_p50_us": med["direct"][1],
        "vip_p50_us": med["vip"][1],
        "vip_p99_us": med["vip"][2],
        "direct_p99_us": med["direct"][2],
        "latency_ratio_p50": med["vip"][1] / med["direct"][1],
        "time_ratio": med["direct"][0] / med["vip"][0],  # time per connect, VIP / direct
    }


def full_sync(st: store.ClusterStore, w: writer.MapWriter, services: int, endpoints: int) -> dict[str, Any]:
    objs = [o for i in range(1, services) for o in service_objects(i, fake_endpoints(i, endpoints))]
    t0 = time.perf_counter()
    with gc_paused():  # as the agent's full sync does
        for obj in objs:
            st.upsert(obj)
        desired = st.desired()
        t1 = time.perf_counter()
        stats = w.sync(desired)
        t2 = time.perf_counter()
    st.take_changes()
    return {
        "services": services,
        "endpoints_per_service": endpoints,
        "model_s": t1 - t0,
        "maps_s": t2 - t1,
        "total_s": t2 - t0,
        "map_ops": stats.ops,
    }


def endpoint_changes(st: store.ClusterStore, w: writer.MapWriter, args: argparse.Namespace) -> dict[str, Any]:
    """Seen (the changed slice reaches the store) → written (the maps hold it), one change at a time."""
    latencies = []
    for k in range(args.changes):
        i = 1 + (k * 7919) % (args.services - 1)
        eps = fake_endpoints(i, args.endpoints)
        eps[k % args.endpoints] = str(ipaddress.IPv4Address("10.200.0.0") + k)
        slice_obj = service_objects(i, eps)[1]
        t0 = time.perf_counter()
        st.upsert(slice_obj)
        w.apply(st.take_changes())
        latencies.append((time.perf_counter() - t0) * 1000)
    latencies.sort()
    return {
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99) - 1],
        "max": latencies[-1],
        "samples": len(latencies),
    }


def restart(st: store.ClusterStore, io: maps.KernelMaps) -> dict[str, Any]:
    """A new writer recovers the programmed state from the maps and converges with zero writes."""
    t0 = time.perf_counter()
    recovered = writer.MapWriter(io)
    t1 = time.perf_counter()
    ops = recovered.sync(st.desired()).ops
    return {"recover_s": t1 - t0, "resync_ops": ops, "resync_s": time.perf_counter() - t1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--connects", type=int, default=5000)
    ap.add_argument("--changes", type=int, default=300)
    args = ap.parse_args()
    build_probe()
    results: dict[str, Any] = {}
    stats_before = STATS_SYSCTL.read_text()
    STATS_SYSCTL.write_text("1")
    try:
        run_all(args, results)
    finally:
        STATS_SYSCTL.write_text(stats_before)
    out = ROOT / "build/bench/results.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"(written to {out.relative_to(ROOT)})")


def run_all(args: argparse.Namespace, results: dict[str, Any]) -> None:
    with Topology() as topo:
        pod = topo.add_pod("backend")
        client = topo.add_client("client")
        node = topo.node_cgroup("node-a")
        topo.spawn([str(PROBE), "server", "8080"], netns=pod, ready="READY")
        cfg = loader.DatapathConfig(OBJECT, topo.bpffs / "node-a", node)
        loader.load(cfg)
        io = maps.KernelMaps(cfg.map_dir)
        try:
            w = writer.MapWriter(io)
            st = store.ClusterStore("node-a")
            for obj in service_objects(0, [pod.ip4]):
                st.upsert(obj)
            w.sync(st.desired())
            st.take_changes()
            results["connect_1_service"] = connect_bench(topo, client, node, pod, args.rounds, args.connects)
            results["full_sync"] = full_sync(st, w, args.services, args.endpoints)
            results["connect_10k_services"] = connect_bench(
                topo, client, node, pod, args.rounds, args.connects
            )
            results["endpoint_change_ms"] = endpoint_changes(st, w, args)
            results["restart"] = restart(st, io)
        finally:
            io.close()
            loader.cleanup(cfg.bpffs)


if __name__ == "__main__":
    main()
