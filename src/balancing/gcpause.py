"""Pause Python's cyclic garbage collector during bulk work, process-wide and nestable across threads.

A full sync of 10k Services, or parsing a manifest of 20k objects, allocates ~10^6 short-lived objects while
~10^6 long-lived ones exist, so generation-2 collections rescan the whole heap again and again: about a
third of a sync's time, and pauses of up to a second that stop every thread, the event loop's included
(``/healthz`` answered in 1.05 s while a 6 MB manifest parsed). The objects involved are acyclic and freed by
reference counting anyway. ``paused()`` may be entered from several threads at once (the writer's and the
parser's): the collector runs again only when the last one leaves, and only if it ran before the first.
``freeze_long_lived()`` is the other half: after a full sync, the synced state (millions of objects at 100k
Services) is moved out of the collector's reach (``gc.freeze``), so no later collection walks it again and a
change after the sync never meets a pause of seconds (bench/changes.py measures it).
Neighbours: ``agent.programming`` (syncs), ``agent.lifecycle`` (the freeze after a source's first full sync)
and ``sources.manifests`` (parsing) use it. Imports nothing from the project, so every layer may.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["freeze_long_lived", "paused"]

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection while any ``paused()`` block runs, in any thread."""
    global _holders, _was_enabled  # noqa: PLW0603 (one process-wide state, as the collector is)
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()


def freeze_long_lived() -> None:
    """Move every object alive now out of the collector's reach (``gc.freeze``), after collecting the young
    generations so that cycles made by the work just done are freed rather than kept. Frozen objects are
    still freed by reference counting when the state replaces them; what a freeze can keep for good is
    cyclic garbage that had already reached the oldest generation, so callers freeze once per bulk load (a
    source's first full sync), not on every sync."""
    gc.collect(1)
    gc.freeze()
