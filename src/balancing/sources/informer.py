"""One Kubernetes resource followed by list+watch, kept as the parsed objects currently in force.

``Informer`` lists a collection (e.g. ``/api/v1/services``), then watches it from the list's
``resourceVersion``, and turns every change into a ``SourceUpdate`` holding only the difference:

- ADDED/MODIFIED upsert an object (nothing if it parses to the same object), DELETED removes it, BOOKMARK
  only advances the resourceVersion the next watch resumes from;
- a dropped or timed-out watch resumes from the last resourceVersion seen; a 410 Gone (HTTP status or
  ERROR event) relists and emits the difference (deletes for objects that vanished meanwhile);
- a periodic resync relists too, so it emits nothing when nothing changed;
- lists spare etcd the way client-go's reflector does: the first one may be served from the API server's
  watch cache (``resourceVersion=0``), a resync asks for nothing older than what was seen
  (``resourceVersionMatch=NotOlderThan``), and only after a 410 is the list a quorum read;
- failures retry with exponential backoff and jitter (capped);
- every watch event received is counted by type, and every list by why it ran (``Counts``: initial, resync,
  gone, retry, unserved), for the agent's metrics: a 410 or a bookmark is visible, not only logged;
- a collection not served (404, e.g. policy CRDs not installed) counts as empty and is relisted after a
  backoff until it appears;
- responses are read within ``Bounds``: a list body of at most ``list_bytes``, a watch event line of at most
  ``event_bytes``, JSON nested at most ``depth`` levels (``sources.boundedjson``); a response over a bound,
  not JSON, or of the wrong shape fails that request (logged with the resource's path, then the usual
  backoff and relist or rewatch), never the informer;
- a malformed object is skipped with a ``KubeObjectError`` naming kind, namespace/name and field; the last
  good version of it (if any) stays in force, and the error is reported once per resourceVersion. Its
  deletion is emitted even when no version of it was ever good (a consumer may hold its error; deleting
  an unknown ref is a no-op for the model).

Only the parsed objects in force are kept (plus the resourceVersion of malformed ones), never raw lists. A
list of a kind ``model.fastparse`` covers (Services, EndpointSlices, Nodes, Pods) is read from its bytes
straight into objects, an item the fast lane refuses going the plain way (``parse_object`` on its dict, so
its errors read the same); the others, or a body that is no list object, are parsed whole first. The
collector is paused while a list is decoded (``gcpause``): 100k objects allocate millions, none in cycles.

Neighbours: ``sources.kube.KubeSource`` runs one informer per resource and merges their updates.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
from pydantic import ValidationError

from balancing import gcpause
from balancing.errors import Gone, KubeObjectError, ObjectError
from balancing.model import fastparse
from balancing.model.fielderrors import field_errors
from balancing.model.objects import KubeObject, ObjectRef, UnknownKind, parse_object, ref
from balancing.sources import boundedjson
from balancing.sources.update import SourceUpdate

log = logging.getLogger(__name__)

Headers = Callable[[], dict[str, str]]
_EMPTY_LIST = b'{"items": []}'  # what a collection not served (404) counts as


@dataclass(frozen=True)
class Resource:
    """A collection to follow: its URL path, the apiVersion/kind of its items, optional field and label
    selectors."""

    path: str
    api_version: str
    kind: str
    field_selector: str = ""
    label_selector: str = ""


@dataclass(frozen=True)
class Timing:
    """Informer timings (seconds)."""

    resync: float = 300.0  # full relist this often
    watch_timeout: int = 240  # server-side watch timeout
    read_slack: float = 30.0  # client read timeout beyond the server-side one (a silent server)
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    pods_wait: float = 30.0  # the initial state waits this long at most for the pods policies select


@dataclass(frozen=True)
class Bounds:
    """How much of the API server's answers the informer reads (bytes, after any content decoding)."""

    list_bytes: int = 64 * 1024 * 1024  # a list response (not paginated: every object of the collection)
    event_bytes: int = 16 * 1024 * 1024  # one watch event line (etcd stores objects of 1.5 MiB by default)
    depth: int = 128  # JSON nesting: a Pod's managedFields inside a List reach about 20 levels


@dataclass
class Counts:
    """What the informers of one source received, by resource kind: watch events by type (ADDED, MODIFIED,
    DELETED, BOOKMARK, ERROR) and lists by reason (``initial``, ``resync``, ``gone`` after a 410, ``retry``
    after a failed request, ``unserved`` while the collection is 404). Shared by the source's informers;
    read (never reset) by ``metrics``."""

    events: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    lists: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)


