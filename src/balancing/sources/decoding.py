"""One manifest file's bytes as documents, strictly and within cost budgets.

``decode(name, data, budgets)`` returns the documents of a YAML file (one or more) or a JSON file (one), or
raises ``DecodeError`` naming the document (1-based; 0: the whole file) and, where known, the line or the
field. Decoding is strict as kubectl's is: a mapping key defined twice is an error, for YAML
(``mapping key "port" already defined at line 5``) and for JSON. YAML goes through libyaml's C parser when
PyYAML was built with it (its pure-Python parser otherwise), with Kubernetes' resolvers: timestamps stay
text.

Budgets (``Budgets``; defaults below) bound what one file may cost, each checked before the step it
protects runs, so a hostile or broken file costs little and is reported, never raised:

- file size: checked on ``stat`` before reading (by ``sources.files``);
- nesting depth: YAML nodes count their depth while the composer descends (an error at the first node
  too deep, before any recursive step goes further); JSON brackets are counted outside strings
  (``sources.boundedjson``) before ``json`` recurses;
- alias expansion: the nodes that YAML aliases add once expanded, counted over the composed node graph
  (each node once, never expanding anything), only for files that can hold an anchor (``&name`` where a
  node may start); the "billion laughs" costs microseconds. Like kubectl's excessive-aliasing check; an
  alias inside its own anchor is refused;
- objects per file: documents are counted as they are composed (each counts as one object; ``sources
  .manifests`` counts the items of ``List``\\ s).

Neighbours: ``sources.manifests`` calls ``decode`` on what ``sources.files`` read and validates the
documents into ``balancing.model`` objects.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from balancing.sources import boundedjson

__all__ = ["DEFAULT_BUDGETS", "Budgets", "DecodeError", "decode", "object_count", "text_of"]

MAX_FILE_BYTES = 32 * 1024 * 1024  # a 10k-Service file is ~4 MB of YAML, ~8 MB of indented JSON
MAX_DEPTH = 100  # nodes from a document's root to its deepest leaf; a CRD schema nests ~40
MAX_ALIAS_NODES = 400_000  # nodes YAML aliases may add once expanded (yaml.v2 allows ~400k)
MAX_OBJECTS = 100_000  # objects per file (a document counts as one at least): 10x the 10k-Service goal

MAX_INT_DIGITS = sys.get_int_max_str_digits()  # Python's int-string conversion limit (4300 by default)
_TOO_LONG = f"(more than {MAX_INT_DIGITS} cannot be read)"


@dataclass(frozen=True)
class Budgets:
    """What one manifest file may cost; see the module docstring."""

    file_bytes: int = MAX_FILE_BYTES
    depth: int = MAX_DEPTH
    alias_nodes: int = MAX_ALIAS_NODES
    objects: int = MAX_OBJECTS


DEFAULT_BUDGETS = Budgets()


class DecodeError(Exception):
    """The file's content is not valid YAML/JSON, or over a budget, at ``document`` (0: whole file)."""

    def __init__(self, document: int, message: str, field: str = "") -> None:
        super().__init__(document, message, field)
        self.document = document
        self.message = message
        self.field = field


def over_budget(budget: str, limit: str, detail: str = "") -> str:
    """The message of a budget exceeded: names the budget and its limit."""
    return f"over the {budget} budget ({limit}){': ' + detail if detail else ''}"


def decode(name: str, data: bytes, budgets: Budgets = DEFAULT_BUDGETS) -> list[Any]:
    """The documents of one file's content (``name`` decides JSON or YAML by suffix); ``DecodeError``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DecodeError(0, f"not UTF-8 text: {exc}") from None
    if name.lower().endswith(".json"):
        return [_json_document(data, text, budgets)]
    return _yaml_documents(text, budgets)


def object_count(document: Any) -> int:
    """How many objects a document holds as far as budgets go: a ``List``'s items, else one."""
    if isinstance(document, dict) and isinstance(document.get("items"), list):
        kind = document.get("kind")
        if isinstance(kind, str) and kind.endswith("List"):
            return max(1, len(document["items"]))
    return 1


