"""Edit Kubernetes documents in tests: ``edit(doc, {"spec.ports.0.port": 70000})`` returns a changed copy.

Dotted paths reach into mappings (created as needed) and lists (``.0``); ``DELETE`` removes a field and the
index one past a list's end appends. ``clone`` is a deep copy that shares nothing. Used by the validation and
CRD tables (tests/unit/test_validation.py, tests/unit/test_crds.py).
"""

from __future__ import annotations

from typing import Any

DELETE = object()


def clone(value: Any) -> Any:
    """A deep copy that shares nothing (``copy.deepcopy`` keeps two references to one list as one list)."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    return [clone(v) for v in value] if isinstance(value, list) else value


def edit(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with each ``{"dotted.path": value}`` set (see the module docstring)."""
    out: dict[str, Any] = clone(doc)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        key: Any = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key]
        elif isinstance(node, list) and key == len(node):
            node.append(clone(value))
        else:
            node[key] = clone(value)
    return out
