"""The agent's following tasks never die silently: a failure is logged, counted, shown by /healthz (503) and
the task restarted; a restarted source re-delivers its whole state, and what it no longer holds is deleted.

Runs the agent's own wiring (``Agent.follow_source`` under ``supervise``) over a manifest directory and a
``MapWriter`` on in-memory maps: no kernel needed (the datapath claims are in tests/kernel/test_hardening.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancing import agent, errors
from balancing.agent import health, supervise
from balancing.datapath import abi, loader, maps, writer
from balancing.model import config
from balancing.model.objects import parse_object
from balancing.sources.update import SourceUpdate
from helpers.support import parse_key


def service_doc(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]},
    }


def slice_doc(service: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        "ports": [{"port": 8080}],
    }  # fmt: skip


def write(directory: Path, name: str, *docs: dict[str, Any]) -> None:
    (directory / name).write_text(yaml.safe_dump_all(docs))


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, directory: Path) -> AsyncIterator[tuple[agent.Agent, maps.FakeMaps]]:
    """An agent following ``directory`` under supervision, writing to fake maps."""
    nowhere = tmp_path / "none"
    cfg = agent.AgentConfig(
        directory,
        config.ModelConfig("node-1"),
        loader.DatapathConfig(nowhere, nowhere, nowhere),
        metrics_addr=None,
        restart_backoff=(0.05, 0.2),
    )
    a = agent.Agent(cfg)
    io = maps.FakeMaps()
    a.programming.writer = writer.MapWriter(io)
    task = a._supervised("source", a.follow_source)
    try:
        yield a, io
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await a.programming.close()


def programmed(a: agent.Agent) -> set[str]:
    """The frontends the writer has programmed."""
    w = a.programming.writer
    assert w is not None
    return {str(k) for k in a.store.desired().frontends if w.svc_id(k) is not None}


@pytest.mark.asyncio
async def test_a_crashing_source_is_restarted_and_healthz_shows_it(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    write(directory, "web.yaml", service_doc("web", "10.96.0.10"), slice_doc("web", "10.0.0.1"))
    async with running(tmp_path, directory) as (a, _io):
        await until(lambda: "10.96.0.10:80/TCP" in programmed(a))
        assert a.health.healthz()[0] == 200
        real = a.ingest.apply
        failures = [RuntimeError("boom")]

        def flaky(update: SourceUpdate) -> None:
            if failures and update.upserts:
                raise failures.pop()
            real(update)

        a.ingest.apply = flaky  # type: ignore[method-assign]
        write(directory, "db.yaml", service_doc("db", "10.96.0.11"), slice_doc("db", "10.0.0.2"))
        await until(lambda: "source" in a.health.down)
        code, body = a.health.healthz()
        assert code == 503 and body["down"] == {"source": "RuntimeError"}  # the details stay in the log
        # restarted: the whole state again, including the change the failed run never applied
        await until(lambda: "10.96.0.11:80/TCP" in programmed(a) and not a.health.down)
        assert a.health.healthz()[0] == 200
        assert b'balancing_task_restarts_total{task="source"} 1.0' in a.metrics.exposition()


def test_a_whole_state_replaces_what_the_store_held(tmp_path: Path) -> None:
    """A restarted source delivers its whole state first: objects missing from it were deleted meanwhile."""
    nowhere = tmp_path / "none"
    a = agent.Agent(
        agent.AgentConfig(
            None, config.ModelConfig("node-1"), loader.DatapathConfig(nowhere, nowhere, nowhere)
        )
    )
    try:
        web, db = (
            parse_object(d) for d in (service_doc("web", "10.96.0.10"), service_doc("db", "10.96.0.11"))
        )
        a.take(SourceUpdate([web, db]), whole=True)
        assert sorted(a.store.refs()) == [("Service", "default", "db"), ("Service", "default", "web")]
        a.take(SourceUpdate([web]), whole=True)
        assert a.store.refs() == [("Service", "default", "web")]
        assert [str(k) for k in a.store.desired().frontends] == ["10.96.0.10:80/TCP"]
    finally:
        a.programming.io.shutdown()


@pytest.mark.asyncio
async def test_supervise_backs_off_exponentially_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    state = health.HealthState()
    state.synced()
    runs: list[int] = []
    failed: list[str] = []
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        delays.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(supervise, "_sleep", recorded_sleep)

    async def body() -> None:
        runs.append(len(runs))
        if len(runs) < 5:
            raise ValueError(f"run {len(runs)}")
        state.task_up("t")
        await asyncio.Event().wait()

    task = asyncio.create_task(
        supervise.supervise("t", body, health=state, on_failure=failed.append, backoff=(1.0, 4.0))
    )
    await until(lambda: len(runs) == 5 and not state.down)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert failed == ["t"] * 4
    nominal = [1.0, 2.0, 4.0, 4.0]  # doubling, capped; each within +-20 % jitter
    assert all(0.8 * n <= d <= 1.2 * n for d, n in zip(delays, nominal, strict=True))


def slice_of(service: str, *ips: str) -> dict[str, Any]:
    doc = slice_doc(service, ips[0])
    doc["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]
    return doc


@pytest.mark.asyncio
async def test_a_frontend_that_cannot_be_written_fails_alone_and_is_retried(tmp_path: Path) -> None:
    """A backend map too small for one Service: the others are programmed, the failure is logged once,
    counted and shown by /healthz's lastError, and retried until it fits."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    write(directory, "web.yaml", service_doc("web", "10.96.0.10"), slice_of("web", "10.0.0.1"))
    many = [f"10.0.1.{i}" for i in range(8)]
    write(directory, "big.yaml", service_doc("big", "10.96.0.11"), slice_of("big", *many))
    nowhere = tmp_path / "none"
    cfg = agent.AgentConfig(
        directory,
        config.ModelConfig("node-1"),
        loader.DatapathConfig(nowhere, nowhere, nowhere),
        metrics_addr=None,
        resync_interval=0.2,
    )
    a = agent.Agent(cfg)
    a.programming.writer = writer.MapWriter(maps.FakeMaps(capacity={abi.MAP_BACKENDS: 4}))
    tasks = [a._supervised("source", a.follow_source), a._supervised("resync", a._resync_after_first_sync)]
    try:
        await until(lambda: "10.96.0.10:80/TCP" in programmed(a))
        assert "10.96.0.11:80/TCP" not in programmed(a)
        await until(
            lambda: (
                a.health.healthz()[1].get("lastError") == "1 frontends not programmed (the log names them)"
            )
        )
        assert a.programming.needs_resync and a.health.healthz()[0] == 200  # degraded, not down
        assert b'balancing_map_write_failures_total{map="bl_be_v1"}' in a.metrics.exposition()
        write(directory, "big.yaml", service_doc("big", "10.96.0.11"), slice_of("big", "10.0.1.1"))
        await until(lambda: "10.96.0.11:80/TCP" in programmed(a) and "lastError" not in a.health.healthz()[1])
        assert not a.programming.needs_resync
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a.programming.close()


@pytest.mark.asyncio
async def test_a_partial_write_never_clears_a_failure_a_full_sync_found(tmp_path: Path) -> None:
    """The failures a full sync reports stand until a write about those frontends succeeds."""
    nowhere = tmp_path / "none"
    a = agent.Agent(
        agent.AgentConfig(
            None, config.ModelConfig("node-1"), loader.DatapathConfig(nowhere, nowhere, nowhere)
        )
    )
    p = a.programming
    try:
        big, small = (parse_key(k) for k in ("10.96.0.11:80/TCP", "10.96.0.10:80/TCP"))
        error = errors.FrontendWriteError(str(big), abi.MAP_BACKENDS, "full")
        p._frontend_failures({big: error}, None)  # a full sync: big fails
        p._frontend_failures({}, {small})  # an incremental write about small only
        assert p.needs_resync and set(p._failing) == {big}
        p._frontend_failures({}, {big})  # a write about big that succeeds
        assert not p.needs_resync and not p._failing
    finally:
        p.io.shutdown()
