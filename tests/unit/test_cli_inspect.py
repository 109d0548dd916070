"""The JSON documents of ``balancing inspect`` and ``balancing trace``, and the agent client.

The documents are built from maps the real writer programmed in memory (``FakeMaps``) joined with a
``/state`` the real ``agent.state.build`` made from the same desired state, so both sides of the join are
the production code. The table renderers are run too (no output checked but that rows stay one line).
"""

from __future__ import annotations

import http.server
import io as stdio
import ipaddress
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from balancing.agent import state as agentstate
from balancing.cli import agentclient, inspect, inspect_data, inspect_render, inspect_trace, trace
from balancing.cli.agentclient import AgentView
from balancing.cli.inspect_common import parse_frontend
from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps
from balancing.datapath.replay import Caller, replay
from balancing.datapath.writer import MapWriter
from balancing.model import objects
from balancing.model.desired import (
    Backend,
    BackendPod,
    DesiredState,
    Frontend,
    FrontendKey,
    FrontendKind,
    Owner,
    PodRef,
    Protocol,
)

A, B, C = (Backend(ipaddress.ip_address(f"10.244.0.{i}"), 8080) for i in (1, 2, 3))
POD_A = PodRef("default", "pod-a", "aaaa")
WEB, NODEPORT, DNS, STICKY = (
    FrontendKey(ipaddress.ip_address("10.96.0.10"), 80, Protocol.TCP),
    FrontendKey(ipaddress.ip_address("192.168.1.10"), 30080, Protocol.TCP),
    FrontendKey(ipaddress.ip_address("10.96.0.53"), 53, Protocol.UDP),
    FrontendKey(ipaddress.ip_address("10.96.0.20"), 80, Protocol.TCP),
)
UNPROGRAMMED = FrontendKey(ipaddress.ip_address("10.96.0.99"), 80, Protocol.TCP)
SVC = Owner("Service", "default", "web", "http")
DNS_SVC = Owner("Service", "kube-system", "kube-dns", "dns")
LRP = Owner("LocalRedirectPolicy", "", "node-local-dns", "dns")
OLD_KEYS = {"frontend", "address", "port", "protocol", "serviceId", "affinityTimeoutSeconds", "backends"}


def desired() -> DesiredState:
    return DesiredState(
        {
            WEB: Frontend(SVC, (A, B), "2 ready endpoints"),
            NODEPORT: Frontend(SVC, (A, B), "traffic policy Cluster", FrontendKind.NODE_PORT),
            DNS: Frontend(
                LRP,
                (A,),
                "LocalRedirectPolicy node-local-dns: 1 local backend",
                fallback=(C,),
                fallback_owner=DNS_SVC,
                backend_pods=(BackendPod(POD_A, A),),
                skip_redirect_from_backends=True,
                qos_limit=100,
            ),
            STICKY: Frontend(SVC, (A, B, C), "3 ready endpoints", affinity_timeout=60),
        }
    )


def pod(name: str, ip: str) -> objects.Pod:
    return objects.Pod.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": name},
            "spec": {"nodeName": "node-a", "containers": [{"name": "main"}]},
            "status": {"phase": "Running", "podIP": ip},
        }
    )


@pytest.fixture
def maps() -> tuple[FakeMaps, MapWriter]:
    io = FakeMaps()
    writer = MapWriter(io, lambda p: [777] if p == POD_A else [])
    writer.sync(desired())
    return io, writer


@pytest.fixture
def view(maps: tuple[FakeMaps, MapWriter]) -> AgentView:
    model = desired()
    model.frontends[UNPROGRAMMED] = Frontend(SVC, (B,), "1 ready endpoint")
    pods = [pod("pod-a", "10.244.0.1"), pod("pod-b", "10.244.0.2")]
    state = agentstate.build("node-a", model, maps[1].svc_id, pods, [])
    return agentclient.from_state(json.loads(json.dumps(state)), "http://127.0.0.1:10256/state")


def rows_by(doc: list[dict[str, Any]], key: str = "frontend") -> dict[str, dict[str, Any]]:
    return {str(r[key]): r for r in doc}


