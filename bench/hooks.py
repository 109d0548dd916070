"""Per-hook cost of the socket hooks (in-kernel ns per run): the datapath at HEAD vs the working tree.

Two copies of the datapath run in one topology: the object built from ``git show <rev>:bpf/balancing.c``
(``--base``, default HEAD; built into a temporary directory) in one node cgroup and its own bpffs directory,
the working tree's ``build/bpf/balancing.o`` in a sibling cgroup and directory. Both are programmed with the
same Services (1, then 10,000, ...: ``--services``), counters on and events off (the agent's defaults). With
``kernel.bpf_stats_enabled=1`` (restored on exit), a client in one cgroup at a time makes ``--connects``
sequential TCP connect+close rounds (bench/tcp_connect.c) either to the backend pod directly (pass-through:
not a frontend) or to a VIP, and the run_time_ns/run_cnt delta of every attached program is read with bpftool.
Rounds are interleaved (base/new, pass-through/VIP, alternating order) ``--rounds`` times; the table gives the
median ns/run per hook and its spread (min..max) over the rounds.

Run as root: ``.venv/bin/python bench/hooks.py [--services 1,10000] [--rounds 5] [--connects 20000]``.
Removes every namespace, cgroup and pin it made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import run  # bench/run.py (beside this script): the probe, the Service objects, hook_stats
from balancing.datapath import loader, maps, writer
from balancing.gcpause import paused as gc_paused
from balancing.model import store
from balancing_testkit.topology import Topology

ROOT = run.ROOT
STATS_SYSCTL = run.STATS_SYSCTL


def build_base(rev: str, workdir: Path) -> Path:
    """Compile the BPF object as of ``rev`` into ``workdir`` with that revision's own Makefile (one place for
    the flags)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "bpf", "Makefile"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    subprocess.run(["make", "-s", "-C", str(workdir), "build/bpf/balancing.o"], check=True)
    return workdir / "build" / "bpf" / "balancing.o"


def prog_stats(link_dir: Path) -> dict[str, tuple[int, int]]:
    """{program: (run_time_ns, run_cnt)} of every program behind a pinned link in ``link_dir``."""
    out = {}
    for pin in sorted(link_dir.iterdir()):
        out[pin.name] = run.hook_stats(pin)
    return out


def xlated_insns(link_dir: Path) -> dict[str, int]:
    """Verified (xlated) instruction count of each attached program."""
    return {
        pin.name: len(run.bpftool_json("prog", "dump", "xlated", "id", run.linked_prog(pin)))
        for pin in sorted(link_dir.iterdir())
    }


def one_round(
    topo: Topology, client: Any, side: dict[str, Any], ip: str, port: int, n: int
) -> dict[str, float]:
    before = prog_stats(side["links"])
    run.connect_round(topo, client, side["cgroup"], ip, port, n)
    after = prog_stats(side["links"])
    res = {}
    for name, (t1, c1) in after.items():
        t0, c0 = before[name]
        if c1 > c0:
            res[name] = (t1 - t0) / (c1 - c0)
    return res


def program_services(
    sides: list[dict[str, Any]], st: store.ClusterStore, first: int, last: int, pod_ip: str, endpoints: int
) -> None:
    """Services ``first..last-1`` (0 is the VIP 10.96.0.1 -> the real pod; the others fake endpoints)."""
    for i in range(first, last):
        for obj in run.service_objects(i, [pod_ip] if i == 0 else run.fake_endpoints(i, endpoints)):
            st.upsert(obj)
    with gc_paused():
        desired = st.desired()
        for side in sides:
            side["writer"].sync(desired)
    st.take_changes()


