"""North-south's operator view on real pinned maps: ``balancing inspect conntrack`` and the metrics reader.

The real datapath object is loaded into a test-owned cgroup and bpffs directory and the real writer
programs a NodePort frontend. Beside its pins the kernel creates north-south's own maps
(``libbpf.map_create``: an LRU hash with ``bl_ct_v1``'s layout, the settings array, the per-CPU counters,
the device hash); the test writes flows into them as the TC programs write them (both directions, packed
with the ABI's layouts) and pins them where ``nodeport.o``'s loader pins them. The command then runs on them,
in-process (typer's runner) and as the real ``balancing`` program, and ``metrics.KernelReader`` reads them.
No program touches these maps: what is checked is the reading of what is there.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from balancing.agent import state as agentstate
from balancing.cli import inspect_data
from balancing.cli.main import app
from balancing.datapath import abi, libbpf, percpu
from balancing.metrics import kernel
from balancing.model.desired import (
    Backend,
    DesiredState,
    Frontend,
    FrontendKey,
    FrontendKind,
    Owner,
    Protocol,
)
from helpers.support import Datapath

NODE = "192.0.2.10"
NODEPORT = FrontendKey(ipaddress.ip_address(NODE), 30080, Protocol.TCP)
REMOTE, LOCAL = (Backend(ipaddress.ip_address(ip), 8080) for ip in ("10.244.1.5", "10.244.0.9"))
SVC = Owner("Service", "shop", "web", "http")
CT_CAPACITY = 1024
SNAT_MIN, SNAT_MAX = 40000, 40999
# enum bpf_map_type
MAP_TYPE_HASH, MAP_TYPE_ARRAY, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_HASH = 1, 2, 6, 9


def pin_map(map_dir: Path, kind: int, name: str, key_size: int, value_size: int, entries: int) -> int:
    """A map the kernel creates, pinned as ``map_dir/name``; the caller closes the fd."""
    fd = libbpf.map_create(kind, name, key_size, value_size, entries)
    try:
        libbpf.obj_pin(fd, str(map_dir / name))
    except OSError:
        os.close(fd)
        raise
    return fd


def endpoint(text: str) -> tuple[bytes, bytes]:
    host, _, port = text.rpartition(":")
    return abi.pack_addr(ipaddress.ip_address(host.strip("[]"))), abi.pack_port(int(port))


def ct_item(src: str, dst: str, new_src: str, new_dst: str, flags: int, svc_id: int, age_s: float) -> Any:
    (s, sp), (d, dp), (ns, nsp), (nd, ndp) = (endpoint(e) for e in (src, dst, new_src, new_dst))
    created = time.monotonic_ns() - int(age_s * 1e9)  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
    key = abi.CT_KEY.packer.pack(s, d, sp, dp, 6, 0, 0)
    val = abi.CT_VAL.packer.pack(ns, nd, nsp, ndp, svc_id, 1, flags, abi.CT_ESTABLISHED, 0, created, created)
    return key, val


def flow(client: str, backend: str, svc_id: int, snat: str | None, age_s: float) -> list[tuple[bytes, bytes]]:
    """Both entries of a flow to the NodePort, as nodeport.c's new_flow() writes them."""
    frontend, source = f"{NODE}:30080", snat or client
    kind = abi.CT_F_SNAT if snat else abi.CT_F_LOCAL
    return [
        ct_item(client, frontend, source, backend, kind, svc_id, age_s),
        ct_item(backend, source, frontend, client, kind | abi.CT_F_REPLY, svc_id, age_s),
    ]