def text_of(value: Any, limit: int = 200) -> str:
    """``str(value)`` for a message: never raises, at most ``limit`` characters, collections by type, and
    no control character (a newline in a name must not forge a log line): such text is shown as a repr."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (dict, list, tuple, set)):
        text = f"<{type(value).__name__}>"
    else:
        try:
            text = str(value)
        except Exception:  # e.g. an int past the conversion limit
            text = f"<{type(value).__name__}>"
    if not text.isprintable():
        text = repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


# --- YAML ----------------------------------------------------------------------------------------------


class _OverBudget(yaml.MarkedYAMLError):
    """Raised from inside the loader; carries the budget message and where it was exceeded."""


class _Budgeted(SafeConstructor, Resolver):
    """Safe constructor and resolver for manifests: strict keys, bounded depth, Kubernetes' resolvers."""

    def _start(self, budgets: Budgets) -> None:
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.budgets = budgets
        self.depth = 0

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        """Called by the composer before each node: counts depth (no path resolvers are used)."""
        self.depth += 1
        if self.depth > self.budgets.depth:
            mark = getattr(current_node, "start_mark", None)
            raise _OverBudget(None, None, over_budget("nesting depth", f"{self.budgets.depth} levels"), mark)

    def ascend_resolver(self) -> None:
        self.depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        own = node.value  # merge keys (<<) are deleted from this list in place, merged pairs go elsewhere
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) != len(own) or node.value is not own:
            self._refuse_duplicates(node, own)
        return mapping

    def _refuse_duplicates(self, node: MappingNode, own: list[tuple[Node, Node]]) -> None:
        first: dict[Any, Node] = {}
        for key_node, _ in own:
            key = self.construct_object(key_node, deep=True)
            if key in first:
                line = first[key].start_mark.line + 1
                problem = f'mapping key "{text_of(key)}" already defined at line {line}'
                raise ConstructorError(None, None, problem, key_node.start_mark)
            first[key] = key_node

    def construct_int(self, node: ScalarNode) -> int:
        """An int, or a located error for one past Python's conversion limit (instead of ValueError)."""
        try:
            return self.construct_yaml_int(node)
        except ValueError:
            digits = sum(c.isdigit() for c in str(node.value))
            problem = f"integer of {digits} digits {_TOO_LONG}"
            raise ConstructorError(None, None, problem, node.start_mark) from None


_Budgeted.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()
}
_Budgeted.yaml_constructors = {
    **SafeConstructor.yaml_constructors,
    "tag:yaml.org,2002:int": _Budgeted.construct_int,
}


class _PureLoader(
    yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Budgeted
):
    """PyYAML's pure-Python parser (only when libyaml is missing)."""

    def __init__(self, text: str, budgets: Budgets) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        self._start(budgets)


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(CParser, _Budgeted):
        """libyaml's C parser and composer; construction stays PyYAML's (safe) Python."""

        def __init__(self, text: str, budgets: Budgets) -> None:
            CParser.__init__(self, text)
            self._start(budgets)


_Loader = _CLoader if yaml.__with_libyaml__ else _PureLoader

# Where an anchor can start: a "&" and a name character, at the start, after blanks or line breaks (a BOM
# too, skipped at a line start) or after a flow indicator or a JSON-like ":" / "?". An anchor anywhere else
# is a syntax error before any alias could use it. A file without a match has no aliases to expand (a
# match may be a false alarm, e.g. inside a quoted string: it only costs the walk).
_ANCHOR = re.compile(r"(?:^|[\s\ufeff\[{,:?])&[\w-]")


