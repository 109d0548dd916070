"""Machine-readable output of the commands: ``-o json`` and ``-o yaml`` print the same document.

JSON is indented; YAML keeps the document's key order and writes block style. Both are stable: keys are only
ever added (the schemas are in the commands' docstrings).
"""

from __future__ import annotations

import json
from typing import Any

import typer
import yaml

__all__ = ["DOCUMENT_FORMATS", "check", "dumps", "dumps_line"]

DOCUMENT_FORMATS = ("json", "yaml")


def check(output: str, allowed: tuple[str, ...]) -> str:
    """``-o/--output`` as given, or a usage error (exit 2) listing ``allowed``."""
    if output not in allowed:
        raise typer.BadParameter(f"must be one of {', '.join(allowed)}", param_hint="-o/--output")
    return output


class _Dumper(yaml.SafeDumper):
    """Block style; strings with a newline as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dumps(doc: Any, fmt: str) -> str:
    """``doc`` as ``json`` (indented) or ``yaml`` (one document), without a trailing newline."""
    if fmt == "yaml":
        text: str = yaml.dump(
            doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000
        )
        return text.rstrip("\n")
    return json.dumps(doc, indent=2)


def dumps_line(doc: Any, fmt: str) -> str:
    """One record of a stream: a JSON line, or a YAML document starting with ``---``."""
    if fmt == "yaml":
        return "---\n" + dumps(doc, "yaml")
    return json.dumps(doc, separators=(",", ":"))