class NorthSouthPins:
    """North-south's four maps, created and pinned under a datapath's ``maps`` directory."""

    def __init__(self, map_dir: Path) -> None:
        self.fds: dict[str, int] = {}
        specs = (
            (MAP_TYPE_LRU_HASH, abi.MAP_CONNTRACK, abi.CT_KEY.size, abi.CT_VAL.size, CT_CAPACITY),
            (MAP_TYPE_HASH, abi.MAP_NS_DEVICES, 4, abi.NSDEV.size, abi.DEFAULT_NSDEV_ENTRIES),
            (MAP_TYPE_ARRAY, abi.MAP_NS_CONFIG, 4, abi.NS_CONFIG.size, 1),
            (MAP_TYPE_PERCPU_ARRAY, abi.MAP_NS_STATS, 4, 8, abi.NSSTAT_MAX),
        )
        try:
            for spec in specs:
                self.fds[spec[1]] = pin_map(map_dir, *spec)
        except OSError:
            self.close()
            raise

    def write(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            libbpf.map_update(self.fds[name], key, value)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def datapath(cgroup_dir: Path, bpffs_dir: Path) -> Iterator[Datapath]:
    """The real datapath (no traffic: its programs sit in an empty cgroup), programmed with the NodePort."""
    d = Datapath(cgroup_dir, bpffs_dir)
    try:
        model = Frontend(SVC, (LOCAL, REMOTE), "2 ready endpoints", FrontendKind.NODE_PORT)
        d.program_frontends({str(NODEPORT): model})
        yield d
    finally:
        d.close()


@pytest.fixture
def ns(datapath: Datapath) -> Iterator[NorthSouthPins]:
    pins = NorthSouthPins(datapath.cfg.map_dir)
    try:
        yield pins
    finally:
        pins.close()


def svc_id_of(datapath: Datapath) -> int:
    svc_id = datapath.writer.svc_id(NODEPORT)
    assert svc_id is not None
    return svc_id


def write_flows(datapath: Datapath, ns: NorthSouthPins) -> None:
    """A source-NATed flow, a flow to a local pod, and a reply entry whose client entry is gone."""
    svc_id = svc_id_of(datapath)
    snat = flow("203.0.113.7:40000", "10.244.1.5:8080", svc_id, f"{NODE}:40001", 30)
    local = flow("203.0.113.8:41000", "10.244.0.9:8080", svc_id, None, 5)
    orphan = flow("203.0.113.9:42000", "10.244.1.5:8080", svc_id, f"{NODE}:40002", 60)[1:]
    ns.write(abi.MAP_CONNTRACK, snat + local + orphan)


def agent_state(datapath: Datapath) -> dict[str, Any]:
    model = DesiredState({NODEPORT: Frontend(SVC, (LOCAL, REMOTE), "ok", FrontendKind.NODE_PORT)})
    state: dict[str, Any] = json.loads(
        json.dumps(agentstate.build("node-a", model, datapath.writer.svc_id, [], []))
    )
    return state


@pytest.fixture
def agent(datapath: Datapath) -> Iterator[str]:
    """The agent's /state for the programmed frontend, served on loopback."""
    body = json.dumps(agent_state(datapath)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def inspect_json(bpffs: Path, *args: str) -> dict[str, Any]:
    res = CliRunner().invoke(app, ["inspect", "conntrack", "--bpffs", str(bpffs), "-o", "json", *args])
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_inspect_conntrack_pairs_the_real_maps_entries_into_flows(
    datapath: Datapath, ns: NorthSouthPins, agent: str
) -> None:
    write_flows(datapath, ns)
    doc = inspect_json(datapath.bpffs, "--agent", agent)
    assert doc["usage"] == {"entries": 5, "capacity": CT_CAPACITY, "flows": 3}
    rows = {r["client"]: r for r in doc["conntrack"]}
    assert list(rows) == ["203.0.113.7:40000", "203.0.113.8:41000", "203.0.113.9:42000"]  # sorted
    owner = {"kind": "Service", "namespace": "shop", "name": "web", "portName": "http"}
    snat = rows["203.0.113.7:40000"]
    assert (snat["frontend"], snat["backend"], snat["snat"], snat["note"]) == (
        f"{NODE}:30080/TCP",
        "10.244.1.5:8080",
        f"{NODE}:40001",
        None,
    )
    assert (
        snat["owner"] == owner and snat["serviceId"] == svc_id_of(datapath) and snat["state"] == "established"
    )
    assert 30 <= snat["ageSeconds"] < 60 and 30 <= snat["idleSeconds"] < 60
    assert [e["direction"] for e in snat["entries"]] == ["client", "reply"]
    local = rows["203.0.113.8:41000"]
    assert local["snat"] is None and local["local"] is True and local["backend"] == "10.244.0.9:8080"
    assert 5 <= local["ageSeconds"] < 30
    orphan = rows["203.0.113.9:42000"]
    assert orphan["note"] == inspect_data.NO_CLIENT_ENTRY and orphan["snat"] == f"{NODE}:40002"
    assert orphan["owner"] == owner and len(orphan["entries"]) == 1
    without_agent = inspect_json(datapath.bpffs)
    assert [r["owner"] for r in without_agent["conntrack"]] == [None] * 3
    assert without_agent["agent"]["available"] is False


def test_the_balancing_program_prints_the_flows(datapath: Datapath, ns: NorthSouthPins) -> None:
    write_flows(datapath, ns)
    argv = [sys.executable, "-m", "balancing", "inspect", "conntrack", "--bpffs", str(datapath.bpffs)]
    env = {**os.environ, "COLUMNS": "220", "TERM": "dumb"}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if "203.0.113." in line]
    assert len(lines) == 3, res.stdout
    assert f"{NODE}:40001" in lines[0] and "established" in lines[0] and "id " in lines[0]
    assert "no client entry" in lines[2]
    as_json = subprocess.run([*argv, "-o", "json"], capture_output=True, text=True, timeout=60, check=False)
    assert as_json.returncode == 0 and len(json.loads(as_json.stdout)["conntrack"]) == 3


def test_without_north_south_pins_the_command_says_so_and_metrics_export_none(datapath: Datapath) -> None:
    res = CliRunner().invoke(app, ["inspect", "conntrack", "--bpffs", str(datapath.bpffs)])
    assert res.exit_code == 2
    assert (
        f"north-south is not running on this node (no {datapath.cfg.map_dir / abi.MAP_CONNTRACK})"
        in res.output
    )
    snap = kernel.KernelReader(datapath.bpffs, entries_every=0).read()
    assert snap.northsouth is None and snap.errors == []
    assert not set(abi.NODEPORT_MAPS) & set(snap.maps)


def test_the_metrics_reader_reads_north_souths_fill_and_counters(
    datapath: Datapath, ns: NorthSouthPins
) -> None:
    write_flows(datapath, ns)
    ns.write(abi.MAP_NS_CONFIG, [(abi.CONFIG_KEY, abi.pack_ns_config(16381, SNAT_MIN, SNAT_MAX))])
    ns.write(abi.MAP_NS_DEVICES, [(abi.pack_u32(2), abi.pack_nsdev(ipaddress.ip_address(NODE), None))])
    cpus = percpu.possible_cpus()
    per_cpu = {  # index → one value per possible CPU
        abi.NSSTAT_SNAT_ALLOCATED: [2] + [1] * (cpus - 1),
        abi.NSSTAT_SNAT_RETRIES: [0] * cpus,
        abi.NSSTAT_CT_CREATED: [3] * cpus,
        abi.NSSTAT_BACKEND_GONE: [1] + [0] * (cpus - 1),
    }
    packed = [
        (abi.pack_u32(i), b"".join(v.to_bytes(8, sys.byteorder) for v in vs)) for i, vs in per_cpu.items()
    ]
    ns.write(abi.MAP_NS_STATS, packed)

    reader = kernel.KernelReader(datapath.bpffs, entries_every=0)
    snap = reader.read()
    assert snap.errors == []
    assert snap.northsouth == kernel.NorthSouth(
        conntrack_entries=5,
        conntrack_capacity=CT_CAPACITY,
        snat_ports_in_use=1,  # the orphan reply entry holds its port too, but is not counted as a flow's
        snat_port_range=SNAT_MAX - SNAT_MIN + 1,
        counters={"snat_allocations": cpus + 1, "snat_retries": 0, "flows": 3 * cpus, "backend_gone": 1},
    )
    assert snap.maps[abi.MAP_CONNTRACK] == kernel.MapUsage("lru_hash", 5, CT_CAPACITY)
    assert snap.maps[abi.MAP_NS_DEVICES].entries == 1
    assert abi.MAP_NS_STATS not in snap.maps and abi.MAP_NS_CONFIG not in snap.maps  # arrays: no usage

    more = flow("198.51.100.1:1000", "10.244.1.5:8080", svc_id_of(datapath), f"{NODE}:40003", 1)
    ns.write(abi.MAP_CONNTRACK, more)
    cached = kernel.KernelReader(datapath.bpffs, entries_every=3600)
    assert cached.read().northsouth == kernel.NorthSouth(7, CT_CAPACITY, 2, 1000, snap.northsouth.counters)
    ns.write(abi.MAP_CONNTRACK, flow("198.51.100.2:1000", "10.244.1.5:8080", 1, f"{NODE}:40004", 1))
    later = cached.read().northsouth
    assert later is not None and later.conntrack_entries == 7, "counted once per entries_every"


def test_counting_a_full_conntrack_map(datapath: Datapath, ns: NorthSouthPins) -> None:
    """The per-scrape walk on a map of 100k entries: exact, and its time reported (-s shows it)."""
    os.close(ns.fds.pop(abi.MAP_CONNTRACK))
    (datapath.cfg.map_dir / abi.MAP_CONNTRACK).unlink()
    capacity, flows = 131072, 50_000
    fd = pin_map(
        datapath.cfg.map_dir, MAP_TYPE_LRU_HASH, abi.MAP_CONNTRACK, abi.CT_KEY.size, abi.CT_VAL.size, capacity
    )
    ns.fds[abi.MAP_CONNTRACK] = fd
    keys, values = bytearray(), bytearray()
    for i in range(flows):
        client = f"203.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:40000"
        snat = f"{NODE}:{40000 + i % 1000}" if i % 2 else None
        backend = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:8080"
        for key, value in flow(client, backend, 1, snat, 1):
            keys += key
            values += value
    for start in range(0, 2 * flows, 8192):
        n = min(8192, 2 * flows - start)
        libbpf.map_update_batch(
            fd,
            bytes(keys[start * abi.CT_KEY.size : (start + n) * abi.CT_KEY.size]),
            bytes(values[start * abi.CT_VAL.size : (start + n) * abi.CT_VAL.size]),
            n,
        )
    started = time.perf_counter()
    entries, snat_ports = kernel.conntrack_fill(fd, abi.CT_KEY.size, abi.CT_VAL.size)
    took = time.perf_counter() - started
    print(f"counting {entries} conntrack entries took {took * 1000:.1f} ms")
    assert (entries, snat_ports) == (2 * flows, flows // 2)
    started = time.perf_counter()
    doc = inspect_json(datapath.bpffs)
    print(f"inspect conntrack -o json over {entries} entries took {time.perf_counter() - started:.2f} s")
    assert doc["usage"]["flows"] == flows and not [r for r in doc["conntrack"] if r["note"]]
