"""North-south events and metrics without the kernel: the event record of a packet from outside the node, its
line in ``balancing monitor``, the pipeline leaving it unattributed, and the collector's north-south families.

A north-south event (hook ``tc_ingress``/``tc_egress``) has no process and no pod: its ``client`` is the
external address and the device it arrived on; socket-hook events keep their schema. The collector exports
north-south's gauges and counters only where the reader found its pins.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from balancing.cli import monitor
from balancing.datapath import abi, podcgroups
from balancing.events import record
from balancing.events.attribution import Attributor
from balancing.events.pipeline import EventPipeline
from balancing.events.record import EventRecord
from balancing.metrics import collector, kernel
from balancing.model.desired import Owner

WEB = Owner("Service", "shop", "web", "http")
NORTHSOUTH_NAMES = {
    "balancing_conntrack_entries",
    "balancing_conntrack_capacity",
    "balancing_snat_ports_in_use",
    "balancing_snat_port_range_size",
    "balancing_northsouth_snat_allocations",
    "balancing_northsouth_snat_retries",
    "balancing_northsouth_flows",
    "balancing_northsouth_backend_gone",
}


def raw_event(
    hook: int, result: int, client: tuple[str, int] | None, ifindex: int = 0, cgroup_id: int = 0
) -> bytes:
    ip = ipaddress.ip_address
    return abi.EVENT.packer.pack(
        5_000_000_000,
        cgroup_id,
        0,
        0,
        0,
        17,
        abi.pack_addr(ip("192.0.2.10")),
        abi.pack_addr(ip("10.244.1.5")),
        abi.pack_port(30080),
        abi.pack_port(8080),
        hook,
        6,
        result,
        0,
        bytes(16),
        abi.pack_addr(ip(client[0])) if client else bytes(16),
        abi.pack_port(client[1] if client else 0),
        0,
        ifindex,
    )


def build(raw: bytes) -> dict[str, Any]:
    return record.build(abi.Event.unpack(raw), None, WEB, 0)


def test_a_north_south_event_names_the_external_client_and_device_not_a_pod() -> None:
    data = build(raw_event(abi.HOOK_TC_INGRESS, abi.RES_NS_SNAT, ("203.0.113.7", 40000), ifindex=3))
    assert data["hook"] == "tc_ingress" and data["result"] == "translated_snat"
    assert data["client"] == {"address": "203.0.113.7:40000", "deviceIfindex": 3}
    assert data["reason"] == record.REASONS["translated_snat"] and data["reason"].startswith("north-south")
    assert (data["frontend"], data["backend"]) == ("192.0.2.10:30080", "10.244.1.5:8080")
    v6 = build(raw_event(abi.HOOK_TC_INGRESS, abi.RES_DROP_SOURCE, ("2001:db8::7", 1), ifindex=4))
    assert v6["client"] == {"address": "[2001:db8::7]:1", "deviceIfindex": 4}
    assert v6["reason"] == record.REASONS["dropped_source_range"]


def test_every_north_south_result_has_a_reason() -> None:
    for result in (abi.RES_NS_LOCAL, abi.RES_NS_SNAT, *abi.NS_DROPS):
        assert abi.RESULTS[result] in record.REASONS


def test_socket_hook_events_keep_their_client() -> None:
    data = build(raw_event(abi.HOOK_CONNECT4, abi.RES_TRANSLATED, None, cgroup_id=5678))
    assert set(data["client"]) == {"pid", "command", "cgroupId", "netnsCookie", "socketCookie", "host"}


def test_monitor_prints_the_external_client() -> None:
    rec = build(raw_event(abi.HOOK_TC_INGRESS, abi.RES_DROP_NO_BACKEND, ("203.0.113.7", 40000), ifindex=3))
    line = monitor.format_text(rec)
    assert "client 203.0.113.7:40000 via ifindex 3" in line and "[red]dropped_no_backend" in line
    assert not monitor.matches(rec, None, (None, "client-0"))  # --pod never matches an external client


class CountingAttributor(Attributor):
    def __init__(self, root: Path) -> None:
        super().__init__(root, lambda _uid: None, index=podcgroups.PodCgroupIndex(), rescan_interval=1e9)
        self.asked: list[int] = []

    def attribute(self, cgroup_id: int) -> Any:
        self.asked.append(cgroup_id)
        return super().attribute(cgroup_id)


def test_the_pipeline_attributes_socket_events_only(tmp_path: Path) -> None:
    records: list[EventRecord] = []

    class Sink:
        def write(self, rec: EventRecord) -> None:
            records.append(rec)

    attributor = CountingAttributor(tmp_path)
    pipeline = EventPipeline(tmp_path / abi.MAP_EVENTS, {17: WEB}.get, attributor, [Sink()])
    pipeline.ingest(raw_event(abi.HOOK_TC_INGRESS, abi.RES_NS_LOCAL, ("203.0.113.7", 40000), ifindex=3))
    pipeline.ingest(raw_event(abi.HOOK_CONNECT4, abi.RES_TRANSLATED, None, cgroup_id=5678))
    assert pipeline.process() == 2 and pipeline.process_errors == 0
    assert attributor.asked == [5678]
    assert [r.data["client"].get("address") for r in records] == ["203.0.113.7:40000", None]


def names(families: list[Metric]) -> dict[str, Metric]:
    return {f.name: f for f in families}


def test_north_south_families_only_where_it_runs() -> None:
    assert collector.northsouth_families(None) == []
    ns = kernel.NorthSouth(
        conntrack_entries=10,
        conntrack_capacity=262144,
        snat_ports_in_use=4,
        snat_port_range=28232,
        counters={"snat_allocations": 7, "snat_retries": 1, "flows": 9, "backend_gone": 2},
    )
    got = names(collector.northsouth_families(ns))
    assert set(got) == NORTHSOUTH_NAMES
    values = {name: f.samples[0].value for name, f in got.items()}
    assert values["balancing_conntrack_entries"] == 10 and values["balancing_snat_port_range_size"] == 28232
    assert values["balancing_northsouth_flows"] == 9 and got["balancing_northsouth_flows"].type == "counter"
    assert got["balancing_northsouth_flows"].samples[0].name == "balancing_northsouth_flows_total"
    partial = names(collector.northsouth_families(kernel.NorthSouth(conntrack_entries=3)))
    assert set(partial) == {"balancing_conntrack_entries"}  # what could not be read is left out


class Reader:
    def __init__(self, snap: kernel.Snapshot) -> None:
        self.snap = snap

    def read(self) -> kernel.Snapshot:
        return self.snap

    def forget(self, svc_ids: set[int]) -> int:
        return 0


def test_the_collector_exports_them_beside_the_datapath_families(tmp_path: Path) -> None:
    ns = kernel.NorthSouth(5, 1024, 1, 1000, {"flows": 3})
    with_ns = collector.DatapathCollector(
        tmp_path, lambda _id: WEB, reader=Reader(kernel.Snapshot(northsouth=ns))
    )
    exported = names(list(with_ns.collect()))
    assert NORTHSOUTH_NAMES - set(exported) == {
        "balancing_northsouth_snat_allocations",
        "balancing_northsouth_snat_retries",
        "balancing_northsouth_backend_gone",
    }
    assert "balancing_resolutions" in exported
    without = collector.DatapathCollector(tmp_path, lambda _id: WEB, reader=Reader(kernel.Snapshot()))
    assert not NORTHSOUTH_NAMES & set(names(list(without.collect())))
