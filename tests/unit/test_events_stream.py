"""The event stream (NDJSON on a unix socket) and ``balancing monitor`` reading and filtering it."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
import typer
from typer.testing import CliRunner

from balancing.cli import inspect_common, monitor
from balancing.datapath import abi, podcgroups
from balancing.events import stream
from balancing.events.attribution import Attributor
from balancing.events.pipeline import EventPipeline
from balancing.events.stream import EventStreamServer
from balancing.model import objects
from balancing.model.desired import Owner

T = TypeVar("T")
UID = "3f1c9a2e-8b7d-4c1e-9f00-123456789abc"
CID = "0123456789abcdef" * 4
OWNERS = {1: Owner("Service", "default", "web", "http"), 2: Owner("Service", "other", "db", "")}
POD_CGROUP, HOST_CGROUP = 1001, 1002


def raw_event(svc_id: int, cgroup_id: int, result: int = 1) -> bytes:
    backend = bytes(16) if result == 8 else abi.pack_addr(ipaddress.ip_address("10.244.1.5"))
    return abi.EVENT.packer.pack(
        1,
        cgroup_id,
        2,
        3,
        1234,
        svc_id,
        abi.pack_addr(ipaddress.ip_address("10.96.0.10")),
        backend,
        abi.pack_port(80),
        abi.pack_port(8080),
        1,
        6,
        result,
        0,
        b"curl".ljust(16, b"\0"),
        bytes(16),  # client_addr (north-south only)
        abi.pack_port(0),
        0,
        0,
    )


def client_pod() -> objects.Pod:
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client-0", "namespace": "default", "uid": UID},
    }
    pod = objects.parse_object(doc)
    assert isinstance(pod, objects.Pod)
    return pod


class Agent:
    """A pipeline and its stream server on an event loop in a thread (as the agent runs them)."""

    def __init__(self, sock: Path) -> None:
        index = podcgroups.PodCgroupIndex(
            {UID: (POD_CGROUP,)}, {POD_CGROUP: podcgroups.CgroupOwner(UID, CID)}
        )
        attr = Attributor(sock.parent, {UID: client_pod()}.get, index=index, rescan_interval=1e9)
        self.pipeline = EventPipeline(sock.parent / abi.MAP_EVENTS, OWNERS.get, attr)
        self.server = EventStreamServer(sock, self.pipeline.subscribe, self.pipeline.unsubscribe)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            res = fn()
            return await res if asyncio.iscoroutine(res) else res

        fut: Future[Any] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return fut.result(10)

    def publish(self, *raws: bytes) -> None:
        def go() -> None:
            for raw in raws:
                self.pipeline.ingest(raw)
            self.pipeline.process()

        self.call(go)

    def wait_clients(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.call(lambda: self.server.clients) != n:
            assert time.monotonic() < deadline, f"waiting for {n} stream clients"
            time.sleep(0.01)

    def close(self) -> None:
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path / "ev.sock")
    try:
        yield a
    finally:
        a.close()


MIXED = (
    raw_event(1, POD_CGROUP),  # web, from the pod
    raw_event(2, POD_CGROUP),  # db, from the pod
    raw_event(1, HOST_CGROUP),  # web, from the host
    raw_event(2, HOST_CGROUP, result=8),  # db refused, from the host
)


def test_every_client_gets_every_event_as_json_lines(agent: Agent) -> None:
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
        a.connect(str(agent.server.path))
        b.connect(str(agent.server.path))
        agent.wait_clients(2)
        agent.publish(*MIXED)
        for s in (a, b):
            f = s.makefile("rb")
            lines = [json.loads(f.readline()) for _ in MIXED]
            f.close()
            assert [(r["serviceId"], "pod" in r["client"]) for r in lines] == [
                (1, True),
                (2, True),
                (1, False),
                (2, False),
            ]
    agent.wait_clients(0)
    assert agent.call(lambda: agent.pipeline.subscribers) == 0, "a gone client unsubscribes"
    assert oct(agent.server.path.stat().st_mode & 0o777) == "0o600"


def test_close_removes_the_socket(tmp_path: Path) -> None:
    a = Agent(tmp_path / "ev.sock")
    assert a.server.path.exists()
    a.close()
    assert not a.server.path.exists()


async def publish_then_close(agent: Agent, iterations: int) -> float:
    """Publish MIXED, let the loop run ``iterations`` times, close the server; how long the close took."""
    for raw in MIXED:
        agent.pipeline.ingest(raw)
    agent.pipeline.process()
    for _ in range(iterations):
        await asyncio.sleep(0)
    start = time.monotonic()
    await agent.server.close()
    return time.monotonic() - start


def test_close_ends_every_stream_whatever_a_client_is_doing(agent: Agent) -> None:
    # close at every step of taking, writing and draining a batch (on Python 3.11 a close that cancelled
    # the client while its drain completed was swallowed by asyncio.wait_for: close() hung)
    for iterations in range(16):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(agent.server.path))
            s.settimeout(5)
            agent.wait_clients(1)
            took = agent.call(functools.partial(publish_then_close, agent, iterations))
            assert took < stream.CLOSE_GRACE, f"close after {iterations} iterations waited for a client"
            with s.makefile("rb") as f:
                lines = f.readlines()  # to the end of the stream
            assert [json.loads(line)["serviceId"] for line in lines] == [1, 2, 1, 2], iterations
        assert agent.call(lambda: (agent.server.clients, agent.pipeline.subscribers)) == (0, 0)
        assert not agent.server.path.exists()
        agent.call(agent.server.start)


def stall(agent: Agent, client: socket.socket) -> None:
    """Publish until ``client`` (which reads nothing) has records stuck on their way to it."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(3):
        agent.publish(*[raw_event(1, POD_CGROUP)] * 1024)
        time.sleep(0.05)
    assert agent.call(lambda: agent.pipeline.subscriber_drops) > 0, "the server's writes to it are stalled"


