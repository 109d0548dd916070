"""What the socket hooks cost, the datapath at HEAD vs the working tree, side by side in one run.

Two copies of the datapath run in one topology: the object built from ``git show <rev>:bpf/balancing.c``
(``--base``, default HEAD; built into a temporary directory) in one node cgroup and its own bpffs directory,
the working tree's ``build/bpf/balancing.o`` in a sibling cgroup and directory; a third sibling cgroup has no
hook at all. Both datapaths are programmed with the same Services (1, then 10,000, ...: ``--services``),
counters on and events off (the agent's defaults); Service 0 (10.96.0.1:80/TCP) and one UDP Service
(``UDP_VIP``:53) lead to the one backend pod, the others to fake endpoints. At each size:

1. Per hook, in the kernel (``kernel.bpf_stats_enabled=1``, restored on exit): a client in one cgroup at a
   time either makes ``--connects`` sequential TCP connect+close rounds (bench/tcp_connect.c) or sends
   ``--datagrams`` datagrams from one unconnected UDP socket, ``--window`` at a time, and reads their echoes
   back (bench/udp_echo.c: every datagram runs sendmsg4 on the way out and recvmsg4 on the client's
   recvfrom; the echo is what makes recvmsg4 run and its reverse translation checked), either to the pod
   directly (pass-through: not a frontend) or to the VIP. The run_time_ns/run_cnt delta of every attached
   program gives ns per run of each hook that ran at least once per two connects/datagrams, and "bpf" the
   hooks' whole time per connect/datagram.
2. Whole process, with bpf_stats off (it adds two clock reads to every run): the same client binaries in the
   hook-free cgroup to the pod (a), in a hooked cgroup to the pod (b), through the VIP (c); the wall time
   and the client's own CPU time per connect/datagram (which leaves out waiting for the server; the hooks
   run in the client's system calls), and b/a, c/a of each per round. On a shared machine both ratios
   spread by several percent; compare them between the sides only beyond that spread.
3. Events on (``--events``, default ``sampled,all``; sampled is 1 in 100): TCP VIP connects again with
   bpf_stats on while a reader thread drains both sides' rings as the agent's does; connect4 ns/run and
   the events the ring had no room for.

The table ends with issue 17's targets, each side's median against each (pass-through socket <= 150 ns of
BPF, VIP connect4 <= 300 ns, VIP / no-hook <= 1.03x, VIP connect4 with events <= 1.5 us): a regression shows
there.

Rounds are interleaved (alternating order) ``--rounds`` times; every figure is the median over the rounds
and its spread (min..max; ratios [min-max]). ``-o json`` prints the summary and the raw samples as one JSON
document instead of the table (``--json PATH`` also writes it to a file).

Run as root: ``.venv/bin/python bench/hooks.py [--services 1,10000] [--rounds 5] [-o table|json]`` (about
3 minutes at the defaults). Removes every namespace, cgroup and pin it made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import run  # bench/run.py (beside this script): the probes, the Service objects, hook_stats
from balancing.datapath import abi, loader, maps, ringbuf, settings, writer
from balancing.gcpause import paused as gc_paused
from balancing.model import store
from balancing_testkit.topology import Topology

ROOT = run.ROOT
STATS_SYSCTL = run.STATS_SYSCTL
SIDES = ("before", "after")
TARGETS = ("pass-through", "vip")
PROTOS = ("tcp", "udp")
UNIT = {"tcp": "connect", "udp": "datagram"}
UDP_INDEX = 200_000  # the UDP Service's index: VIP 10.99.13.65, above any --services count
UDP_VIP = "10.99.13.65"
UDP_PORT, UDP_TARGET = 53, 5353
NO_HOOK = "no-hook"


def build_base(rev: str, workdir: Path) -> Path:
    """Compile the BPF object as of ``rev`` into ``workdir`` with that revision's own Makefile (one place for
    the flags)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "bpf", "Makefile"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    # output kept unless it fails: parsing the Makefile reads files left out here (tests/cluster/go.mod)
    done = subprocess.run(
        ["make", "-s", "-C", str(workdir), "build/bpf/balancing.o"],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"building {rev}'s datapath failed:\n{done.stdout}{done.stderr}")
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