def test_services_keep_their_keys_and_add_names(maps: tuple[FakeMaps, MapWriter], view: AgentView) -> None:
    io, writer = maps
    bare = inspect_data.services_doc(io, AgentView())
    rows = rows_by(bare["services"])
    assert set(rows) == {str(k) for k in (WEB, NODEPORT, DNS, STICKY)}
    assert all(set(r) >= OLD_KEYS for r in rows.values())
    web = rows[str(WEB)]
    assert web["backends"] == [str(A), str(B)] and web["serviceId"] == writer.svc_id(WEB)
    assert web["owner"] is None and web["kind"] is None and web["reason"] is None and web["fallback"] is None
    assert rows[str(DNS)]["fallback"] == [str(C)] and rows[str(DNS)]["flags"] == [
        "fallback",
        "clients",
        "qos",
    ]
    assert rows[str(STICKY)]["affinityTimeoutSeconds"] == 60 and rows[str(STICKY)]["flags"] == ["affinity"]
    assert bare["unprogrammed"] == [] and set(bare["usage"]) == {
        abi.MAP_SERVICES,
        abi.MAP_BACKENDS,
        abi.MAP_AFFINITY,
    }

    named = rows_by(inspect_data.services_doc(io, view)["services"])
    assert named[str(WEB)]["owner"] == {
        "kind": "Service",
        "namespace": "default",
        "name": "web",
        "portName": "http",
    }
    assert named[str(NODEPORT)]["kind"] == "NodePort" and named[str(WEB)]["reason"] == "2 ready endpoints"
    assert named[str(DNS)]["fallbackOwner"]["name"] == "kube-dns"
    assert inspect_data.services_doc(io, view)["unprogrammed"] == [str(UNPROGRAMMED)]


def test_backends_say_who_uses_them_and_which_pod_they_are(
    maps: tuple[FakeMaps, MapWriter], view: AgentView
) -> None:
    io, _ = maps
    rows = rows_by(inspect_data.backends_doc(io, view)["backends"], "backend")
    assert set(rows) == {str(A), str(B), str(C)}  # TCP and UDP backends share addresses
    doc = inspect_data.backends_doc(io, view)["backends"]
    udp_c = next(r for r in doc if r["backend"] == str(C) and r["protocol"] == "UDP")
    assert udp_c["usedBy"] == [
        {"frontend": str(DNS), "serviceId": udp_c["usedBy"][0]["serviceId"], "tier": "fallback", "slot": 1}
    ]
    tcp_a = next(r for r in doc if r["backend"] == str(A) and r["protocol"] == "TCP")
    assert {u["frontend"] for u in tcp_a["usedBy"]} == {str(WEB), str(NODEPORT), str(STICKY)}
    assert tcp_a["pod"] == {"namespace": "default", "name": "pod-a", "node": "node-a"}
    assert udp_c["pod"] is None
    assert all(r["pod"] is None for r in inspect_data.backends_doc(io, AgentView())["backends"])
    assert [r["backendId"] for r in doc] == sorted(r["backendId"] for r in doc)


def test_policies_show_tiers_qos_and_client_rules(maps: tuple[FakeMaps, MapWriter], view: AgentView) -> None:
    io, _ = maps
    doc = inspect_data.policies_doc(io, view)
    assert doc["status"] is None
    (row,) = doc["policies"]
    assert row["frontend"] == str(DNS) and row["owner"]["kind"] == "LocalRedirectPolicy"
    assert row["primary"] == [str(A)] and row["fallback"] == [str(C)]
    assert row["qos"] == {"limit": 100, "count": 0, "windowAgeSeconds": None, "exceeded": False}
    assert row["clientRules"] == {"total": 1, "skip": 1, "loopGuard": 0}
    assert row["skipRedirectFromBackend"] is True
    assert row["backendPods"] == [{"namespace": "default", "name": "pod-a", "uid": "aaaa", "backend": str(A)}]
    # without names, policy frontends are found by their tiers, and the skip flag by the client rules
    (bare,) = inspect_data.policies_doc(io, AgentView())["policies"]
    assert bare["owner"] is None and bare["skipRedirectFromBackend"] is True and bare["backendPods"] is None
    # the agent's policy status, when it serves one
    assert view.state is not None
    status = [{"kind": "LocalRedirectPolicy", "name": "node-local-dns", "ready": True, "reason": "Ready"}]
    served = agentclient.from_state({**view.state, "policies": status})
    assert inspect_data.policies_doc(io, served)["status"] == status


