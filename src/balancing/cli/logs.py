"""Logging for the commands that log (``agent``, ``controller``): one level check, text or JSON lines.

``--log-level`` is one of ``LEVELS`` (any case); a bad value is a one-line error naming where it came from.
``--log-format json`` writes one JSON object per line::

    {"time": "2024-05-01T10:00:00.123Z", "level": "info", "logger": "balancing.agent", "message": "...",
     "service": "default/web", ...}

``time`` is RFC 3339 in UTC; fields a log call passes with ``extra=`` (``service``, ``policy``, ``node``,
``file``, ...) are added as they are (as ``str()`` when not JSON values), and a traceback as ``exception``.
The text format is ``TIME LEVEL LOGGER: MESSAGE`` followed by the same fields as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from balancing import errors

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "TextFormatter", "check_format", "check_level", "setup"]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
# What every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# Libraries whose info lines are noise in the agent's log.
_QUIET = ("watchfiles", "httpx", "httpcore")


def check_level(where: str, value: str) -> str:
    """``value`` as a level name (lower case); ``errors.ConfigError`` naming ``where`` if it is none."""
    level = value.strip().lower()
    if level not in LEVELS:
        raise errors.ConfigError(where, f"{value!r} is not one of {', '.join(LEVELS)}")
    return level


def check_format(where: str, value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in FORMATS:
        raise errors.ConfigError(where, f"{value!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a log call passed with ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields(record).items():
            doc.setdefault(key, _jsonable(value))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            doc["exception"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value ...`` (then a traceback, if any)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in fields(record).items())
        if not extra:
            return super().format(record)
        head, sep, tail = super().format(record).partition("\n")
        return f"{head} {extra}{sep}{tail}"


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner swaps it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup(level: str, fmt: str = "text") -> logging.Handler:
    """Log at ``level`` (checked already) in ``fmt`` to stderr, in place of an earlier ``setup``'s handler."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler
