"""The control plane at scale (issue 15): every row of the issue's table at each size, against its targets.

Per size N (``--services``, default ``10000,100000``) with E endpoints per Service (``--endpoints``, 10), in a
fresh process per size (so its peak RSS is that size's alone), ``--rounds`` times:

1. **decode**: a ServiceList and an EndpointSliceList as the API server returns them (compact JSON bytes;
   items with uid, resourceVersion, creationTimestamp, Helm-style labels and annotations, slices with
   ownerReferences and endpoints with conditions, nodeName, zone and targetRef; no managedFields) turned
   into the model's typed objects by the agent's own list path, ``sources.informer.Informer.relist`` over
   an httpx mock transport serving those bytes. Time and objects/s. ``Bounds.list_bytes`` is raised to the
   bodies' size when they exceed it (the row then says so: the agent would refuse such a list today);
2. **model**: the decoded objects upserted into ``model.store.ClusterStore`` and ``desired()`` (one full
   recompute; the collector paused for ``desired`` as the agent's full sync does);
3. **map writes**: ``datapath.writer.MapWriter.sync`` of that desired state into real kernel maps (the BPF
   object loaded into a bench-owned cgroup and bpffs directory, both removed after): time, map operations
   and operations/s; **all**: the sum of 1-3 (the issue's "from API list JSON to maps");
4. **peak RSS**: VmHWM of that process (/proc/self/status) after steps 1-3;
5. **change**: then ``gcpause.freeze_long_lived()`` as the agent does after its first full sync, and
   ``--changes`` endpoint changes (one endpoint of one slice replaced), each timed from the parsed slice
   reaching the store to the writer having applied it (as bench/run.py): p50, p99, max (the JSON names the
   slowest changes by index: a collection falls on the same one in every run);

and, through the CLI (``python -m balancing agent --manifests DIR`` in a bench-owned cgroup and bpffs
directory, its health port on loopback; one agent at a time):

6. **e2e**: a manifest directory, then the time from starting the agent to ``/readyz`` answering 200 (polled
   every 50 ms), and the agent's VmHWM read just before it is stopped; ``/statusz`` must count every
   frontend, else the row says how many were programmed (a file over ``sources.decoding``'s budgets is
   refused whole). Cases (``--e2e``, ``SERVICESxENDPOINTS:FORMAT`` comma-separated; by default derived from
   the sizes: N x E as one JSON ``List`` when N >= 50000, else N x E and N x 3 as one YAML file of
   documents): the issue's 100k x 10 JSON List, 10k x 10 YAML and 10k x 3 YAML. When one file is refused,
   the same objects split into files within the budgets run as one more row (``--no-split`` leaves it out; a
   refused case runs once);
7. **NodePort**: ``--nodeport-nodes`` Node objects (one InternalIP each) and ``--nodeport-services``
   NodePort Services (``--nodeport-endpoints`` each) through the store and the writer into kernel maps, in
   a process of its own: time and frontends written. Today every node address makes a frontend of each
   NodePort Service, so nodes x services frontends; the defaults (1000 x 1000) run in under two minutes.

Targets are the issue's, stated for 100k Services (times scale linearly with N: 10 s for 1-3, 3 s for the
model; RSS 1 GiB at 100k and 150 MiB at 10k or less, linear between), 2 s and 150 MiB for the 10k-Service
manifests, >= 1M map operations/s, change p99 <= 5 ms and max <= 50 ms, NodePort 2 s per 1000 NodePort
Services whatever the number of nodes. With ``--rounds`` > 1 each figure is the median over rounds with its
spread [min..max]; a target is judged on the median.

Run as root (kernel maps, cgroups, agents), on a shared machine under the kernel-test lock:
``flock /tmp/bl-kernel-tests.lock make bench-scale ARGS="--services 10000,100000"`` or
``.venv/bin/python bench/scale.py [--services N,...] [--only decode,model,maps,all,rss,change,e2e,nodeport]
[--rounds R] [--json PATH]``. The default run takes about 5 minutes per round (100k dominates); a quick
check in about a minute: ``--services 10000 --e2e 10000x3:yaml --nodeport-nodes 100 --nodeport-services 100``.
``--only decode,model`` needs no root. Every cgroup, pin and file it makes is removed.
Neighbours: bench/run.py (the object path), bench/changes.py (the freeze's effect side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

import run  # bench/run.py: the BPF object's path
from balancing.datapath import abi, loader, maps, writer
from balancing.gcpause import freeze_long_lived
from balancing.gcpause import paused as gc_paused
from balancing.model import objects, store
from balancing.model.desired import DesiredState
from balancing.model.objects import KubeObject
from balancing.sources.decoding import DEFAULT_BUDGETS
from balancing.sources.informer import Bounds, Informer, Resource, Timing
from balancing_testkit.topology import Topology, owned_bpffs_dir, owned_cgroup

Doc = dict[str, Any]
MiB = 2**20
GiB = 2**30
NODE = "bench-node"  # this node: no endpoint is on it
CREATED = "2026-01-01T00:00:00Z"
NAMESPACES = 500  # Services are spread over this many namespaces
ENDPOINT_NODES = 1000  # endpoints' nodeName spread over this many (other) nodes
SERVICES = Resource("/api/v1/services", "v1", "Service")
SLICES = Resource("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice")
ROWS = ("decode", "model", "maps", "all", "rss", "change", "e2e", "nodeport")
WORKER_ROWS = frozenset(ROWS[:6])
DUMPER = yaml.CSafeDumper if yaml.__with_libyaml__ else yaml.SafeDumper

_START = time.monotonic()


def note(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(f"[{time.monotonic() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


# --- the objects: API list items and manifests ------------------------------------------------------------


def _ip(first_octet: int, n: int) -> str:
    return f"10.{first_octet + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def _uid(kind: int, n: int) -> str:
    return str(uuid.UUID(int=(kind << 64) | n))


def service_doc(i: int, *, api: bool = True) -> Doc:
    """Service ``i`` (10.96.0.0/12), one TCP port 80 -> 8080: as the API lists it (``api``), else as a
    manifest (apiVersion/kind, no server-set fields)."""
    name, ns, release = f"svc-{i}", f"ns-{i % NAMESPACES}", f"release-{i % 1000}"
    vip = _ip(96, i + 1)
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": "app-1.4.2",
    }
    spec: Doc = {
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        "selector": {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": release},
        "clusterIP": vip,
        "clusterIPs": [vip],
        "type": "ClusterIP",
        "sessionAffinity": "None",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    }
    if not api:
        meta = {"name": name, "namespace": ns, "labels": labels}
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    meta = {
        "name": name,
        "namespace": ns,
        "uid": _uid(1, i),
        "resourceVersion": str(1_000_000 + i),
        "creationTimestamp": CREATED,
        "labels": labels,
        "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": ns},
    }
    return {"metadata": meta, "spec": spec, "status": {"loadBalancer": {}}}


def slice_doc(i: int, endpoints: int, *, api: bool = True, change: tuple[int, int] | None = None) -> Doc:
    """Service ``i``'s one EndpointSlice (10.128.0.0/12), as the API lists it (``api``) or as a manifest;
    ``change=(j, k)``: endpoint ``j`` replaced by the ``k``-th new address (10.200.0.0/16)."""
    name, ns = f"svc-{i}", f"ns-{i % NAMESPACES}"
    eps: list[Doc] = []
    for j in range(endpoints):
        n = i * endpoints + j
        ip = _ip(200, change[1]) if change is not None and change[0] == j else _ip(128, n)
        node = f"node-{n % ENDPOINT_NODES}"
        if not api:
            eps.append({"addresses": [ip], "conditions": {"ready": True}, "nodeName": node})
            continue
        pod = {"kind": "Pod", "namespace": ns, "name": f"{name}-7d9f8b6c5d-{j:05d}", "uid": _uid(3, n)}
        conditions = {"ready": True, "serving": True, "terminating": False}
        eps.append(
            {
                "addresses": [ip],
                "conditions": conditions,
                "nodeName": node,
                "targetRef": pod,
                "zone": f"z{n % 3}",
            }
        )
    labels = {"kubernetes.io/service-name": name}
    body: Doc = {
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    }
    if not api:
        meta: Doc = {"name": f"{name}-1", "namespace": ns, "labels": labels}
        return {"apiVersion": SLICES.api_version, "kind": "EndpointSlice", "metadata": meta, **body}
    owner = {"apiVersion": "v1", "kind": "Service", "name": name, "uid": _uid(1, i), "controller": True}
    meta = {
        "name": f"{name}-x7k2p",
        "generateName": f"{name}-",
        "namespace": ns,
        "uid": _uid(2, i),
        "resourceVersion": str(3_000_000 + i + (change[1] if change else 0)),
        "generation": 1,
        "creationTimestamp": CREATED,
        "labels": {
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            **labels,
            "app.kubernetes.io/name": name,
        },
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": CREATED},
        "ownerReferences": [{**owner, "blockOwnerDeletion": True}],
    }
    return {"metadata": meta, **body}


def _compact(doc: Doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def write_api_list(path: Path, resource: Resource, docs: Iterable[Doc]) -> int:
    """A ``<Kind>List`` as the API server answers a list (compact JSON); its size in bytes."""
    with path.open("wb") as f:
        head = {"kind": f"{resource.kind}List", "apiVersion": resource.api_version}
        f.write(_compact({**head, "metadata": {"resourceVersion": "9000000"}})[:-1] + b',"items":[')
        for k, doc in enumerate(docs):
            f.write(b"," + _compact(doc) if k else _compact(doc))
        f.write(b"]}\n")
        return f.tell()


def manifest_docs(services: int, endpoints: int, first: int = 0) -> Iterator[Doc]:
    for i in range(first, services):
        yield service_doc(i, api=False)
        yield slice_doc(i, endpoints, api=False)


def write_manifest(path: Path, docs: Iterable[Doc], fmt: str) -> int:
    """One manifest file: a JSON ``List`` (compact) or YAML documents (libyaml's emitter); its size."""
    with path.open("wb") as f:
        if fmt == "json":
            f.write(b'{"apiVersion":"v1","kind":"List","items":[')
            for k, doc in enumerate(docs):
                f.write(b"," + _compact(doc) if k else _compact(doc))
            f.write(b"]}\n")
        else:
            it = iter(docs)
            while chunk := list(itertools.islice(it, 1000)):
                f.write(yaml.dump_all(chunk, Dumper=DUMPER, sort_keys=False, explicit_start=True).encode())
        return f.tell()


# --- /proc -------------------------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def map_sizes(frontends: int, slots: int, backends: int | None = None) -> dict[str, int]:
    """Service and backend map capacities with room for ``frontends`` (a master and ``slots`` slots each)
    and ``backends`` distinct backends (default: ``slots`` per frontend)."""
    backends = frontends * slots if backends is None else backends
    return {
        "max_services": max(abi.DEFAULT_SVC_ENTRIES, math.ceil(1.25 * frontends * (1 + slots))),
        "max_backends": max(abi.DEFAULT_BACKENDS, math.ceil(1.25 * backends) + 4096),
    }


# --- the per-size worker (a fresh process: steps 1-5) --------------------------------------------------


async def decode_lists(bodies: dict[str, bytes]) -> tuple[list[Informer], list[KubeObject], dict[str, Any]]:
    """Each list body through ``Informer.relist`` as the agent lists it; the informers (they keep the
    objects in force, as the agent's do), the objects and the figures."""
    sizes = {path: len(body) for path, body in bodies.items()}
    bounds = Bounds(list_bytes=max(Bounds().list_bytes, *sizes.values()))

    def answer(request: httpx.Request) -> httpx.Response:
        body = bodies.pop(request.url.path)  # the response holds the only copy, as a real one does
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    informers: list[Informer] = []
    decoded: list[KubeObject] = []
    seconds: dict[str, float] = {}
    transport = httpx.MockTransport(answer)
    async with httpx.AsyncClient(base_url="http://apiserver.bench", transport=transport) as client:
        for resource in (SERVICES, SLICES):
            informer = Informer(client, resource, lambda: {}, Timing(), bounds)
            t0 = time.perf_counter()
            update = await informer.relist()
            seconds[resource.kind] = time.perf_counter() - t0
            if update.errors:
                raise RuntimeError(f"{resource.kind}: {len(update.errors)} errors, e.g. {update.errors[0]}")
            informers.append(informer)
            decoded.extend(update.upserts)
    figures = {
        "seconds": sum(seconds.values()),
        "seconds_by_kind": seconds,
        "objects": len(decoded),
        "objects_per_s": len(decoded) / sum(seconds.values()),
        "list_bytes": sizes,
        "list_bytes_bound_default": Bounds().list_bytes,
        "over_default_bound": any(s > Bounds().list_bytes for s in sizes.values()),
    }
    return informers, decoded, figures


def worker(args: argparse.Namespace) -> dict[str, Any]:
    n, e, stages = args.size, args.endpoints, set(args.stages.split(","))
    api_dir = Path(args.api_dir)
    out: dict[str, Any] = {"services": n, "endpoints": e, "rss_start": proc_status()}
    bodies = {SERVICES.path: (api_dir / "services.json").read_bytes()}
    bodies[SLICES.path] = (api_dir / "slices.json").read_bytes()
    informers, decoded, out["decode"] = asyncio.run(decode_lists(bodies))
    del bodies
    out["rss_after_decode"] = proc_status()
    if "model" not in stages:
        return out
    st = store.ClusterStore(NODE)
    t0 = time.perf_counter()
    for obj in decoded:
        st.upsert(obj)
    t1 = time.perf_counter()
    with gc_paused():  # as the agent's full sync
        desired = st.desired()
        st.take_changes()
    t2 = time.perf_counter()
    del decoded
    frontends = len(desired.frontends)
    out["model"] = {"seconds": t2 - t0, "upsert_s": t1 - t0, "desired_s": t2 - t1, "frontends": frontends}
    out["rss_after_model"] = proc_status()
    if "maps" in stages:
        with_maps(args, st, desired, out)
    out["informer_objects"] = sum(len(i.objects) for i in informers)
    return out


def with_maps(
    args: argparse.Namespace, st: store.ClusterStore, desired: DesiredState, out: dict[str, Any]
) -> None:
    """Steps 3-5 on real kernel maps in a bench-owned cgroup and bpffs directory (removed after)."""
    with owned_cgroup() as cgroup, owned_bpffs_dir() as bpffs:
        cfg = loader.DatapathConfig(
            run.OBJECT, bpffs, cgroup, **map_sizes(len(desired.frontends), args.endpoints)
        )
        t0 = time.perf_counter()
        loader.load(cfg)
        out["load_s"] = time.perf_counter() - t0
        io = maps.KernelMaps(cfg.map_dir)
        try:
            w = writer.MapWriter(io)
            with gc_paused():
                t0 = time.perf_counter()
                stats = w.sync(desired)
                seconds = time.perf_counter() - t0
            if stats.failed:
                raise RuntimeError(
                    f"{len(stats.failed)} frontends failed: {next(iter(stats.failed.values()))}"
                )
            out["maps"] = {"seconds": seconds, "ops": stats.ops, "ops_per_s": stats.ops / seconds}
            out["rss_after_maps"] = proc_status()
            if "change" in set(args.stages.split(",")):
                out["change"] = changes(args, st, w)
                out["rss_after_change"] = proc_status()
        finally:
            io.close()
            loader.cleanup(cfg.bpffs)


def changes(args: argparse.Namespace, st: store.ClusterStore, w: writer.MapWriter) -> dict[str, Any]:
    """After the freeze the agent makes: one endpoint change at a time, seen (in the store) -> written."""
    freeze_long_lived()
    latencies, ops = [], 0
    for k in range(args.changes):
        i, j = (k * 7919) % args.size, k % args.endpoints
        doc = {
            **slice_doc(i, args.endpoints, change=(j, k)),
            "apiVersion": SLICES.api_version,
            "kind": "EndpointSlice",
        }
        obj = objects.parse_object(doc)
        t0 = time.perf_counter()
        st.upsert(obj)
        ops += w.apply(st.take_changes()).ops
        latencies.append((time.perf_counter() - t0) * 1000)
    order = sorted(range(len(latencies)), key=latencies.__getitem__, reverse=True)
    slowest = {str(k): latencies[k] for k in order[:5]}  # which changes (their index) were slowest, ms
    latencies.sort()
    return {
        "slowest": slowest,
        "samples": len(latencies),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[math.ceil(len(latencies) * 0.99) - 1],
        "max_ms": latencies[-1],
        "ops": ops,
    }


# --- the NodePort worker (a process of its own) -------------------------------------------------------


def nodeport_worker(args: argparse.Namespace) -> dict[str, Any]:
    nodes, services, e = args.nodeport_nodes, args.nodeport_services, args.nodeport_endpoints
    docs: list[Doc] = []
    for k in range(nodes):
        addresses = [
            {"type": "InternalIP", "address": _ip(250, k + 1)},
            {"type": "Hostname", "address": f"node-{k}"},
        ]
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": f"node-{k}"},
                "status": {"addresses": addresses},
            }
        )
    for i in range(services):
        svc = service_doc(i, api=False)
        svc["spec"]["type"] = "NodePort"
        svc["spec"]["ports"][0]["nodePort"] = 30000 + i % 2768
        docs += [svc, slice_doc(i, e, api=False)]
    parsed = [objects.parse_object(d) for d in docs]
    del docs
    st = store.ClusterStore("node-0")
    t0 = time.perf_counter()
    for obj in parsed:
        st.upsert(obj)
    with gc_paused():
        desired = st.desired()
        st.take_changes()
    t1 = time.perf_counter()
    out: dict[str, Any] = {"nodes": nodes, "services": services, "endpoints": e, "model_s": t1 - t0}
    out["frontends"] = len(desired.frontends)
    with owned_cgroup() as cgroup, owned_bpffs_dir() as bpffs:
        sizes = map_sizes(len(desired.frontends), e, services * e)
        cfg = loader.DatapathConfig(run.OBJECT, bpffs, cgroup, **sizes)
        loader.load(cfg)
        io = maps.KernelMaps(cfg.map_dir)
        try:
            w = writer.MapWriter(io)
            with gc_paused():
                t1 = time.perf_counter()
                stats = w.sync(desired)
                t2 = time.perf_counter()
        finally:
            io.close()
            loader.cleanup(cfg.bpffs)
    if stats.failed:
        raise RuntimeError(f"{len(stats.failed)} NodePort frontends failed")
    out.update(
        maps_s=t2 - t1,
        seconds=out["model_s"] + t2 - t1,
        frontends_written=stats.frontends_written,
        ops=stats.ops,
    )
    out["rss_peak"] = proc_status()["VmHWM"]
    return out


