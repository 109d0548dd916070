"""watch_manifests: file changes reach the caller within a second, and the directory may come and go.

Parsing happens off the event loop (the directory is read and parsed in a worker thread, and the loop keeps
ticking meanwhile), and no file's content ends the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from balancing.model.objects import KubeObject, ObjectRef, Service, ref
from balancing.sources.manifests import ManifestDirectory
from balancing.sources.update import SourceUpdate
from balancing.sources.watch import load, watch_manifests

WITHIN_S = 1.0
WEB = ("Service", "default", "web")
API = ("Service", "default", "api")


def service(name: str, port: int = 80) -> str:
    return f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports:\n  - port: {port}\n"


def port(state: dict[ObjectRef, KubeObject], key: ObjectRef) -> int | None:
    obj = state.get(key)
    return obj.spec.ports[0].port if isinstance(obj, Service) else None


class Follower:
    """Applies the stream's updates to a state and waits (at most WITHIN_S) for a condition on it."""

    def __init__(self, directory: ManifestDirectory, stream: AsyncIterator[SourceUpdate]) -> None:
        self.stream = stream
        self.state = {ref(obj): obj for obj in directory.load().upserts}
        self.updates: list[SourceUpdate] = []

    async def until(
        self, condition: Callable[[dict[ObjectRef, KubeObject]], bool], within: float = WITHIN_S
    ) -> None:
        async def follow() -> None:
            while not condition(self.state):
                update = await anext(self.stream)
                self.updates.append(update)
                for obj in update.upserts:
                    self.state[ref(obj)] = obj
                for key in update.deletes:
                    del self.state[key]

        await asyncio.wait_for(follow(), within)


def run(root: Path, scenario: Callable[[Follower], object]) -> None:
    async def main() -> None:
        directory = ManifestDirectory(root)
        stream = watch_manifests(directory)
        async with aclosing(stream):  # type: ignore[type-var]
            follower = Follower(directory, stream)
            await scenario(follower)  # type: ignore[misc]

    asyncio.run(main())


def test_add_edit_remove(tmp_path: Path) -> None:
    async def scenario(f: Follower) -> None:
        (tmp_path / "web.yaml").write_text(service("web"))
        await f.until(lambda s: port(s, WEB) == 80)
        (tmp_path / "web.yaml").write_text(service("web", 81))
        await f.until(lambda s: port(s, WEB) == 81)
        (tmp_path / "web.yaml").unlink()
        await f.until(lambda s: WEB not in s)

    run(tmp_path, scenario)


