"""How long one Maglev table takes to build, in pure Python, by number of backends.

The agent builds one table per north-south frontend (``datapath.maglev.table``), thousands of them at start,
at the datapath's default size (``abi.DEFAULT_MAGLEV_SIZE``, 16381 entries). For each ``--backends`` count
this builds ``--runs`` tables of random 18-byte identities (a packed IPv6 address and port, as the writer
passes them) and prints the median and the spread (min..max) in ms per table, plus what a hit of
``maglev.TableCache`` costs (a copy in the caller's order). Needs nothing: no root, no kernel.

Run: ``.venv/bin/python bench/maglev.py [--size 16381] [--backends 1,2,3,10,100,1000] [--runs 15] [-o json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from balancing.datapath import abi, maglev


def timed_ms(build: Callable[[], object], runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        build()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def measure(size: int, backends: int, runs: int) -> dict[str, dict[str, float]]:
    identities = [os.urandom(18) for _ in range(backends)]
    cache = maglev.TableCache()
    cache.table(identities, size)
    return {
        "table": timed_ms(lambda: maglev.table(identities, size), runs),
        "cache_hit": timed_ms(lambda: cache.table(identities[::-1], size), runs),
    }


def print_table(results: dict[int, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(f"maglev table of {args.size} entries, {args.runs} runs: ms per table, median [min..max]")
    print(f"{'backends':>10}{'table()':>28}{'TableCache hit':>28}")
    for backends, cells in results.items():
        row = "".join(
            f"{cell['median']:>10.2f} [{cell['min']:.2f}..{cell['max']:.2f}]".rjust(28)
            for cell in cells.values()
        )
        print(f"{backends:>10}{row}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=abi.DEFAULT_MAGLEV_SIZE)
    ap.add_argument("--backends", default="1,2,3,10,100,1000")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = ap.parse_args()
    maglev.valid_size(args.size)
    counts = [int(n) for n in args.backends.split(",")]
    results = {n: measure(args.size, n, args.runs) for n in counts}
    if args.output == "json":
        print(json.dumps({"size": args.size, "runs": args.runs, "results": results}, indent=2))
    else:
        print_table(results, args)


if __name__ == "__main__":
    main()