def spawn_worker(kind: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """This script as a fresh process (``--worker kind``); its JSON result."""
    with tempfile.NamedTemporaryFile(prefix="bench-scale-", suffix=".json") as result:
        argv = [sys.executable, __file__, "--worker", kind, "--out", result.name, *extra]
        argv += [f"--endpoints={args.endpoints}", f"--changes={args.changes}"]
        subprocess.run(argv, check=True)
        return dict(json.loads(Path(result.name).read_text()))


# --- end to end through the CLI ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    services: int
    endpoints: int
    fmt: str  # "json" (one List) or "yaml" (documents)
    files: int = 1

    @property
    def label(self) -> str:
        what = "JSON List" if self.fmt == "json" else "YAML"
        split = f", split into {self.files} files" if self.files > 1 else ", one file"
        return f"e2e {what}{split}: start -> /readyz"


def e2e_cases(args: argparse.Namespace, sizes: list[int]) -> list[Case]:
    if args.e2e:
        cases = []
        for item in args.e2e.split(","):
            size, _, fmt = item.partition(":")
            services, _, endpoints = size.partition("x")
            cases.append(Case(int(services), int(endpoints or args.endpoints), fmt or "yaml"))
        return cases
    out: list[Case] = []
    for n in sorted(sizes, reverse=True):
        if n >= 50_000:
            out.append(Case(n, args.endpoints, "json"))
        else:
            out += [Case(n, args.endpoints, "yaml"), Case(n, 3, "yaml")]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, Doc]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, dict(json.load(r))
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def write_case(directory: Path, case: Case) -> int:
    """The case's manifest file(s) in ``directory``; bytes written."""
    per_file = math.ceil(case.services / case.files)
    written = 0
    for f in range(case.files):
        first, last = f * per_file, min(case.services, (f + 1) * per_file)
        docs = manifest_docs(last, case.endpoints, first)
        written += write_manifest(directory / f"services-{f:03d}.{case.fmt}", docs, case.fmt)
    return written