def client_round(
    topo: Topology, client: Any, cgroup: Path, proto: str, target: tuple[str, int], args: argparse.Namespace
) -> dict[str, float]:
    """One client run: {"wall", "cpu"} ns per connect or datagram, as the client measured them (cpu: its own
    CPU time, whatever else runs). Every connect must succeed, every echo come back from the target."""
    ip, port = target
    if proto == "tcp":
        argv = [str(run.PROBE), "client", ip, str(port), str(args.connects)]
    else:
        argv = [str(run.UDP_PROBE), "client", ip, str(port), str(args.datagrams), str(args.window)]
    out = topo.run(argv, netns=client, cgroup=cgroup, timeout=300).stdout.split()
    if proto == "tcp":
        rate, _p50, _p99, errors, cpu = out
        if int(errors):
            raise RuntimeError(f"{errors} connects to {ip}:{port} failed")
        return {"wall": 1e9 / float(rate), "cpu": float(cpu)}
    wall, cpu, lost, wrong = out
    if int(lost) or int(wrong):
        raise RuntimeError(f"{ip}:{port}: {lost} datagrams lost, {wrong} echoes from another source")
    return {"wall": float(wall), "cpu": float(cpu)}


def hook_round(
    topo: Topology,
    client: Any,
    side: dict[str, Any],
    proto: str,
    target: tuple[str, int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One client run in a hooked cgroup with bpf_stats on: ns/run per hook, bpf ns and client ns per op."""
    ops = args.connects if proto == "tcp" else args.datagrams
    before = prog_stats(side["links"])
    client_ns = client_round(topo, client, side["cgroup"], proto, target, args)["wall"]
    after = prog_stats(side["links"])
    hooks, total = {}, 0
    for name, (t1, c1) in after.items():
        t0, c0 = before[name]
        total += t1 - t0
        if 2 * (c1 - c0) >= ops:
            hooks[name] = (t1 - t0) / (c1 - c0)
    return {"hooks": hooks, "bpf_ns": total / ops, "client_ns": client_ns}


def program_services(
    sides: list[dict[str, Any]], st: store.ClusterStore, first: int, last: int, pod_ip: str, endpoints: int
) -> None:
    """Services ``first..last-1`` (0 is the VIP 10.96.0.1 -> the real pod; the others fake endpoints), and
    with the first batch the UDP Service ``UDP_VIP``:53 -> the pod's port 5353."""
    objs = []
    if first == 0:
        objs += run.service_objects(UDP_INDEX, [pod_ip], UDP_PORT, UDP_TARGET, protocol="UDP")
    for i in range(first, last):
        objs += run.service_objects(i, [pod_ip] if i == 0 else run.fake_endpoints(i, endpoints))
    for obj in objs:
        st.upsert(obj)
    with gc_paused():
        desired = st.desired()
        for side in sides:
            side["writer"].sync(desired)
    st.take_changes()


def stat(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def fmt(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.0f} ({s['min']:.0f}..{s['max']:.0f})"


def fmt_ratio(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.3f}x [{s['min']:.3f}-{s['max']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", default="1,10000", help="comma-separated Service counts, increasing")
    ap.add_argument("--endpoints", type=int, default=10, help="per Service (100k Services: 2 fit the maps)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connects", type=int, default=20_000, help="TCP connect+close per client run")
    ap.add_argument("--datagrams", type=int, default=100_000, help="UDP datagrams per client run")
    ap.add_argument("--window", type=int, default=1, help="UDP datagrams in flight (1: one echo at a time)")
    ap.add_argument("--base", default="HEAD", help="git revision of the 'before' datapath")
    ap.add_argument("--base-object", type=Path, help="a built 'before' object instead of --base")
    ap.add_argument("--after-first", action="store_true", help="set the 'after' side up first (bias check)")
    ap.add_argument(
        "--events",
        default="sampled,all",
        help="events modes measured on TCP VIP connects after the rest ('' for none; sampled: 1 in 100)",
    )
    ap.add_argument("-o", "--output", choices=["table", "json"], default="table")
    ap.add_argument("--json", type=Path, help="also write the JSON document (summary and raw samples) here")
    args = ap.parse_args()
    run.build_probe()
    run.build_probe(run.UDP_PROBE_SRC, run.UDP_PROBE)
    stats_before = STATS_SYSCTL.read_text()
    try:
        with tempfile.TemporaryDirectory(prefix="bl-bench-base-") as tmp:
            base_obj = args.base_object or build_base(args.base, Path(tmp))
            doc = run_all(args, base_obj)
    finally:
        STATS_SYSCTL.write_text(stats_before)
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text)
    if args.output == "json":
        print(text)
    else:
        print_table(doc)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace, base_obj: Path) -> dict[str, Any]:
    counts = [int(c) for c in args.services.split(",")]
    doc: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "base_object", "output")},
        "insns": {},
        "sizes": {},
    }
    with Topology() as topo:
        pod = topo.add_pod("backend")
        client = topo.add_client("client")
        topo.spawn([str(run.PROBE), "server", "8080"], netns=pod, ready="READY")
        topo.spawn([str(run.UDP_PROBE), "server", str(UDP_TARGET)], netns=pod, ready="READY")
        sides: list[dict[str, Any]] = []
        try:
            for name in reversed(SIDES) if args.after_first else SIDES:
                cg = topo.node_cgroup(f"node-{name}")
                cfg = loader.DatapathConfig(
                    base_obj if name == "before" else run.OBJECT, topo.bpffs / f"node-{name}", cg
                )
                loader.load(cfg)
                io = maps.KernelMaps(cfg.map_dir)
                side: dict[str, Any] = {
                    "name": name,
                    "cgroup": cg,
                    "cfg": cfg,
                    "io": io,
                    "links": cfg.bpffs / "links",
                    "writer": writer.MapWriter(io),
                }
                sides.append(side)
                doc["insns"][name] = xlated_insns(side["links"])
            sides.sort(key=lambda s: SIDES.index(s["name"]))
            plain = topo.node_cgroup(NO_HOOK)
            st = store.ClusterStore("node-a")
            targets = {
                "tcp": {"pass-through": (pod.ip4, 8080), "vip": ("10.96.0.1", 80)},
                "udp": {"pass-through": (pod.ip4, UDP_TARGET), "vip": (UDP_VIP, UDP_PORT)},
            }
            programmed = 0
            for count in counts:
                t0 = time.monotonic()
                program_services(sides, st, programmed, count, pod.ip4, args.endpoints)
                programmed = count
                doc["sizes"][str(count)] = one_size(topo, client, sides, plain, targets, args)
                log(f"{count} Services: measured in {time.monotonic() - t0:.0f} s")
        finally:
            for side in sides:
                side["io"].close()
                loader.cleanup(side["cfg"].bpffs)
    return doc