def fmt(samples: list[float]) -> str:
    if not samples:
        return "-"
    return f"{statistics.median(samples):7.0f} ({min(samples):.0f}..{max(samples):.0f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", default="1,10000", help="comma-separated Service counts, increasing")
    ap.add_argument("--endpoints", type=int, default=10, help="per Service (100k Services: 2 fit the maps)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connects", type=int, default=20_000)
    ap.add_argument("--base", default="HEAD", help="git revision of the 'before' datapath")
    ap.add_argument("--base-object", type=Path, help="a built 'before' object instead of --base")
    ap.add_argument("--after-first", action="store_true", help="set the 'after' side up first (bias check)")
    ap.add_argument("--json", type=Path, help="also write the raw samples here")
    args = ap.parse_args()
    run.build_probe()
    stats_before = STATS_SYSCTL.read_text()
    STATS_SYSCTL.write_text("1")
    try:
        with tempfile.TemporaryDirectory(prefix="bl-bench-base-") as tmp:
            base_obj = args.base_object or build_base(args.base, Path(tmp))
            results = run_all(args, base_obj)
    finally:
        STATS_SYSCTL.write_text(stats_before)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run_all(args: argparse.Namespace, base_obj: Path) -> dict[str, Any]:
    counts = [int(c) for c in args.services.split(",")]
    results: dict[str, Any] = {}
    with Topology() as topo:
        pod = topo.add_pod("backend")
        client = topo.add_client("client")
        topo.spawn([str(run.PROBE), "server", "8080"], netns=pod, ready="READY")
        sides: list[dict[str, Any]] = []
        try:
            objects = [("before", base_obj), ("after", run.OBJECT)]
            for name, obj in reversed(objects) if args.after_first else objects:
                cg = topo.node_cgroup(f"node-{name}")
                cfg = loader.DatapathConfig(obj, topo.bpffs / f"node-{name}", cg)
                loader.load(cfg)
                io = maps.KernelMaps(cfg.map_dir)
                sides.append(
                    {
                        "name": name,
                        "cgroup": cg,
                        "cfg": cfg,
                        "io": io,
                        "writer": writer.MapWriter(io),
                        "links": cfg.bpffs / "links",
                    }
                )
            for side in sides:
                print(f"{side['name']}: verified insns {xlated_insns(side['links'])}")
            st = store.ClusterStore("node-a")
            programmed = 0
            targets = {"pass-through": (pod.ip4, 8080), "vip": ("10.96.0.1", 80)}
            for count in counts:
                program_services(sides, st, programmed, count, pod.ip4, args.endpoints)
                programmed = count
                for side in sides:  # warm-up
                    for ip, port in targets.values():
                        run.connect_round(topo, client, side["cgroup"], ip, port, args.connects // 10)
                samples: dict[tuple[str, str], list[dict[str, float]]] = {}
                for r in range(args.rounds):
                    order = [(s, t) for s in sides for t in targets]
                    for side, target in order if r % 2 == 0 else reversed(order):
                        res = one_round(topo, client, side, *targets[target], args.connects)
                        samples.setdefault((target, side["name"]), []).append(res)
                print_table(count, args, samples)
                results[str(count)] = {f"{t}/{s}": v for (t, s), v in samples.items()}
        finally:
            for side in sides:
                side["io"].close()
                loader.cleanup(side["cfg"].bpffs)
    return results


def print_table(
    count: int, args: argparse.Namespace, samples: dict[tuple[str, str], list[dict[str, float]]]
) -> None:
    hooks = sorted({h for runs in samples.values() for res in runs for h in res})
    print(
        f"\n{count} Services, {args.connects} sequential TCP connect+close per round, {args.rounds} rounds: "
        "ns per run, median (min..max)"
    )
    print(f"{'target':14s} {'hook':18s} {'before':>22s} {'after':>22s}")
    for target in ("pass-through", "vip"):
        for hook in [*hooks, "total"]:
            row = []
            for side in ("before", "after"):
                runs = samples.get((target, side), [])
                if hook == "total":
                    vals = [sum(res.values()) for res in runs]
                else:
                    vals = [res[hook] for res in runs if hook in res]
                row.append(fmt(vals))
            if row != ["-", "-"]:
                print(f"{target:14s} {hook:18s} {row[0]:>22s} {row[1]:>22s}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