def run_agent(topo: Topology, directory: Path, case: Case, timeout: float, seq: int) -> dict[str, Any]:
    """``balancing agent`` on ``directory``: seconds to /readyz 200, its VmHWM then, /statusz's counts."""
    name = f"scale-{seq}"
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "balancing",
        "agent",
        "--manifests",
        str(directory),
        "--node-name",
        NODE,
        "--cgroup",
        str(topo.node_cgroup(name)),
        "--bpffs",
        str(topo.bpffs / name),
        "--health-addr",
        f"127.0.0.1:{port}",
        "--state-addr",
        "",
        "--metrics-addr",
        "",
        "--bpf-object",
        str(run.OBJECT),
        *(f"--{k.replace('_', '-')}={v}" for k, v in map_sizes(case.services, case.endpoints).items()),
    ]
    started = time.monotonic()
    proc = topo.spawn(argv, label=name)
    out: dict[str, Any] = {}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited {proc.returncode}:\n{topo.logs(proc)[1][-3000:]}")
            try:
                if http_get(port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                out["timeout"] = True
                break
            time.sleep(0.05)
        out["seconds"] = time.monotonic() - started
        out["rss_peak"] = proc_status(proc.pid)["VmHWM"]
        status = http_get(port, "/statusz")[1]
        out["frontends"] = status.get("frontends", 0)
        out["errors"] = status.get("errors", {}).get("errors", 0)
        logged = [line for line in topo.logs(proc)[1].splitlines() if "ERROR" in line or "rejected" in line]
        out["first_error"] = logged[0][:400] if logged else ""
    finally:
        topo.stop(proc)
        loader.cleanup(topo.bpffs / name)
    return out


def e2e(args: argparse.Namespace, cases: list[Case], tmp: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    seq = 0
    with Topology() as topo:
        pending = list(cases)
        while pending:
            case = pending.pop(0)
            directory = tmp / f"manifests-{seq}"
            directory.mkdir()
            size = write_case(directory, case)
            runs: list[dict[str, Any]] = []
            refused = False
            while len(runs) < args.rounds and not refused:  # once refused, no more rounds of it
                seq += 1
                note(f"e2e: {case.services:,} x {case.endpoints} {case.fmt}, {case.files} file(s): agent")
                runs.append(run_agent(topo, directory, case, args.e2e_timeout, seq))
                refused = runs[-1]["frontends"] < case.services
            for f in directory.iterdir():
                f.unlink()
            directory.rmdir()
            entry = {"case": vars(case), "label": case.label, "bytes": size, "runs": runs}
            results.append(entry)
            if refused and case.files == 1 and not args.no_split:
                budgets = DEFAULT_BUDGETS
                files = max(
                    math.ceil(size / (0.8 * budgets.file_bytes)),
                    math.ceil(2 * case.services / (0.8 * budgets.objects)),
                )
                if files > 1:
                    pending.insert(0, Case(case.services, case.endpoints, case.fmt, files))
    return results


# --- the table ---------------------------------------------------------------------------------------


def fmt_s(v: float) -> str:
    return f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def fmt_bytes(v: float) -> str:
    return f"{v / GiB:.2f} GiB" if v >= GiB else f"{v / MiB:.0f} MiB"


def fmt_k(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"


@dataclass
class Row:
    row: str
    size: str
    measured: str
    target: str
    met: str
    values: dict[str, Any]


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """The median, with [min..max] when there are several."""
    mid = statistics.median(values)
    if len(values) < 2:
        return fmt(mid)
    return f"{fmt(mid)} [{fmt(min(values))}..{fmt(max(values))}]"


def rss_target(n: int) -> float:
    """1 GiB at 100k Services, 150 MiB at 10k or less, linear between (and beyond)."""
    return 150 * MiB + max(0, n - 10_000) * (GiB - 150 * MiB) / 90_000


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def size_rows(n: int, e: int, runs: list[dict[str, Any]], only: set[str]) -> list[Row]:
    size = f"{n:,} x {e}"
    rows: list[Row] = []
    med = statistics.median

    def pick(*path: str) -> list[float]:
        values = []
        for r in runs:
            v: Any = r
            for p in path:
                v = v[p]
            values.append(float(v))
        return values

    if "decode" in only:
        dec, rate = pick("decode", "seconds"), pick("decode", "objects_per_s")
        objects_n = runs[0]["decode"]["objects"]
        measured = f"{spread(dec, fmt_s)}, {fmt_k(med(rate))} objects/s ({objects_n:,} objects)"
        if runs[0]["decode"]["over_default_bound"]:
            largest = max(runs[0]["decode"]["list_bytes"].values())
            measured += f"; a list of {fmt_bytes(largest)} is over the informer's bound (refused today)"
        rows.append(
            Row(
                "1. decode: API list JSON -> objects",
                size,
                measured,
                "-",
                "-",
                {"seconds": dec, "objects_per_s": rate},
            )
        )
    if "model" in only and "model" in runs[0]:
        model = pick("model", "seconds")
        target = 3.0 * n / 100_000
        rows.append(
            Row(
                "2. model: full recompute",
                size,
                spread(model, fmt_s),
                f"<= {fmt_s(target)}",
                yes(med(model) <= target),
                {"seconds": model, "target_s": target},
            )
        )
    if "maps" in runs[0]:
        secs, rate = pick("maps", "seconds"), pick("maps", "ops_per_s")
        ops = runs[0]["maps"]["ops"]
        if "maps" in only:
            measured = f"{spread(secs, fmt_s)}, {fmt_k(ops)} ops, {spread(rate, fmt_k)} ops/s"
            rows.append(
                Row(
                    "3. map writes: writer sync",
                    size,
                    measured,
                    ">= 1M ops/s",
                    yes(med(rate) >= 1e6),
                    {"seconds": secs, "ops": ops, "ops_per_s": rate},
                )
            )
        if "all" in only:
            total = [
                d + m + w
                for d, m, w in zip(pick("decode", "seconds"), pick("model", "seconds"), secs, strict=True)
            ]
            target = 10.0 * n / 100_000
            rows.append(
                Row(
                    "   all: decode + model + maps",
                    size,
                    spread(total, fmt_s),
                    f"<= {fmt_s(target)}",
                    yes(med(total) <= target),
                    {"seconds": total, "target_s": target},
                )
            )
        if "rss" in only:
            hwm = pick("rss_after_maps", "VmHWM")
            target = rss_target(n)
            rows.append(
                Row(
                    "4. peak RSS (VmHWM) of 1-3",
                    size,
                    spread(hwm, fmt_bytes),
                    f"<= {fmt_bytes(target)}",
                    yes(med(hwm) <= target),
                    {"bytes": hwm, "target_bytes": target},
                )
            )
    if "change" in only and "change" in runs[0]:
        p50, p99, mx = pick("change", "p50_ms"), pick("change", "p99_ms"), pick("change", "max_ms")
        ms: Callable[[float], str] = lambda v: f"{v:.2f}"  # noqa: E731
        samples = runs[0]["change"]["samples"]
        measured = f"p50 {spread(p50, ms)} p99 {spread(p99, ms)} max {spread(mx, ms)} ms ({samples} changes)"
        ok = med(p99) <= 5 and med(mx) <= 50
        rows.append(
            Row(
                "5. one endpoint change after sync",
                size,
                measured,
                "p99 <= 5 ms, max <= 50 ms",
                yes(ok),
                {"p50_ms": p50, "p99_ms": p99, "max_ms": mx},
            )
        )
    return rows


def e2e_rows(results: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for entry in results:
        case = Case(**entry["case"])
        runs = entry["runs"]
        secs = [r["seconds"] for r in runs]
        hwm = [float(r["rss_peak"]) for r in runs]
        t_target = 2.0 if case.services <= 10_000 else 10.0 * case.services / 100_000
        r_target = rss_target(case.services)
        incomplete = [r for r in runs if r["frontends"] < case.services or r.get("timeout")]
        measured = f"{spread(secs, fmt_s)}, RSS {spread(hwm, fmt_bytes)}"
        if incomplete:
            r = incomplete[0]
            why = "timed out" if r.get("timeout") else "ready"
            reason = r["first_error"].partition("rejected: ")[2].partition(": ")[2] or r["first_error"]
            reason = reason.removesuffix(" (file ignored until fixed)")
            measured += f"; {why} with {r['frontends']:,}/{case.services:,} frontends ({reason[:80]})"
        ok = not incomplete and statistics.median(secs) <= t_target and statistics.median(hwm) <= r_target
        target = f"<= {fmt_s(t_target)}, <= {fmt_bytes(r_target)}"
        size = f"{case.services:,} x {case.endpoints}"
        rows.append(
            Row(
                f"6. {case.label}",
                size,
                measured,
                target,
                yes(ok),
                {**entry, "seconds": secs, "rss_peak": hwm},
            )
        )
    return rows


def nodeport_row(runs: list[dict[str, Any]]) -> Row:
    r0 = runs[0]
    secs = [r["seconds"] for r in runs]
    target = 2.0 * r0["services"] / 1000
    measured = (
        f"{spread(secs, fmt_s)} (model {fmt_s(statistics.median(r['model_s'] for r in runs))}, maps "
        f"{fmt_s(statistics.median(r['maps_s'] for r in runs))}), {r0['frontends_written']:,} frontends "
        f"written, {fmt_k(r0['ops'])} ops"
    )
    size = f"{r0['nodes']:,} nodes x {r0['services']:,} (x{r0['endpoints']})"
    return Row(
        "7. NodePort: model + writer",
        size,
        measured,
        f"<= {fmt_s(target)}",
        yes(statistics.median(secs) <= target),
        {"runs": runs, "target_s": target},
    )


def print_table(rows: list[Row]) -> None:
    heads = ("row", "size", "measured", "target", "met")
    cells = [(r.row, r.size, r.measured, r.target, r.met) for r in rows]
    widths = [max(len(h), *(len(c[k]) for c in cells)) if cells else len(h) for k, h in enumerate(heads)]
    widths[2] = min(widths[2], 90)
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--services", default="10000,100000", help="sizes, comma-separated")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run, of {','.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=1, help="runs per size and per e2e case")
    ap.add_argument("--changes", type=int, default=1000, help="endpoint changes timed after the sync")
    ap.add_argument("--e2e", default="", help="cases SERVICESxENDPOINTS:json|yaml,... [from the sizes]")
    ap.add_argument("--e2e-timeout", type=float, default=600.0, help="seconds an agent may take to be ready")
    ap.add_argument("--no-split", action="store_true", help="no split-files row when one file is refused")
    ap.add_argument("--nodeport-nodes", type=int, default=1000)
    ap.add_argument("--nodeport-services", type=int, default=1000)
    ap.add_argument("--nodeport-endpoints", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--worker", choices=("size", "nodeport"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--api-dir", help=argparse.SUPPRESS)
    ap.add_argument("--stages", default="model,maps,change", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def stages_for(only: set[str]) -> str:
    stages = []
    if only & {"model", "maps", "all", "rss", "change"}:
        stages.append("model")
    if only & {"maps", "all", "rss", "change"}:
        stages.append("maps")
    if "change" in only:
        stages.append("change")
    return ",".join(stages) or "decode"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args) if args.worker == "size" else nodeport_worker(args)
        Path(args.out).write_text(json.dumps(result))
        return 0
    only = {o.strip() for o in args.only.split(",") if o.strip()}
    if only - set(ROWS):
        raise SystemExit(f"--only: unknown rows {sorted(only - set(ROWS))} (of {','.join(ROWS)})")
    sizes = [int(s) for s in args.services.split(",")]
    report: dict[str, Any] = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "sizes": {},
        "cpus": os.cpu_count(),
    }
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        if only & WORKER_ROWS:
            for n in sizes:
                api = tmp / f"api-{n}"
                api.mkdir()
                note(f"size {n:,} x {args.endpoints}: writing the API lists")
                write_api_list(api / "services.json", SERVICES, (service_doc(i) for i in range(n)))
                write_api_list(api / "slices.json", SLICES, (slice_doc(i, args.endpoints) for i in range(n)))
                runs = []
                for r in range(args.rounds):
                    note(f"size {n:,}: round {r + 1}/{args.rounds}")
                    extra = [f"--size={n}", f"--api-dir={api}", f"--stages={stages_for(only)}"]
                    runs.append(spawn_worker("size", args, extra))
                for f in api.iterdir():
                    f.unlink()
                api.rmdir()
                report["sizes"][str(n)] = runs
                rows += size_rows(n, args.endpoints, runs, only)
        if "e2e" in only:
            report["e2e"] = e2e(args, e2e_cases(args, sizes), tmp)
            rows += e2e_rows(report["e2e"])
        if "nodeport" in only:
            note(f"NodePort: {args.nodeport_nodes:,} nodes x {args.nodeport_services:,} Services")
            extra = [
                f"--nodeport-nodes={args.nodeport_nodes}",
                f"--nodeport-services={args.nodeport_services}",
                f"--nodeport-endpoints={args.nodeport_endpoints}",
            ]
            report["nodeport"] = [spawn_worker("nodeport", args, extra) for _ in range(args.rounds)]
            rows.append(nodeport_row(report["nodeport"]))
    report["seconds"] = time.monotonic() - started
    report["rows"] = [vars(r) for r in rows]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"(written to {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
