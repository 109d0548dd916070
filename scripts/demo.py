"""`make demo`: the agent on the bundled examples, real backends in network namespaces, traffic balanced.

Builds a one-node "cluster" on this kernel (three pod namespaces running a small TCP/UDP server, a client
namespace, a cgroup of the demo's own for the client processes and a bpffs directory of its own), starts
``balancing agent`` on a copy of examples/, sends TCP and UDP over IPv4 and IPv6 to the VIPs and prints which
backend answered, edits a manifest to show the change taking effect, then removes everything it made. The
machine's root cgroup is never touched.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from balancing_testkit.topology import Topology

ROOT = Path(__file__).resolve().parents[1]

console = Console()
PY = sys.executable
NODE = "demo-node"


def wait_ready(port: int, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                body: dict[str, Any] = json.load(r)
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def counts_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("traffic", "answered by", "failed"):
        table.add_column(col)
    for label, res in rows:
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(res.get("backends", {}).items())) or "-"
        failed = ", ".join(f"{k}: {v}" for k, v in res.get("errors", {}).items()) or "0"
        table.add_row(label, spread, failed)
    return table


def main() -> None:
    manifests = Path(tempfile.mkdtemp(prefix="balancing-demo-"))
    try:
        for f in (ROOT / "examples").glob("*.yaml"):
            shutil.copy(f, manifests / f.name)
        with Topology() as topo:
            run_demo(topo, manifests)
    finally:
        shutil.rmtree(manifests, ignore_errors=True)
    console.print("[green]demo finished; every namespace, cgroup, pin and process it made is gone[/green]")


def run_demo(topo: Topology, manifests: Path) -> None:
    pods = [topo.add_pod(f"web-{n}") for n in "abc"]
    for i, pod in enumerate(pods, 1):
        if (pod.ip4, pod.ip6) != (f"10.244.1.{i}", f"fd00:244::1:{i}"):
            raise SystemExit(
                f"pod {pod.name} got {pod.ip4}/{pod.ip6}, examples/pods.yaml expects other addresses"
            )
        topo.start_backend(pod, name=f"web-{'abc'[i - 1]}", port=8080)
    client = topo.add_client("client")
    node = topo.node_cgroup(NODE)
    bpffs = topo.bpffs / NODE
    port = 19256
    console.rule("[bold]Balancing demo")
    console.print(f"pods: {', '.join(f'{p.name} {p.ip4} {p.ip6}' for p in pods)}")
    console.print(f"agent: cgroup {node}, pins {bpffs}, manifests {manifests}")
    argv = [
        PY,
        "-m",
        "balancing",
        "agent",
        "--manifests",
        str(manifests),
        "--node-name",
        NODE,
        "--cgroup",
        str(node),
        "--bpffs",
        str(bpffs),
        "--health-addr",
        f"127.0.0.1:{port}",
        "--state-addr",
        "",
        "--max-services",
        "4096",
        "--max-backends",
        "4096",
        "--max-reverse",
        "4096",
        "--metrics-addr",
        f"127.0.0.1:{port + 1}",
    ]
    agent = topo.spawn(argv, label="agent")
    try:
        console.print(f"agent ready: {wait_ready(port)}")
        console.print(topo.run([PY, "-m", "balancing", "inspect", "services", "--bpffs", str(bpffs)]).stdout)

        def c(*args: str | int) -> dict[str, Any]:
            return topo.run_client(client, node, [str(a) for a in args])

        console.print(
            counts_table(
                "web: 10.96.0.10 / fd00:96::10 (endpoints derived from the Pods)",
                [
                    ("TCP IPv4, 300 connects", c("tcp", "10.96.0.10", 80, "--count", 300)),
                    ("TCP IPv6, 300 connects", c("tcp", "fd00:96::10", 80, "--count", 300, "--family", 6)),
                    (
                        "TCP v4-mapped on AF_INET6",
                        c("tcp", "10.96.0.10", 80, "--count", 100, "--family", "mapped"),
                    ),
                    (
                        "UDP one unconnected socket, 50 datagrams",
                        c("udp-unconnected", "10.96.0.10", 53, "--count", 50),
                    ),
                    ("UDP 100 connected sockets", c("udp-connected", "10.96.0.10", 53, "--count", 100)),
                ],
            )
        )
        peer = c("getpeername", "10.96.0.10", 80)
        udp = c("udp-unconnected", "fd00:96::10", 53, "--count", 5, "--family", 6, "--details")
        console.print(
            f"getpeername() shows {peer.get('peernames')}; UDP replies come from "
            f"{udp.get('reply_sources', udp.get('sources'))} (the VIP, not the pod)"
        )
        console.print(
            counts_table(
                "api: 10.96.0.20 (EndpointSlice: one ready, one not ready)",
                [
                    ("TCP 100 connects", c("tcp", "10.96.0.20", 8000, "--count", 100)),
                ],
            )
        )
        t0 = time.perf_counter()
        empty = c("tcp", "10.96.0.30", 80, "--count", 1)
        console.print(
            f"empty (no endpoints): {empty.get('errors')} — refused at once "
            f"(whole client run {1000 * (time.perf_counter() - t0):.0f} ms incl. Python start)"
        )

        console.rule("edit examples: pod web-c becomes not ready")
        pods_file = manifests / "pods.yaml"
        text = pods_file.read_text()
        head, sep, tail = text.partition("name: web-c")
        pods_file.write_text(head + sep + tail.replace('status: "True"', 'status: "False"', 1))
        time.sleep(1.0)
        console.print(
            counts_table(
                "web after the edit",
                [
                    ("TCP IPv4, 300 connects", c("tcp", "10.96.0.10", 80, "--count", 300)),
                ],
            )
        )

        console.rule("stop the agent: the datapath keeps translating")
        topo.stop(agent)
        console.print(
            counts_table(
                "web with the agent stopped",
                [
                    ("TCP IPv4, 100 connects", c("tcp", "10.96.0.10", 80, "--count", 100)),
                ],
            )
        )
    finally:
        if agent.poll() is None:
            topo.stop(agent)
        console.print(topo.run([PY, "-m", "balancing", "cleanup", "--bpffs", str(bpffs)]).stdout.strip())


if __name__ == "__main__":
    main()
