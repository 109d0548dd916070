"""The datapath's metrics on the real kernel: per-CPU counters read at scrape time equal what clients did.

The real BPF object is loaded into the test node's cgroup and programmed by the real writer; clients connect
through it, and the collector (through ``Metrics``' HTTP endpoint, parsed as Prometheus text) must report
exactly as many translated and refused resolutions as connects were made, with owner labels, and map usage
equal to what the maps hold.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancing.datapath import abi, libbpf, percpu
from balancing.datapath.owners import OwnerIndex
from balancing.metrics import Metrics, MetricsServer
from balancing.model.desired import Frontend, Owner
from balancing_testkit.topology import Cluster, parse_client_json
from helpers.support import Datapath, backends_of, parse_key

VIP, VIP_EMPTY, VIP_DNS = "10.96.0.10", "10.96.0.20", "10.96.0.53"
WEB = Owner("Service", "shop", "web", "http")
EMPTY = Owner("Service", "shop", "empty", "http")
DNS = Owner("Service", "kube-system", "dns", "dns")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def scrape(dp: Datapath, cluster: Cluster) -> Iterator[tuple[Metrics, MetricsServer, OwnerIndex]]:
    """Program web (three backends), empty (none) and dns (UDP); serve the metrics on a free port."""
    pods = [f"{p.ip4}:{cluster.port}" for p in cluster.pods]
    frontends = {
        parse_key(f"{VIP}:80/TCP"): Frontend(WEB, backends_of(pods)),
        parse_key(f"{VIP_EMPTY}:80/TCP"): Frontend(EMPTY, ()),
        parse_key(f"{VIP_DNS}:53/UDP"): Frontend(DNS, backends_of(pods)),
    }
    dp.program_frontends({str(k): f for k, f in frontends.items()})
    owners = OwnerIndex()
    owners.replace(frontends, dp.writer.svc_id)
    metrics = Metrics(process=False)
    metrics.watch_datapath(dp.bpffs, owners, entries_every=0)
    server = metrics.serve("127.0.0.1", 0)
    try:
        yield metrics, server, owners
    finally:
        server.close()


def get_samples(server: MetricsServer) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def resolutions(samples: Samples, **want: str) -> float:
    """The sum of balancing_resolutions_total over the series whose labels include ``want``."""
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "balancing_resolutions_total" and set(want.items()) <= labels
    )


def client(cluster: Cluster, *args: object, cpu: int | None = None) -> dict[str, Any]:
    argv = cluster.topo.client_argv([str(a) for a in args])
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    res = cluster.topo.run(argv, netns=cluster.client, cgroup=cluster.cgroup, timeout=60)
    return parse_client_json(argv, res)


def test_counters_equal_the_connects_made(
    cluster: Cluster, scrape: tuple[Metrics, MetricsServer, OwnerIndex]
) -> None:
    _, server, _ = scrape
    before = get_samples(server)
    assert resolutions(before, name="web") == 0 and resolutions(before, name="empty") == 0
    n, m, k = 37, 11, 9

    ok = client(cluster, "tcp", VIP, 80, "--count", n)
    refused = client(cluster, "tcp", VIP_EMPTY, 80, "--count", m)
    dns = client(cluster, "udp-unconnected", VIP_DNS, 53, "--count", k)
    assert ok["ok"] == n and ok["errors"] == {}
    assert refused["errors"] == {"ECONNREFUSED": m}
    assert dns["ok"] == k

    after = get_samples(server)
    web = {"kind": "Service", "namespace": "shop", "name": "web", "port": "http", "protocol": "TCP"}
    assert resolutions(after, **web, result="translated", hook="connect4") == n
    assert resolutions(after, name="web", hook="connect4") == n  # nothing else on connect
    assert resolutions(after, name="empty", result="refused", hook="connect4", protocol="TCP") == m
    assert resolutions(after, name="empty") == m
    assert resolutions(after, name="dns", result="translated", hook="sendmsg4", protocol="UDP") == k
    assert resolutions(after, name="dns", result="reversed", hook="recvmsg4") == k  # replies show the VIP
    assert resolutions(after, service_id="") == resolutions(after)  # every id has its owner
    assert after[("balancing_events_lost_total", frozenset())] == 0
    assert after[("balancing_datapath_up", frozenset())] == 1

    again = client(cluster, "tcp", VIP, 80, "--count", 5)
    assert again["ok"] == 5
    assert resolutions(get_samples(server), name="web", hook="connect4") == n + 5  # counters, not gauges


def test_counts_from_every_cpu_are_summed(
    cluster: Cluster, scrape: tuple[Metrics, MetricsServer, OwnerIndex], dp: Datapath
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to run clients on")
    _, server, _ = scrape
    counts = {cpus[0]: 13, cpus[1]: 21}
    for cpu, count in counts.items():
        assert client(cluster, "tcp", VIP, 80, "--count", count, cpu=cpu)["ok"] == count
    assert resolutions(get_samples(server), name="web", hook="connect4") == sum(counts.values())

    # the raw per-CPU values really are spread over the CPUs the clients ran on
    svc_id = dp.writer.svc_id(parse_key(f"{VIP}:80/TCP"))
    assert svc_id is not None
    key = abi.STAT_KEY.packer.pack(svc_id, 1, 6, 1, 0)  # translated, TCP, connect4
    fd = libbpf.obj_get(str(dp.cfg.map_dir / abi.MAP_STATS))
    try:
        raw = libbpf.map_lookup(fd, key, 8 * percpu.possible_cpus())
        summed = percpu.sum_u64(fd, key)
    finally:
        os.close(fd)
    assert raw is not None
    per_cpu = memoryview(raw).cast("Q").tolist()
    assert [per_cpu[c] for c in cpus[:2]] == [counts[cpus[0]], counts[cpus[1]]]
    assert summed == sum(counts.values())


def test_map_usage_and_programs_match_the_kernel(
    cluster: Cluster, scrape: tuple[Metrics, MetricsServer, OwnerIndex], dp: Datapath
) -> None:
    _, server, _ = scrape
    client(cluster, "tcp", VIP, 80, "--count", 3)
    client(cluster, "tcp", VIP_EMPTY, 80, "--count", 2)
    samples = get_samples(server)

    def usage(metric: str, name: str) -> float:
        found = [v for (n, lb), v in samples.items() if n == metric and ("map", name) in lb]
        assert len(found) == 1, (metric, name, found)
        return found[0]

    for name in (abi.MAP_SERVICES, abi.MAP_BACKENDS, abi.MAP_AFFINITY_MATCH, abi.MAP_CLIENTS, abi.MAP_QOS):
        assert usage("balancing_map_entries", name) == len(dp.io.items(name)), name
        assert usage("balancing_map_capacity", name) == dp.io.capacity[name], name
    # web: master + 3 slots, empty: master only, dns: master + 3 slots
    assert usage("balancing_map_entries", abi.MAP_SERVICES) == 9
    assert usage("balancing_map_entries", abi.MAP_BACKENDS) == 6  # TCP and UDP backends differ
    # counters: (web, translated, connect4), (web, reversed, getpeername4) maybe, (empty, refused, connect4)
    stats_fd = libbpf.obj_get(str(dp.cfg.map_dir / abi.MAP_STATS))
    try:
        stat_keys = len(libbpf.map_keys(stats_fd, abi.STAT_KEY.size))
    finally:
        os.close(stats_fd)
    assert usage("balancing_map_entries", abi.MAP_STATS) == stat_keys >= 2
    assert usage("balancing_map_capacity", abi.MAP_STATS) == dp.cfg.max_stats
    assert not [
        n for (n, lb), _ in samples.items() if n == "balancing_map_entries" and ("map", abi.MAP_CONFIG) in lb
    ]

    programs = len(dp.report.programs_attached)
    assert programs > 0
    assert samples[("balancing_programs_loaded", frozenset())] == programs
    assert samples[("balancing_programs_attached", frozenset())] == programs


def test_frontend_taken_over_keeps_its_counts_where_they_were_made(
    cluster: Cluster, scrape: tuple[Metrics, MetricsServer, OwnerIndex], dp: Datapath
) -> None:
    """A policy taking a Service's frontend (same frontend id, new owner): the Service keeps its count, the
    policy counts only what came after, and no series goes down."""
    _, server, owners = scrape
    assert client(cluster, "tcp", VIP, 80, "--count", 7)["ok"] == 7
    assert resolutions(get_samples(server), name="web", hook="connect4") == 7

    policy = Owner("LocalRedirectPolicy", "shop", "web-local", "http")
    key = parse_key(f"{VIP}:80/TCP")
    pods = backends_of([f"{cluster.pods[0].ip4}:{cluster.port}"])
    dp.program_frontends({f"{VIP}:80/TCP": Frontend(policy, pods)})
    owners.replace({key: Frontend(policy, pods)}, dp.writer.svc_id)
    assert client(cluster, "tcp", VIP, 80, "--count", 4)["ok"] == 4

    samples = get_samples(server)
    assert resolutions(samples, name="web", hook="connect4") == 7
    assert resolutions(samples, kind="LocalRedirectPolicy", name="web-local", hook="connect4") == 4


def test_forget_deletes_the_counters_of_the_given_ids_only(
    cluster: Cluster, scrape: tuple[Metrics, MetricsServer, OwnerIndex], dp: Datapath
) -> None:
    """The collector deletes counters of ids no longer programmed; the kernel reader does it on the map."""
    from balancing.metrics import KernelReader

    assert client(cluster, "tcp", VIP, 80, "--count", 3)["ok"] == 3
    assert client(cluster, "tcp", VIP_EMPTY, 80, "--count", 2)["errors"] == {"ECONNREFUSED": 2}
    reader = KernelReader(dp.bpffs)
    web_id, empty_id = (dp.writer.svc_id(parse_key(f"{ip}:80/TCP")) for ip in (VIP, VIP_EMPTY))
    assert web_id is not None and empty_id is not None
    assert {k[0] for k in reader.read().resolutions} == {web_id, empty_id}
    assert reader.forget({empty_id, 999_999}) == 1
    assert {k[0] for k in reader.read().resolutions} == {web_id}
    assert client(cluster, "tcp", VIP_EMPTY, 80, "--count", 1)["errors"] == {"ECONNREFUSED": 1}
    assert reader.read().resolutions[(empty_id, "refused", 6, "connect4")] == 1, "recreated from zero"
