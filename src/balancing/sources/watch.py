"""Following a manifest directory: ``watch_manifests`` yields a ``SourceUpdate`` each time files change.

Uses ``watchfiles.awatch`` (inotify) on the directory and its parent, not recursively, with a short debounce
so an added, edited, removed or renamed-over file takes effect well within a second. Watching the parent
notices the directory itself being removed or replaced (``rm -rf`` then recreate, ``mv`` or a symlink swap
as in Kubernetes ConfigMap volumes): the watch restarts on the new directory, and while it is missing the
last objects stay in force (``ManifestDirectory`` logs it). Each (re)start resyncs with a full rescan once
the watch is in place, so nothing changed meanwhile is missed.

Reading and parsing run in a worker thread (``asyncio.to_thread``), never on the event loop: a large
manifest edited takes its parse time in the thread while the loop keeps serving (health, state, events).
``load`` is the first full read the same way. A scan's problems are ``ManifestError`` entries of its update:
nothing a file holds ends the watch.

Neighbours: ``ManifestDirectory`` (in ``manifests``) does all reading and diffing; the agent consumes the
updates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path

from watchfiles import Change, awatch

from balancing.sources.manifests import ManifestDirectory, is_manifest_name
from balancing.sources.update import SourceUpdate

log = logging.getLogger(__name__)

IDLE_CHECK_MS = 250  # when no event arrives: how often to check the directory is still the same one
MISSING_RETRY_S = 0.1  # while the directory is missing: how often to look for it again

Identity = tuple[int, int]  # (st_dev, st_ino) of the directory


async def load(directory: ManifestDirectory) -> SourceUpdate:
    """``directory.load()`` in a worker thread: the whole state first, before ``watch_manifests``."""
    return await asyncio.to_thread(directory.load)


async def watch_manifests(
    directory: ManifestDirectory, *, debounce_ms: int = 50
) -> AsyncIterator[SourceUpdate]:
    """Yield every non-empty update to ``directory`` as its files change, forever.

    Call ``load(directory)`` (or ``directory.load()``) first: the watch reports differences from the state
    then. Survives the directory going missing or being replaced.
    """
    while True:
        identity = _identity(directory.path)
        if identity is None:
            await asyncio.to_thread(directory.rescan)  # logs the directory missing (once), keeps objects
            await asyncio.sleep(MISSING_RETRY_S)
            continue
        try:
            async for update in _watch_while_same(directory, identity, debounce_ms):
                yield update
        except OSError as exc:  # e.g. removed between the check and the watch starting
            log.warning("watching %s failed (%s); retrying", directory.path, exc)
            await asyncio.sleep(MISSING_RETRY_S)


async def _watch_while_same(
    directory: ManifestDirectory, identity: Identity, debounce_ms: int
) -> AsyncIterator[SourceUpdate]:
    """Updates until the directory is removed or replaced by another one."""
    root = Path(os.path.abspath(directory.path))
    targets = [root] if root.parent == root else [root, root.parent]
    changes = awatch(
        *targets,
        watch_filter=_concerning(root),
        debounce=debounce_ms,
        step=min(50, max(1, debounce_ms // 4)),
        rust_timeout=IDLE_CHECK_MS,
        yield_on_timeout=True,
        recursive=False,
    )
    resync = True  # the first wake-up (event or timeout) comes once the watch is in place
    async with aclosing(changes) as stream:
        async for batch in stream:
            replaced = _identity(directory.path) != identity
            paths = {Path(path) for _, path in batch}
            targeted = not (resync or replaced) and all(is_manifest_name(p.name) for p in paths)
            if batch or resync or replaced:
                update = await asyncio.to_thread(directory.rescan, paths if targeted else None)
                if update:
                    yield update
            resync = False
            if replaced:
                log.info("manifest directory %s was removed or replaced; watching again", directory.path)
                return


def _concerning(root: Path) -> Callable[[Change, str], bool]:
    """Events about the directory itself or the entries directly in it (not the parent's other entries)."""

    def keep(change: Change, path: str) -> bool:
        entry = Path(path)
        return root in (entry, entry.parent)

    return keep


def _identity(path: Path) -> Identity | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None