class ResponseTooLarge(ValueError):
    """An answer from the API server is over one of the ``Bounds``."""


class Informer:
    """List+watch of one ``Resource``; see the module docstring."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        resource: Resource,
        headers: Headers,
        timing: Timing,
        bounds: Bounds | None = None,
        counts: Counts | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.counts = counts or Counts()
        self.headers = headers
        self.timing = timing
        self.bounds = bounds or Bounds()
        self.objects: dict[ObjectRef, KubeObject] = {}
        self.resource_version = ""
        self._quorum = False  # the next list must be consistent (after a 410): no resourceVersion
        self._bad: dict[tuple[str, str], str] = {}  # (namespace, name) -> resourceVersion reported
        self._failures = 0
        self._next_resync = 0.0
        self.missing = False  # the collection is not served (404): relisted after a backoff, not watched
        self._list_reason = "initial"  # why the next list runs (Counts.lists)
        self._reader = fastparse.list_reader(resource.api_version, resource.kind)

    # --- listing ---------------------------------------------------------------------------------------

    async def list_until_done(self) -> SourceUpdate:
        """Relist, retrying with backoff until it succeeds; the difference against what was in force."""
        while True:
            try:
                update = await self.relist()
            except Gone:
                self._quorum = True  # the version asked for is too old to serve: ask for the latest
                self._list_reason = "gone"
                await self._backoff(f"listing {self.resource.path}: resourceVersion too old")
                continue
            except (httpx.HTTPError, ValueError) as exc:
                await self._backoff(f"listing {self.resource.path} failed: {_describe(exc)}")
                continue
            if not self.missing:  # a 404 keeps backing off: no CRDs must not mean two lists a second
                self._failures = 0
            return update

    async def relist(self) -> SourceUpdate:
        self.counts.lists[(self.resource.kind, self._list_reason)] += 1
        self._list_reason = "retry"  # until this one succeeds
        params = self._params()
        if not self._quorum:
            params["resourceVersion"] = self.resource_version or "0"
            if self.resource_version:
                params["resourceVersionMatch"] = "NotOlderThan"
        body = await self._list(params)
        with gcpause.paused():  # a large list allocates millions of objects, none in cycles
            return self._relisted(body)

    def _relisted(self, body: bytes) -> SourceUpdate:
        """The difference a list response makes to the objects in force (and the informer's state)."""
        metadata, items = self._decode_list(body)
        resource_version = _resource_version({"metadata": metadata})
        if resource_version is None:
            raise ValueError("list response has a malformed metadata.resourceVersion")
        new: dict[ObjectRef, KubeObject] = {}
        errors: list[ObjectError] = []
        seen_bad: set[tuple[str, str]] = set()
        model = self._reader.model if self._reader is not None else None
        for item in items:
            obj, error, key = self._parsed(item) if type(item) is model else self._parse(item)  # type: ignore[arg-type]
            if obj is not None:
                new[ref(obj)] = obj
            elif key is not None:
                seen_bad.add(key)
                old = self._old_for(key)
                if old is not None:
                    new[ref(old)] = old  # keep the last good version
                errors.extend(error)
            else:
                errors.extend(error)
        # Malformed ones gone meanwhile with no good version: deleted too (as a watch's DELETED would be).
        vanished = [
            (self.resource.kind, *k) for k in self._bad if k not in seen_bad and self._old_for(k) is None
        ]
        self._bad = {k: v for k, v in self._bad.items() if k in seen_bad}
        upserts = [obj for r, obj in new.items() if self.objects.get(r) != obj]
        deletes = sorted([*(r for r in self.objects if r not in new), *vanished])
        self.objects = new
        self.resource_version = resource_version
        self._quorum = False
        self._list_reason = "unserved" if self.missing else "resync"
        self._next_resync = time.monotonic() + self.timing.resync
        return SourceUpdate(upserts, deletes, errors)

    def _decode_list(self, body: bytes) -> tuple[Any, list[Any]]:
        """A list response's ``metadata`` (None when absent) and ``items``: for a kind ``fastparse`` covers,
        read straight into objects (an item it refuses stays a plain value, for ``_parse``); else, or if
        the body is no list object, parsed whole (``ValueError`` when it is none)."""
        boundedjson.check_depth(body, self.bounds.depth)
        if self._reader is not None:
            try:
                return self._reader.read(body)
            except ValueError:
                pass  # not a list as expected: the plain parse tells what it is
        parsed = boundedjson.loads(body, max_depth=self.bounds.depth)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("items"), list):
            raise ValueError("list response has no items")
        return parsed.get("metadata"), parsed["items"]

    async def _list(self, params: dict[str, str]) -> bytes:
        headers = await asyncio.to_thread(self.headers)  # may run an exec credential plugin: off the loop
        request = self.client.build_request("GET", self.resource.path, params=params, headers=headers)
        response = await self.client.send(request, stream=True)
        try:
            if response.status_code == 410:
                raise Gone()
            if response.status_code == 404:  # e.g. the policy CRDs are not installed (yet)
                if not self.missing:
                    log.warning(
                        "%s not served by the API server (404); treating it as empty", self.resource.path
                    )
                self.missing = True
                return _EMPTY_LIST
            response.raise_for_status()
            body = await _read_body(response, self.bounds.list_bytes)
        finally:
            await response.aclose()
        self.missing = False
        return body

    # --- watching --------------------------------------------------------------------------------------

    async def run(self, emit: Callable[[SourceUpdate], Awaitable[None]]) -> None:
        """Watch forever (after ``list_until_done``), emitting every non-empty update."""
        while True:
            if time.monotonic() >= self._next_resync:
                update = await self.list_until_done()
                if update:
                    await emit(update)
            if self.missing:
                await self._backoff(f"{self.resource.path} still not served")
                self._next_resync = 0.0
                continue
            try:
                await self._watch_once(emit)
                self._failures = 0
            except Gone:
                log.info("%s: resourceVersion %s gone; relisting", self.resource.path, self.resource_version)
                self._list_reason = "gone"
                self._next_resync = 0.0
                self._quorum = True
            except (httpx.HTTPError, ValueError) as exc:
                await self._backoff(f"watching {self.resource.path} failed: {_describe(exc)}")

    async def _watch_once(self, emit: Callable[[SourceUpdate], Awaitable[None]]) -> None:
        remaining = max(0.0, self._next_resync - time.monotonic())
        server_timeout = max(1, min(self.timing.watch_timeout, int(remaining) + 1))
        params = {
            **self._params(),
            "watch": "1",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version,
            "timeoutSeconds": str(server_timeout),
        }
        timeout = httpx.Timeout(10.0, read=server_timeout + self.timing.read_slack)
        try:
            async with asyncio.timeout(remaining):
                headers = await asyncio.to_thread(self.headers)  # may run an exec plugin: off the loop
                request = self.client.build_request(
                    "GET", self.resource.path, params=params, headers=headers, timeout=timeout
                )
                response = await self.client.send(request, stream=True)
                try:
                    if response.status_code == 410:
                        raise Gone()
                    response.raise_for_status()
                    async for line in _lines(response, self.bounds.event_bytes):
                        if line.strip():
                            update = self._event(boundedjson.loads(line, max_depth=self.bounds.depth))
                            if update:
                                await emit(update)
                finally:
                    await response.aclose()
        except TimeoutError:
            pass  # time to resync

    def _event(self, event: Any) -> SourceUpdate:
        if not isinstance(event, dict):
            raise ValueError("watch event is not an object")
        kind, item = event.get("type"), event.get("object")
        if not isinstance(item, dict):
            raise ValueError("watch event has no object")
        if kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"):
            self.counts.events[(self.resource.kind, kind)] += 1
        if kind == "ERROR":
            if item.get("code") == 410:
                raise Gone()
            raise ValueError(f"watch error: {item.get('message') or item}")
        rv = _resource_version(item)
        if rv:
            self.resource_version = rv
        if kind == "BOOKMARK":
            return SourceUpdate()
        if kind == "DELETED":
            was_bad = _key_of(item) in self._bad
            obj, _, key = self._parse(item)
            if key is None:
                return SourceUpdate()
            self._bad.pop(key, None)
            gone = self._old_for(key)
            if gone is None:  # never good: its deletion still matters to whoever kept its error
                return SourceUpdate(deletes=[(self.resource.kind, *key)]) if was_bad else SourceUpdate()
            del self.objects[ref(gone)]
            return SourceUpdate(deletes=[ref(gone)])
        if kind not in ("ADDED", "MODIFIED"):
            log.warning("%s: ignoring watch event of type %r", self.resource.path, kind)
            return SourceUpdate()
        obj, errors, _ = self._parse(item)
        if obj is None:
            return SourceUpdate(errors=errors)
        if self.objects.get(ref(obj)) == obj:
            return SourceUpdate()
        self.objects[ref(obj)] = obj
        return SourceUpdate(upserts=[obj])

    # --- helpers ---------------------------------------------------------------------------------------

    def _params(self) -> dict[str, str]:
        params = {
            "fieldSelector": self.resource.field_selector,
            "labelSelector": self.resource.label_selector,
        }
        return {k: v for k, v in params.items() if v}

    def _parse(self, item: Any) -> tuple[KubeObject | None, list[ObjectError], tuple[str, str] | None]:
        """The object, or the errors it has (once per resourceVersion), and its (namespace, name)."""
        if not isinstance(item, dict):
            return None, [KubeObjectError(self.resource.kind, "", "expected an object")], None
        doc = {**item, "apiVersion": self.resource.api_version, "kind": self.resource.kind}
        key = _key_of(item)
        try:
            obj = parse_object(doc)
        except ValidationError as exc:
            described = describe_item(self.resource.kind, key)
            errors: list[ObjectError] = [
                KubeObjectError(described, at, "; ".join(messages))
                for at, messages in field_errors(doc, exc).items()
            ]
            rv = _resource_version(item) or ""
            if self._bad.get(key) == rv and rv:
                errors = []  # already reported
            self._bad[key] = rv
            return None, errors, key if key[1] else None
        except UnknownKind as exc:  # not expected: the resource's kind is always one the model reads
            return None, [KubeObjectError(self.resource.kind, "", str(exc))], None
        self._bad.pop(key, None)
        return obj, [], key

    def _parsed(self, obj: KubeObject) -> tuple[KubeObject, list[ObjectError], tuple[str, str]]:
        """``_parse``'s answer for an item ``fastparse`` read: the object."""
        key = (obj.metadata.namespace, obj.metadata.name)
        self._bad.pop(key, None)
        return obj, [], key

    def _old_for(self, key: tuple[str, str]) -> KubeObject | None:
        for r in ((self.resource.kind, key[0], key[1]), (self.resource.kind, "", key[1])):
            if r in self.objects:
                return self.objects[r]
        return None

    async def _backoff(self, message: str) -> None:
        delay = min(self.timing.backoff_cap, self.timing.backoff_base * 2**self._failures)
        delay *= random.uniform(0.5, 1.0)
        self._failures = min(self._failures + 1, 30)
        log.warning("%s; retrying in %.1fs", message, delay)
        await asyncio.sleep(delay)


