"""After a write: destroy the connected UDP sockets whose backend left the frontend they connected through.

``Terminations.submit`` takes what a write removed (frontend → backends); the ``SocketTerminator`` runs on its
own executor, one run at a time and in write order, after the write (so a reconnect cannot get the removed
backend again) and off the write path (a write never waits for it). Pairs removed while a run goes on are
merged into the next run, however fast backends churn. Failures are counted and logged, never raised.
Neighbours: ``datapath.sockterm`` (the iterator program), ``agent.programming`` (submits after each write).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from balancing.datapath import loader, sockterm
from balancing.metrics import Metrics
from balancing.model import desired

__all__ = ["Terminations"]

log = logging.getLogger("balancing.agent")


class Terminations:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sockterm")
        self.terminator: sockterm.SocketTerminator | None = None  # set by ``open``
        self._running: set[asyncio.Future[None]] = set()  # the run going on, if any
        self._doomed: dict[desired.FrontendKey, set[desired.Backend]] = {}  # removed meanwhile: next run
        self._stopping = False

    async def open(self, dp: loader.DatapathConfig, netns_dirs: tuple[Path, ...]) -> None:
        """Load the terminator (after ``loader.load``: it would retire the terminator's own pin)."""
        obj = dp.object_path.with_name(sockterm.OBJECT)
        self.terminator = await asyncio.get_running_loop().run_in_executor(
            self.io, partial(sockterm.SocketTerminator, dp.bpffs, dp.cgroup, obj, netns_dirs=netns_dirs)
        )

    def submit(self, removed: Mapping[desired.FrontendKey, frozenset[desired.Backend]]) -> None:
        if not removed or self.terminator is None:
            return
        for key, backends in removed.items():
            self._doomed.setdefault(key, set()).update(backends)
        self._start()

    def _start(self) -> None:
        terminator = self.terminator
        if self._running or not self._doomed or terminator is None or self._stopping:
            return  # a run is going on (it starts the next when it ends), or nothing to do

        def run(pairs: dict[desired.FrontendKey, set[desired.Backend]]) -> None:
            report = terminator.terminate(pairs)
            self.metrics.udp_sockets_terminated(report.destroyed, len(report.errors))
            if report.skipped:
                log.debug("connected UDP sockets of removed backends left alone: %s", report.skipped)
            elif report.destroyed or report.errors:
                log.info("%s", report.summary())

        def finished(future: asyncio.Future[None]) -> None:
            self._running.discard(future)
            if not future.cancelled() and future.exception() is not None:
                log.error("terminating UDP sockets failed: %s", future.exception())
            self._start()  # with what was removed meanwhile

        pairs, self._doomed = self._doomed, {}
        future = asyncio.get_running_loop().run_in_executor(self.io, run, pairs)
        self._running.add(future)
        future.add_done_callback(finished)

    async def close(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._running, return_exceptions=True)
        if self.terminator is not None:
            await asyncio.get_running_loop().run_in_executor(self.io, self.terminator.close)
        self.io.shutdown(wait=True)