def one_size(
    topo: Topology,
    client: Any,
    sides: list[dict[str, Any]],
    plain: Path,
    targets: dict[str, dict[str, tuple[str, int]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Both phases at the programmed size: {"raw": ..., "summary": ...}."""
    warm = argparse.Namespace(
        **{**vars(args), "connects": args.connects // 10, "datagrams": args.datagrams // 10}
    )
    for proto in PROTOS:
        client_round(topo, client, plain, proto, targets[proto]["pass-through"], warm)
        for side in sides:
            for target in TARGETS:
                client_round(topo, client, side["cgroup"], proto, targets[proto][target], warm)
    hooked: dict[str, list[dict[str, Any]]] = {}
    STATS_SYSCTL.write_text("1")
    for r in range(args.rounds):
        order = [(p, s, t) for p in PROTOS for s in sides for t in TARGETS]
        for proto, side, target in order if r % 2 == 0 else reversed(order):
            res = hook_round(topo, client, side, proto, targets[proto][target], args)
            hooked.setdefault(f"{proto}/{target}/{side['name']}", []).append(res)
    STATS_SYSCTL.write_text("0")
    whole: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for proto in PROTOS:
            runs: list[tuple[Path, str, str]] = [(plain, NO_HOOK, "pass-through")]
            runs += [(s["cgroup"], s["name"], t) for s in sides for t in TARGETS]
            for cgroup, name, target in runs if r % 2 == 0 else reversed(runs):
                res = client_round(topo, client, cgroup, proto, targets[proto][target], args)
                whole.setdefault(f"{proto}/{target}/{name}", []).append(res)
    summary = summarize(hooked, whole)
    summary["events"] = events_phase(topo, client, sides, targets["tcp"]["vip"], args)
    return {"raw": {"hooks": hooked, "whole": whole}, "summary": summary}


EVENT_MODES = {"sampled": (abi.EVENTS_SAMPLED, 100), "all": (abi.EVENTS_ALL, 1)}


class Drain:
    """Reads both sides' event rings on a thread while a phase runs, as the agent's reader does (a timer
    plus the forced wakeups), so the ring never fills; counts what it read."""

    def __init__(self, sides: list[dict[str, Any]]) -> None:
        self.rings = [ringbuf.RingBuffer(s["cfg"].map_dir / abi.MAP_EVENTS, lambda _b: None) for s in sides]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-drain", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for ring in self.rings:
                ring.poll(10)
                ring.consume()

    def __enter__(self) -> Drain:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for ring in self.rings:
            ring.consume()
            ring.close()


def events_phase(
    topo: Topology, client: Any, sides: list[dict[str, Any]], vip: tuple[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    """TCP VIP connects with events on, per mode of ``--events``: {mode: {side: {"connect4", "bpf_ns",
    "lost"}}} (bpf_stats on, a reader draining the rings; lost: events the ring had no room for)."""
    out: dict[str, Any] = {}
    modes = [m for m in args.events.split(",") if m]
    if not modes:
        return out
    try:
        for mode in modes:
            events, every = EVENT_MODES[mode]
            for side in sides:
                settings.write_config(side["cfg"].map_dir, events, sample_every=every)
            lost0 = {s["name"]: ringbuf.read_lost(s["cfg"].map_dir) for s in sides}
            runs: dict[str, list[dict[str, Any]]] = {}
            STATS_SYSCTL.write_text("1")
            with Drain(sides):
                for r in range(args.rounds):
                    for side in sides if r % 2 == 0 else reversed(sides):
                        runs.setdefault(side["name"], []).append(
                            hook_round(topo, client, side, "tcp", vip, args)
                        )
            STATS_SYSCTL.write_text("0")
            out[mode] = {
                name: {
                    "connect4": stat([r["hooks"]["bl_connect4"] for r in res]),
                    "bpf_ns": stat([r["bpf_ns"] for r in res]),
                    "lost": ringbuf.read_lost(next(s for s in sides if s["name"] == name)["cfg"].map_dir)
                    - lost0[name],
                }
                for name, res in runs.items()
            }
    finally:
        STATS_SYSCTL.write_text("0")
        for side in sides:
            settings.write_config(side["cfg"].map_dir, abi.EVENTS_OFF)
    return out


def summarize(
    hooked: dict[str, list[dict[str, Any]]], whole: dict[str, list[dict[str, float]]]
) -> dict[str, Any]:
    """{proto: {NO_HOOK: {ns, cpu_ns}, target: {side: {hooks, bpf_ns, ns, ratio, cpu_ns, cpu_ratio}}}}, each
    a stat over the rounds (the ratios are taken per round: paired)."""
    out: dict[str, Any] = {}
    for proto in PROTOS:
        base = whole[f"{proto}/pass-through/{NO_HOOK}"]
        out[proto] = {
            NO_HOOK: {"ns": stat([b["wall"] for b in base]), "cpu_ns": stat([b["cpu"] for b in base])}
        }
        for target in TARGETS:
            for side in SIDES:
                runs = hooked[f"{proto}/{target}/{side}"]
                times = whole[f"{proto}/{target}/{side}"]
                names = sorted({h for res in runs for h in res["hooks"]})
                out[proto].setdefault(target, {})[side] = {
                    "hooks": {h: stat([res["hooks"][h] for res in runs if h in res["hooks"]]) for h in names},
                    "bpf_ns": stat([res["bpf_ns"] for res in runs]),
                    "ns": stat([t["wall"] for t in times]),
                    "ratio": stat([t["wall"] / b["wall"] for t, b in zip(times, base, strict=True)]),
                    "cpu_ns": stat([t["cpu"] for t in times]),
                    "cpu_ratio": stat([t["cpu"] / b["cpu"] for t, b in zip(times, base, strict=True)]),
                }
    return out


def print_table(doc: dict[str, Any]) -> None:
    cfg = doc["config"]
    sizes = list(doc["sizes"])
    print(f"verified insns: {json.dumps(doc['insns'])}")
    print(
        f"Per round: {cfg['connects']} sequential TCP connect+close; {cfg['datagrams']} UDP datagrams from "
        f"one unconnected socket, echoed, window {cfg['window']}; {cfg['rounds']} rounds, median (min..max)\n"
        "hook rows: in-kernel ns per run (bpf_stats on); bpf: all hooks' ns per connect/datagram; ns/op: the "
        "client's wall time per connect/datagram, cpu ns/op its CPU time (bpf_stats off); xno-hook: the "
        "ratio to the same client's figure in a cgroup without hooks, per round."
    )
    head = f"{'':4s} {'target':13s} {'row':22s}" + "".join(
        f" {f'{n} {s}':>24s}" for n in sizes for s in SIDES
    )
    print(head)
    print("-" * len(head))
    for proto in PROTOS:
        sums = [doc["sizes"][n]["summary"][proto] for n in sizes]
        row(proto, NO_HOOK, f"ns/{UNIT[proto]}", [fmt(s[NO_HOOK]["ns"]) for s in sums for _ in SIDES])
        row(proto, NO_HOOK, f"cpu ns/{UNIT[proto]}", [fmt(s[NO_HOOK]["cpu_ns"]) for s in sums for _ in SIDES])
        for target in TARGETS:
            cells = [[s[target][side] for side in SIDES] for s in sums]
            hooks = sorted({h for c in cells for d in c for h in d["hooks"]})
            for h in hooks:
                row(proto, target, f"{h} ns/run", [fmt(d["hooks"].get(h)) for c in cells for d in c])
            row(proto, target, f"bpf ns/{UNIT[proto]}", [fmt(d["bpf_ns"]) for c in cells for d in c])
            row(proto, target, f"ns/{UNIT[proto]}", [fmt(d["ns"]) for c in cells for d in c])
            row(proto, target, "xno-hook", [fmt_ratio(d["ratio"]) for c in cells for d in c])
            row(proto, target, f"cpu ns/{UNIT[proto]}", [fmt(d["cpu_ns"]) for c in cells for d in c])
            row(proto, target, "cpu xno-hook", [fmt_ratio(d["cpu_ratio"]) for c in cells for d in c])
    for mode in doc["config"]["events"].split(","):
        by_size = [doc["sizes"][n]["summary"].get("events", {}).get(mode) for n in sizes]
        if not any(by_size):
            continue
        label = f"events={mode}"
        row(
            "tcp",
            "vip",
            f"{label} connect4",
            [fmt(c[side]["connect4"]) if c else "-" for c in by_size for side in SIDES],
        )
        row(
            "tcp",
            "vip",
            f"{label} lost",
            [str(c[side]["lost"]) if c else "-" for c in by_size for side in SIDES],
        )
    print_targets(doc)
    sys.stdout.flush()


# Issue 17's targets, checked on each side's medians: (label, proto, target, figure, limit).
TARGET_CHECKS = (
    ("TCP pass-through, all hooks of a socket <= 150 ns", "tcp", "pass-through", "bpf_ns", 150.0),
    ("TCP VIP connect4 <= 300 ns", "tcp", "vip", "bl_connect4", 300.0),
    ("TCP VIP / no-hook <= 1.03x", "tcp", "vip", "ratio", 1.03),
)
EVENT_LIMIT_NS = 1500.0  # VIP connect4 with events on, sampled and all


def print_targets(doc: dict[str, Any]) -> None:
    """One line per target and size: each side's median and whether it is met (a regression shows here)."""
    print("\ntargets (median; met: yes/no)")
    for label, proto, target, figure, limit in TARGET_CHECKS:
        cells = []
        for n, size in doc["sizes"].items():
            for side in SIDES:
                d = size["summary"][proto][target][side]
                s = d["hooks"].get(figure) if figure.startswith("bl_") else d[figure]
                if s:
                    value = s["median"]
                    shown = f"{value:.3f}x" if figure == "ratio" else f"{value:.0f}"
                    cells.append(f"{n} {side}: {shown} {'yes' if value <= limit else 'no'}")
        print(f"  {label:52s} " + "; ".join(cells))
    for mode in doc["config"]["events"].split(","):
        cells = []
        for n, size in doc["sizes"].items():
            for side, d in size["summary"].get("events", {}).get(mode, {}).items():
                value = d["connect4"]["median"]
                cells.append(f"{n} {side}: {value:.0f} {'yes' if value <= EVENT_LIMIT_NS else 'no'}")
        if cells:
            print(f"  {f'TCP VIP connect4, events {mode} <= 1500 ns':52s} " + "; ".join(cells))


def row(proto: str, target: str, label: str, cells: list[str]) -> None:
    print(f"{proto:4s} {target:13s} {label:22s}" + "".join(f" {c:>24s}" for c in cells))


if __name__ == "__main__":
    main()
