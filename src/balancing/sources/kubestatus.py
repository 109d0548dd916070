"""The one write path to the Kubernetes API: patches of the policies' ``status`` subresource.

Everything else in ``sources`` only reads. Many writers share one policy object (an agent per node writes
its own ``status.nodes`` entry, the controller the ``Ready`` condition), so every write of a value is a
server-side apply (``PATCH .../<plural>/<name>/status``, ``application/apply-patch+yaml``, ``force=true``)
under the writer's own field manager: the API server merges the list-maps by key and gives each manager
exactly the entries it applied, so writers never overwrite each other, need no read-modify-write and no
resourceVersion, and a manager that stops applying an entry removes it (and only it). The one other write
is the controller's removal of entries whose writer is gone for good (a departed node's agent can no longer
withdraw its entry): a JSON patch (``application/json-patch+json``) whose ``test`` operations make it fail
(409/422, outcome ``stale``) if the object changed in the meantime. Only the status subresource is written;
the RBAC needed is ``patch`` on ``<plural>/status``.

``StatusWriter`` (one per field manager and patch type) is level-based, debounced and safe to call from an
event loop that must never wait:

- ``ensure(key, want, have, body, minor=False)``: ``want`` is the value this writer wants the object to show
  (anything comparable), ``have`` what the object shows now (read from the watch). Equal: nothing to do (a
  pending write of something else is dropped). Different: ``body()`` is sent, unless a write of that same
  ``want`` has not been seen back on the object yet (the watch lags the write).
- Writes per object wait ``delay`` (changes arriving meanwhile coalesce, the latest wins) and are at least
  ``min_interval`` apart, or ``minor_interval`` for a change the caller marks ``minor`` (e.g. only a count
  changed); a change that is not minor brings a pending minor write forward. ``concurrency`` writes at most
  are in flight.
- Failures (connection errors, 5xx, 429, 408, 409 for an apply) retry with exponential backoff and jitter,
  capped, the latest value winning. 401/403 (RBAC lacking ``patch`` on ``<plural>/status``, or not
  propagated yet) are retried ``denied_attempts`` times at most, then the value is ``failed`` (logged as
  an error once per object). Other 4xx are logged and the value is dropped until it changes. A JSON patch
  refused with 409/422 is ``stale``: dropped, and the same value is tried again on the next ``ensure``
  (the next change of the object). 404 (the object is gone) is not an error: the object's state stays as
  a tombstone until ``forget`` (the watch's delete), so a watch lagging behind a deletion still gets at
  most one write per interval. Nothing raises to the caller. ``on_result(key, outcome)`` counts every
  attempt: ``ok``, ``gone``, ``retry``, ``failed`` or (JSON patches only) ``stale``.

Neighbours: ``sources.kube.KubeConnection`` (where the API server is and how to authenticate);
``balancing.agent.policy_status`` (the agent's ``nodes`` entry) and ``balancing.controller.status`` (the
``Ready`` condition, the removal of departed nodes' entries) decide what to write.
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
from balancing.sources import kubecredentials
from balancing.sources.kube import KubeConnection

__all__ = [
    "APPLY_CONTENT_TYPE",
    "JSON_PATCH_CONTENT_TYPE",
    "PLURALS",
    "Body",
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
JSON_PATCH_CONTENT_TYPE = "application/json-patch+json"  # RFC 6902
PLURALS = {"LocalRedirectPolicy": "localredirectpolicies", "BalancingPolicy": "balancingpolicies"}
FIELD_MANAGER_MAX = 128  # the API server's limit
Key = tuple[str, str]  # (kind, name): the policy kinds are cluster-scoped
Body = Callable[[], Any]  # the patch document: an apply configuration (dict) or JSON patch operations (list)
Outcome = Callable[[Key, str], None]
RETRIED = frozenset({408, 409, 429})  # timeouts, throttling, (apply) conflicts
DENIED = frozenset({401, 403})  # credentials or RBAC: retried a few times (propagation), then failed
STALE = frozenset({409, 422})  # a JSON patch whose ``test`` failed: the object changed meanwhile


def status_path(kind: str, name: str) -> str:
    return f"/apis/{POLICY_API_VERSION}/{PLURALS[kind]}/{quote(name, safe='')}/status"


def apply_body(kind: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """The apply configuration: only identity and the fields this manager owns. An empty ``status`` is
    left out: the manager owns nothing any more, and the API server then drops its ``managedFields``
    record too (an empty ``status: {}`` would leave a record owning ``f:status`` for ever)."""
    body = {"apiVersion": POLICY_API_VERSION, "kind": kind, "metadata": {"name": name}}
    return {**body, "status": status} if status else body


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
    minor_interval: float = 60.0  # per object: a minor change (``ensure(minor=True)``) this far after a write
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    denied_attempts: int = 3  # 401/403 answers before a value counts as failed
    concurrency: int = 4  # writes in flight at once
    timeout: float = 10.0  # per request


@dataclass
class _Slot:
    """One object's write state (kept after a 404 as a tombstone, until ``forget``)."""

    want: Hashable = None  # the value last asked for (None with ``asked`` False: nothing asked)
    asked: bool = False
    seen: bool = False  # ``want`` has been seen back on the object
    body: Body | None = None  # a write waiting to be made
    minor: bool = False  # ``body`` is a minor change: spaced by ``minor_interval``
    due: float = 0.0  # not before
    last_write: float = float("-inf")
    failures: int = 0  # consecutive failed attempts (backoff)
    denied: int = 0  # consecutive 401/403 answers for the current value
    denied_logged: bool = False  # the error for a refused value has been logged for this object
    wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # ``due`` moved earlier
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class StatusWriter:
    """Writes status for one field manager with one patch type (``APPLY_CONTENT_TYPE`` or
    ``JSON_PATCH_CONTENT_TYPE``); see the module docstring. ``ensure`` and ``forget`` are called from a
    running event loop; ``close`` (or leaving ``async with``) stops it."""

    def __init__(
        self,
        connection: KubeConnection,
        manager: str,
        *,
        timing: WriterTiming | None = None,
        on_result: Outcome | None = None,
        clock: Callable[[], float] = time.monotonic,
        content_type: str = APPLY_CONTENT_TYPE,
    ) -> None:
        if content_type not in (APPLY_CONTENT_TYPE, JSON_PATCH_CONTENT_TYPE):
            raise ValueError(f"unsupported patch type {content_type!r}")
        self.connection = connection
        self.manager = manager
        self.timing = timing or WriterTiming()
        self.on_result = on_result
        self.content_type = content_type
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

    def ensure(self, key: Key, want: Hashable, have: Hashable, body: Body, *, minor: bool = False) -> None:
        """Make the object ``key`` show ``want`` (it shows ``have``); ``body()`` builds the patch when a write
        is needed. ``minor``: the difference is minor, written at most once per ``minor_interval``. Never
        blocks, never raises."""
        slot = self._slots.get(key)
        if want == have:
            if slot is not None:
                self._settled(slot, want)
            return
        if slot is None:
            slot = self._slots[key] = _Slot()
        elif slot.asked and slot.want == want and (slot.body is not None or not slot.seen):
            return  # already on its way, or written and not seen back yet
        slot.want, slot.asked, slot.seen, slot.body, slot.minor = want, True, False, body, minor
        slot.denied = 0  # a new value gets its attempts
        due = max(self._clock() + self.timing.delay, slot.last_write + self._interval(minor))
        if slot.task is None or slot.task.done():
            slot.due = due
            slot.task = asyncio.get_running_loop().create_task(self._run(key, slot), name=f"status {key}")
        elif due < slot.due and not slot.failures:  # e.g. a real change overtaking a pending minor one
            slot.due = due
            slot.wake.set()

    def forget(self, key: Key) -> None:
        """The object is gone (or no longer this writer's business): drop any pending write and its state."""
        slot = self._slots.pop(key, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()

    def pending(self) -> int:
        """Objects with a write waiting or in flight."""
        return sum(1 for s in self._slots.values() if s.task is not None and not s.task.done())

    # --- writing -------------------------------------------------------------------------------------------

    def _interval(self, minor: bool) -> float:
        return (
            max(self.timing.min_interval, self.timing.minor_interval) if minor else self.timing.min_interval
        )

    @staticmethod
    def _settled(slot: _Slot, shown: Hashable) -> None:
        """The object shows ``shown``, which is wanted: a write still waiting is obsolete. The slot stays (its
        ``last_write`` spaces the next write) until ``forget``."""
        slot.body = None
        slot.want, slot.asked, slot.seen = shown, True, True
        slot.wake.set()  # a task waiting for a (long) due time can end now

    async def _wait_until_due(self, slot: _Slot) -> None:
        while slot.body is not None and (wait := slot.due - self._clock()) > 0:
            slot.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await slot.wake.wait()  # ``ensure`` moved ``due`` earlier

    async def _run(self, key: Key, slot: _Slot) -> None:
        try:
            while slot.body is not None:
                await self._wait_until_due(slot)
                async with self._limit:
                    build, slot.body = slot.body, None
                    if build is None:
                        continue  # made obsolete while waiting for a free writer
                    minor = slot.minor
                    slot.last_write = self._clock()
                    outcome, retry_after, why = await self._send(key, build)
                denied = outcome == "denied"
                if denied:
                    outcome = self._denied(key, slot, why)  # logs itself: once per object
                self._report(key, outcome)
                if outcome == "retry":
                    slot.failures += 1
                    if not denied:
                        self._retrying(key, slot.failures, why)
                    if slot.body is None and not slot.seen:
                        slot.body, slot.minor = build, minor  # nothing newer, not shown meanwhile: again
                    backoff = min(
                        self.timing.backoff_cap, self.timing.backoff_base * 2 ** (slot.failures - 1)
                    )
                    slot.due = self._clock() + max(retry_after, backoff * random.uniform(0.5, 1.0))
                    continue
                if slot.failures and outcome == "ok":
                    log.info("status of %s %s written after %d failed attempts", *key, slot.failures)
                slot.failures = slot.denied = 0
                if outcome == "stale" and slot.body is None:
                    slot.asked = False  # the next ensure of this value tries again, from a newer object
                # "gone": the slot stays as a tombstone (see the module docstring) until ``forget``.
                slot.due = max(slot.due, slot.last_write + self._interval(slot.minor))
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must never reach the agent loop or the datapath
            log.exception("writing the status of %s %s", *key)
            self._drop(key, slot)

    def _drop(self, key: Key, slot: _Slot) -> None:
        if self._slots.get(key) is slot:
            del self._slots[key]

    def _denied(self, key: Key, slot: _Slot, why: str) -> str:
        """A 401/403 answer: ``retry`` for the first ``denied_attempts - 1``, then ``failed``."""
        slot.denied += 1
        if slot.denied < self.timing.denied_attempts:
            log.debug("writing the status of %s %s refused (attempt %d): %s", *key, slot.denied, why)
            return "retry"
        kind = key[0]
        plural = PLURALS.get(kind, kind)
        message = "writing the status of %s %s refused %d times, not retrying this value: %s (RBAC likely "
        message += "lacks patch on %s/status)"
        level = logging.DEBUG if slot.denied_logged else logging.ERROR
        slot.denied_logged = True
        log.log(level, message, *key, slot.denied, why, plural)
        return "failed"

    async def _send(self, key: Key, build: Body) -> tuple[str, float, str]:
        """One patch: ``(outcome, seconds the server asked to wait, why it failed)``; outcomes beyond the
        reported ones: ``denied`` (401/403)."""
        kind, name = key
        client = self._connect()
        params = {"fieldManager": self.manager}
        if self.content_type == APPLY_CONTENT_TYPE:
            params["force"] = "true"  # only an apply takes it
        try:
            credentials = await asyncio.to_thread(self.connection.headers)  # an exec plugin: off the loop
            response = await client.patch(
                status_path(kind, name),
                params=params,
                content=json.dumps(build()).encode(),
                headers={**credentials, "Content-Type": self.content_type},
            )
        except (httpx.HTTPError, kubecredentials.CredentialError) as exc:  # credentials: e.g. a failed exec
            return "retry", 0.0, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        code = response.status_code
        if code < 300:
            return "ok", 0.0, ""
        why = f"HTTP {code}: {_message(response)}"
        if code == 404:
            log.debug("%s %s is gone; no status to write", kind, name)
            return "gone", 0.0, why
        if code in DENIED:
            return "denied", _retry_after(response, self.timing.backoff_cap), why
        if code in STALE and self.content_type == JSON_PATCH_CONTENT_TYPE:
            log.info("%s %s changed meanwhile, its status patch no longer applies: %s", kind, name, why)
            return "stale", 0.0, why
        if code >= 500 or code in RETRIED:
            return "retry", _retry_after(response, self.timing.backoff_cap), why
        log.error("writing the status of %s %s failed, not retrying this value: %s", kind, name, why)
        return "failed", 0.0, why

    def _connect(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.connection.base_url,
                verify=self.connection.verify,
                timeout=self.timing.timeout,
                auth=self.connection.auth,  # fresh credentials, a retry after a 401
            )
        return self._client

    @staticmethod
    def _retrying(key: Key, failures: int, why: str) -> None:
        if failures == 1 or failures % 10 == 0:
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