def test_affinity_records_are_checked_like_the_datapath(
    maps: tuple[FakeMaps, MapWriter], view: AgentView
) -> None:
    io, writer = maps
    svc_id = writer.svc_id(STICKY)
    assert svc_id is not None
    now = 1_000 * 10**9
    ids = {b: writer._backend_ids[abi.pack_backend(b.ip, b.port, Protocol.TCP)] for b in (A, B)}
    records = [
        (11, svc_id, ids[A], now - 5 * 10**9),
        (12, svc_id, ids[B], now - 61 * 10**9),
        (13, 999, ids[A], now),
    ]
    io.update(
        abi.MAP_AFFINITY,
        [(abi.AFF_KEY.packer.pack(c, s, 0), abi.AFF_VAL.packer.pack(t, b, 0)) for c, s, b, t in records],
    )
    rows = rows_by(inspect_data.affinity_doc(io, view, now)["affinity"], "netnsCookie")
    assert rows["11"] == {
        "netnsCookie": 11,
        "serviceId": svc_id,
        "frontend": str(STICKY),
        "owner": {"kind": "Service", "namespace": "default", "name": "web", "portName": "http"},
        "backendId": ids[A],
        "backend": str(A),
        "pod": {"namespace": "default", "name": "pod-a", "node": "node-a"},
        "idleSeconds": 5.0,
        "timeoutSeconds": 60,
        "expired": False,
        "matched": True,
        "valid": True,
    }
    assert rows["12"]["expired"] and not rows["12"]["valid"]
    assert rows["13"]["frontend"] is None and not rows["13"]["valid"]


def test_nodes_group_nodeport_frontends_by_address(maps: tuple[FakeMaps, MapWriter], view: AgentView) -> None:
    io, writer = maps
    assert inspect_data.nodes_doc(io, AgentView()) == {"nodes": []}
    assert view.state is not None
    named = agentclient.from_state({**view.state, "nodes": {"node-a": {"addresses": ["192.168.1.10"]}}})
    doc = inspect_data.nodes_doc(io, named, lambda a: a == "192.168.1.10")
    assert doc == {
        "nodes": [
            {
                "address": "192.168.1.10",
                "node": "node-a",
                "local": True,
                "frontends": [
                    {
                        "frontend": str(NODEPORT),
                        "port": 30080,
                        "protocol": "TCP",
                        "serviceId": writer.svc_id(NODEPORT),
                        "owner": {
                            "kind": "Service",
                            "namespace": "default",
                            "name": "web",
                            "portName": "http",
                        },
                        "reason": "traffic policy Cluster",
                        "backends": [str(A), str(B)],
                        "programmed": True,
                    }
                ],
            }
        ]
    }


