"""One endpoint change after a large full sync, with and without the long-lived heap frozen (gc.freeze).

After a full sync of 100k Services the agent holds tens of millions of long-lived Python objects; any later
generation-2 collection walks all of them and stops every thread, the event loop's included, for seconds
(issue 15 measured a 5.3 s change latency). ``gcpause.freeze_long_lived()``, which the agent calls after a
full sync, moves them out of the collector's reach. This benchmark programs ``--services`` Services x
``--endpoints`` endpoints into real kernel maps (store and writer as the agent runs them), then alternates
rounds of two modes in one process, ``--rounds`` times each:

- ``plain``: the heap as a full sync leaves it (``gc.unfreeze()``);
- ``frozen``: after ``freeze_long_lived()``;

and in each round measures a forced full collection (the worst pause a change can meet: what a collection
triggered by the allocation of a change costs) and ``--changes`` endpoint changes seen → written (p50, p99,
max). The table gives the median over rounds with the spread (min..max).

Run as root: ``.venv/bin/python bench/changes.py [--services 100000] [--rounds 3]`` (``make bench-changes``).
Removes every cgroup and pin it made.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import run  # bench/run.py: the Service objects, full_sync, the object path
from balancing.datapath import abi, loader, maps, writer
from balancing.gcpause import freeze_long_lived
from balancing.model import store
from balancing_testkit.topology import Topology

MODES = ("plain", "frozen")


def one_round(
    st: store.ClusterStore, w: writer.MapWriter, mode: str, args: argparse.Namespace
) -> dict[str, float]:
    gc.unfreeze()
    if mode == "frozen":
        freeze_long_lived()
    t0 = time.perf_counter()
    gc.collect()
    full_collection_ms = (time.perf_counter() - t0) * 1000
    changes = run.endpoint_changes(st, w, args)
    latencies = {f"change_{k}_ms": v for k, v in changes.items() if k != "samples"}
    return {"full_collection_ms": full_collection_ms, **latencies}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=100_000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--changes", type=int, default=2000)
    ap.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with Topology() as topo:
        cfg = loader.DatapathConfig(
            run.OBJECT,
            topo.bpffs / "node-a",
            topo.node_cgroup("node-a"),
            max_services=max(abi.DEFAULT_SVC_ENTRIES, 2 * args.services),
            max_backends=max(abi.DEFAULT_BACKENDS, 2 * args.services * args.endpoints),
        )
        loader.load(cfg)
        io = maps.KernelMaps(cfg.map_dir)
        try:
            w = writer.MapWriter(io)
            st = store.ClusterStore("node-a")
            sync = run.full_sync(st, w, args.services, args.endpoints)
            print(f"full sync: {json.dumps(sync)}", file=sys.stderr)
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    results[mode].append(one_round(st, w, mode, args))
        finally:
            gc.unfreeze()
            io.close()
            loader.cleanup(cfg.bpffs)
    summary = summarize(results)
    if args.output == "json":
        print(json.dumps({"services": args.services, "endpoints": args.endpoints, **summary}, indent=2))
    else:
        print_table(summary, args)


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mode, rounds in results.items():
        out[mode] = {}
        for metric in rounds[0]:
            values = [r[metric] for r in rounds]
            out[mode][metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def print_table(summary: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    size = f"{args.services} Services x {args.endpoints} endpoints"
    print(f"{size}, {args.rounds} rounds, {args.changes} changes/round")
    print(f"{'metric (ms)':<24}" + "".join(f"{m:>28}" for m in MODES))
    for metric in summary[MODES[0]]:
        cells = []
        for mode in MODES:
            s = summary[mode][metric]
            cells.append(f"{s['median']:>10.2f} [{s['min']:.2f}..{s['max']:.2f}]".rjust(28))
        print(f"{metric:<24}" + "".join(cells))


if __name__ == "__main__":
    main()
