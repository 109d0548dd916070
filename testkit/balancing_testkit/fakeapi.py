"""A small fake Kubernetes API server: list and watch (JSON lines) over plain HTTP, with resourceVersions,
history replay, compaction (410 Gone), dropped connections, stalls, field selectors (``spec.nodeName``),
label selectors (``=``, ``!=``, ``in``, ``notin``, exists, ``!`` not exists) and namespaced collection paths
(``/api/v1/namespaces/NS/pods`` reads ``/api/v1/pods`` of one namespace). Used by the Kubernetes source's
unit tests and by agent tests; start it with ``asyncio.start_server(fake.handle, ...)``.

Writes: PATCH of a cluster-scoped object's status subresource only (``<collection>/<name>/status``):

- server-side apply (``application/apply-patch+yaml``, ``fieldManager`` required), simplified: the list-maps
  ``status.nodes`` (keyed by ``nodeName``) and ``status.conditions`` (keyed by ``type``) merge by key, other
  status fields are scalars, and ownership is tracked per field manager at entry granularity. An apply sets
  what it names (a field another manager owns with a different value is a 409 conflict unless
  ``force=true``, which takes it over), and removes what that manager owned before and no longer names,
  unless another manager owns it too;
- JSON patch (``application/json-patch+json``, RFC 6902; ``force`` refused as for any non-apply patch) with
  the ``test`` and ``remove`` operations on JSON pointers: a failed ``test`` or a missing path fails the
  whole patch with 422; only ``status`` is changed, and fields no longer there leave every manager's
  ownership records.

Each write bumps the resourceVersion and sends MODIFIED; a missing object is a 404. Every request is
recorded in ``calls`` (method, path, params, headers, body, arrival); ``fail_patches`` holds status codes to
answer the next PATCHes with instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

Key = tuple[str, str]
FieldPath = tuple[str, ...]  # ("observedGeneration",) or ("nodes", "node-1"): what a manager owns
LIST_MAP_KEYS = {"nodes": "nodeName", "conditions": "type"}  # status list-maps and their keys
APPLY = "application/apply-patch+yaml"
JSON_PATCH = "application/json-patch+json"


class Call(NamedTuple):
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    at: float  # when it arrived (time.monotonic)


class Conflict(Exception):
    """An apply without force names a field another manager owns with a different value."""


class PatchFailed(Exception):
    """A JSON patch operation does not apply (a failed ``test``, a missing path, an unknown operation)."""


class FakeApi:
    """Collections keyed by path; every change gets a resourceVersion and goes to open watches."""

    def __init__(self) -> None:
        self.rv = 100
        self.objects: dict[str, dict[Key, dict[str, Any]]] = {}
        self.history: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.compacted = 0
        self.watches: dict[str, list[asyncio.Queue[dict[str, Any] | None]]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stall_watches = False
        self.missing: set[str] = set()  # paths answered with 404
        self.failing: set[str] = set()  # paths (as requested) answered with 500
        self.headers: dict[str, str] = {}  # of the last request
        self.tasks: set[asyncio.Task[None]] = set()
        self.calls: list[Call] = []  # every request, in order
        self.fail_patches: list[int] = []  # status codes for the next PATCHes (popped first to last)
        self.managed: dict[tuple[str, Key], dict[str, set[FieldPath]]] = {}  # per object, per field manager

    # --- changing state --------------------------------------------------------------------------------

    def put(self, path: str, obj: dict[str, Any], *, notify: bool = True) -> None:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        kind = "MODIFIED" if key in self.objects.setdefault(path, {}) else "ADDED"
        self._record(path, kind, obj, notify)
        self.objects[path][key] = obj

    def delete(self, path: str, namespace: str, name: str, *, notify: bool = True) -> None:
        obj = self.objects[path].pop((namespace, name))
        self.managed.pop((path, (namespace, name)), None)
        self._record(path, "DELETED", copy.deepcopy(obj), notify)

    def update_spec(self, path: str, name: str, spec: dict[str, Any]) -> None:
        """A user's change of a cluster-scoped object's spec: generation bumped, status kept."""
        obj = copy.deepcopy(self.objects[path][("", name)])
        obj["spec"] = copy.deepcopy(spec)
        obj["metadata"]["generation"] = int(obj["metadata"].get("generation") or 1) + 1
        self.put(path, obj)

    def owners(self, path: str, name: str) -> dict[str, set[FieldPath]]:
        """What each field manager owns of a cluster-scoped object's status."""
        return {m: set(f) for m, f in self.managed.get((path, ("", name)), {}).items() if f}

    def patches(self) -> list[Call]:
        return [c for c in self.calls if c.method == "PATCH"]

    def bookmark(self, path: str) -> None:
        self.rv += 1
        self._send(path, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(self.rv)}}})

    def compact(self) -> None:
        """Forget history: watches from older resourceVersions get 410 Gone."""
        self.compacted = self.rv
        self.history.clear()

    def drop_watches(self) -> None:
        for queues in self.watches.values():
            for queue in queues:
                queue.put_nowait(None)

    def _record(self, path: str, kind: str, obj: dict[str, Any], notify: bool) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        event = {"type": kind, "object": obj}
        self.history.setdefault(path, []).append((self.rv, event))
        if notify:
            self._send(path, event)

    def _send(self, path: str, event: dict[str, Any]) -> None:
        for queue in self.watches.get(path, []):
            queue.put_nowait(event)

    # --- serving ---------------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            request = (await reader.readline()).decode()
            headers: dict[str, str] = {}
            while line := (await reader.readline()).decode().strip():
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.headers.update(headers)
            length = int(headers.get("content-length") or 0)
            raw = await reader.readexactly(length) if length else b""
            method = request.split()[0].upper()
            url = urlsplit(request.split()[1])
            params = dict(parse_qsl(url.query))
            self.requests.append((url.path, params))
            self.calls.append(
                Call(method, url.path, dict(params), headers, _json_or_none(raw), time.monotonic())
            )
            path, namespace = _collection(url.path)
            if namespace:
                params = {**params, "namespace": namespace}
            if method == "PATCH":
                await self._respond(writer, *self._patch(url.path, params, headers, raw))
            elif url.path in self.missing or path in self.missing:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
            elif url.path in self.failing:
                await self._respond(writer, 500, {"kind": "Status", "code": 500, "message": "etcd is sad"})
            elif params.get("watch"):
                await self._watch(path, params, writer)
            else:
                items = [o for o in self.objects.get(path, {}).values() if _selected(o, params)]
                body = {"kind": "List", "metadata": {"resourceVersion": str(self.rv)}, "items": items}
                data = json.dumps(body).encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                writer.write(head.encode() + b"Connection: close\r\n\r\n" + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    # --- server-side apply of status ----------------------------------------------------------------------

    def _patch(
        self, url_path: str, params: dict[str, str], headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        match = _STATUS.match(url_path)
        if match is None:
            return 405, _status(405, "MethodNotAllowed", "only <collection>/<name>/status takes PATCH here")
        path, name = match["collection"], unquote(match["name"])
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if content_type not in (APPLY, JSON_PATCH):
            return 415, _status(
                415, "UnsupportedMediaType", "only server-side apply and JSON patch are served"
            )
        manager = params.get("fieldManager", "")
        if content_type == APPLY and not manager:
            return 400, _status(400, "BadRequest", "fieldManager is required for apply patch")
        if content_type != APPLY and "force" in params:
            # as the real API server answers (tests/cluster/test_apiserver_policy_status.py saw it)
            return 422, _status(422, "Invalid", "force: Forbidden: may not be specified for non-apply patch")
        obj = self.objects.get(path, {}).get(("", name))
        if obj is None or url_path in self.missing:
            return 404, _status(404, "NotFound", f"{name} not found")
        if self.fail_patches:
            code = self.fail_patches.pop(0)
            return code, _status(code, "InternalError" if code >= 500 else "Injected", "injected failure")
        doc = _json_or_none(raw)
        if content_type == JSON_PATCH:
            return self._json_patch(path, name, obj, doc)
        if not isinstance(doc, dict) or (doc.get("metadata") or {}).get("name") != name:
            return 400, _status(400, "BadRequest", "the body must be an object named as in the path")
        applied = doc.get("status") or {}
        owned = self.managed.setdefault((path, ("", name)), {})
        new = copy.deepcopy(obj)
        try:
            new["status"] = _apply_status(
                new.get("status") or {}, owned, manager, applied, params.get("force") == "true"
            )
        except Conflict as exc:
            return 409, _status(409, "Conflict", str(exc))
        if not new["status"]:
            del new["status"]
        self.put(path, new)
        return 200, self.objects[path][("", name)]

    def _json_patch(self, path: str, name: str, obj: dict[str, Any], ops: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(ops, list):
            return 400, _status(400, "BadRequest", "a JSON patch is a list of operations")
        patched = copy.deepcopy(obj)
        try:
            for op in ops:
                _json_patch_op(patched, op)
        except PatchFailed as exc:
            return 422, _status(422, "Invalid", str(exc))
        new = copy.deepcopy(obj)
        new.pop("status", None)
        if patched.get("status"):
            new["status"] = patched["status"]  # the status subresource: nothing else changes
        present = set(_fields(new.get("status") or {}))
        for fields in self.managed.get((path, ("", name)), {}).values():
            fields.intersection_update(present)
        self.put(path, new)
        return 200, self.objects[path][("", name)]

    async def _respond(self, writer: asyncio.StreamWriter, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        head = f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + data)
        await writer.drain()

    async def _watch(self, path: str, params: dict[str, str], writer: asyncio.StreamWriter) -> None:
        if self.stall_watches:
            await asyncio.sleep(3600)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        since = int(params.get("resourceVersion") or 0)
        if since < self.compacted:
            gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
            writer.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            await writer.drain()
            return
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for rv, past in self.history.get(path, []):
            if rv > since:
                queue.put_nowait(past)
        self.watches.setdefault(path, []).append(queue)
        try:
            while (event := await queue.get()) is not None:
                if event["type"] == "BOOKMARK" or _selected(event["object"], params):
                    writer.write(json.dumps(event).encode() + b"\n")
                    await writer.drain()
        finally:
            self.watches[path].remove(queue)


_NAMESPACED = re.compile(r"^/api/v1/namespaces/([^/]+)/([^/]+)$")
_STATUS = re.compile(r"^(?P<collection>/.+)/(?P<name>[^/]+)/status$")


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


def _json_patch_op(doc: dict[str, Any], op: Any) -> None:
    """Apply one JSON patch operation (``test`` or ``remove``) to ``doc`` in place."""
    if not isinstance(op, dict) or not isinstance(op.get("path"), str) or not op["path"].startswith("/"):
        raise PatchFailed(f"malformed operation {op!r}")
    *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in op["path"][1:].split("/")]
    container: Any = doc
    for token in parents:
        container = _child(container, token, op["path"])
    if op.get("op") == "test":
        if _child(container, last, op["path"]) != op.get("value"):
            raise PatchFailed(f"testing value {op['path']} failed")
    elif op.get("op") == "remove":
        _child(container, last, op["path"])
        if isinstance(container, list):
            del container[int(last)]
        else:
            del container[last]
    else:
        raise PatchFailed(f"unsupported operation {op.get('op')!r}")


def _child(container: Any, token: str, path: str) -> Any:
    if isinstance(container, dict) and token in container:
        return container[token]
    if isinstance(container, list) and token.isdigit() and int(token) < len(container):
        return container[int(token)]
    raise PatchFailed(f"{path}: no such path")


def _fields(status: dict[str, Any]) -> dict[FieldPath, Any]:
    """A status by owned field: scalars by name, list-map entries by (list, key)."""
    found: dict[FieldPath, Any] = {}
    for name, value in status.items():
        if name in LIST_MAP_KEYS:
            for entry in value or []:
                found[(name, str(entry[LIST_MAP_KEYS[name]]))] = entry
        else:
            found[(name,)] = value
    return found


def _apply_status(
    current: dict[str, Any],
    owned: dict[str, set[FieldPath]],
    manager: str,
    applied: dict[str, Any],
    force: bool,
) -> dict[str, Any]:
    """``current`` after ``manager`` applied ``applied`` (``owned`` is updated); see the module docstring."""
    have, want = _fields(current), _fields(applied)
    for field, value in want.items():
        for other, fields in owned.items():
            if other != manager and field in fields and have.get(field) != value:
                if not force:
                    raise Conflict(f"{field} is owned by {other}")
                fields.discard(field)
    shared = {f for other, fields in owned.items() if other != manager for f in fields}
    for field in owned.get(manager, set()) - want.keys() - shared:
        have.pop(field, None)
    have.update(want)
    owned[manager] = set(want)
    result: dict[str, Any] = {}
    for field, value in have.items():  # insertion order: existing entries keep their place
        if len(field) == 1:
            result[field[0]] = value
        else:
            result.setdefault(field[0], []).append(value)
    return result


def _collection(path: str) -> tuple[str, str]:
    """The cluster-wide collection a path reads, and the namespace it narrows to ("" for all)."""
    match = _NAMESPACED.match(path)
    return (f"/api/v1/{match[2]}", match[1]) if match else (path, "")


def _selected(obj: dict[str, Any], params: dict[str, str]) -> bool:
    meta = obj.get("metadata") or {}
    if params.get("namespace") and meta.get("namespace") != params["namespace"]:
        return False
    if not _labels_match(meta.get("labels") or {}, params.get("labelSelector", "")):
        return False
    selector = params.get("fieldSelector", "")
    if not selector:
        return True
    field, _, value = selector.partition("=")
    assert field == "spec.nodeName"
    return bool(obj.get("spec", {}).get("nodeName") == value)


_TERM = re.compile(
    r"\s*(!?)([^\s,!=()]+)\s*(?:(=|==|!=)\s*([^\s,()]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*(?:,|$)"
)


def _labels_match(labels: dict[str, str], selector: str) -> bool:
    """The API server's label selector syntax, as much of it as the source sends."""
    pos = 0
    while pos < len(selector):
        term = _TERM.match(selector, pos)
        assert term and term.end() > pos, f"unparsable labelSelector {selector!r} at {pos}"
        pos = term.end()
        negated, key, op, value, set_op, values = term.groups()
        if op:
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif set_op:
            members = {v.strip() for v in values.split(",") if v.strip()}
            if (labels.get(key) in members) != (set_op == "in"):
                return False
        elif (key in labels) == bool(negated):
            return False
    return True


@contextlib.asynccontextmanager
async def serving(fake: FakeApi | None = None) -> AsyncIterator[tuple[FakeApi, str]]:
    """``fake`` (a new one by default) served on a free loopback port of the running loop: ``(fake, base
    URL)``; the listener and every open connection are closed afterwards."""
    fake = fake or FakeApi()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    try:
        yield fake, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(fake.tasks):
            task.cancel()
        await asyncio.gather(*fake.tasks, return_exceptions=True)


class ThreadedApi:
    """A FakeApi served from a thread of its own (for tests whose client is another process, e.g. the agent).

    ``call(fn, *args)`` runs ``fn`` in the server's loop; ``stop_serving()`` closes the listener and drops the
    watches (an API-server outage); leaving the ``with`` block closes everything.
    """

    def __init__(self) -> None:
        import threading

        self.fake = FakeApi()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-api")
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self.fake.handle, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self._started.set()
        self.loop.run_forever()

    def __enter__(self) -> ThreadedApi:
        self._thread.start()
        if not self._started.wait(5):
            raise RuntimeError("the fake API server did not start")
        return self

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop_serving(self) -> None:
        assert self.server is not None
        self.call(self.server.close)
        self.call(self.fake.drop_watches)

    def __exit__(self, *_exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

        async def shutdown() -> None:
            assert self.server is not None
            self.server.close()
            await self.server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.loop.run_until_complete(shutdown())
        self.loop.close()