def test_rename_over_and_rename_away(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(service("web"))

    async def scenario(f: Follower) -> None:
        assert port(f.state, WEB) == 80
        temp = tmp_path / ".web.yaml.tmp"  # how editors and config tools write atomically
        temp.write_text(service("web", 82))
        os.replace(temp, tmp_path / "web.yaml")
        await f.until(lambda s: port(s, WEB) == 82)
        os.rename(tmp_path / "web.yaml", tmp_path / "web.yaml.bak")
        await f.until(lambda s: WEB not in s)
        os.rename(tmp_path / "web.yaml.bak", tmp_path / "api.yaml")  # a name it reads again
        (tmp_path / "api.yaml").write_text(service("api"))
        await f.until(lambda s: API in s)

    run(tmp_path, scenario)


def test_errors_are_yielded_and_last_good_state_kept(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(service("web"))

    async def scenario(f: Follower) -> None:
        (tmp_path / "web.yaml").write_text(service("web", 70000))
        await f.until(lambda s: any(u.errors for u in f.updates))
        assert port(f.state, WEB) == 80
        (tmp_path / "web.yaml").write_text(service("web", 83))
        await f.until(lambda s: port(s, WEB) == 83)

    run(tmp_path, scenario)


def test_directory_replaced(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "web.yaml").write_text(service("web"))

    async def scenario(f: Follower) -> None:
        new = tmp_path / "new"
        new.mkdir()
        (new / "api.yaml").write_text(service("api"))
        shutil.rmtree(root)
        new.rename(root)
        await f.until(lambda s: API in s and WEB not in s)
        (root / "web.yaml").write_text(service("web", 84))  # the new directory is watched
        await f.until(lambda s: port(s, WEB) == 84)

    run(root, scenario)


def test_directory_briefly_missing_keeps_objects(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "web.yaml").write_text(service("web"))

    async def scenario(f: Follower) -> None:
        shutil.rmtree(root)
        await asyncio.sleep(0.4)
        root.mkdir()
        (root / "web.yaml").write_text(service("web"))
        (root / "api.yaml").write_text(service("api"))
        await f.until(lambda s: API in s)
        assert all(WEB not in u.deletes for u in f.updates)
        (root / "api.yaml").unlink()
        await f.until(lambda s: API not in s)

    run(root, scenario)


def test_hostile_file_does_not_end_the_watch(tmp_path: Path) -> None:
    async def scenario(f: Follower) -> None:
        (tmp_path / "deep.yaml").write_text("[" * 3000)
        (tmp_path / "int.yaml").write_text(service("x").replace("port: 80", "port: " + "9" * 5000))
        await f.until(lambda s: sum(len(u.errors) for u in f.updates) == 2)
        (tmp_path / "web.yaml").write_text(service("web"))
        await f.until(lambda s: port(s, WEB) == 80)

    run(tmp_path, scenario)


SERVICES = 4000  # about a second of parsing and validation


def large_manifest(services: int) -> str:
    return "---\n".join(
        service(f"s{i}").replace("spec:\n", f"spec:\n  clusterIP: 10.96.{i // 250}.{i % 250 + 1}\n")
        for i in range(services)
    )


class Ticker:
    """Counts the event loop's 10 ms ticks: each one ran while the loop was free."""

    def __init__(self) -> None:
        self.ticks = 0
        self.task = asyncio.create_task(self._run())

    async def start(self) -> Ticker:
        await asyncio.sleep(0.02)  # the first tick has run
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    async def stop(self) -> int:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.ticks


def record_parsing_threads(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The threads ``ManifestDirectory.load`` and ``rescan`` (where files are read and parsed) run in."""
    seen: list[threading.Thread] = []
    for name in ("load", "rescan"):
        original = getattr(ManifestDirectory, name)

        def wrapper(self: ManifestDirectory, *args: Any, _original: Any = original) -> Any:
            seen.append(threading.current_thread())
            return _original(self, *args)

        monkeypatch.setattr(ManifestDirectory, name, wrapper)
    return seen


def test_large_file_parses_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = large_manifest(SERVICES)
    threads = record_parsing_threads(monkeypatch)

    async def scenario(f: Follower) -> None:
        (tmp_path / "web.yaml").write_text(service("web"))
        await f.until(lambda s: WEB in s)  # the watch is in place
        ticker = await Ticker().start()
        before = ticker.ticks
        threads.clear()  # the harness's own initial load ran in this thread: only the watch's reads count
        (tmp_path / "big.yaml").write_text(text)
        await f.until(lambda s: len(s) == SERVICES + 1, within=60)
        ticks = await ticker.stop() - before
        assert threads and threading.main_thread() not in threads  # the loop's thread parsed nothing
        assert ticks >= 2, "the loop never ran while the file was parsed"

    run(tmp_path, scenario)


def test_load_runs_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.yaml").write_text(large_manifest(SERVICES))
    threads = record_parsing_threads(monkeypatch)

    async def main() -> None:
        ticker = await Ticker().start()
        before = ticker.ticks
        update = await load(ManifestDirectory(tmp_path))
        ticks = await ticker.stop() - before
        assert len(update.upserts) == SERVICES
        assert threads and threading.main_thread() not in threads  # the loop's thread parsed nothing
        assert ticks >= 2, "the loop never ran while the file was parsed"

    asyncio.run(main())
