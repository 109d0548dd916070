"""``gcpause``: the collector paused across nested and concurrent bulk work, and the long-lived heap frozen
after a full sync (young cycles freed first, survivors out of the collector's reach)."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

import pytest

from balancing import gcpause


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session keeps a normal collector


def test_paused_nests_across_threads_and_restores_the_collector() -> None:
    assert gc.isenabled()
    inner_done = threading.Event()
    with gcpause.paused():

        def other() -> None:
            with gcpause.paused():
                assert not gc.isenabled()
            inner_done.set()

        threading.Thread(target=other).start()
        assert inner_done.wait(5)
        assert not gc.isenabled()  # the other thread left; this block still holds it
    assert gc.isenabled()


def test_freeze_frees_young_cycles_and_keeps_survivors_out_of_collections(unfrozen: None) -> None:
    kept = Node()
    kept.other = Node()
    kept.other.other = kept  # a live cycle: survives, frozen
    garbage = Node()
    garbage.other = Node()
    garbage.other.other = garbage  # a dead cycle made by the work just done: freed, not frozen
    dead = weakref.ref(garbage)
    del garbage
    before = gc.get_freeze_count()
    gcpause.freeze_long_lived()
    assert dead() is None
    assert gc.get_freeze_count() > before
    assert not any(o is kept for o in gc.get_objects())  # no generation holds it: collections skip it
    assert kept.other.other is kept