def _yaml_documents(text: str, budgets: Budgets) -> list[Any]:
    documents: list[Any] = []
    expansion = _Expansion(budgets.alias_nodes) if "&" in text and _ANCHOR.search(text) else None
    loader = None
    try:
        loader = _Loader(text, budgets)  # the pure reader checks the characters here already
        while loader.check_node():
            if len(documents) >= budgets.objects:
                raise DecodeError(0, over_budget("objects per file", f"{budgets.objects} objects"))
            node = loader.get_node()
            if expansion is not None and node is not None:
                expansion.add(node, budgets.depth)
            documents.append(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise DecodeError(len(documents) + 1, _yaml_message(exc, text)) from None
    except DecodeError:
        raise
    except Exception as exc:  # e.g. MemoryError: still this document's problem, located as far as known
        problem = f"cannot be parsed: {type(exc).__name__}: {text_of(exc)}"
        raise DecodeError(len(documents) + 1, problem) from None
    finally:
        if loader is not None:
            loader.dispose()
    return documents


def _yaml_message(exc: yaml.YAMLError, text: str) -> str:
    mark = exc.problem_mark if isinstance(exc, yaml.MarkedYAMLError) else None
    where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    if isinstance(exc, _OverBudget):
        return f"{exc.problem} at {where}" if where else str(exc.problem)
    if isinstance(exc, yaml.MarkedYAMLError) and where:
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML at {where}: {exc.problem}{context}"
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        what = f"character #x{char:04x}" if isinstance(char, int) else f"byte {char!r}"
        return f"invalid YAML at {_reader_where(exc, text)}: unacceptable {what}: {exc.reason}"
    return f"invalid YAML: {exc}"


def _reader_where(exc: yaml.reader.ReaderError, text: str) -> str:
    """The line and column of a reader error (libyaml counts bytes of UTF-8, PyYAML characters)."""
    if yaml.__with_libyaml__:
        before = text.encode("utf-8")[: exc.position].decode("utf-8", "replace")
    else:
        before = text[: exc.position]
    line = before.count("\n") + 1
    return f"line {line} column {len(before) - (before.rfind(chr(10)) + 1) + 1}"


class _Expansion:
    """Nodes that aliases add, over the documents of one file, against the alias budget.

    Walks each composed document once (iteratively, every distinct node once) computing for each node the
    size and depth of its subtree with aliases expanded; a node met again on its own path is an alias
    inside its anchor.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.added = 0

    def add(self, root: Node, max_depth: int) -> None:
        size: dict[int, tuple[int, int]] = {}  # id(node) → (nodes, depth) expanded
        on_path: set[int] = set()
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            key = id(node)
            if done:
                on_path.discard(key)
                below = [size[id(child)] for child in _children(node)]
                size[key] = (1 + sum(n for n, _ in below), 1 + max((d for _, d in below), default=0))
                continue
            if key in size:
                continue
            if key in on_path:
                raise _OverBudget(None, None, "an alias refers to a node that contains it", node.start_mark)
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in size)
        nodes, depth = size[id(root)]
        if depth > max_depth:
            limit = f"{max_depth} levels"
            raise _OverBudget(None, None, over_budget("nesting depth", limit, "with aliases expanded"), None)
        self.added += nodes - len(size)
        if self.added > self.budget:
            detail = f"aliases expand to more than {self.budget} more nodes"
            raise _OverBudget(
                None, None, over_budget("alias expansion", f"{self.budget} nodes", detail), None
            )


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


# --- JSON ----------------------------------------------------------------------------------------------

_LONG_INT = re.compile(rf"[0-9]{{{MAX_INT_DIGITS + 1},}}")


def _json_document(data: bytes, text: str, budgets: Budgets) -> Any:
    try:  # containers nest one level less than their leaves, which count in the budget
        boundedjson.check_depth(data, budgets.depth - 1)
    except boundedjson.JSONTooDeep:
        raise DecodeError(1, over_budget("nesting depth", f"{budgets.depth} levels")) from None
    duplicates: list[tuple[dict[str, Any], str]] = []

    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            duplicates.append((result, _first_duplicate(pairs)))
        return result

    try:
        document = json.loads(text, object_pairs_hook=mapping)
    except json.JSONDecodeError as exc:
        raise DecodeError(1, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # only for invalid JSON, whose brackets do not pair up
        raise DecodeError(1, over_budget("nesting depth", f"{budgets.depth} levels")) from None
    except ValueError as exc:  # an int past Python's conversion limit
        raise DecodeError(1, _long_int_message(text, exc)) from None
    if duplicates:
        inner, key = duplicates[0]
        field = _path_to(document, inner)
        raise DecodeError(1, f'mapping key "{text_of(key)}" already defined', f"{field}.{key}".lstrip("."))
    return document


def _first_duplicate(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def _long_int_message(text: str, exc: ValueError) -> str:
    match = _LONG_INT.search(text)
    if match is None:
        return f"invalid JSON: {exc}"
    start = match.start()
    line, column = text.count("\n", 0, start) + 1, start - (text.rfind("\n", 0, start) + 1) + 1
    digits = match.end() - start
    return f"invalid JSON at line {line} column {column}: integer of {digits} digits {_TOO_LONG}"


def _path_to(document: Any, target: dict[str, Any]) -> str:
    """The field path of ``target`` (found by identity) inside ``document``; "" for the root."""
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}".lstrip(".")) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
    return ""
