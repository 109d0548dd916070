"""The agent's HTTP endpoints: ``/healthz`` and ``/livez`` (kube-proxy compatible JSON) and ``/readyz``.

``/healthz`` answers 200 with ``{"lastUpdated": ..., "currentTime": ...}`` while the last successful sync is
younger than the staleness limit, else 503; ``/readyz`` is 200 once the first full sync is programmed. A tiny
asyncio server: the agent runs one event loop and this must never block it.
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
        healthy = self.last_synced is not None and now - self.last_synced <= self.stale_after
        return (200 if healthy else 503), body

    def readyz(self) -> tuple[int, dict[str, object]]:
        return (200 if self.ready else 503), {"ready": self.ready, **self.extra}


Handler = Callable[[str], tuple[int, dict[str, object]]]  # request path → (status, JSON body)


def agent_routes(
    state: HealthState, extra: dict[str, Callable[[], tuple[int, dict[str, object]]]] | None = None
) -> Handler:
    routes = {"/healthz": state.healthz, "/livez": state.healthz, "/readyz": state.readyz, **(extra or {})}

    def handle(path: str) -> tuple[int, dict[str, object]]:
        return routes[path]() if path in routes else (404, {"error": f"no such path {path!r}"})

    return handle


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    """GET-only JSON endpoints on ``httpserve``."""

    def handle(method: str, path: str, _body: bytes) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "application/json", b'{"error": "GET only"}'
        code, body = handler(path)
        return code, "application/json", json.dumps(body).encode()

    return await httpserve.serve(handle, host, port)
