"""Frontend id → owner: who each service id the writer programmed stands for, for metrics and events.

The datapath names a frontend only by its service id (``svc_id``: in the counter keys, in every resolution
event); the ids are the writer's (``writer.MapWriter.svc_id``, recovered from the maps across restarts).
``OwnerIndex`` follows them: the agent calls ``replace`` after each full sync and ``apply`` after each
partial one, and the readers (``metrics.collector`` at each scrape, ``events.pipeline`` for each record)
call the index with an id. Both readers see ids of frontends just removed (counts not yet scraped, events
still in the ring, UDP replies of sockets still open), so a removed id keeps its owner for ``linger``
seconds. ``synced`` says that a full sync has filled the index: before it an unknown id means nothing
(the metrics collector then holds counts back), after it an unknown id is really unowned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from balancing.model.desired import Frontend, FrontendChanges, FrontendKey, Owner

__all__ = ["LINGER", "OwnerIndex", "OwnerLookup"]

OwnerLookup = Callable[[int], Owner | None]  # frontend id (svc_id) → its owner; None: unknown
SvcId = Callable[[FrontendKey], int | None]  # the writer's id of a frontend (``MapWriter.svc_id``)
LINGER = 300.0  # seconds a removed id keeps its owner


class OwnerIndex:
    """Frontend id → owner of what the writer programmed; the agent refreshes it after each write. The
    owner of a removed id is still given for ``linger`` seconds. ``synced``: a full sync has filled it.

    Scrapes call it from the metrics server's threads, the events pipeline from the event loop: lookups are
    single dict reads, and ``replace`` swaps whole dicts, so a reader sees the old or the new state, never a
    half-built one.
    """

    def __init__(self, *, linger: float = LINGER, clock: Callable[[], float] = time.monotonic) -> None:
        self.linger = linger
        self._clock = clock
        self._ids: dict[FrontendKey, int] = {}
        self._owners: dict[int, Owner] = {}
        self._retired: dict[int, tuple[Owner, float]] = {}  # removed id → (owner, when removed)
        self.synced = False

    def __call__(self, svc_id: int) -> Owner | None:
        owner = self._owners.get(svc_id)
        if owner is not None:
            return owner
        retired = self._retired.get(svc_id)
        return retired[0] if retired is not None and self._clock() - retired[1] < self.linger else None

    def __len__(self) -> int:
        return len(self._owners)

    def replace(self, frontends: Mapping[FrontendKey, Frontend], svc_id: SvcId) -> None:
        """After a full sync: exactly these frontends (``svc_id``: the writer's ``MapWriter.svc_id``)."""
        ids = {k: i for k in frontends if (i := svc_id(k)) is not None}
        owners = {i: frontends[k].owner for k, i in ids.items()}
        self._retire({i: o for i, o in self._owners.items() if i not in owners})
        self._ids, self._owners = ids, owners
        self.synced = True

    def apply(self, changes: FrontendChanges, svc_id: SvcId) -> None:
        """After a partial sync: set the upserted frontends, forget the removed ones."""
        gone: dict[int, Owner] = {}
        for key in changes.remove - changes.upsert.keys():
            old = self._ids.pop(key, None)
            if old is not None and (owner := self._owners.pop(old, None)) is not None:
                gone[old] = owner
        self._retire(gone)
        for key, frontend in changes.upsert.items():
            i = svc_id(key)
            if i is not None:
                self._ids[key] = i
                self._owners[i] = frontend.owner

    def _retire(self, gone: Mapping[int, Owner]) -> None:
        now = self._clock()
        kept = {i: r for i, r in self._retired.items() if now - r[1] < self.linger}
        self._retired = {**kept, **{i: (owner, now) for i, owner in gone.items()}}
