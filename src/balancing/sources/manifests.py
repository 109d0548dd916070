"""The manifest source: one directory of YAML/JSON files read as the Kubernetes objects in force.

``ManifestDirectory`` reads every ``*.yaml``, ``*.yml`` and ``*.json`` file directly in the directory (not
hidden files, not editor leftovers such as ``x~``), each holding one or more documents, a document being
one object or a ``List`` of them. ``load`` and ``rescan`` return a ``SourceUpdate`` (``sources.update``): the
difference against what was in force before. Rules:

- an object of a kind the model does not read is skipped with a logged warning;
- a file that fails to parse, exceeds a cost budget (``decoding.Budgets``: size, nesting depth, alias
  expansion, objects per file), or holds any invalid document, keeps its last good version in force as a
  whole (a file never good contributes nothing) and reports ``ManifestError``\\ s naming file, document,
  object and field; whatever a file holds, ``parse_manifest``, ``load`` and ``rescan`` never raise for it
  (even a ``RecursionError``, ``MemoryError`` or a pydantic-core panic is the file's error);
- an entry with a manifest name that is not a regular file (FIFO, socket, device, directory, dangling
  symlink) is skipped with one warning and never opened for reading (``sources.files``);
- an object defined in two files comes from the file whose name sorts first (warning naming both);
- Service, EndpointSlice and Pod without a namespace are in ``default``;
- a missing directory keeps everything in force (logged) until it is back.

Scans are serialised by a lock, so they may run in a worker thread (``sources.watch`` runs them there).

Neighbours: ``sources.files`` reads a file, ``sources.decoding`` turns its bytes into documents within the
budgets, ``balancing.model.objects.parse_object`` validates each document (the kinds that
``balancing.model.fastparse`` covers through its lane); ``sources.watch`` calls
``rescan`` when files change; the agent applies updates to the model's store.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from balancing import gcpause
from balancing.errors import ManifestError, SourceError
from balancing.model.fielderrors import field_errors, join_path
from balancing.model.objects import KubeObject, ObjectRef, UnknownKind, parse_object, ref
from balancing.sources import decoding, files
from balancing.sources.update import SourceUpdate

log = logging.getLogger(__name__)

NAMESPACED_KINDS = frozenset({"Service", "EndpointSlice", "Pod"})
SUFFIXES = (".yaml", ".yml", ".json")


def is_manifest_name(name: str) -> bool:
    """Whether a file name is read as a manifest (right suffix, not hidden, not an editor leftover)."""
    return name.lower().endswith(SUFFIXES) and not name.startswith(".") and not name.endswith("~")


# --- parsing one file ----------------------------------------------------------------------------------

MAX_REPORTED_ERRORS = 100  # per file and scan; the rest are summed up in one more error


def parse_manifest(
    path: Path, data: bytes, budgets: decoding.Budgets = decoding.DEFAULT_BUDGETS
) -> tuple[list[KubeObject], list[ManifestError]]:
    """Every object one file's content defines, and every problem found in it (no I/O).

    Never raises for the content: whatever goes wrong decoding or validating it (a budget exceeded, a
    ``RecursionError``, a ``MemoryError``, a panic in pydantic-core) is a ``ManifestError`` of the file,
    located at the document, object and field as far as known.
    """
    try:
        items = _all_items(path, data, budgets)
    except ManifestError as exc:
        return [], [exc]
    except BaseException as exc:
        if not _contained(exc):
            raise
        return [], [ManifestError(path, 0, "", "", _unexpected(exc))]
    objects: list[KubeObject] = []
    errors: list[ManifestError] = []
    for index, where, item in items:
        obj, problems = _parse_one(path, index, where, item)
        if obj is not None:
            objects.append(obj)
        errors.extend(problems)
    if len(errors) > MAX_REPORTED_ERRORS:
        more = len(errors) - MAX_REPORTED_ERRORS
        errors = [*errors[:MAX_REPORTED_ERRORS], ManifestError(path, 0, "", "", f"{more} more problems")]
    return objects, errors


def _all_items(path: Path, data: bytes, budgets: decoding.Budgets) -> list[tuple[int, str, Any]]:
    """(document, location, raw object) of every object in the file, within the objects budget."""
    try:
        documents = decoding.decode(path.name, data, budgets)
    except decoding.DecodeError as exc:
        raise ManifestError(path, exc.document, "", exc.field, exc.message) from None
    items = [
        (index, where, item)
        for index, document in enumerate(documents, start=1)
        for where, item in _items(document)
    ]
    if len(items) > budgets.objects:
        limit = f"{budgets.objects} objects"
        message = decoding.over_budget("objects per file", limit, f"the file holds {len(items)}")
        raise ManifestError(path, 0, "", "", message)
    return items


def _parse_one(
    path: Path, index: int, where: str, item: Any
) -> tuple[KubeObject | None, list[ManifestError]]:
    """One raw object as a model object, or its problems (None and [] for a kind not read)."""
    try:
        return _parse_item(path, index, where, item), []
    except ManifestError as exc:
        return None, [exc]
    except ValidationError as exc:
        errors = _validation_errors(path, index, where, item, exc)
        return None, errors or [ManifestError(path, index, _describe(item), where, "invalid")]
    except UnknownKind:
        _skip(path, index, where, item)
        return None, []
    except BaseException as exc:
        if not _contained(exc):
            raise
        return None, [ManifestError(path, index, _describe(item), where, _unexpected(exc))]


def _contained(exc: BaseException) -> bool:
    """Whether an exception is the file's problem: any ``Exception``, and pydantic-core's Rust panics
    (``pyo3_runtime.PanicException`` derives from ``BaseException``); never an interrupt or exit."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _unexpected(exc: BaseException) -> str:
    return f"cannot be read ({type(exc).__name__}: {decoding.text_of(exc)})"


