"""Metrics without the kernel: control-plane instruments, the datapath collector over a fake reader, the
exposition as Prometheus and OpenMetrics text, and the Grafana dashboard and alert rules against it.

The datapath collector's attribution is tested here with hand-made snapshots (owners changing, unknown
frontend ids, recreated map entries); tests/kernel/test_metrics.py checks the same collector against the real
per-CPU maps and real connects.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

import balancing
from balancing import metrics
from balancing.datapath import abi
from balancing.datapath.owners import OwnerIndex
from balancing.metrics import kernel
from balancing.model.desired import Frontend, FrontendChanges, FrontendKey, Owner, parse_ip
from balancing.model.desired import Protocol as IPProtocol

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/balancing-dashboard.json"
ALERTS = ROOT / "deploy/prometheus/balancing-alerts.yaml"
WEB = Owner("Service", "shop", "web", "http")
POLICY = Owner("LocalRedirectPolicy", "shop", "web-local", "http")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeReader:
    """Returns whatever snapshot the test sets; counts reads."""

    def __init__(self, snap: kernel.Snapshot | None = None) -> None:
        self.snap = snap or kernel.Snapshot()
        self.reads = 0
        self.forgotten: set[int] = set()

    def read(self) -> kernel.Snapshot:
        self.reads += 1
        return self.snap

    def forget(self, svc_ids: set[int]) -> int:
        """As the kernel map would: the keys of these ids go."""
        doomed = [k for k in self.snap.resolutions if k[0] in svc_ids]
        for k in doomed:
            del self.snap.resolutions[k]
        self.forgotten |= svc_ids
        return len(doomed)


def samples_of(m: metrics.Metrics) -> Samples:
    text = m.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    found = [v for (n, lb), v in samples.items() if n == metric and set(labels.items()) <= lb]
    assert found, f"no sample {metric}{labels}"
    return sum(found)


def resolution_series(samples: Samples) -> dict[tuple[str, ...], float]:
    """balancing_resolutions_total by (name, result, service_id)."""
    out: dict[tuple[str, ...], float] = {}
    for (n, lb), v in samples.items():
        if n == "balancing_resolutions_total":
            d = dict(lb)
            out[(d["name"], d["result"], d["service_id"])] = v
    return out


def key(svc_id: int, result: str = "translated", proto: int = 6, hook: str = "connect4") -> kernel.StatKey:
    return (svc_id, result, proto, hook)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reader() -> FakeReader:
    return FakeReader()


@pytest.fixture
def owners() -> dict[int, Owner]:
    return {}


@pytest.fixture
def m(clock: FakeClock, reader: FakeReader, owners: dict[int, Owner]) -> metrics.Metrics:
    mt = metrics.Metrics(clock=clock)
    collector = metrics.DatapathCollector(
        Path("/nonexistent"), owners.get, reader=reader, clock=clock, unknown_grace=60, retention=600
    )
    mt.registry.register(collector)
    return mt


# --- control plane ---------------------------------------------------------------------------------------


def test_sync_done_feeds_the_kube_proxy_histograms_and_the_last_sync_time(m: metrics.Metrics) -> None:
    m.sync_done(0.004, full=True)
    m.sync_done(0.0005, full=False)
    m.sync_done(0.0007, full=False)
    s = samples_of(m)
    assert value(s, "balancing_sync_proxy_rules_duration_seconds_count") == 3
    assert value(s, "balancing_sync_full_proxy_rules_duration_seconds_count") == 1
    assert value(s, "balancing_sync_partial_proxy_rules_duration_seconds_count") == 2
    assert value(s, "balancing_sync_proxy_rules_duration_seconds_bucket", le="0.001") == 2
    assert value(s, "balancing_sync_proxy_rules_last_timestamp_seconds") > 1.6e9


def test_programmed_measures_from_the_change_seen_on_the_given_clock(
    m: metrics.Metrics, clock: FakeClock
) -> None:
    seen = clock.now
    clock.now += 0.003
    m.programmed(seen)
    m.programmed(clock.now + 5)  # a clock mix-up never observes a negative duration
    s = samples_of(m)
    assert value(s, "balancing_network_programming_duration_seconds_count") == 2
    assert value(s, "balancing_network_programming_duration_seconds_sum") == pytest.approx(0.003)
    assert value(s, "balancing_network_programming_duration_seconds_bucket", le="0.0025") == 1
    assert value(s, "balancing_network_programming_duration_seconds_bucket", le="0.005") == 2


def test_changes_pending_no_local_and_errors(m: metrics.Metrics) -> None:
    s = samples_of(m)
    assert value(s, "balancing_sync_proxy_rules_no_local_endpoints_total", traffic_policy="internal") == 0
    m.changes(services=2, endpoints=5)
    m.changes(services=0, endpoints=1)
    m.pending(services=1, endpoints=3)
    m.no_local_endpoints("external", 4)
    m.source_error("manifests", "invalid")
    m.source_error("manifests", "invalid")
    m.source_error("kubernetes", "api")
    m.write_failed(abi.MAP_SERVICES)
    m.write_failed("")
    s = samples_of(m)
    assert value(s, "balancing_sync_proxy_rules_service_changes_total") == 2
    assert value(s, "balancing_sync_proxy_rules_endpoint_changes_total") == 6
    assert value(s, "balancing_sync_proxy_rules_service_changes_pending") == 1
    assert value(s, "balancing_sync_proxy_rules_endpoint_changes_pending") == 3
    assert value(s, "balancing_sync_proxy_rules_no_local_endpoints_total", traffic_policy="external") == 4
    assert value(s, "balancing_source_errors_total", source="manifests", kind="invalid") == 2
    assert value(s, "balancing_source_errors_total", source="kubernetes", kind="api") == 1
    assert value(s, "balancing_map_write_failures_total", map=abi.MAP_SERVICES) == 1
    assert value(s, "balancing_map_write_failures_total", map="unknown") == 1
    m.pending(0, 0)
    assert value(samples_of(m), "balancing_sync_proxy_rules_endpoint_changes_pending") == 0


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = metrics.Metrics(process=False), metrics.Metrics(process=False)
    a.write_failed("x")
    assert ("balancing_map_write_failures_total", frozenset({("map", "x")})) not in samples_of(b)
    assert value(samples_of(a), "balancing_build_info", version=balancing.__version__) == 1


# --- the datapath collector ------------------------------------------------------------------------------


def test_resolutions_are_labelled_by_owner_and_summed_over_its_frontends(
    m: metrics.Metrics, reader: FakeReader, owners: dict[int, Owner]
) -> None:
    owners.update({1: WEB, 2: WEB})  # e.g. its ClusterIP and NodePort frontends
    reader.snap = kernel.Snapshot(
        resolutions={key(1): 5, key(2): 7, key(1, "refused"): 2, key(2, "translated", 17, "sendmsg4"): 3}
    )
    s = samples_of(m)
    labels = {"kind": "Service", "namespace": "shop", "name": "web", "port": "http", "service_id": ""}
    assert value(s, "balancing_resolutions_total", **labels, result="translated", hook="connect4") == 12
    assert value(s, "balancing_resolutions_total", **labels, result="refused", protocol="TCP") == 2
    assert value(s, "balancing_resolutions_total", **labels, protocol="UDP", hook="sendmsg4") == 3


def test_unknown_ids_wait_for_their_owner_then_are_labelled_by_service_id(
    m: metrics.Metrics, reader: FakeReader, owners: dict[int, Owner], clock: FakeClock
) -> None:
    reader.snap = kernel.Snapshot(resolutions={key(1): 5, key(9): 4})
    assert resolution_series(samples_of(m)) == {}  # right after a restart nothing is known yet
    owners[1] = WEB
    clock.now += 30
    reader.snap = kernel.Snapshot(resolutions={key(1): 6, key(9): 4})
    assert resolution_series(samples_of(m)) == {("web", "translated", ""): 6}  # the whole count, once known
    clock.now += 31
    assert resolution_series(samples_of(m)) == {("web", "translated", ""): 6, ("", "translated", "9"): 4}
    assert reader.forgotten == {9} and key(9) not in reader.snap.resolutions, "counted, then deleted"
    reader.snap.resolutions[key(9)] = 1  # a late datagram recreates it: counted from zero
    clock.now += 61
    assert resolution_series(samples_of(m))[("", "translated", "9")] == 5


def test_a_removed_frontends_last_counts_still_go_to_its_owner(reader: FakeReader, clock: FakeClock) -> None:
    index = OwnerIndex(linger=300, clock=clock)
    fkey = FrontendKey(parse_ip("10.96.0.1"), 80, IPProtocol.TCP)
    index.replace({fkey: Frontend(WEB, ())}, {fkey: 1}.get)
    mt = metrics.Metrics(clock=clock)
    mt.registry.register(
        metrics.DatapathCollector(Path("/nonexistent"), index, reader=reader, clock=clock, unknown_grace=60)
    )
    reader.snap = kernel.Snapshot(resolutions={key(1): 5})
    samples_of(mt)
    index.replace({}, {fkey: 1}.get)  # the Service is deleted between two scrapes
    reader.snap = kernel.Snapshot(resolutions={key(1): 7})
    clock.now += 10
    assert resolution_series(samples_of(mt)) == {("web", "translated", ""): 7}
    clock.now += 300  # the owner is forgotten; 60 s later the counters are deleted
    samples_of(mt)
    assert not reader.forgotten
    clock.now += 61
    assert resolution_series(samples_of(mt)) == {("web", "translated", ""): 7}
    assert reader.forgotten == {1} and not reader.snap.resolutions


def test_a_new_owner_of_a_frontend_counts_only_what_came_after(
    m: metrics.Metrics, reader: FakeReader, owners: dict[int, Owner]
) -> None:
    owners[1] = WEB
    reader.snap = kernel.Snapshot(resolutions={key(1): 10})
    samples_of(m)
    owners[1] = POLICY  # a policy took the frontend over: same id, new owner
    reader.snap = kernel.Snapshot(resolutions={key(1): 14})
    assert resolution_series(samples_of(m)) == {
        ("web", "translated", ""): 10,
        ("web-local", "translated", ""): 4,
    }


def test_a_recreated_counter_never_makes_a_series_go_down(
    m: metrics.Metrics, reader: FakeReader, owners: dict[int, Owner]
) -> None:
    owners.update({1: WEB, 2: WEB})
    reader.snap = kernel.Snapshot(resolutions={key(1): 10})
    samples_of(m)
    reader.snap = kernel.Snapshot(resolutions={key(1): 3})  # entry deleted and recreated (or maps reloaded)
    assert resolution_series(samples_of(m)) == {("web", "translated", ""): 13}
    reader.snap = kernel.Snapshot(resolutions={key(2): 1})  # the Service recreated: a new frontend id
    assert resolution_series(samples_of(m)) == {("web", "translated", ""): 14}


def test_series_of_owners_gone_for_the_retention_are_dropped(
    m: metrics.Metrics, reader: FakeReader, owners: dict[int, Owner], clock: FakeClock
) -> None:
    owners.update({1: WEB, 2: POLICY})
    reader.snap = kernel.Snapshot(resolutions={key(1): 10, key(2): 1})
    samples_of(m)
    del owners[1]
    clock.now += 500
    assert ("web", "translated", "") in resolution_series(samples_of(m))  # kept for the retention
    clock.now += 200
    assert resolution_series(samples_of(m)) == {("web-local", "translated", ""): 1}


def test_map_usage_programs_events_and_up(m: metrics.Metrics, reader: FakeReader) -> None:
    reader.snap = kernel.Snapshot(
        events_lost=7,
        maps={
            abi.MAP_SERVICES: kernel.MapUsage("hash", 9, 4096),
            abi.MAP_AFFINITY: kernel.MapUsage("lru_hash", 4096, 4096),
        },
        programs_loaded=9,
        programs_attached=8,
    )
    s = samples_of(m)
    assert value(s, "balancing_events_lost_total") == 7
    assert value(s, "balancing_map_entries", map=abi.MAP_SERVICES, type="hash") == 9
    assert value(s, "balancing_map_capacity", map=abi.MAP_SERVICES) == 4096
    assert value(s, "balancing_map_entries", map=abi.MAP_AFFINITY, type="lru_hash") == 4096
    assert value(s, "balancing_programs_loaded") == 9
    assert value(s, "balancing_programs_attached") == 8
    assert value(s, "balancing_datapath_up") == 1
    reader.snap = kernel.Snapshot(errors=["bl_svc_v1: bpf_obj_get: No such file or directory"])
    s = samples_of(m)
    assert value(s, "balancing_datapath_up") == 0
    assert value(s, "balancing_programs_attached") == 0


def test_registering_reads_nothing(reader: FakeReader) -> None:
    mt = metrics.Metrics(process=False)
    mt.registry.register(metrics.DatapathCollector(Path("/nonexistent"), lambda _i: None, reader=reader))
    assert reader.reads == 0
    mt.exposition()
    assert reader.reads == 1


def test_the_kernel_reader_reports_a_missing_datapath_as_errors(tmp_path: Path) -> None:
    snap = kernel.KernelReader(tmp_path).read()
    assert snap.resolutions == {} and snap.maps == {} and snap.programs_loaded == 0
    assert len(snap.errors) == len(abi.ALL_MAPS)


def test_owner_index_follows_full_and_partial_syncs(clock: FakeClock) -> None:
    def fk(ip: str, port: int = 80) -> FrontendKey:
        return FrontendKey(parse_ip(ip), port, IPProtocol.TCP)

    ids = {fk("10.96.0.1"): 1, fk("10.96.0.2"): 2, fk("10.96.0.3"): 3}
    index = OwnerIndex(linger=300, clock=clock)
    index.replace({fk("10.96.0.1"): Frontend(WEB, ()), fk("10.96.0.2"): Frontend(WEB, ())}, ids.get)
    assert index(1) == WEB and index(2) == WEB and index(3) is None and len(index) == 2
    index.apply(
        FrontendChanges(
            upsert={fk("10.96.0.3"): Frontend(POLICY, ()), fk("10.96.0.2"): Frontend(POLICY, ())},
            remove=frozenset({fk("10.96.0.1"), fk("10.96.0.2")}),
        ),
        ids.get,
    )
    assert index(1) == WEB and index(2) == POLICY and index(3) == POLICY, "1 removed: its owner lingers"
    index.replace({}, ids.get)
    assert len(index) == 0
    clock.now += 301
    assert index(1) is None and index(2) is None and index(3) is None


# --- exposition ------------------------------------------------------------------------------------------


@pytest.fixture
def populated(m: metrics.Metrics, reader: FakeReader, owners: dict[int, Owner]) -> metrics.Metrics:
    """Every family with samples: what dashboards and alerts are checked against."""
    owners[1] = WEB
    reader.snap = kernel.Snapshot(
        resolutions={
            key(1, result, 6, hook): 1 for result in abi.RESULTS.values() for hook in abi.HOOKS.values()
        },
        events_lost=0,
        maps={abi.MAP_SERVICES: kernel.MapUsage("hash", 1, 10)},
        programs_loaded=9,
        programs_attached=9,
    )
    m.sync_done(0.01, full=True)
    m.sync_done(0.001, full=False)
    m.programmed(0.0)
    m.changes(1, 1)
    m.pending(0, 0)
    m.source_error("manifests", "invalid")
    m.write_failed(abi.MAP_SERVICES)
    m.task_restarted("source")
    return m


def test_exposition_parses_as_prometheus_and_openmetrics_text(populated: metrics.Metrics) -> None:
    text = populated.exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["balancing_resolutions"].type == "counter"
    assert families["balancing_sync_proxy_rules_duration_seconds"].type == "histogram"
    assert families["balancing_sync_proxy_rules_no_local_endpoints_total"].type == "gauge"  # kube-proxy's
    om = {f.name for f in parse_openmetrics(openmetrics_latest(populated.registry).decode())}
    assert {"balancing_resolutions", "balancing_events_lost", "balancing_map_entries"} <= om


def test_serve_answers_scrapes_over_http(populated: metrics.Metrics) -> None:
    server = populated.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200
            text = r.read().decode()
    finally:
        server.close()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert (
        "balancing_resolutions_total" in names
        and "balancing_sync_proxy_rules_duration_seconds_bucket" in names
    )


def test_public_api_is_what_all_lists() -> None:
    assert all(hasattr(metrics, name) for name in metrics.__all__)


# --- dashboard and alerts --------------------------------------------------------------------------------

_SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_METRIC = re.compile(r"\b((?:balancing|process)_[a-z0-9_]+)\b")
_TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
_VALUES = {"result": set(abi.RESULTS.values()), "hook": set(abi.HOOKS.values())}


def exposed(m: metrics.Metrics) -> dict[str, set[str]]:
    """Sample name → the label names it carries."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def check_expr(expr: str, names: dict[str, set[str]]) -> None:
    """Every metric an expression names is exposed, with the labels and label values it selects on."""
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    referenced = set(_METRIC.findall(expr))
    assert referenced, f"no metric in {expr!r}"
    for name in referenced:
        assert name in names, f"{name} (in {expr!r}) is not exposed"
    for name, body in _SELECTOR.findall(expr):
        if name not in names:
            continue
        for label, op, val in _MATCHER.findall(body):
            assert label in names[name] | _TARGET_LABELS, f"{name} has no label {label} ({expr!r})"
            known = _VALUES.get(label)
            if known and "$" not in val:
                if op == "=":
                    assert val in known, f"{label}={val!r} never occurs ({expr!r})"
                elif op == "=~":
                    assert any(re.fullmatch(val, k) for k in known), f"{label}=~{val!r} matches nothing"


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def test_dashboard_is_grafana_json_on_exposed_metrics(populated: metrics.Metrics) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    all_panels = list(panels(dashboard))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "namespace", "service"} <= variables
    names = exposed(populated)
    exprs = []
    for p in all_panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            exprs.append(t["expr"])
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables | {"__rate_interval", "__interval", "__range"}, (p["title"], var)
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            check_expr(v["query"]["query"], names)
    for expr in exprs:
        check_expr(expr, names)
    covered = " ".join(exprs)
    for wanted in (
        'result="refused"',
        'result="affinity"',
        "fallback_",
        "balancing_events_lost_total",
        "balancing_sync_proxy_rules_duration_seconds_bucket",
        "balancing_network_programming_duration_seconds_bucket",
        "balancing_map_capacity",
    ):
        assert wanted in covered, f"the dashboard shows nothing on {wanted}"