def test_trace_json_joins_the_replay_with_names(maps: tuple[FakeMaps, MapWriter], view: AgentView) -> None:
    io, writer = maps
    t = replay(io, DNS, Caller(cgroup_id=777, netns_cookie=5, now_ns=10**12))
    doc = trace.trace_json(t, view)
    assert set(doc) == {
        "target", "caller", "frontend", "clientRules", "clientRule", "qos", "affinity", "tiers", "verdict",
        "notes", "agent",
    }  # fmt: skip
    assert doc["frontend"]["owner"]["name"] == "node-local-dns" and doc["frontend"]["kind"] == "ClusterIP"
    assert doc["frontend"]["reason"].startswith("LocalRedirectPolicy") and doc["frontend"][
        "serviceId"
    ] == writer.svc_id(DNS)
    assert doc["clientRule"] == {
        "cgroupId": 777,
        "skip": True,
        "ownBackendId": None,
        "ownBackend": None,
        "pod": None,
    }
    assert doc["tiers"]["fallback"]["owner"]["name"] == "kube-dns"
    assert doc["tiers"]["primary"]["slots"][0]["pod"]["name"] == "pod-a"
    v = doc["verdict"]
    assert (
        v["action"] == "translate" and v["decidedBy"] == "skip-redirect-from-backend" and v["deterministic"]
    )
    assert v["backend"] == str(C) and v["result"] == "fallback_skip_redirect_from_backend"
    assert v["outcomes"][0]["tier"] == "fallback" and v["outcomes"][0]["probability"] == 1.0
    assert doc["agent"] == {"url": "http://127.0.0.1:10256/state", "available": True, "error": None}
    missing = trace.trace_json(replay(io, UNPROGRAMMED, Caller()), AgentView())
    assert missing["frontend"] is None and missing["verdict"]["action"] == "pass"
    assert missing["verdict"]["decidedBy"] == "not-a-frontend" and missing["tiers"] == {
        "primary": None,
        "fallback": None,
    }


