"""``healthCheckNodePort`` servers: what an external load balancer asks to learn whether this node has
ready local endpoints for a Service with ``externalTrafficPolicy: Local``.

One HTTP listener per health-check port, opened and closed as Services come and go, answering every path with
``{"service": {"namespace", "name"}, "localEndpoints": N}``: 200 when N ≥ 1, else 503 (kube-proxy's contract).
The counts come from the model (``ClusterStore.health_checks``); this module only serves them. A port that
cannot be bound is logged with its Service and retried on the next update.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from balancing.agent import health

log = logging.getLogger(__name__)


class Check(Protocol):
    """What the model reports per health-check port (``model.healthcheck.HealthCheck``)."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def local_endpoints(self) -> int: ...


class HealthCheckServers:
    def __init__(self, host: str) -> None:
        self.host = host
        self._checks: dict[int, Check] = {}
        self._servers: dict[int, asyncio.Server] = {}

    def _handler(self, port: int) -> health.Handler:
        def handle(_path: str) -> tuple[int, dict[str, object]]:
            check = self._checks.get(port)
            if check is None:
                return 503, {"error": "no service uses this health check port any more"}
            body: dict[str, object] = {
                "service": {"namespace": check.namespace, "name": check.name},
                "localEndpoints": check.local_endpoints,
            }
            return (200 if check.local_endpoints > 0 else 503), body

        return handle

    async def update(self, checks: Mapping[int, Check]) -> None:
        """Serve exactly ``checks``: open new ports, close gone ones, answer with the new counts at once."""
        self._checks = dict(checks)
        for port in sorted(self._servers.keys() - checks.keys()):
            server = self._servers.pop(port)
            server.close()
            await server.wait_closed()
        for port in sorted(checks.keys() - self._servers.keys()):
            check = checks[port]
            try:
                self._servers[port] = await health.serve(self._handler(port), self.host, port)
            except OSError as exc:
                log.error(
                    "healthCheckNodePort %d of Service %s/%s cannot be served on %s: %s (retrying later)",
                    port,
                    check.namespace,
                    check.name,
                    self.host,
                    exc,
                )

    async def close(self) -> None:
        await self.update({})
