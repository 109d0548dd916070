"""JSON from outside the process, parsed only when it nests no deeper than a bound.

``loads(data, max_depth=...)`` is ``json.loads`` for UTF-8 bytes that first checks, at C speed, that the
arrays and objects nest at most ``max_depth`` levels: escaped backslashes and quotes are dropped, the strings
cut out by splitting at the quotes, the brackets turned into steps of +1 and -1 with ``bytes.translate`` and
their running sum's maximum taken with ``itertools.accumulate``. A hostile document costs a few passes over
its bytes (about 0.06 s per MiB of nothing but brackets), never a ``RecursionError`` from the decoder (about
1000 levels) or a recursion in whoever walks the result. Every failure is a ``ValueError`` (``JSONTooDeep``
for the depth). Used by the Kubernetes informer (list and watch responses) and the admission webhook (request
bodies); the size bounds are theirs.
"""

from __future__ import annotations

import json
from itertools import accumulate
from typing import Any

__all__ = ["JSONTooDeep", "check_depth", "loads"]

_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JSONTooDeep(ValueError):
    """The document nests arrays and objects deeper than the bound."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"JSON nested deeper than {max_depth} levels")
        self.max_depth = max_depth


def check_depth(data: bytes, max_depth: int) -> None:
    """Raise ``JSONTooDeep`` when ``data`` nests deeper than ``max_depth``. Exact for JSON; for anything else
    an upper bound of how deep a decoder gets before it finds the error."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")  # left to right, as a decoder reads
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    steps = outside_strings.translate(_STEPS, _NOT_BRACKETS)  # +1 per opening, -1 per closing bracket
    if max(accumulate(memoryview(steps).cast("b")), default=0) > max_depth:
        raise JSONTooDeep(max_depth)


def loads(data: bytes, *, max_depth: int = 64) -> Any:
    """The JSON value in ``data`` (UTF-8: no ASCII byte occurs inside another character, so the check sees
    what the decoder sees), nesting at most ``max_depth`` levels."""
    check_depth(data, max_depth)
    try:
        return json.loads(data.decode())
    except RecursionError:  # not reachable after the check; kept so no caller ever sees one
        raise JSONTooDeep(max_depth) from None
