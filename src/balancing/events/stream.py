"""The live event stream for ``balancing monitor``: NDJSON over a unix socket.

Every client that connects to the socket (default ``/run/balancing/events.sock``, mode 0600) receives every
event record from then on, one JSON object per line (the schema of ``record``), until it disconnects.
Clients send nothing; filtering happens in the client. Each client is a pipeline subscriber with a bounded
queue, so a slow client loses events (counted by the pipeline) and never slows the agent or other clients;
one that accepts nothing for ``STUCK_AFTER`` seconds is disconnected.
``close`` ends every client's stream: each gets what was published before the close, then end-of-file;
a client that has not taken it within ``CLOSE_GRACE`` seconds is dropped (its connection aborted), so a
slow or stuck client never holds up the agent's shutdown.
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

from balancing.events.record import EventRecord

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/balancing/events.sock")
MAX_WRITE_BATCH = 256  # records written per drain()
STUCK_AFTER = 30.0  # seconds a client may take to accept one batch before it is disconnected
CLOSE_GRACE = 1.0  # seconds close() gives the clients to take the rest of their stream before dropping them

Subscribe = Callable[[], asyncio.Queue[EventRecord]]
Unsubscribe = Callable[[asyncio.Queue[EventRecord]], None]


class EventStreamServer:
    """Serves the pipeline's records to every connected unix-socket client."""

    def __init__(self, path: Path, subscribe: Subscribe, unsubscribe: Unsubscribe) -> None:
        self.path = path
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self._server: asyncio.AbstractServer | None = None
        self._closing = asyncio.Event()  # set by close(): every client ends its stream
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.connections = 0  # accepted since start

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.path)
        self._closing = asyncio.Event()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        os.chmod(self.path, 0o600)
        log.info("event stream on %s", self.path)

    async def close(self) -> None:
        """Stop accepting and end every client's stream (a slow or stuck client delays it ``CLOSE_GRACE``)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._closing.set()  # each client sends what it was given before now, then end-of-file
        await self._wait_clients()
        for writer in list(self._clients.values()):
            writer.transport.abort()  # slow or stuck: its pending writes fail, its task ends
        await self._wait_clients()
        for task in list(self._clients):  # never expected: the task ignored its aborted connection
            log.warning("event stream client %s did not end; cancelling it", task.get_name())
            task.cancel()
        await self._wait_clients()
        # on some Python patch releases this also waits for every connection to be closed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE):
                await server.wait_closed()
        _remove_stale(self.path)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def _wait_clients(self) -> None:
        if self._clients:
            await asyncio.wait(set(self._clients), timeout=CLOSE_GRACE)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        self.connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._clients.pop(task, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # No cancellation on the way: close() ends a client by setting _closing (and, past CLOSE_GRACE, by
        # aborting its connection), never by cancelling its task.
        q = self._subscribe()
        gone = asyncio.ensure_future(_until_eof(reader))
        closing = asyncio.ensure_future(self._closing.wait())
        get: asyncio.Future[EventRecord] | None = None
        graceful = False
        try:
            while not (gone.done() or closing.done()):
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, gone, closing}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    await _send(writer, _take(get.result(), q))
            if gone.done():
                return
            # the server is closing: the rest of this client's stream, then EOF
            self._unsubscribe(q)
            if get is not None:
                get.cancel()  # (if pending) whatever it would have taken stays in q
            while not q.empty():
                await _send(writer, _take(q.get_nowait(), q))
            graceful = True
        except (ConnectionError, OSError, TimeoutError):
            return
        finally:
            self._unsubscribe(q)
            pending = [f for f in (gone, closing, get) if f is not None and not f.done()]
            for f in pending:
                f.cancel()
            if graceful:
                writer.close()  # EOF once the last records are out (close() aborts it past CLOSE_GRACE)
            else:
                writer.transport.abort()  # gone, failed or stuck: what is still buffered is of no use
            if pending:
                await asyncio.wait(pending)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, records: list[EventRecord]) -> None:
    """Write one batch; TimeoutError when the client takes nothing for ``STUCK_AFTER`` seconds."""
    writer.write(b"".join(r.line for r in records))
    # asyncio.timeout, not asyncio.wait_for: on Python 3.11, wait_for returns normally when the drain
    # completes in the same loop iteration as a cancellation of this task, swallowing the cancellation.
    async with asyncio.timeout(STUCK_AFTER):
        await writer.drain()


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