def test_targets_parse_like_the_datapath_sees_them() -> None:
    assert trace.parse_target("10.96.0.10:53/udp") == (
        FrontendKey(ipaddress.ip_address("10.96.0.10"), 53, Protocol.UDP),
        True,
    )
    assert trace.parse_target("[fd00::a]:80/TCP")[0].ip == ipaddress.ip_address("fd00::a")
    mapped = trace.parse_target("[::ffff:10.96.0.10]:80")
    assert mapped == (FrontendKey(ipaddress.ip_address("10.96.0.10"), 80, Protocol.TCP), False)
    for bad in ("10.96.0.10", "fd00::a:80/TCP", "10.96.0.10:80/ICMP", "10.96.0.10:0/TCP", "x:80/TCP"):
        with pytest.raises(ValueError):
            parse_frontend(bad)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"node": "n", "frontends": [], "pods": {}, "path": self.path}).encode()
        self.send_response(200 if self.path == "/state" else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def agent_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_agent_client_fetches_state_and_never_raises(agent_url: str) -> None:
    assert agentclient.state_url("127.0.0.1:10256") == "http://127.0.0.1:10256/state"
    assert agentclient.state_url("http://h:1/state") == "http://h:1/state"
    got = agentclient.fetch(f"http://{agent_url}")
    assert got.available and got.state is not None and got.state["node"] == "n" and got.note() is None
    closed = agentclient.fetch("127.0.0.1:1", timeout=0.5)
    assert not closed.available and closed.error and "127.0.0.1:1" in str(closed.note())
    assert agentclient.fetch(None).note() is not None and not agentclient.fetch(None).describe()["available"]
    assert (
        agentclient.host_of("[fd00::1]:80") == "fd00::1" and agentclient.host_of("10.0.0.1:80") == "10.0.0.1"
    )


def _render(items: Any) -> str:
    buf = stdio.StringIO()
    out = Console(file=buf, width=200)
    for item in items:
        out.print(item)
    text = buf.getvalue()
    assert isinstance(text, str)
    return text


def test_tables_render_and_stay_one_line_per_row_at_200_services() -> None:
    io = FakeMaps()
    many = {
        FrontendKey(ipaddress.ip_address(f"10.96.{i // 250}.{i % 250 + 1}"), 80, Protocol.TCP): Frontend(
            SVC, (A, B, C), "3 ready endpoints"
        )
        for i in range(200)
    }
    MapWriter(io).sync(DesiredState(many))
    state = agentstate.build("node-a", DesiredState(many), lambda k: 1, [], [])
    view = agentclient.from_state(state)
    text = _render(inspect_render.services(inspect_data.services_doc(io, view), view, False))
    assert sum(1 for line in text.splitlines() if "10.96." in line) == 200
    for name in ("backends", "policies", "affinity", "nodes"):
        doc = getattr(inspect_data, f"{name}_doc")(io, view)
        _render(getattr(inspect_render, name)(doc, view, True))


def test_trace_text_renders(maps: tuple[FakeMaps, MapWriter], view: AgentView) -> None:
    io, _ = maps
    for key, caller in ((DNS, Caller(cgroup_id=777)), (STICKY, Caller()), (UNPROGRAMMED, Caller())):
        buf = stdio.StringIO()
        out = Console(file=buf, width=160)
        inspect_trace.render(trace.trace_json(replay(io, key, caller), view), view, out)
        text = buf.getvalue()
        assert "trace" in text and ("verdict" in text or "not a frontend" in text)


def test_commands_fail_clearly_without_pins(tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(inspect.app, name="inspect")
    app.command("trace")(trace.trace)
    runner = CliRunner()
    for args in (["inspect", "services"], ["inspect", "affinity"], ["trace", "10.96.0.10:80/TCP"]):
        res = runner.invoke(app, [*args, "--bpffs", str(tmp_path)])
        assert res.exit_code == 2 and "cannot open the maps" in res.output, res.output
    res = runner.invoke(app, ["trace", "10.96.0.10/TCP", "--bpffs", str(tmp_path)])
    assert res.exit_code == 2 and "VIP:PORT/PROTO" in res.output
    res = runner.invoke(app, ["inspect", "services", "-o", "xml", "--bpffs", str(tmp_path)])
    assert res.exit_code == 2


def test_local_addresses() -> None:
    assert inspect.is_local_address("127.0.0.1")


V6 = FrontendKey(ipaddress.ip_address("fd00:96::10"), 53, Protocol.UDP)
V6_BACKEND = Backend(ipaddress.ip_address("fd00:244::5"), 53)


@pytest.fixture
def v6_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """``balancing inspect`` on in-memory maps holding an IPv6 frontend, joined with the agent's view."""
    import contextlib

    from balancing.cli import main

    model = DesiredState({V6: Frontend(DNS_SVC, (V6_BACKEND,), "1 ready endpoint")})
    io = FakeMaps()
    writer = MapWriter(io)
    writer.sync(model)
    view = agentclient.from_state(agentstate.build("node-a", model, writer.svc_id, [], []), "http://a/state")

    @contextlib.contextmanager
    def fake_maps(_bpffs: Path) -> Iterator[FakeMaps]:
        yield io

    monkeypatch.setattr(inspect, "open_maps", fake_maps)
    monkeypatch.setattr(trace, "open_maps", fake_maps)
    monkeypatch.setattr(agentclient, "fetch", lambda agent, timeout=0: view)
    assert main.app is not None
    yield CliRunner()


@pytest.mark.parametrize("output", ["table", "wide"])
def test_ipv6_frontends_survive_the_tables(v6_cli: CliRunner, output: str) -> None:
    from balancing.cli.main import app as main_app

    env = {"COLUMNS": "200", "TERM": "dumb"}
    for what in ("services", "backends"):
        res = v6_cli.invoke(main_app, ["inspect", what, "-o", output], env=env)
        assert res.exit_code == 0, res.output
        assert "[fd00:96::10]:53/UDP" in res.output and "[fd00:244::5]:53" in res.output, res.output
    res = v6_cli.invoke(main_app, ["trace", "[fd00:96::10]:53/UDP"], env=env)
    assert res.exit_code == 0 and "[fd00:96::10]:53/UDP" in res.output, res.output


def test_inspect_and_trace_print_yaml_as_they_print_json(v6_cli: CliRunner) -> None:
    import yaml

    from balancing.cli.main import app as main_app

    for args in (["inspect", "services"], ["inspect", "backends"], ["trace", "[fd00:96::10]:53/UDP"]):
        as_json = v6_cli.invoke(main_app, [*args, "-o", "json"])
        as_yaml = v6_cli.invoke(main_app, [*args, "-o", "yaml"])
        assert as_json.exit_code == 0 and as_yaml.exit_code == 0, as_yaml.output
        assert yaml.safe_load(as_yaml.output) == json.loads(as_json.output)
    doc = yaml.safe_load(v6_cli.invoke(main_app, ["inspect", "services", "-o", "yaml"]).output)
    assert doc["services"][0]["frontend"] == "[fd00:96::10]:53/UDP"
