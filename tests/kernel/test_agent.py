"""The agent as an operator runs it: a process on a manifest directory, programming a test node's cgroup.

Covers the manifest → maps path end to end: endpoints added and removed by editing files, readiness and
terminating fallback, named targetPorts, pod-derived endpoints, broken manifests, restarts (SIGKILL and
upgrade) under load with zero failed connects, several agents side by side, and the health endpoints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balancing.datapath import abi, maps
from balancing_testkit.topology import Cluster
from helpers.support import (
    ROOT,
    SOCKET_PROGRAMS,
    AgentProcess,
    Conditions,
    endpoint,
    endpoint_slice,
    pod,
    service,
    wait_until,
    write_manifest,
)

VIP = "10.96.0.10"
KEY = f"{VIP}:80/TCP"


def web(cluster: Cluster, conditions: Sequence[Conditions], port: int = 8080) -> list[dict[str, Any]]:
    eps = [endpoint(p.ip4, **c) for p, c in zip(cluster.pods, conditions, strict=False)]
    return [
        service("web", [VIP], [("http", 80, "TCP", port)]),
        endpoint_slice("web", eps, [("http", port, "TCP")]),
    ]


def connect(cluster: Cluster, count: int = 60, vip: str = VIP, port: int = 80) -> dict[str, Any]:
    return cluster.topo.run_client(cluster.client, None, ["tcp", vip, str(port), "--count", str(count)])


def test_endpoints_added_and_removed_through_the_manifest_directory(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    write_manifest(manifests, "web.yaml", web(cluster, [{}]))
    agent.start()
    assert connect(cluster)["backends"] == {"pod-a": 60}
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}, {}]))
    took = agent.wait_frontends(lambda f: len(f.get(KEY, [])) == 3, what="three endpoints")
    assert took < 1.0
    assert set(connect(cluster, 90)["backends"]) == {"pod-a", "pod-b", "pod-c"}
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}]))
    agent.wait_frontends(lambda f: len(f.get(KEY, [])) == 2, what="two endpoints")
    assert set(connect(cluster, 60)["backends"]) == {"pod-a", "pod-b"}
    (manifests / "web.yaml").unlink()
    took = agent.wait_frontends(lambda f: KEY not in f, what="the service to go")
    assert took < 1.0
    assert connect(cluster, 1)["errors"] == {"EHOSTUNREACH": 1}  # untranslated again


def test_not_ready_endpoint_gets_no_connections(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {"ready": False}, {"ready": None}]))
    agent.start()
    res = connect(cluster, 90)
    assert set(res["backends"]) == {"pod-a", "pod-c"}  # a missing ready condition counts as ready


def test_terminating_fallback_when_nothing_is_ready(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    conditions: list[Conditions] = [
        {"ready": False, "serving": True, "terminating": True},
        {"ready": False, "serving": False, "terminating": True},  # never used: not serving
        {"ready": False, "serving": True, "terminating": True},
    ]
    write_manifest(manifests, "web.yaml", web(cluster, conditions))
    agent.start()
    assert set(connect(cluster, 90)["backends"]) == {"pod-a", "pod-c"}
    conditions[1] = {"ready": True}  # one ready endpoint: the terminating ones are no longer used
    write_manifest(manifests, "web.yaml", web(cluster, conditions))
    agent.wait_frontends(lambda f: len(f.get(KEY, [])) == 1)
    assert connect(cluster, 30)["backends"] == {"pod-b": 30}
    conditions[1] = {"ready": False, "serving": False}
    conditions[0] = conditions[2] = {"ready": False, "serving": False}
    write_manifest(manifests, "web.yaml", web(cluster, conditions))
    agent.wait_frontends(lambda f: f.get(KEY) == [])
    assert connect(cluster, 1)["errors"] == {"ECONNREFUSED": 1}


def test_named_target_port_resolves_per_endpoint(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    topo = cluster.topo
    topo.start_backend(cluster.pods[2], name="pod-c-9090", port=9090)
    docs = [
        service("web", [VIP], [("http", 80, "TCP", "web-port")]),
        endpoint_slice("web", [endpoint(cluster.pods[0].ip4)], [("http", 8080, "TCP")], name="web-a"),
        endpoint_slice("web", [endpoint(cluster.pods[2].ip4)], [("http", 9090, "TCP")], name="web-c"),
    ]
    write_manifest(manifests, "web.yaml", docs)
    agent.start()
    assert agent.frontends()[KEY] == sorted([f"{cluster.pods[0].ip4}:8080", f"{cluster.pods[2].ip4}:9090"])
    assert set(connect(cluster, 60)["backends"]) == {"pod-a", "pod-c-9090"}


def test_selector_service_without_slices_uses_matching_ready_pods(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    a, b, c = cluster.pods
    docs = [
        service("web", [VIP, "fd00:96::10"], [("http", 80, "TCP", "http")], selector={"app": "web"}),
        pod("a", [a.ip4, a.ip6], {"app": "web"}, [("http", 8080, "TCP")]),
        pod("b", [b.ip4, b.ip6], {"app": "web"}, [("http", 8080, "TCP")], ready=False),
        pod("c", [c.ip4, c.ip6], {"app": "other"}, [("http", 8080, "TCP")]),
    ]
    write_manifest(manifests, "web.yaml", docs)
    agent.start()
    assert connect(cluster, 20)["backends"] == {"pod-a": 20}
    v6 = cluster.topo.run_client(
        cluster.client, None, ["tcp", "fd00:96::10", "80", "--count", "20", "--family", "6"]
    )
    assert v6["backends"] == {"pod-a": 20}


def test_a_broken_manifest_keeps_the_previous_state(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}, {}]))
    agent.start()
    before = agent.frontends()
    (manifests / "web.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web\n")
    wait_until(lambda: "web.yaml" in agent.stderr() and "invalid YAML" in agent.stderr(), what="the error")
    docs = web(cluster, [{}])
    docs[0]["spec"]["ports"][0]["port"] = 70000  # invalid field
    write_manifest(manifests, "web.yaml", docs)
    wait_until(lambda: "spec.ports[0].port" in agent.stderr(), what="the validation error")
    assert agent.frontends() == before
    assert set(connect(cluster, 60)["backends"]) == {"pod-a", "pod-b", "pod-c"}
    assert agent.proc is not None and agent.proc.poll() is None
    write_manifest(manifests, "web.yaml", web(cluster, [{}]))
    agent.wait_frontends(lambda f: len(f.get(KEY, [])) == 1, what="the fixed file")


def test_sigkill_and_restart_under_load_fails_no_connect(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}, {}]))
    agent.start()
    loop = cluster.topo.spawn_client(cluster.client, None, ["loop", VIP, "80", "--timeout", "2"])
    agent.kill()
    agent.start()
    assert f"{len(abi.ALL_MAPS)} maps reused, {len(SOCKET_PROGRAMS)} programs unchanged" in agent.stderr()
    assert re.search(r"full sync: 1 frontends, 0 written, 0 removed, 0 map ops", agent.stderr())
    res = cluster.topo.finish_client(loop)
    assert res["ok"] > 20 and res["errors"] == {}, res


def test_changed_bpf_object_is_swapped_in_with_no_failed_connect(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT), "build/bpf/balancing-v3.o"], check=True)
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}, {}]))
    agent.start()
    loop = cluster.topo.spawn_client(cluster.client, None, ["loop", VIP, "80", "--timeout", "2"])
    agent.stop()
    upgraded = AgentProcess(
        cluster.topo, manifests, cluster.node, bpf_object=ROOT / "build/bpf/balancing-v3.o"
    )
    upgraded.start()
    try:
        assert f"{len(SOCKET_PROGRAMS)} programs swapped" in upgraded.stderr()
        res = cluster.topo.finish_client(loop)
        assert res["ok"] > 20 and res["errors"] == {}, res
    finally:
        upgraded.stop()


def test_two_agents_side_by_side_stay_isolated(cluster: Cluster, manifests: Path, tmp_path: Path) -> None:
    topo = cluster.topo
    other_dir = tmp_path / "node-b"
    other_dir.mkdir()
    write_manifest(manifests, "web.yaml", web(cluster, [{}]))
    docs = web(cluster, [{}, {}, {}])
    docs[1]["endpoints"] = docs[1]["endpoints"][2:]  # node-b's view: pod-c only
    write_manifest(other_dir, "web.yaml", docs)
    a = AgentProcess(topo, manifests, "node-a").start()
    b = AgentProcess(topo, other_dir, "node-b").start()
    client_b = topo.add_client("client-b", node="node-b")
    try:
        assert connect(cluster, 20)["backends"] == {"pod-a": 20}
        assert topo.run_client(client_b, None, ["tcp", VIP, "80", "--count", "20"])["backends"] == {
            "pod-c": 20
        }
        b.stop()
        topo.run([sys.executable, "-m", "balancing", "cleanup", "--bpffs", str(b.bpffs)])
        assert connect(cluster, 20)["backends"] == {"pod-a": 20}
        assert topo.run_client(client_b, None, ["tcp", VIP, "80", "--count", "1"])["errors"] == {
            "EHOSTUNREACH": 1
        }
    finally:
        a.stop()


def test_health_endpoints(cluster: Cluster, manifests: Path, agent: AgentProcess) -> None:
    write_manifest(manifests, "web.yaml", web(cluster, [{}]))
    agent.start()
    code, body = agent.get("/healthz")
    assert code == 200 and set(body) >= {"lastUpdated", "currentTime"}
    assert agent.get("/livez")[0] == 200
    code, body = agent.get("/readyz")
    assert code == 200 and body["ready"] is True
    assert agent.get("/nope")[0] == 404


def test_sigterm_leaves_the_datapath_translating(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}]))
    agent.start()
    log = agent.stop()
    assert "keeps translating" in log
    assert set(connect(cluster, 40)["backends"]) == {"pod-a", "pod-b"}


def test_resync_repairs_a_map_changed_behind_the_agents_back(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}, {}]))
    agent.extra = ["--resync-interval", "0.1"]
    agent.start()
    io = maps.KernelMaps(agent.bpffs / "maps")
    try:
        master = [k for k, _ in io.items(abi.MAP_SERVICES) if abi.split_svc_key(k)[1] == abi.MASTER_SLOT]
        io.delete(abi.MAP_SERVICES, master)  # as if someone ran bpftool map delete
    finally:
        io.close()
    three = sorted(f"{p.ip4}:8080" for p in cluster.pods)
    agent.wait_frontends(lambda f: f.get(KEY) == three, timeout=5, what="the repair")
    assert set(connect(cluster, 60)["backends"]) == {"pod-a", "pod-b", "pod-c"}


def test_health_check_node_port_reports_ready_local_endpoints(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    import json
    import urllib.error
    import urllib.request

    def probe() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen("http://127.0.0.2:32100/", timeout=2) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def lb(conditions: Sequence[Conditions]) -> list[dict[str, Any]]:
        docs = web(cluster, conditions)
        docs[0]["spec"].update(
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=32100,
        )
        docs[0]["spec"]["ports"][0]["nodePort"] = 30080
        return docs

    write_manifest(manifests, "web.yaml", lb([{}, {}]))
    agent.extra = ["--healthcheck-address", "127.0.0.2"]
    agent.start()
    assert probe() == (200, {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2})
    write_manifest(manifests, "web.yaml", lb([{"ready": False}, {"ready": False}]))
    wait_until(lambda: probe()[0] == 503, what="503 without ready local endpoints")
    assert probe()[1]["localEndpoints"] == 0
    (manifests / "web.yaml").unlink()

    def closed() -> bool:
        try:
            probe()
        except OSError:
            return True
        return False

    wait_until(closed, what="the health check port to close")


def test_events_metrics_and_state_through_the_agent(
    cluster: Cluster, manifests: Path, agent: AgentProcess, tmp_path: Path
) -> None:
    import json
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from helpers.support import free_port

    sock, metrics_port = tmp_path / "events.sock", free_port()
    write_manifest(manifests, "web.yaml", web(cluster, [{}, {}, {}]))
    agent.extra = [
        "--events",
        "all",
        "--events-socket",
        str(sock),
        "--metrics-addr",
        f"127.0.0.1:{metrics_port}",
    ]
    agent.start()
    wait_until(sock.exists, what="the event socket")
    monitor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "balancing",
            "monitor",
            "--socket",
            str(sock),
            "--service",
            "default/web",
            "-o",
            "json",
            "--count",
            "25",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    made = 0
    try:
        while monitor.poll() is None and made < 500:  # the monitor needs a moment to connect
            made += connect(cluster, 5)["ok"]
        out, _ = monitor.communicate(timeout=15)
    finally:
        if monitor.poll() is None:
            monitor.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 25
    assert {e["owner"]["name"] for e in events} == {"web"} and {e["result"] for e in events} == {"translated"}
    assert all(e["client"].get("host") or e["client"].get("pod") for e in events)
    assert {e["frontend"] for e in events} == {f"{VIP}:80"}

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "balancing_resolutions":
            for s in family.samples:
                if (
                    s.name.endswith("_total")
                    and s.labels.get("name") == "web"
                    and s.labels["result"] == "translated"
                ):
                    total += s.value
    assert total == made, "the per-CPU counters count every connect, read at scrape time"

    code, state = agent.get("/state")
    assert code == 200
    (fe,) = [f for f in state["frontends"] if f["frontend"] == KEY]
    assert fe["owner"]["name"] == "web" and fe["kind"] == "ClusterIP" and len(fe["backends"]) == 3


def test_out_of_cluster_host_honours_enable_out_cluster(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    """Bare-metal mode (--out-of-cluster): policies apply only with enableOutCluster (default true)."""
    from helpers.support import balancing_policy

    a, b, _ = cluster.pods
    write_manifest(
        manifests,
        "policies.yaml",
        [
            balancing_policy(
                "on",
                address="10.96.7.1",
                front_ports=[("", 80, "TCP")],
                addresses=[a.ip4],
                back_ports=[("", 8080, "TCP")],
            ),
            balancing_policy(
                "off",
                address="10.96.7.2",
                front_ports=[("", 80, "TCP")],
                addresses=[b.ip4],
                back_ports=[("", 8080, "TCP")],
                enable_out_cluster=False,
            ),
        ],
    )
    agent.extra = ["--out-of-cluster"]
    agent.start()
    assert connect(cluster, 10, vip="10.96.7.1")["backends"] == {"pod-a": 10}
    assert connect(cluster, 1, vip="10.96.7.2")["errors"] == {"EHOSTUNREACH": 1}  # not applied: untranslated
    status = {p["name"]: p for p in agent.get("/state")[1]["policies"]}
    assert status["on"]["ready"] and status["off"]["reason"] == "OutOfClusterDisabled"


def test_kubernetes_mode_follows_the_api_server_and_survives_its_outage(
    cluster: Cluster, tmp_path: Path
) -> None:
    """--api-server: the same model and writer from list+watch; the datapath keeps translating while the API
    server is gone."""
    from balancing_testkit.fakeapi import ThreadedApi

    svc, eps = web(cluster, [{}])
    with ThreadedApi() as api:
        api.call(api.fake.put, "/api/v1/services", svc)
        api.call(api.fake.put, "/apis/discovery.k8s.io/v1/endpointslices", eps)
        agent = AgentProcess(cluster.topo, tmp_path, cluster.node, extra=["--api-server", api.url])
        try:
            agent.start(manifests_flag=False)
            assert connect(cluster, 20)["backends"] == {"pod-a": 20}
            api.call(api.fake.put, "/apis/discovery.k8s.io/v1/endpointslices", web(cluster, [{}, {}])[1])
            agent.wait_frontends(lambda f: len(f.get(KEY, [])) == 2, what="the watch event")
            assert set(connect(cluster, 40)["backends"]) == {"pod-a", "pod-b"}
            api.stop_serving()
            assert set(connect(cluster, 40)["backends"]) == {"pod-a", "pod-b"}, (
                "translating with the API gone"
            )
            assert agent.proc is not None and agent.proc.poll() is None
        finally:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()


def test_kubernetes_mode_writes_this_nodes_policy_status(cluster: Cluster, tmp_path: Path) -> None:
    """The agent writes its entry in the policy's status.nodes (server-side apply, its own field manager),
    after the maps hold the policy, and again only when what it reports changes."""
    from balancing_testkit.fakeapi import ThreadedApi
    from helpers.support import POLICY_API, balancing_policy

    a = cluster.pods[0]
    path = f"/apis/{POLICY_API}/balancingpolicies"

    def policy(*addresses: str) -> dict[str, Any]:
        return balancing_policy(
            "edge",
            address="10.96.7.1",
            front_ports=[("", 80, "TCP")],
            addresses=addresses,
            back_ports=[("", 8080, "TCP")],
        )

    def entry() -> dict[str, Any] | None:
        nodes = (api.fake.objects[path][("", "edge")].get("status") or {}).get("nodes") or []
        return next((n for n in nodes if n["nodeName"] == cluster.node), None)

    with ThreadedApi() as api:
        api.call(api.fake.put, path, policy(a.ip4))
        agent = AgentProcess(cluster.topo, tmp_path, cluster.node, extra=["--api-server", api.url])
        try:
            agent.start(manifests_flag=False)
            assert connect(cluster, 10, vip="10.96.7.1")["backends"] == {"pod-a": 10}
            wait_until(lambda: entry() is not None, 10.0, "the agent's status entry")
            first = entry()
            assert first is not None and (first["backends"], first["ready"]) == (1, True)
            patch = next(c for c in api.fake.patches() if c.path.endswith("/edge/status"))
            assert patch.params["fieldManager"] == f"balancing-agent-{cluster.node}"
            assert patch.headers["content-type"] == "application/apply-patch+yaml"

            # A change of readiness is written promptly (a change of the count alone waits up to a minute:
            # on every node at once it would be N writes, each sent to N watchers).
            status = api.fake.objects[path][("", "edge")]["status"]
            api.call(api.fake.put, path, {**policy("fd00::1"), "status": status})  # no IPv4 backend left
            wait_until(lambda: (entry() or {}).get("ready") is False, 15.0, "the entry to follow the change")
            second = entry()
            assert second is not None and second["backends"] == 0
            writes = [c for c in api.fake.patches() if c.path.endswith("/edge/status")]
            assert len(writes) == 2, "one write per change of what this node reports"
        finally:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()