async def _read_body(response: httpx.Response, limit: int) -> bytes:
    """The whole body, refused (``ResponseTooLarge``) as soon as it is known to be over ``limit`` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge(f"list response of {declared} bytes, more than {limit}")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ResponseTooLarge(f"list response over {limit} bytes")
    return bytes(body)


async def _lines(response: httpx.Response, limit: int) -> AsyncIterator[bytes]:
    """The body's lines (without their ends), each of at most ``limit`` bytes (``ResponseTooLarge``)."""
    pending = bytearray()
    async for chunk in response.aiter_bytes():
        searched = len(pending)  # no line end before here
        pending += chunk
        while (end := pending.find(b"\n", searched)) >= 0:
            yield bytes(pending[:end])
            del pending[: end + 1]
            searched = 0
        if len(pending) > limit:
            raise ResponseTooLarge(f"watch event line over {limit} bytes")
    if pending:
        yield bytes(pending)


def _resource_version(doc: dict[str, Any]) -> str | None:
    """``metadata.resourceVersion`` ("" when absent), None when the metadata or it is of the wrong type."""
    meta = doc.get("metadata")
    if meta is None:
        return ""
    if not isinstance(meta, dict):
        return None
    rv = meta.get("resourceVersion")
    if rv is None:
        return ""
    return rv if isinstance(rv, str) else None


def _key_of(item: dict[str, Any]) -> tuple[str, str]:
    """An object's (namespace, name) as the API server sent it."""
    meta = item.get("metadata")
    if not isinstance(meta, dict):
        return ("", "")
    namespace, name = meta.get("namespace"), meta.get("name")
    return (namespace if isinstance(namespace, str) else "", name if isinstance(name, str) else "")


def describe_item(kind: str, key: tuple[str, str]) -> str:
    namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace and name else f"{kind} {name}".strip()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    text = text if len(text) <= 300 else text[:299] + "…"  # an error event's message is the server's
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