def _skip(path: Path, index: int, where: str, item: dict[str, Any]) -> None:
    at = f" {where}" if where else ""
    kind = (decoding.text_of(item.get("apiVersion")), decoding.text_of(item.get("kind")))
    log.warning("%s document %d%s: skipping %s %s (kind not read by balancing)", path, index, at, *kind)


def _items(document: Any) -> list[tuple[str, Any]]:
    """The objects of one document with their location: itself, or each item of a ``List``."""
    if document is None:
        return []  # empty document, e.g. after a trailing ``---``
    kind = document.get("kind") if isinstance(document, dict) else None
    if not (isinstance(kind, str) and kind.endswith("List")):
        return [("", document)]
    items = document.get("items") or []
    if not isinstance(items, list):
        return [("items", items)]
    defaults = {} if kind == "List" else {"apiVersion": document.get("apiVersion"), "kind": kind[:-4]}
    return [(f"items[{i}]", _with_defaults(item, defaults)) for i, item in enumerate(items)]


def _with_defaults(item: Any, defaults: dict[str, Any]) -> Any:
    return {**defaults, **item} if isinstance(item, dict) else item


def _parse_item(path: Path, index: int, where: str, item: Any) -> KubeObject:
    if not isinstance(item, dict):
        raise ManifestError(
            path, index, "", where, f"expected an object (mapping), got {type(item).__name__}"
        )
    for key in ("apiVersion", "kind"):
        if not item.get(key):
            raise ManifestError(path, index, _describe(item), join_path(where, key), "Field required")
    return _default_namespace(parse_object(_in_default_namespace(item)))


def _in_default_namespace(item: dict[str, Any]) -> dict[str, Any]:
    """The document with ``metadata.namespace: default`` where ``_default_namespace`` would put it (a
    namespaced kind, its namespace absent, null or empty): the object is built in it at once, not copied
    after (the namespace is not among what a validation error is about)."""
    meta = item.get("metadata")
    if (
        item.get("kind") not in NAMESPACED_KINDS
        or not isinstance(meta, dict)
        or meta.get("namespace", "") not in ("", None)
    ):
        return item
    return {**item, "metadata": {**meta, "namespace": "default"}}


def _default_namespace(obj: KubeObject) -> KubeObject:
    if obj.kind not in NAMESPACED_KINDS or obj.metadata.namespace:
        return obj
    return obj.model_copy(update={"metadata": obj.metadata.model_copy(update={"namespace": "default"})})


