"""``balancing status`` against a fake agent serving the real ``/statusz`` routes, and what feeds them."""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from balancing.agent import health, lifecycle
from balancing.cli import status
from balancing.cli.main import app
from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps
from balancing.datapath.writer import MapWriter
from balancing.model.desired import (
    Backend,
    BackendPod,
    DesiredState,
    Frontend,
    FrontendKey,
    Owner,
    PodRef,
    Protocol,
)

A, B, C = (Backend(ipaddress.ip_address(f"10.244.0.{i}"), 8080) for i in (1, 2, 3))
V6 = Backend(ipaddress.ip_address("fd00:244::5"), 53)
SVC = Owner("Service", "default", "web", "http")
POD = PodRef("default", "pod-a", "aaaa")


def desired() -> DesiredState:
    ip = ipaddress.ip_address
    return DesiredState(
        {
            FrontendKey(ip("10.96.0.10"), 80, Protocol.TCP): Frontend(SVC, (A, B), "2 ready"),
            FrontendKey(ip("10.96.0.20"), 80, Protocol.TCP): Frontend(
                SVC, (A, B, C), "3", affinity_timeout=60
            ),
            FrontendKey(ip("fd00:96::10"), 53, Protocol.UDP): Frontend(SVC, (V6,), "1"),
            FrontendKey(ip("10.96.0.53"), 53, Protocol.UDP): Frontend(
                Owner("LocalRedirectPolicy", "", "dns", "dns"),
                (A,),
                "lrp",
                fallback=(C,),
                fallback_owner=SVC,
                backend_pods=(BackendPod(POD, A),),
                skip_redirect_from_backends=True,
                qos_limit=10,
            ),
        }
    )


def test_map_fill_counts_what_the_writer_wrote() -> None:
    io = FakeMaps()
    writer = MapWriter(io, lambda p: [777, 778] if p == POD else [])
    writer.sync(desired())
    fill = lifecycle.map_fill(writer.record())
    for name, pinned in lifecycle.FILLED_MAPS.items():
        assert fill[name] == len(io.items(pinned)), name
    assert fill["qos"] == 1 and fill["clients"] == 2 and fill["affinityMatch"] == 3


class Fake:
    """A fake agent: ``/statusz`` and the other health routes of a real ``HealthState``."""

    def __init__(self, state: health.HealthState, details: dict[str, object]) -> None:
        self.handler = health.agent_routes(state, lambda: state.statusz(details))


@pytest.fixture
def agent() -> Iterator[Callable[[health.HealthState, dict[str, object]], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(state: health.HealthState, details: dict[str, object]) -> str:
        routes = Fake(state, details).handler

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = routes(self.path)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


DETAILS: dict[str, object] = {
    "version": "9.9.9",
    "source": "manifests",
    "frontends": 4,
    "maps": {"services": {"entries": 900, "capacity": 1000}, "backends": {"entries": 3, "capacity": 100}},
    "programs": {"attached": ["connect4", "connect6", "sendmsg4"], "loadWarnings": 1},
}


def synced_state() -> health.HealthState:
    state = health.HealthState(stale_after=70)
    state.synced()
    return state


def test_status_shows_a_ready_agent(agent: Callable[[health.HealthState, dict[str, object]], str]) -> None:
    url = agent(synced_state(), DETAILS)
    result = CliRunner().invoke(app, ["status", "--agent", url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"http://{url}/statusz (balancing 9.9.9, source manifests)" in out
    assert "ready     yes" in out and "healthy   yes" in out and "stale after 70.0 s" in out
    assert "4 programmed" in out and "services 900/1000 (90%)" in out and "backends 3/100 (3%)" in out
    assert "3 attached: connect4, connect6, sendmsg4 (1 load warnings)" in out
    assert "all running" in out and "0 in the last 10 min" in out


def test_status_of_a_struggling_agent_exits_1(
    agent: Callable[[health.HealthState, dict[str, object]], str],
) -> None:
    state = health.HealthState()
    state.task_down("source", "SourceError: the API server said 500")
    state.last_error = "1 frontends not programmed, e.g. [fd00:96::10]:53/UDP: map full"
    log = logging.getLogger("balancing.test-status")
    log.addHandler(state.errors)
    try:
        log.error("one")
        log.warning("two")
    finally:
        log.removeHandler(state.errors)
    url = agent(state, DETAILS)
    result = CliRunner().invoke(app, ["status", "--agent", f"http://{url}"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    out = result.output
    assert "ready     no" in out and "last sync none yet" in out and "restarting: source" in out
    assert "1 in the last 10 min; 1 errors, 1 warnings since start" in out
    assert "[fd00:96::10]:53/UDP: map full" in out  # brackets survive the rendering


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_status_documents(agent: Callable[[health.HealthState, dict[str, object]], str], fmt: str) -> None:
    url = agent(synced_state(), DETAILS)
    result = CliRunner().invoke(app, ["status", "--agent", url, "-o", fmt])
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.output) if fmt == "json" else yaml.safe_load(result.output)
    assert doc["agent"] == f"http://{url}/statusz" and doc["ready"] and doc["healthy"]
    assert set(doc) >= {"currentTime", "lastSync", "lastSyncAgeSeconds", "staleAfterSeconds", "tasksDown",
                        "errors", "version", "source", "frontends", "maps", "programs"}  # fmt: skip
    assert doc["errors"] == {"errors": 0, "warnings": 0, "recentErrors": 0, "windowSeconds": 600.0,
                             "lastErrorTime": None, "lastError": ""}  # fmt: skip


def test_statusz_is_counts_only_and_cheap() -> None:
    code, body = health.agent_routes(synced_state())("/statusz")
    assert code == 200 and isinstance(body, dict) and body["ready"] is True
    assert health.agent_routes(synced_state())("/nope")[0] == 404


def test_status_without_an_agent_is_one_line_and_exit_2() -> None:
    for args, words in (
        (["--agent", "127.0.0.1:1"], "is the agent running?"),
        (["--agent", "nonsense"], "is not HOST:PORT"),
    ):
        result = CliRunner().invoke(app, ["status", *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "--agent" in lines[0] and words in lines[0]
    assert status.statusz_url("[::1]:10256") == "http://[::1]:10256/statusz"
    assert status.statusz_url("http://h:1/statusz") == "http://h:1/statusz"
    result = CliRunner().invoke(app, ["status", "-o", "xml"])
    assert result.exit_code == 2


def test_an_old_agent_without_statusz(agent: Callable[[health.HealthState, dict[str, object]], str]) -> None:
    url = agent(synced_state(), DETAILS)
    result = CliRunner().invoke(app, ["status", "--agent", f"http://{url}/nothing/statusz"])
    assert result.exit_code == 2 and "HTTP 404" in result.output


def test_abi_names_of_the_filled_maps() -> None:
    assert lifecycle.FILLED_MAPS["services"] == abi.MAP_SERVICES
