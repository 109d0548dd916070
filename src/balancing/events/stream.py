"""The live event stream for ``balancing monitor``: NDJSON over a unix socket.

Every client that connects to the socket (default ``/run/balancing/events.sock``, mode 0600) receives every
event record from then on, one JSON object per line (the schema of ``record``), until it disconnects.
Clients send nothing; filtering happens in the client. Each client is a pipeline subscriber with a bounded
queue, so a slow client loses events (counted by the pipeline) and never slows the agent or other clients;
one that accepts nothing for ``STUCK_AFTER`` seconds is disconnected.
Neighbours: ``pipeline`` (subscribe/unsubscribe), ``cli.monitor`` (the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balancing.events.record import EventRecord

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/balancing/events.sock")
MAX_WRITE_BATCH = 256  # records written per drain()
STUCK_AFTER = 30.0  # seconds a client may take to accept one batch before it is disconnected

Subscribe = Callable[[], asyncio.Queue[EventRecord]]
Unsubscribe = Callable[[asyncio.Queue[EventRecord]], None]


class EventStreamServer:
    """Serves the pipeline's records to every connected unix-socket client."""

    def __init__(self, path: Path, subscribe: Subscribe, unsubscribe: Unsubscribe) -> None:
        self.path = path
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted since start

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.path)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        os.chmod(self.path, 0o600)
        log.info("event stream on %s", self.path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()
        self._server = None
        _remove_stale(self.path)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        self.connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._clients.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        q = self._subscribe()
        gone = asyncio.ensure_future(_until_eof(reader))
        get: asyncio.Future[EventRecord] | None = None
        try:
            while True:
                get = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    return
                writer.write(b"".join(r.line for r in _take(get.result(), q)))
                await asyncio.wait_for(writer.drain(), STUCK_AFTER)
        except (ConnectionError, OSError, TimeoutError):
            return
        finally:
            self._unsubscribe(q)
            await _cancel(gone, get)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()


async def _cancel(*futures: asyncio.Future[Any] | None) -> None:
    for f in futures:
        if f is not None and not f.done():
            f.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await f


async def _until_eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(4096):
            pass  # clients send nothing we use


def _take(first: EventRecord, q: asyncio.Queue[EventRecord]) -> list[EventRecord]:
    out = [first]
    while len(out) < MAX_WRITE_BATCH and not q.empty():
        out.append(q.get_nowait())
    return out


def _remove_stale(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
