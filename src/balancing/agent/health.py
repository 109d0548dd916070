"""The agent's HTTP endpoints: ``/healthz`` and ``/livez`` (kube-proxy compatible JSON), ``/readyz`` and
``/statusz``.

``/healthz`` answers 200 with ``{"lastUpdated": ..., "currentTime": ...}`` while the last successful sync is
younger than the staleness limit and every supervised task runs, else 503 (with ``"down": {task: problem}``
naming the tasks being restarted, see ``agent.supervise``); ``/readyz`` is 200 once the first full sync is
programmed. ``/statusz`` (always 200; what ``balancing status`` shows) is counts only, no names of Services,
pods or policies, since the health port may listen on every address; keys are only ever added::

    {"ready": bool, "healthy": bool,                      # /readyz and /healthz would say 200
     "currentTime": RFC 3339, "lastSync": RFC 3339 | null, "lastSyncAgeSeconds": float | null,
     "staleAfterSeconds": float, "tasksDown": [task],
     "errors": {"errors": int, "warnings": int,            # logged since start
                "recentErrors": int, "windowSeconds": float, "lastErrorTime": RFC 3339 | null,
                "lastError": str},                          # as /healthz's lastError ("" when none)
     ...}                                                   # what the agent adds (agent.lifecycle)

Served by ``balancing.httpserve`` (bounded, never blocking the agent's one event loop); the same ``serve``
also carries the ``/state`` port and the health-check node ports (``agent.healthcheck_ports``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from balancing import httpserve


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class ErrorCounter(logging.Handler):
    """Counts the WARNING and ERROR records logged (their times, not their text: ``/statusz`` is counts)."""

    def __init__(self, window: float = 600.0, keep: int = 1000) -> None:
        super().__init__(logging.WARNING)
        self.window = window
        self.errors = 0
        self.warnings = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=keep)  # error times

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors += 1
            self._recent.append(record.created)
        else:
            self.warnings += 1

    def summary(self, now: float) -> dict[str, object]:
        while self._recent and self._recent[0] < now - self.window:
            self._recent.popleft()
        last = self._recent[-1] if self._recent else None
        return {
            "errors": self.errors,
            "warnings": self.warnings,
            "recentErrors": len(self._recent),
            "windowSeconds": self.window,
            "lastErrorTime": _rfc3339(last) if last is not None else None,
        }


@dataclass
class HealthState:
    stale_after: float = 60.0
    ready: bool = False
    last_synced: float | None = None  # wall-clock time of the last successful sync
    last_error: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    down: dict[str, str] = field(default_factory=dict)  # supervised task → why it is being restarted
    errors: ErrorCounter = field(default_factory=ErrorCounter)  # attached to the agent's loggers by it

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

    def statusz(self, details: Mapping[str, object] | None = None) -> tuple[int, dict[str, object]]:
        """The ``/statusz`` document (module docstring) with ``details`` added."""
        now = time.time()
        healthy = self.healthz()[0] == 200
        synced = self.last_synced
        body: dict[str, object] = {
            "ready": self.ready,
            "healthy": healthy,
            "currentTime": _rfc3339(now),
            "lastSync": _rfc3339(synced) if synced else None,
            "lastSyncAgeSeconds": round(now - synced, 3) if synced else None,
            "staleAfterSeconds": self.stale_after,
            "tasksDown": sorted(self.down),
            "errors": {**self.errors.summary(now), "lastError": self.last_error},
        }
        body.update(details or {})
        return 200, body


Body = dict[str, object] | bytes  # a JSON object, or one already encoded (a cached answer)
Route = Callable[[], tuple[int, Body]]
Handler = Callable[[str], tuple[int, Body]]  # request path → (status, JSON body)


def agent_routes(state: HealthState, statusz: Route | None = None) -> Handler:
    """``/healthz``, ``/livez``, ``/readyz`` of ``state``; ``/statusz``: ``statusz``, else ``state``'s."""
    return routes(
        {
            "/healthz": state.healthz,
            "/livez": state.healthz,
            "/readyz": state.readyz,
            "/statusz": statusz or state.statusz,
        }
    )


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
