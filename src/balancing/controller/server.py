"""The webhook's HTTPS server: ``POST /validate`` and ``POST /mutate`` take an AdmissionReview v1;
``GET /healthz``, ``/readyz`` and ``/metrics`` (Prometheus text) share the port. A tiny asyncio server in
``balancing.httpserve`` (shared with the agent's health endpoints): one request per connection, bodies
bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from balancing import httpserve
from balancing.controller import admission

__all__ = ["MAX_BODY", "Webhook", "serve"]

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024  # the API server's request limit for an object is about this
_TIMEOUT = 10.0


class Webhook:
    """The routes and their state: where existing policies come from, readiness, the metrics registry."""

    def __init__(
        self,
        existing: admission.Existing,
        *,
        ready: Callable[[], bool] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.existing = existing
        self.ready = ready or (lambda: True)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            "balancing_controller_admission_decisions",
            "Admission decisions by policy kind, operation, webhook and outcome.",
            ["kind", "operation", "webhook", "allowed"],
            registry=self.registry,
        )

    def review(self, webhook: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """``(status, AdmissionReview)`` for a POST to ``/validate`` or ``/mutate``."""
        try:
            review = json.loads(body)
        except ValueError as exc:
            return 400, {"error": f"the body is not JSON: {exc}"}
        request = review.get("request") if isinstance(review, dict) else None
        if not isinstance(request, dict):
            return 400, {"error": "not an AdmissionReview: no request"}
        operation = str(request.get("operation", ""))
        kind = request.get("kind")
        kind_name = str(kind.get("kind", "")) if isinstance(kind, dict) else ""
        if webhook == "validate":
            try:
                allowed, message = admission.validate(request, self.existing)
            except Exception:  # a bug must not turn into a refused change
                log.exception("validating %s %s", operation, kind_name)
                allowed, message = True, ""
            answer = admission.admission_response(request, allowed, message)
        else:
            allowed, patch = True, admission.mutate(request)
            answer = admission.admission_response(request, True, patch=patch)
        self.decisions.labels(kind_name, operation, webhook, "true" if allowed else "false").inc()
        if not allowed:
            log.info("denied %s %s: %s", operation, kind_name, message)
        return 200, answer

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for one request."""
        if path in ("/validate", "/mutate"):
            if method != "POST":
                return _json(405, {"error": f"{path} takes POST"})
            return _json(*self.review(path[1:], body))
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": f"{path} takes GET"})
        if path in ("/healthz", "/livez"):
            return _json(200, {"ok": True})
        if path == "/readyz":
            ready = self.ready()
            return _json(200 if ready else 503, {"ready": ready})
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return _json(404, {"error": f"no such path {path!r}"})


def _json(code: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return code, "application/json", json.dumps(body).encode()


async def serve(webhook: Webhook, host: str, port: int, ssl_context: ssl.SSLContext | None) -> asyncio.Server:
    """Start serving ``webhook`` on ``host:port`` (port 0: any free port); HTTPS unless ``ssl_context`` is
    ``None`` (for tests and a TLS-terminating proxy only: the API server calls webhooks over HTTPS)."""
    return await httpserve.serve(
        webhook.handle, host, port, ssl_context=ssl_context, max_body=MAX_BODY, timeout=_TIMEOUT
    )