def _validation_errors(
    path: Path, index: int, where: str, item: dict[str, Any], exc: ValidationError
) -> list[ManifestError]:
    """One error per field (``fielderrors``), under ``where`` in the file."""
    described = _describe(item)
    return [
        ManifestError(path, index, described, join_path(where, at), "; ".join(messages))
        for at, messages in field_errors(item, exc).items()
    ]


def _describe(item: Any) -> str:
    """``"Service default/web"`` from a raw document, as far as it names itself (never raises)."""
    if not isinstance(item, dict):
        return ""
    kind = decoding.text_of(item.get("kind") or "")
    meta = item.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = decoding.text_of(meta.get("name") or "")
    namespace = decoding.text_of(meta.get("namespace") or ("default" if kind in NAMESPACED_KINDS else ""))
    full = f"{namespace}/{name}" if namespace and name else name
    return f"{kind} {full}".strip()


# --- the directory -------------------------------------------------------------------------------------


@dataclass
class _File:
    data: bytes | None  # content last read (None: could not be read)
    good: list[KubeObject] | None  # objects of the last good version (None: never good)
    errors: list[ManifestError]  # problems of ``data`` (empty when ``data`` is the good version)


class ManifestDirectory:
    """The objects defined by the manifest files directly in ``path``; see the module docstring."""

    def __init__(self, path: Path, budgets: decoding.Budgets = decoding.DEFAULT_BUDGETS) -> None:
        self.path = Path(path)
        self.budgets = budgets
        self._files: dict[str, _File] = {}
        self._in_force: dict[ObjectRef, KubeObject] = {}
        self._conflicts: set[tuple[ObjectRef, str, str]] = set()
        self._missing = False
        self._skipped: dict[str, str] = {}  # entry name → what it is (warned about once)
        self._lock = threading.Lock()  # one scan at a time, whichever thread runs it

    def load(self) -> SourceUpdate:
        """Re-read every file: all objects in force as upserts (plus deletes of any gone), all errors.

        Raises ``SourceError`` if the directory does not exist, never for a file's content.
        """
        if not self.path.is_dir():
            raise SourceError(f"manifest directory {self.path} does not exist or is not a directory")
        with self._lock:
            update = self._scan(None, full=True)
        if update is None:
            raise SourceError(f"manifest directory {self.path} disappeared while being read")
        return update

    def rescan(self, changed_paths: set[Path] | None = None) -> SourceUpdate:
        """Re-read the given files (all if None): only the difference against what was in force.

        Never raises for a file's content or kind (see the module docstring).
        """
        with self._lock:
            return self._scan(changed_paths, full=False) or SourceUpdate()

    def errors(self) -> list[ManifestError]:
        """Current problems, file by file (a file's errors clear when it is fixed or removed)."""
        return [e for name in sorted(self._files) for e in self._files[name].errors]

    def objects(self) -> list[KubeObject]:
        """The objects in force now."""
        return list(self._in_force.values())

    def _scan(self, changed: set[Path] | None, *, full: bool) -> SourceUpdate | None:
        """Re-read and commit; None (nothing changed) if the directory is missing."""
        with gcpause.paused():  # parsing a large file must not stall the agent's loop in collections
            return self._scan_paused(changed, full=full)

    def _scan_paused(self, changed: set[Path] | None, *, full: bool) -> SourceUpdate | None:
        saved = dict(self._files)
        names = self._names(changed)
        if names is None:
            return None
        new_errors = [e for name in sorted(names) for e in self._refresh(name, force=full)]
        if not self.path.is_dir():  # vanished mid-scan: its files' absence means nothing
            self._files = saved
            self._set_missing(True)
            return None
        self._set_missing(False)
        return self._commit(new_errors, full=full)

    def _names(self, changed: set[Path] | None) -> set[str] | None:
        """File names to re-read, or None if the directory is missing."""
        if changed is not None and not any(self._is_self(p) for p in changed):
            return {p.name for p in changed if self._is_self(p.parent) and is_manifest_name(p.name)}
        try:
            listing = {name for name in os.listdir(self.path) if is_manifest_name(name)}
        except OSError as exc:
            self._set_missing(True, exc)
            return None
        self._set_missing(False)
        return listing | set(self._files)

    def _is_self(self, path: Path) -> bool:
        return path == self.path or os.path.realpath(path) == os.path.realpath(self.path)

    def _set_missing(self, missing: bool, exc: OSError | None = None) -> None:
        if missing and not self._missing:
            reason = exc.strerror if exc and exc.strerror else "missing"
            log.warning("manifest directory %s: %s; keeping the last objects", self.path, reason)
        elif self._missing and not missing:
            log.info("manifest directory %s is back", self.path)
        self._missing = missing

    def _refresh(self, name: str, *, force: bool) -> list[ManifestError]:
        """Re-read one file; returns its new errors."""
        path = self.path / name
        old = self._files.get(name)
        try:
            data = files.read_regular(path, self.budgets.file_bytes)
        except files.NotRegular as exc:
            self._skip_entry(name, exc.kind)
            data = None
        except files.TooLarge as exc:
            limit = f"{self.budgets.file_bytes} bytes"
            return self._unreadable(name, old, decoding.over_budget("file size", limit, f"{exc.size} bytes"))
        except OSError as exc:
            return self._unreadable(name, old, f"cannot read: {exc}")
        else:
            self._skipped.pop(name, None)
        if data is None:
            self._files.pop(name, None)
            return []
        if old is not None and old.data == data and not force:
            return []
        objects, errors = parse_manifest(path, data, self.budgets)
        if not errors:
            self._files[name] = _File(data, objects, [])
            return []
        good = old.good if old else None
        errors = [_consequence(e, good) for e in errors]
        self._files[name] = _File(data, good, errors)
        return errors

    def _skip_entry(self, name: str, kind: str) -> None:
        """Skip an entry that is not a regular file, with a warning the first time (per kind)."""
        if self._skipped.get(name) != kind:
            log.warning("%s: skipping %s (a %s, not a regular file)", self.path, decoding.text_of(name), kind)
        self._skipped[name] = kind

    def _unreadable(self, name: str, old: _File | None, message: str) -> list[ManifestError]:
        """A file not read (I/O error, over the size budget): its last good version stays in force."""
        good = old.good if old else None
        problem = _consequence(ManifestError(self.path / name, 0, "", "", message), good)
        repeated = old is not None and old.data is None and [str(e) for e in old.errors] == [str(problem)]
        self._files[name] = _File(None, good, [problem])
        return [] if repeated else [problem]

    def _commit(self, new_errors: list[ManifestError], *, full: bool) -> SourceUpdate:
        merged = self._merge()
        upserts = [obj for r, obj in merged.items() if full or self._in_force.get(r) != obj]
        deletes = sorted(r for r in self._in_force if r not in merged)
        self._in_force = merged
        return SourceUpdate(upserts, deletes, new_errors)

    def _merge(self) -> dict[ObjectRef, KubeObject]:
        """The objects in force: files in name order, the first definition of each ref wins."""
        merged: dict[ObjectRef, KubeObject] = {}
        owner: dict[ObjectRef, str] = {}
        conflicts: set[tuple[ObjectRef, str, str]] = set()
        for name in sorted(self._files):
            for obj in self._files[name].good or []:
                key = ref(obj)
                if key in owner:
                    conflicts.add((key, owner[key], name))
                    continue
                merged[key] = obj
                owner[key] = name
        for key, winner, loser in sorted(conflicts - self._conflicts):
            where = f"twice in {winner}" if winner == loser else f"in both {winner} and {loser}"
            log.warning("%s: %s %s/%s is defined %s; using %s", self.path, *key, where, winner)
        self._conflicts = conflicts
        return merged


def _consequence(error: ManifestError, good: list[KubeObject] | None) -> ManifestError:
    """The error, its message saying what stays in force instead."""
    note = "keeping the last good version of the file" if good is not None else "file ignored until fixed"
    return ManifestError(error.file, error.document, error.obj, error.field, f"{error.message} ({note})")