def test_alert_rules_are_valid_and_on_exposed_metrics(populated: metrics.Metrics) -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    names = exposed(populated)
    alerts = {}
    for group in doc["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            check_expr(rule["expr"], names)
            alerts[rule["alert"]] = rule["expr"]
    assert len(alerts) == sum(len(g["rules"]) for g in doc["spec"]["groups"]), "alert names are unique"
    expressions = " ".join(alerts.values())
    for wanted in (
        'result="refused"',
        "balancing_events_lost_total",
        "balancing_sync_proxy_rules_last_timestamp_seconds",
        "balancing_map_write_failures_total",
        "balancing_map_capacity",
        "balancing_sync_proxy_rules_no_local_endpoints_total",
    ):
        assert wanted in expressions, f"no alert on {wanted}"


def test_nothing_is_attributed_or_deleted_before_the_first_full_sync(
    reader: FakeReader, clock: FakeClock
) -> None:
    """An agent whose first sync is slow (an API server still unreachable after a reboot) must not count live
    frontends as ownerless, nor delete their counters."""
    index = OwnerIndex(clock=clock)
    mt = metrics.Metrics(clock=clock)
    mt.registry.register(
        metrics.DatapathCollector(
            Path("/nonexistent"),
            index,
            reader=reader,
            clock=clock,
            unknown_grace=60,
            synced=lambda: index.synced,
        )
    )
    reader.snap = kernel.Snapshot(resolutions={key(1): 5})
    for _ in range(3):
        clock.now += 120
        assert resolution_series(samples_of(mt)) == {}
    assert not reader.forgotten
    fkey = FrontendKey(parse_ip("10.96.0.1"), 80, IPProtocol.TCP)
    index.replace({fkey: Frontend(WEB, ())}, {fkey: 1}.get)
    assert resolution_series(samples_of(mt)) == {("web", "translated", ""): 5}, "all of it, to its owner"
