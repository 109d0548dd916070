"""The manifest source: one directory of YAML/JSON files read as the Kubernetes objects in force.

``ManifestDirectory`` reads every ``*.yaml``, ``*.yml`` and ``*.json`` file directly in the directory (not
hidden files, not editor leftovers such as ``x~``), each holding one or more documents, a document being
one object or a ``List`` of them. ``load`` and ``rescan`` return a ``SourceUpdate``: the difference against
what was in force before. Rules:

- an object of a kind the model does not read is skipped with a logged warning;
- a file that fails to parse, or holds any invalid document, keeps its last good version in force as a
  whole (a file never good contributes nothing) and reports ``ManifestError``\\ s naming file, document,
  object and field;
- an object defined in two files comes from the file whose name sorts first (warning naming both);
- Service, EndpointSlice and Pod without a namespace are in ``default``;
- a missing directory keeps everything in force (logged) until it is back.

Neighbours: documents are validated by ``balancing.model.objects.parse_object``; ``sources.watch`` calls
``rescan`` when files change; the agent applies updates to the model's store.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from balancing.errors import ManifestError, SourceError
from balancing.model.fielderrors import field_errors, join_path
from balancing.model.objects import KubeObject, ObjectRef, UnknownKind, parse_object, ref

log = logging.getLogger(__name__)

NAMESPACED_KINDS = frozenset({"Service", "EndpointSlice", "Pod"})
SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class SourceUpdate:
    """A change to the objects in force: new or changed objects, removed refs, and newly found errors.

    False when empty. ``errors`` holds problems found by this scan (a file re-read unchanged is not
    reported again); ``ManifestDirectory.errors()`` gives all current ones.
    """

    upserts: list[KubeObject] = field(default_factory=list)
    deletes: list[ObjectRef] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes or self.errors)


def is_manifest_name(name: str) -> bool:
    """Whether a file name is read as a manifest (right suffix, not hidden, not an editor leftover)."""
    return name.lower().endswith(SUFFIXES) and not name.startswith(".") and not name.endswith("~")


# --- parsing one file ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that keeps timestamps as text, as Kubernetes does."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_manifest(path: Path, data: bytes) -> tuple[list[KubeObject], list[ManifestError]]:
    """Every object one file's content defines, and every problem found in it (no I/O)."""
    try:
        documents = _documents(path, data)
    except ManifestError as exc:
        return [], [exc]
    objects: list[KubeObject] = []
    errors: list[ManifestError] = []
    for index, document in enumerate(documents, start=1):
        for where, item in _items(document):
            try:
                objects.append(_parse_item(path, index, where, item))
            except ManifestError as exc:
                errors.append(exc)
            except ValidationError as exc:
                errors.extend(_validation_errors(path, index, where, item, exc))
            except UnknownKind:
                _skip(path, index, where, item)
    return objects, errors


def _skip(path: Path, index: int, where: str, item: dict[str, Any]) -> None:
    at = f" {where}" if where else ""
    kind = (item.get("apiVersion"), item.get("kind"))
    log.warning("%s document %d%s: skipping %s %s (kind not read by balancing)", path, index, at, *kind)


def _documents(path: Path, data: bytes) -> list[Any]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(path, 0, "", "", f"not UTF-8 text: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise ManifestError(
                path, 1, "", "", f"invalid JSON at {_at(exc.lineno, exc.colno)}: {exc.msg}"
            ) from None
    documents: list[Any] = []
    try:
        for document in yaml.load_all(text, Loader=_Loader):
            documents.append(document)
    except yaml.YAMLError as exc:
        raise ManifestError(path, len(documents) + 1, "", "", _yaml_message(exc)) from None
    return documents


def _at(line: int, column: int) -> str:
    return f"line {line} column {column}"


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML at {_at(mark.line + 1, mark.column + 1)}: {exc.problem}{context}"
    return f"invalid YAML: {exc}"


def _items(document: Any) -> list[tuple[str, Any]]:
    """The objects of one document with their location: itself, or each item of a ``List``."""
    if document is None:
        return []  # empty document, e.g. after a trailing ``---``
    if not (isinstance(document, dict) and str(document.get("kind", "")).endswith("List")):
        return [("", document)]
    items = document.get("items") or []
    if not isinstance(items, list):
        return [("items", items)]
    kind = str(document["kind"])
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
    return _default_namespace(parse_object(item))


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


def _describe(item: dict[str, Any]) -> str:
    """``"Service default/web"`` from a raw document, as far as it names itself."""
    kind = str(item.get("kind") or "")
    meta = item.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or ("default" if kind in NAMESPACED_KINDS else ""))
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

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._files: dict[str, _File] = {}
        self._in_force: dict[ObjectRef, KubeObject] = {}
        self._conflicts: set[tuple[ObjectRef, str, str]] = set()
        self._missing = False

    def load(self) -> SourceUpdate:
        """Re-read every file: all objects in force as upserts (plus deletes of any gone), all errors.

        Raises ``SourceError`` if the directory does not exist.
        """
        if not self.path.is_dir():
            raise SourceError(f"manifest directory {self.path} does not exist or is not a directory")
        update = self._scan(None, full=True)
        if update is None:
            raise SourceError(f"manifest directory {self.path} disappeared while being read")
        return update

    def rescan(self, changed_paths: set[Path] | None = None) -> SourceUpdate:
        """Re-read the given files (all if None): only the difference against what was in force."""
        return self._scan(changed_paths, full=False) or SourceUpdate()

    def errors(self) -> list[ManifestError]:
        """Current problems, file by file (a file's errors clear when it is fixed or removed)."""
        return [e for name in sorted(self._files) for e in self._files[name].errors]

    def objects(self) -> list[KubeObject]:
        """The objects in force now."""
        return list(self._in_force.values())

    def _scan(self, changed: set[Path] | None, *, full: bool) -> SourceUpdate | None:
        """Re-read and commit; None (nothing changed) if the directory is missing."""
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
            data = path.read_bytes() if path.is_file() else None
        except FileNotFoundError:
            data = None
        except OSError as exc:
            return self._unreadable(name, old, exc)
        if data is None:
            self._files.pop(name, None)
            return []
        if old is not None and old.data == data and not force:
            return []
        objects, errors = parse_manifest(path, data)
        if not errors:
            self._files[name] = _File(data, objects, [])
            return []
        good = old.good if old else None
        errors = [_consequence(e, good) for e in errors]
        self._files[name] = _File(data, good, errors)
        return errors

    def _unreadable(self, name: str, old: _File | None, exc: OSError) -> list[ManifestError]:
        good = old.good if old else None
        problem = _consequence(ManifestError(self.path / name, 0, "", "", f"cannot read: {exc}"), good)
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
