"""A pydantic ``ValidationError`` on a raw document, as messages per field path of that document.

``field_errors(doc, exc)`` maps ``"spec.ports[0].port"`` (a path in the document, without pydantic's union
branch tags; the absent field itself for a missing one; ``""`` for the whole object) to its messages, the
alternatives of a union (IPv4 or IPv6, ...) deduplicated and in order. The manifest and Kubernetes sources
(``sources.manifests``) and the admission webhook (``controller.admission``) report errors through it, so
an operator reads the same message from ``kubectl apply`` and from the agent's log.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

__all__ = ["field_errors", "join_path"]


def field_errors(doc: Any, exc: ValidationError) -> dict[str, list[str]]:
    by_field: dict[str, list[str]] = {}
    for error in exc.errors():
        loc = _document_loc(doc, tuple(error["loc"]), missing=error["type"] == "missing")
        message = str(error["msg"]).removeprefix("Value error, ")
        messages = by_field.setdefault(_field_path(loc), [])
        if message not in messages:
            messages.append(message)
    return by_field


def join_path(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _document_loc(doc: Any, loc: tuple[int | str, ...], *, missing: bool) -> tuple[int | str, ...]:
    """The part of a pydantic location that names the document's fields (not union branch tags)."""
    node, kept = doc, list[int | str]()
    for part in loc:
        if not _has(node, part):
            if missing and isinstance(node, dict):
                kept.append(part)  # the absent field itself
            break
        node = node[part]
        kept.append(part)
    return tuple(kept)


def _has(node: Any, part: int | str) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _field_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        name = str(part)
        if not name.isprintable():  # a key from the document: never a control character in a log line
            name = repr(name)
        text = f"{text}[{part}]" if isinstance(part, int) else join_path(text, name)
    return text
