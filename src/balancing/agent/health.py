"""The agent's HTTP endpoints: ``/healthz`` and ``/livez`` (kube-proxy compatible JSON) and ``/readyz``.

``/healthz`` answers 200 with ``{"lastUpdated": ..., "currentTime": ...}`` while the last successful sync is
younger than the staleness limit and every supervised task runs, else 503 (with ``"down": {task: problem}``
naming the tasks being restarted, see ``agent.supervise``); ``/readyz`` is 200 once the first full sync is
programmed. Served by ``balancing.httpserve`` (bounded, never blocking the agent's one event loop); the same
``serve`` also carries the ``/state`` port and the health-check node ports (``agent.healthcheck_ports``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from balancing import httpserve


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class HealthState:
    stale_after: float = 60.0
    ready: bool = False
    last_synced: float | None = None  # wall-clock time of the last successful sync
    last_error: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    down: dict[str, str] = field(default_factory=dict)  # supervised task → why it is being restarted

    def task_down(self, name: str, problem: str) -> None:
        self.down[name] = problem

    def task_up(self, name: str) -> None:
        self.down.pop(name, None)

    def synced(self) -> None:
        self.ready = True
        self.last_synced = time.time()
        self.last_error = ""

    def healthz(self) -> tuple[int, dict[str, object]]:
        now = time.time()
        body: dict[str, object] = {
            "lastUpdated": _rfc3339(self.last_synced) if self.last_synced else "",
            "currentTime": _rfc3339(now),
        }
        if self.last_error:
            body["lastError"] = self.last_error
        if self.down:
            body["down"] = dict(self.down)
        fresh = self.last_synced is not None and now - self.last_synced <= self.stale_after
        healthy = fresh and not self.down
        return (200 if healthy else 503), body

    def readyz(self) -> tuple[int, dict[str, object]]:
        return (200 if self.ready else 503), {"ready": self.ready, **self.extra}


Body = dict[str, object] | bytes  # a JSON object, or one already encoded (a cached answer)
Route = Callable[[], tuple[int, Body]]
Handler = Callable[[str], tuple[int, Body]]  # request path → (status, JSON body)


def agent_routes(state: HealthState) -> Handler:
    """``/healthz``, ``/livez`` and ``/readyz`` of ``state``."""
    return routes({"/healthz": state.healthz, "/livez": state.healthz, "/readyz": state.readyz})


def routes(table: dict[str, Route]) -> Handler:
    """A handler answering the paths of ``table`` (404 for any other)."""

    def handle(path: str) -> tuple[int, Body]:
        return table[path]() if path in table else (404, {"error": "no such path"})

    return handle


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    """GET-only JSON endpoints on ``httpserve``."""

    def handle(method: str, path: str, _body: bytes) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "application/json", b'{"error": "GET only"}'
        code, body = handler(path)
        return code, "application/json", body if isinstance(body, bytes) else json.dumps(body).encode()

    return await httpserve.serve(handle, host, port)
