"""Resolution events on the real kernel: the datapath emits, the pipeline reads, attributes and counts.

The datapath is loaded into the cluster's node cgroup; kubelet-named cgroups are created below it (both
drivers, three runtimes, every QoS class) and clients run inside them, with Pod objects for their UIDs as
the manifest directory would hold them. Checked: one event per connect with the right pod, container,
owner and backend; refusals; sampled mode about 1/N; off emits nothing; reverse events only when asked;
both wakeup paths (epoll and timer); and a full ring that nobody reads loses events — counted — while every
connect still succeeds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balancing.datapath import abi, loader, maps, ringbuf, settings, writer
from balancing.events.attribution import Attributor
from balancing.events.pipeline import EventPipeline
from balancing.events.record import EventRecord
from balancing.model import objects
from balancing.model.desired import Frontend, Owner
from balancing_testkit.topology import Cluster
from helpers.support import SMALL_MAPS, Datapath, backends_of, parse_key

VIP = "10.96.0.10"
KEY = f"{VIP}:80/TCP"
REFUSE_KEY, REFUSE_UDP_KEY = "10.96.0.30:80/TCP", "10.96.0.30:53/UDP"
WEB = Owner("Service", "default", "web", "http")
EMPTY = Owner("Service", "default", "empty", "")
OWNERS = {KEY: WEB, REFUSE_KEY: EMPTY, REFUSE_UDP_KEY: EMPTY}


@dataclass
class EventsDatapath(Datapath):
    """``support.Datapath`` with a configurable ring buffer size."""

    event_bytes: int = abi.DEFAULT_EVENT_BYTES

    def __post_init__(self) -> None:
        self.cfg = loader.DatapathConfig(
            self.object_path, self.bpffs, self.cgroup, **SMALL_MAPS, event_bytes=self.event_bytes
        )
        self.report = loader.load(self.cfg)
        self.io = maps.KernelMaps(self.cfg.map_dir)
        self.writer = writer.MapWriter(self.io, lambda pod: [])

    def events(self, mode: int, **kw: Any) -> None:
        settings.write_config(self.cfg.map_dir, mode, **kw)

    @property
    def ring(self) -> Path:
        return self.cfg.map_dir / abi.MAP_EVENTS


def load(cluster: Cluster, event_bytes: int = abi.DEFAULT_EVENT_BYTES) -> EventsDatapath:
    dp = EventsDatapath(cluster.cgroup, cluster.topo.bpffs / cluster.node, event_bytes=event_bytes)
    backends = [f"{p.ip4}:8080" for p in cluster.pods]
    dp.program_frontends(
        {
            KEY: Frontend(WEB, backends_of(backends)),
            REFUSE_KEY: Frontend(EMPTY, ()),
            REFUSE_UDP_KEY: Frontend(EMPTY, ()),
        }
    )
    return dp


@pytest.fixture
def dp(cluster: Cluster) -> Iterator[EventsDatapath]:
    d = load(cluster)
    try:
        yield d
    finally:
        d.close()


# --- kubelet-named cgroups and their Pod objects -------------------------------------------------------


@dataclass(frozen=True)
class FakePod:
    name: str
    uid: str
    container_id: str
    cgroup: Path  # the container's cgroup

    def obj(self) -> objects.Pod:
        pod = objects.parse_object(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": self.name, "namespace": "team", "uid": self.uid},
                "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
                "status": {
                    "phase": "Running",
                    "containerStatuses": [
                        {"name": "app", "containerID": f"containerd://{self.container_id}"}
                    ],
                },
            }
        )
        assert isinstance(pod, objects.Pod)
        return pod

    def container_name(self) -> str:
        """``app`` where the model keeps containerStatuses, else the container id."""
        return "app" if hasattr(self.obj().status, "container_statuses") else self.container_id


def kubelet_pod(node_cgroup: Path, name: str, layout: str) -> FakePod:
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    u = uid.replace("-", "_")
    paths = {
        "systemd-burstable-containerd": "kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{u}.slice/cri-containerd-{cid}.scope",
        "systemd-guaranteed-crio": f"kubepods.slice/kubepods-pod{u}.slice/crio-{cid}.scope",
        "systemd-besteffort-docker": "kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{u}.slice/docker-{cid}.scope",
        "cgroupfs-burstable": f"kubepods/burstable/pod{uid}/{cid}",
    }
    path = node_cgroup / paths[layout]
    path.mkdir(parents=True)
    return FakePod(name, uid, cid, path)


# --- running the pipeline around some traffic ----------------------------------------------------------


@dataclass
class Collected:
    records: list[dict[str, Any]]
    pipeline: EventPipeline
    results: list[dict[str, Any]]
    seen_before_stop: int  # what arrived while running (the final consume on stop excluded)


def collect(
    dp: EventsDatapath,
    actions: list[Callable[[], dict[str, Any]]],
    *,
    expect: int,
    pods: Sequence[FakePod] = (),
    interval: float = 0.1,
    settle: float = 0.3,
) -> Collected:
    """Run the pipeline while ``actions`` (client runs) execute; wait for ``expect`` events, then ``settle``
    seconds more so extra events would show up too."""
    uids = {p.uid: p.obj() for p in pods}
    owners = {dp.writer.svc_id(parse_key(k)): o for k, o in OWNERS.items()}
    attributor = Attributor(dp.cgroup, uids.get, rescan_interval=0.5)
    pipeline = EventPipeline(dp.ring, owners.get, attributor, interval=interval)

    async def run() -> Collected:
        stop = asyncio.Event()
        q: asyncio.Queue[EventRecord] = pipeline.subscribe(1 << 20)
        task = asyncio.create_task(pipeline.run(stop))
        results = [await asyncio.to_thread(a) for a in actions]
        deadline = time.monotonic() + 10
        while pipeline.seen < expect and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle)
        seen = pipeline.seen
        stop.set()
        await task
        return Collected([q.get_nowait().data for _ in range(q.qsize())], pipeline, results, seen)

    return asyncio.run(run())


def client(cluster: Cluster, cgroup: Path | None, *args: object) -> Callable[[], dict[str, Any]]:
    return lambda: cluster.topo.run_client(cluster.client, cgroup, [str(a) for a in args])


# --- tests ---------------------------------------------------------------------------------------------

LAYOUTS = [
    "systemd-burstable-containerd",
    "systemd-guaranteed-crio",
    "systemd-besteffort-docker",
    "cgroupfs-burstable",
]


def test_each_connect_is_one_event_attributed_to_its_pod_and_container(
    cluster: Cluster, dp: EventsDatapath
) -> None:
    dp.events(abi.EVENTS_ALL, wakeup_bytes=settings.default_wakeup_bytes(abi.DEFAULT_EVENT_BYTES))
    pods = [kubelet_pod(cluster.cgroup, f"client-{i}", layout) for i, layout in enumerate(LAYOUTS)]
    per_pod = 15
    actions = [client(cluster, p.cgroup, "tcp", VIP, 80, "--count", per_pod) for p in pods]
    actions.append(client(cluster, cluster.cgroup, "tcp", VIP, 80, "--count", 10))  # a host process
    got = collect(dp, actions, expect=per_pod * len(pods) + 10, pods=pods)
    assert all(r["errors"] == {} for r in got.results)
    assert got.seen_before_stop == got.pipeline.seen == len(got.records) == per_pod * len(pods) + 10
    backends = {f"{p.ip4}:8080" for p in cluster.pods}
    for rec in got.records:
        assert (rec["hook"], rec["protocol"], rec["result"]) == ("connect4", "TCP", "translated")
        assert rec["frontend"] == f"{VIP}:80" and rec["backend"] in backends
        assert rec["owner"] == {"kind": "Service", "namespace": "default", "name": "web", "portName": "http"}
        assert rec["client"]["command"]
    for p, res in zip(pods, got.results, strict=False):
        mine = [r for r in got.records if r["client"]["cgroupId"] == p.cgroup.stat().st_ino]
        assert len(mine) == per_pod, p
        assert {r["client"]["pid"] for r in mine} == {res["self"]["pid"]}
        want = {"namespace": "team", "name": p.name, "container": p.container_name(), "uid": p.uid}
        assert all(r["client"]["pod"] == want for r in mine), (mine[0], want)
    host = [r for r in got.records if r["client"].get("host")]
    assert len(host) == 10 and all("pod" not in r["client"] for r in host)
    assert got.pipeline.lost == 0 and got.pipeline.process_errors == 0


def test_refusals_are_events_too(cluster: Cluster, dp: EventsDatapath) -> None:
    dp.events(abi.EVENTS_ALL)
    actions = [
        client(cluster, None, "tcp", "10.96.0.30", 80, "--count", 5),
        client(cluster, None, "udp-unconnected", "10.96.0.30", 53, "--count", 3),
    ]
    got = collect(dp, actions, expect=8)
    assert got.results[0]["errors"] == {"ECONNREFUSED": 5}
    assert (
        sorted((r["hook"], r["protocol"], r["result"], r["backend"]) for r in got.records)
        == [("connect4", "TCP", "refused", None)] * 5 + [("sendmsg4", "UDP", "refused", None)] * 3
    )
    assert {r["owner"]["name"] for r in got.records} == {"empty"}
    assert {r["reason"] for r in got.records} == {"no usable backend: connection refused"}


def test_sampled_mode_emits_about_one_in_n(cluster: Cluster, dp: EventsDatapath) -> None:
    dp.events(abi.EVENTS_SAMPLED, sample_every=10)
    got = collect(dp, [client(cluster, None, "tcp", VIP, 80, "--count", 1000)], expect=55)
    assert got.results[0]["ok"] == 1000
    assert 55 <= len(got.records) <= 150, len(got.records)  # binomial(1000, 0.1): sd 9.5


def test_off_emits_nothing_and_is_the_default(cluster: Cluster, dp: EventsDatapath) -> None:
    assert settings.read_config(dp.cfg.map_dir)[0] == abi.EVENTS_OFF
    got = collect(dp, [client(cluster, None, "tcp", VIP, 80, "--count", 30)], expect=0)
    assert got.results[0]["ok"] == 30 and got.records == []
    dp.events(abi.EVENTS_ALL)
    dp.events(abi.EVENTS_OFF)
    got = collect(dp, [client(cluster, None, "tcp", VIP, 80, "--count", 30)], expect=0)
    assert got.records == [] and got.pipeline.lost == 0


def test_reverse_events_only_when_enabled(cluster: Cluster, dp: EventsDatapath) -> None:
    dp.events(abi.EVENTS_ALL, reverse_events=True)
    got = collect(dp, [client(cluster, None, "getpeername", VIP, 80)], expect=2)
    reversed_ = [r for r in got.records if r["result"] == "reversed"]
    assert reversed_, got.records
    assert all(r["hook"] == "getpeername4" and r["frontend"] == f"{VIP}:80" for r in reversed_)
    assert {r["backend"] for r in reversed_} <= {f"{p.ip4}:8080" for p in cluster.pods}
    dp.events(abi.EVENTS_ALL, reverse_events=False)
    got = collect(dp, [client(cluster, None, "getpeername", VIP, 80)], expect=1)
    assert [r["result"] for r in got.records] == ["translated"]


def test_a_forced_wakeup_delivers_without_the_timer(cluster: Cluster, dp: EventsDatapath) -> None:
    dp.events(abi.EVENTS_ALL, wakeup_bytes=0)  # every submit wakes the reader
    got = collect(dp, [client(cluster, None, "tcp", VIP, 80, "--count", 20)], expect=20, interval=60)
    assert len(got.records) == got.seen_before_stop == 20


def test_a_full_ring_loses_counted_events_and_connects_still_succeed(cluster: Cluster) -> None:
    dp = load(cluster, event_bytes=4096)
    try:
        dp.events(abi.EVENTS_ALL)
        res = cluster.topo.run_client(cluster.client, None, ["tcp", VIP, "80", "--count", "300"])
        assert res["ok"] == 300 and res["errors"] == {}
        lost = ringbuf.read_lost(dp.cfg.map_dir)
        capacity = 4096 // (abi.EVENT.size + ringbuf.RECORD_OVERHEAD)
        assert lost >= 300 - capacity
        records: list[bytes] = []
        with ringbuf.RingBuffer(dp.ring, records.append) as rb:
            assert rb.consume() == len(records) <= capacity
        assert len(records) + lost == 300
        assert all(abi.Event.unpack(r).result == "translated" for r in records)
        # drained, the ring takes events again; the counter keeps its total
        res = cluster.topo.run_client(cluster.client, None, ["tcp", VIP, "80", "--count", "5"])
        with ringbuf.RingBuffer(dp.ring, records.append) as rb:
            assert rb.consume() == 5
        assert ringbuf.read_lost(dp.cfg.map_dir) == lost
    finally:
        dp.close()


def test_callback_errors_are_counted_not_raised(cluster: Cluster, dp: EventsDatapath) -> None:
    dp.events(abi.EVENTS_ALL)
    cluster.topo.run_client(cluster.client, None, ["tcp", VIP, "80", "--count", "3"])

    def explode(_raw: bytes) -> None:
        raise ValueError("a bug in the consumer")

    with ringbuf.RingBuffer(dp.ring, explode) as rb:
        assert rb.consume() == 3
        assert (rb.records, rb.callback_errors) == (3, 3)
