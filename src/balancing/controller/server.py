"""The webhook's HTTPS server: ``POST /validate`` and ``POST /mutate`` take an AdmissionReview v1;
``GET /healthz``, ``/readyz`` and ``/metrics`` (Prometheus text) share the port. A tiny asyncio server in
``balancing.httpserve`` (shared with the agent's health endpoints): one request per connection, at most
``MAX_CONNECTIONS`` at once, bodies up to ``MAX_BODY`` (``BODY_BUDGET`` bytes of them at once).

A body is JSON nested at most ``MAX_DEPTH`` levels (``sources.boundedjson``), else 400, as for anything that
is not an AdmissionReview (its ``uid`` a string of at most 128 characters). The decision counter's labels
take only the policy kinds and the admission operations (anything else counts as ``other``), so a client
cannot grow the registry; a denial is logged with the bounded message ``admission`` makes."""

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
from balancing.sources import boundedjson

__all__ = ["BODY_BUDGET", "MAX_BODY", "MAX_CONNECTIONS", "MAX_DEPTH", "Webhook", "serve"]

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024  # the API server's request limit for an object is about this
BODY_BUDGET = 4 * MAX_BODY
MAX_CONNECTIONS = 128  # about 280 KiB each with TLS (256 KiB: asyncio's TLS read buffer): 35 MiB at most
MAX_DEPTH = 64  # an AdmissionReview of a policy nests about 10 levels
_TIMEOUT = 10.0
_OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")


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
            review = boundedjson.loads(body, max_depth=MAX_DEPTH)
        except ValueError as exc:
            return 400, {"error": f"the body is not JSON: {str(exc)[:200]}"}
        request = review.get("request") if isinstance(review, dict) else None
        if not isinstance(request, dict):
            return 400, {"error": "not an AdmissionReview: no request"}
        uid = request.get("uid", "")
        if not isinstance(uid, str) or len(uid) > 128:
            return 400, {"error": "not an AdmissionReview: request.uid is not a string of at most 128"}
        operation = _label(request.get("operation"), _OPERATIONS)
        kind = request.get("kind")
        kind_name = _label(kind.get("kind") if isinstance(kind, dict) else None, admission.POLICY_KINDS)
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


def _label(value: Any, known: tuple[str, ...]) -> str:
    return value if isinstance(value, str) and value in known else "other"


def _json(code: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return code, "application/json", json.dumps(body).encode()


async def serve(
    webhook: Webhook,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    max_connections: int = MAX_CONNECTIONS,
    timeout: float = _TIMEOUT,
) -> asyncio.Server:
    """Start serving ``webhook`` on ``host:port`` (port 0: any free port); HTTPS unless ``ssl_context`` is
    ``None`` (for tests and a TLS-terminating proxy only: the API server calls webhooks over HTTPS)."""
    return await httpserve.serve(
        webhook.handle,
        host,
        port,
        ssl_context=ssl_context,
        max_body=MAX_BODY,
        body_budget=BODY_BUDGET,
        timeout=timeout,
        max_connections=max_connections,
    )