def read_to_the_end(client: socket.socket) -> None:
    client.settimeout(5)
    while client.recv(1 << 16):
        pass


def test_close_drops_a_stuck_client_promptly(agent: Agent) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.server.path))
        agent.wait_clients(1)
        stall(agent, s)
        start = time.monotonic()
        agent.call(agent.server.close)
        assert time.monotonic() - start < stream.CLOSE_GRACE + 1
        assert agent.call(lambda: (agent.server.clients, agent.pipeline.subscribers)) == (0, 0)
        assert not agent.server.path.exists()
        read_to_the_end(s)


def test_a_stuck_client_is_disconnected(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "STUCK_AFTER", 0.2)
    with socket.socket(socket.AF_UNIX) as s, socket.socket(socket.AF_UNIX) as other:
        s.connect(str(agent.server.path))
        other.connect(str(agent.server.path))
        agent.wait_clients(2)
        other.close()
        agent.wait_clients(1)
        stall(agent, s)
        agent.wait_clients(0)
        assert agent.call(lambda: agent.pipeline.subscribers) == 0
        read_to_the_end(s)


def run_monitor(agent: Agent, *args: str, publish: tuple[bytes, ...] = MIXED) -> Any:
    app = typer.Typer()
    app.command()(monitor.monitor)

    def publish_once_subscribed() -> None:
        agent.wait_clients(1)
        agent.publish(*publish)

    publisher = threading.Thread(target=publish_once_subscribed)
    publisher.start()
    try:
        return CliRunner().invoke(app, ["--socket", str(agent.server.path), *args])
    finally:
        publisher.join(10)


def test_monitor_filters_by_service_as_json(agent: Agent) -> None:
    res = run_monitor(agent, "--service", "default/web", "-o", "json", "--count", "2")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["owner"]["name"], "pod" in r["client"]) for r in recs] == [("web", True), ("web", False)]


def test_monitor_filters_by_pod_as_text(agent: Agent) -> None:
    res = run_monitor(agent, "--pod", "default/client-0", "--count", "2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 2
    assert "default/client-0[" in lines[0] and "curl(1234)" in lines[0]
    assert "Service default/web:http 10.96.0.10:80 ⇒ 10.244.1.5:8080 translated" in lines[0]
    assert "Service other/db" in lines[1]


def test_monitor_shows_host_clients_and_refusals(agent: Agent) -> None:
    res = run_monitor(agent, "--service", "db", "--count", "2")
    assert res.exit_code == 0, res.output
    second = res.stdout.splitlines()[1]
    assert "host curl(1234)" in second and "⇒ - refused" in second


def test_monitor_ends_with_the_stream(agent: Agent) -> None:
    app = typer.Typer()
    app.command()(monitor.monitor)

    def stop_agent() -> None:
        agent.wait_clients(1)
        agent.publish(*MIXED)
        agent.call(agent.server.close)

    closer = threading.Thread(target=stop_agent)
    closer.start()
    res = CliRunner().invoke(app, ["--socket", str(agent.server.path), "-o", "json"])
    closer.join(10)
    assert not closer.is_alive(), "the server's close returned"
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["serviceId"] for line in res.stdout.splitlines()] == [1, 2, 1, 2]
    assert "the event stream ended" in res.stderr
    assert not agent.server.path.exists()


def test_monitor_without_agent_says_why(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(monitor.monitor)
    res = CliRunner().invoke(app, ["--socket", str(tmp_path / "missing.sock")])
    assert res.exit_code == 2
    assert "is the agent running with events on?" in res.stderr
    assert str(tmp_path / "missing.sock") in res.stderr


@pytest.mark.parametrize("bad", ["--service=/web", "--pod=ns/", "-o=yaml"])
def test_monitor_rejects_bad_flags(tmp_path: Path, bad: str) -> None:
    app = typer.Typer()
    app.command()(monitor.monitor)
    flag, _, value = bad.partition("=")
    res = CliRunner().invoke(app, ["--socket", str(tmp_path / "x.sock"), flag, value])
    assert res.exit_code == 2


def test_filters_match_namespace_and_name() -> None:
    rec: dict[str, Any] = {
        "owner": {"kind": "Service", "namespace": "default", "name": "web", "portName": ""},
        "client": {"pod": {"namespace": "default", "name": "client-0", "container": "main", "uid": UID}},
    }
    assert monitor.matches(rec, ("default", "web"), ("default", "client-0"))
    assert monitor.matches(rec, (None, "web"), None)
    assert not monitor.matches(rec, ("other", "web"), None)
    assert not monitor.matches(rec, None, ("default", "client-1"))
    assert not monitor.matches({"owner": None, "client": {"host": True}}, ("default", "web"), None)
    assert not monitor.matches({"owner": None, "client": {"host": True}}, None, ("default", "client-0"))


def test_monitor_names_owners_as_inspect_does() -> None:
    """One owner formatter for the tools (``inspect_common.owner_text``); ``-`` when the owner is unknown."""
    owner = {"kind": "BalancingPolicy", "namespace": "", "name": "dns", "portName": ""}
    assert f"→ [bold]{inspect_common.owner_text(owner)}[/]" in monitor.format_text({"owner": owner})
    assert "→ [bold]BalancingPolicy dns[/]" in monitor.format_text({"owner": owner})
    assert "→ [bold]-[/]" in monitor.format_text({"owner": None})
