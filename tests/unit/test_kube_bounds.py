"""The Kubernetes source against a hostile or broken API server: lists and watch events over the size bounds,
JSON nested 10k deep, not JSON, the wrong types. Each fails that one request (a warning naming the
resource), then the informer's backoff and relist or rewatch bring the good objects; no task dies.

The hostile answers come from ``HostileApi``: the fake API server of ``balancing_testkit.fakeapi``, with raw
answers queued per (path, watch or list) sent instead of the served ones, once each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from balancing.sources import boundedjson
from balancing.sources.informer import Bounds
from balancing.sources.kube import KubeSource, Timing
from balancing.sources.update import SourceUpdate
from balancing_testkit.fakeapi import FakeApi, serving

SERVICES = "/api/v1/services"
FAST = Timing(resync=3600, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)
SMALL = Bounds(list_bytes=64 * 1024, event_bytes=16 * 1024, depth=32)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
DEEP = b"[" * 10_000 + b"]" * 10_000

Send = Callable[[asyncio.StreamWriter], Awaitable[None]]


class HostileApi(FakeApi):
    def __init__(self) -> None:
        super().__init__()
        self.hostile: list[tuple[str, bool, Send]] = []  # (path, watch?, what to send instead)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")  # GETs only: no body
        url = urlsplit(head.split(b" ", 2)[1].decode())
        watch = "watch=1" in url.query
        for i, (path, is_watch, send) in enumerate(self.hostile):
            if (path, is_watch) == (url.path, watch):
                del self.hostile[i]
                await self._hostile(send, writer)
                return
        served = asyncio.StreamReader()
        served.feed_data(head)
        served.feed_eof()
        await super().handle(served, writer)

    async def _hostile(self, send: Send, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await send(writer)
        except ConnectionError:
            pass  # the client gave up on it, as it should
        finally:
            writer.close()
            self.tasks.discard(task)


def raw(data: bytes, *, length: bool = True) -> Send:
    """Send ``data`` after a 200 head (with its Content-Length, or delimited by the close)."""

    async def send(writer: asyncio.StreamWriter) -> None:
        head = (
            HEAD.replace(b"\r\n\r\n", f"\r\nContent-Length: {len(data)}\r\n\r\n".encode()) if length else HEAD
        )
        writer.write(head + data)
        await writer.drain()

    return send


def endless(chunk: bytes, count: int) -> Send:
    """A close-delimited body of ``count`` times ``chunk`` (at most), as fast as the client reads it."""

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for _ in range(count):
            writer.write(chunk)
            await writer.drain()

    return send


def service(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]},
    }


def names(update: SourceUpdate) -> set[str]:
    return {o.metadata.name for o in update.upserts if o.kind == "Service"}


@contextlib.asynccontextmanager
async def following(
    fake: HostileApi, bounds: Bounds | None
) -> AsyncIterator[AsyncGenerator[SourceUpdate, None]]:
    async with serving(fake) as (_, url):
        source = KubeSource("node-1", api_base_url=url, timing=FAST, bounds=bounds)
        async with contextlib.aclosing(source.updates()) as updates:
            yield updates


async def until(updates: AsyncIterator[SourceUpdate], name: str) -> None:
    """Updates until the one bringing Service ``name`` (5 s at most)."""
    async with asyncio.timeout(5):
        while name not in names(await anext(updates)):
            pass


def ours_failed(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Errors our code logged (a following task that died is one); the fake server's teardown (cancelled
    handler tasks, which asyncio reports) is not ours."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("balancing")]


def list_body(items: bytes = b"[]") -> bytes:
    return b'{"kind": "List", "metadata": {"resourceVersion": "1"}, "items": ' + items + b"}"


def event(obj: object, kind: str = "ADDED") -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


HOSTILE_LISTS = {
    "declared over the bound": (raw(list_body(b"[" + b" " * 70_000 + b"]")), SMALL, "ResponseTooLarge"),
    "streamed over the bound": (raw(b" " * 200_000, length=False), SMALL, "ResponseTooLarge"),
    "100 MB of it": (endless(b" " * 1024 * 1024, 100), None, "ResponseTooLarge"),
    "10k deep": (raw(DEEP), None, "JSONTooDeep"),
    "10k deep inside an item": (raw(list_body(b"[" + DEEP + b"]")), None, "JSONTooDeep"),
    "not JSON": (raw(b"<html>the proxy is sad</html>"), None, "JSONDecodeError"),
    "not UTF-8": (raw(b'{"items": ["\xff"]}'), None, "UnicodeDecodeError"),
    "a JSON array": (raw(b"[]"), None, "ValueError: list response has no items"),
    "items an object": (raw(b'{"items": {}}'), None, "ValueError: list response has no items"),
    "metadata a list": (raw(b'{"items": [], "metadata": []}'), None, "malformed metadata.resourceVersion"),
    "resourceVersion a number": (
        raw(b'{"items": [], "metadata": {"resourceVersion": 7}}'),
        None,
        "malformed metadata.resourceVersion",
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", HOSTILE_LISTS)
async def test_a_hostile_list_fails_that_request_and_the_next_list_brings_the_objects(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    send, bounds, error = HOSTILE_LISTS[case]
    fake = HostileApi()
    fake.put(SERVICES, service("web"))
    fake.hostile.append((SERVICES, False, send))
    with caplog.at_level(logging.WARNING):
        async with following(fake, bounds) as updates:
            await until(updates, "web")
            fake.put(SERVICES, service("later"))
            await until(updates, "later")
    failures = [r.getMessage() for r in caplog.records if f"listing {SERVICES} failed" in r.getMessage()]
    assert len(failures) == 1 and error in failures[0], caplog.text
    assert not ours_failed(caplog), caplog.text


HOSTILE_WATCHES = {
    "a line over the bound": (endless(b"x" * 4096, 100), SMALL, "ResponseTooLarge"),
    "a 100 MB line": (endless(b"x" * 1024 * 1024, 100), None, "ResponseTooLarge"),
    "10k deep": (raw(DEEP + b"\n", length=False), None, "JSONTooDeep"),
    "10k deep in an object": (
        raw(event({"metadata": {"name": "x"}}).replace(b'"x"', DEEP)),
        None,
        "JSONTooDeep",
    ),
    "not JSON": (raw(b"<html>\n", length=False), None, "JSONDecodeError"),
    "an event not an object": (raw(b"[]\n", length=False), None, "watch event is not an object"),
    "an object not an object": (raw(event("x"), length=False), None, "watch event has no object"),
    "an error event with a huge message": (
        raw(event({"code": 500, "message": "m" * 100_000}, "ERROR"), length=False),
        None,
        "watch error: mmm",
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", HOSTILE_WATCHES)
async def test_a_hostile_watch_fails_that_request_and_the_next_watch_brings_the_objects(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    send, bounds, error = HOSTILE_WATCHES[case]
    fake = HostileApi()
    fake.put(SERVICES, service("web"))
    fake.hostile.append((SERVICES, True, send))
    with caplog.at_level(logging.WARNING):
        async with following(fake, bounds) as updates:
            await until(updates, "web")
            fake.put(SERVICES, service("later"))
            await until(updates, "later")
    failures = [r.getMessage() for r in caplog.records if f"watching {SERVICES} failed" in r.getMessage()]
    assert len(failures) == 1 and error in failures[0], caplog.text
    assert all(len(r.getMessage()) < 1000 for r in caplog.records), "a log line carries the server's text"
    assert not ours_failed(caplog), caplog.text


@pytest.mark.asyncio
async def test_objects_of_the_wrong_shape_are_errors_of_their_own_not_of_the_watch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Metadata or a resourceVersion of the wrong type in one object: its error; the stream goes on."""
    fake = HostileApi()
    fake.put(SERVICES, service("web"))
    lines = (
        event({"metadata": []})
        + event({"metadata": {"name": "odd", "resourceVersion": 5}})
        + event({"metadata": {"name": {"x": 1}, "namespace": ["default"]}})
    )
    lines += event({**service("good"), "metadata": {**service("good")["metadata"], "resourceVersion": "900"}})
    fake.hostile.append((SERVICES, True, raw(lines, length=False)))
    with caplog.at_level(logging.WARNING):
        async with following(fake, None) as updates:
            await until(updates, "web")
            await until(updates, "good")
    assert not ours_failed(caplog), caplog.text


def test_bounded_json_depth() -> None:
    assert boundedjson.loads(b"[" * 64 + b"]" * 64) is not None
    with pytest.raises(boundedjson.JSONTooDeep):
        boundedjson.loads(b"[" * 65 + b"]" * 65)
    with pytest.raises(boundedjson.JSONTooDeep):
        boundedjson.loads(b"[" * 100_000)  # unbalanced: as deep as a decoder would get
    assert boundedjson.loads(b'["' + b"[" * 100 + b'"]') == ["[" * 100]  # brackets in strings do not count
    assert boundedjson.loads(b'["\\\\", "\\"[[", {"a": [1]}]', max_depth=3) == ["\\", '"[[', {"a": [1]}]
    with pytest.raises(ValueError):
        boundedjson.loads(b'"\xff"')
