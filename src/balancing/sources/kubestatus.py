"""The one write path to the Kubernetes API: server-side apply of the policies' ``status`` subresource.

Everything else in ``sources`` only reads. Many writers share one policy object (an agent per node writes
its own ``status.nodes`` entry, the controller the ``Ready`` condition), so every write is a server-side
apply (``PATCH .../<plural>/<name>/status``, ``application/apply-patch+yaml``, ``force=true``) under the
writer's own field manager: the API server merges the list-maps by key and gives each manager exactly the
entries it applied, so writers never overwrite each other, need no read-modify-write and no resourceVersion,
and a manager that stops applying an entry removes it (and only it). Only the status subresource is written;
the RBAC needed is ``patch`` on ``<plural>/status``.

``StatusWriter`` is level-based, debounced and safe to call from an event loop that must never wait:

- ``ensure(key, want, have, body)``: ``want`` is the value this writer wants the object to show (anything
  comparable), ``have`` what the object shows now (read from the watch). Equal: nothing to do (a pending
  write of something else is dropped). Different: ``body()`` is applied, unless a write of that same
  ``want`` has not been seen back on the object yet (the watch lags the write).
- Writes per object wait ``delay`` (changes arriving meanwhile coalesce, the latest wins) and are at least
  ``min_interval`` apart; ``concurrency`` writes at most are in flight.
- Failures (connection errors, 5xx, 429, 401/403, 409) retry with exponential backoff and jitter, capped,
  the latest value winning; other 4xx are logged and dropped until the value changes; 404 (the object is
  gone) is not an error. Nothing raises to the caller. ``on_result(key, outcome)`` counts every attempt:
  ``ok``, ``gone``, ``retry`` or ``failed``.

Neighbours: ``sources.kube.KubeConnection`` (where the API server is and how to authenticate);
``balancing.agent_status`` (the agent's ``nodes`` entry) and ``balancing.controller.status`` (the ``Ready``
condition) decide what to write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx2 as httpx

from balancing.model.objects import POLICY_API_VERSION
from balancing.sources.kube import KubeConnection

__all__ = [
    "APPLY_CONTENT_TYPE",
    "PLURALS",
    "Key",
    "StatusWriter",
    "WriterTiming",
    "apply_body",
    "field_manager",
    "status_path",
    "timestamp",
]

log = logging.getLogger(__name__)

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON
PLURALS = {"LocalRedirectPolicy": "localredirectpolicies", "BalancingPolicy": "balancingpolicies"}
FIELD_MANAGER_MAX = 128  # the API server's limit
Key = tuple[str, str]  # (kind, name): the policy kinds are cluster-scoped
Outcome = Callable[[Key, str], None]
RETRIED = frozenset({401, 403, 408, 409, 429})  # auth or RBAC propagating, timeouts, throttling


def status_path(kind: str, name: str) -> str:
    return f"/apis/{POLICY_API_VERSION}/{PLURALS[kind]}/{quote(name, safe='')}/status"


def apply_body(kind: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """The apply configuration: only identity and the fields this manager owns."""
    return {"apiVersion": POLICY_API_VERSION, "kind": kind, "metadata": {"name": name}, "status": status}


def field_manager(prefix: str, suffix: str = "") -> str:
    """``prefix-suffix``, shortened with a hash of the whole when longer than the API server allows (node
    names may have 253 characters)."""
    name = f"{prefix}-{suffix}" if suffix else prefix
    if len(name) <= FIELD_MANAGER_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: FIELD_MANAGER_MAX - 11]}-{digest}"


def timestamp(now: float | None = None) -> str:
    """RFC 3339 in UTC, to the second (the API's ``metav1.Time``)."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WriterTiming:
    """``StatusWriter`` timings (seconds) and bounds."""

    delay: float = 1.0  # a change waits this long for the next one to coalesce with
    min_interval: float = 10.0  # per object: writes at least this far apart
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    concurrency: int = 4  # writes in flight at once
    timeout: float = 10.0  # per request


@dataclass
class _Slot:
    """One object's write state."""

    want: Hashable = None  # the value last asked for (None with ``asked`` False: nothing asked)
    asked: bool = False
    seen: bool = False  # ``want`` has been seen back on the object
    body: Callable[[], dict[str, Any]] | None = None  # a write waiting to be made
    due: float = 0.0  # not before
    last_write: float = float("-inf")
    failures: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class StatusWriter:
    """Applies status for one field manager; see the module docstring. ``ensure`` and ``forget`` are called
    from a running event loop; ``close`` (or leaving ``async with``) stops it."""

    def __init__(
        self,
        connection: KubeConnection,
        manager: str,
        *,
        timing: WriterTiming | None = None,
        on_result: Outcome | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connection = connection
        self.manager = manager
        self.timing = timing or WriterTiming()
        self.on_result = on_result
        self._clock = clock
        self._slots: dict[Key, _Slot] = {}
        self._client: httpx.AsyncClient | None = None
        self._limit = asyncio.Semaphore(max(1, self.timing.concurrency))

    async def __aenter__(self) -> StatusWriter:
        self._connect()  # up front: building the client (TLS context, CA bundle) takes a while
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop: pending writes are dropped (the next writer to start re-derives them from the objects)."""
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- what the callers use ------------------------------------------------------------------------------

    def ensure(self, key: Key, want: Hashable, have: Hashable, body: Callable[[], dict[str, Any]]) -> None:
        """Make the object ``key`` show ``want`` (it shows ``have``); ``body()`` builds the apply
        configuration when a write is needed. Never blocks, never raises."""
        slot = self._slots.get(key)
        if want == have:
            if slot is not None:
                self._settled(slot, want)
            return
        if slot is None:
            slot = self._slots[key] = _Slot()
        elif slot.asked and slot.want == want and (slot.body is not None or not slot.seen):
            return  # already on its way, or written and not seen back yet
        slot.want, slot.asked, slot.seen, slot.body = want, True, False, body
        now = self._clock()
        if slot.task is None or slot.task.done():
            slot.due = max(now + self.timing.delay, slot.last_write + self.timing.min_interval)
            slot.task = asyncio.get_running_loop().create_task(self._run(key, slot), name=f"status {key}")

    def forget(self, key: Key) -> None:
        """The object is gone (or no longer this writer's business): drop any pending write."""
        slot = self._slots.pop(key, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()

    def pending(self) -> int:
        """Objects with a write waiting or in flight."""
        return sum(1 for s in self._slots.values() if s.task is not None and not s.task.done())

    # --- writing -------------------------------------------------------------------------------------------

    @staticmethod
    def _settled(slot: _Slot, shown: Hashable) -> None:
        """The object shows ``shown``, which is wanted: a write still waiting is obsolete. The slot stays (its
        ``last_write`` spaces the next write) until ``forget``."""
        slot.body = None
        slot.want, slot.asked, slot.seen = shown, True, True

    async def _run(self, key: Key, slot: _Slot) -> None:
        try:
            while slot.body is not None:
                while (wait := slot.due - self._clock()) > 0:
                    await asyncio.sleep(wait)
                async with self._limit:
                    build, slot.body = slot.body, None
                    if build is None:
                        continue  # made obsolete while waiting for a free writer
                    slot.last_write = self._clock()
                    outcome, retry_after = await self._apply(key, build)
                self._report(key, outcome)
                if outcome == "retry":
                    slot.failures += 1
                    if slot.body is None and not slot.seen:
                        slot.body = build  # nothing newer, and not shown meanwhile: try this one again
                    backoff = min(
                        self.timing.backoff_cap, self.timing.backoff_base * 2 ** (slot.failures - 1)
                    )
                    slot.due = self._clock() + max(retry_after, backoff * random.uniform(0.5, 1.0))
                    continue
                if slot.failures and outcome == "ok":
                    log.info("status of %s %s written after %d failed attempts", *key, slot.failures)
                slot.failures = 0
                if outcome == "gone":
                    self._drop(key, slot)
                    return
                slot.due = max(slot.due, slot.last_write + self.timing.min_interval)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must never reach the agent loop or the datapath
            log.exception("writing the status of %s %s", *key)
            self._drop(key, slot)

    def _drop(self, key: Key, slot: _Slot) -> None:
        if self._slots.get(key) is slot:
            del self._slots[key]

    async def _apply(self, key: Key, build: Callable[[], dict[str, Any]]) -> tuple[str, float]:
        """One server-side apply: ``(outcome, seconds the server asked to wait)``."""
        kind, name = key
        client = self._connect()
        try:
            response = await client.patch(
                status_path(kind, name),
                params={"fieldManager": self.manager, "force": "true"},
                content=json.dumps(build()).encode(),
                headers={**self.connection.headers(), "Content-Type": APPLY_CONTENT_TYPE},
            )
        except httpx.HTTPError as exc:
            self._failed(key, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, True)
            return "retry", 0.0
        code = response.status_code
        if code < 300:
            return "ok", 0.0
        if code == 404:
            log.debug("%s %s is gone; no status to write", kind, name)
            return "gone", 0.0
        retry = code >= 500 or code in RETRIED
        self._failed(key, f"HTTP {code}: {_message(response)}", retry)
        if not retry:
            return "failed", 0.0
        return "retry", _retry_after(response, self.timing.backoff_cap)

    def _connect(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.connection.base_url, verify=self.connection.verify, timeout=self.timing.timeout
            )
        return self._client

    def _failed(self, key: Key, why: str, retry: bool) -> None:
        slot = self._slots.get(key)
        failures = (slot.failures if slot is not None else 0) + 1
        if not retry:
            log.error("writing the status of %s %s failed, not retrying this value: %s", *key, why)
        elif failures == 1 or failures % 10 == 0:
            log.warning("writing the status of %s %s failed (attempt %d), retrying: %s", *key, failures, why)
        else:
            log.debug("writing the status of %s %s failed (attempt %d): %s", *key, failures, why)

    def _report(self, key: Key, outcome: str) -> None:
        if self.on_result is not None:
            with contextlib.suppress(Exception):
                self.on_result(key, outcome)


def _message(response: httpx.Response) -> str:
    """The API server's Status message, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:500]
    return response.text[:200]


def _retry_after(response: httpx.Response, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(response.headers.get("Retry-After", "0"))))
    except ValueError:
        return 0.0
