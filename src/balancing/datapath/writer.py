"""Program a desired state into the maps: diff against what is programmed, apply make-before-break.

For every changed frontend the writer keeps backends that stay in their slots, fills freed slots with new
backends and compacts the tail, so one endpoint change costs a few element writes. Operations run in
dependency order across the whole change: new backends, then slots, then master entries (the count), then
stale masters, stale slots and unused backends. A connect that reads the maps at any instant in between
resolves to a backend that was valid before or after the change. Backend and frontend ids are recovered from
the maps on start and allocated monotonically, so an id is never reused under a concurrent reader.
Neighbours: ``maps`` (I/O), ``programmed`` (reading state), ``abi`` (encoding).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from balancing.datapath import abi
from balancing.datapath.maps import MapIO
from balancing.datapath.programmed import BackendRef, ProgrammedFrontend, backend_of, read_state
from balancing.model.desired import Backend, DesiredState, Frontend, FrontendChanges, FrontendKey

log = logging.getLogger(__name__)
Ref = TypeVar("Ref", bound=Hashable)


@dataclass
class WriteStats:
    ops: int = 0
    frontends_written: int = 0
    frontends_removed: int = 0


@dataclass
class _Plan:
    backends: list[tuple[bytes, bytes]] = field(default_factory=list)
    slots: list[tuple[bytes, bytes]] = field(default_factory=list)
    masters: list[tuple[bytes, bytes]] = field(default_factory=list)
    stale_masters: list[bytes] = field(default_factory=list)
    stale_slots: list[bytes] = field(default_factory=list)
    stale_backends: list[bytes] = field(default_factory=list)
    matches: list[tuple[bytes, bytes]] = field(default_factory=list)
    stale_matches: list[bytes] = field(default_factory=list)
    released: set[BackendRef] = field(default_factory=set)


def assign_slots(old: Sequence[Ref | None], new: Sequence[Ref]) -> list[Ref]:
    """New slot order: survivors keep their slots, additions fill holes, the tail compacts into holes."""
    wanted = set(new)
    slots: list[Ref | None] = [r if r in wanted else None for r in old]
    kept = {r for r in slots if r is not None}
    additions = iter(r for r in new if r not in kept)
    for i, ref in enumerate(slots):
        if ref is None:
            slots[i] = next(additions, None)
    slots.extend(additions)
    head, tail = slots[: len(wanted)], [r for r in slots[len(wanted) :] if r is not None]
    for i, ref in enumerate(head):
        if ref is None:
            head[i] = tail.pop()
    return [r for r in head if r is not None]


class MapWriter:
    """Owns the service and backend maps of one agent."""

    def __init__(self, io: MapIO) -> None:
        self.io = io
        self.recover()

    def recover(self) -> None:
        """(Re)read the maps; called on start and after a failed write, so state is always the kernel's."""
        state = read_state(self.io)
        self._frontends: dict[FrontendKey, ProgrammedFrontend] = state.frontends
        self._backend_ids: dict[BackendRef, int] = state.backend_ids
        self._refs: Counter[BackendRef] = Counter(
            r for f in state.frontends.values() for r in f.slots if r is not None
        )
        self._garbage_slots, self._garbage_backends = state.garbage_slots, state.garbage_backends
        self._garbage_matches = state.garbage_matches
        self._next_svc_id = state.max_svc_id + 1
        self._next_backend_id = state.max_backend_id + 1
        # The backend tuples last programmed per frontend: an identical tuple (usually the very same object
        # from the model's cache) is skipped without re-encoding its backends.
        self._applied: dict[FrontendKey, tuple[object, ...]] = {}

    def programmed(self) -> dict[FrontendKey, tuple[Backend | None, ...]]:
        return {k: tuple(backend_of(r) if r else None for r in f.slots) for k, f in self._frontends.items()}

    def svc_id(self, key: FrontendKey) -> int | None:
        f = self._frontends.get(key)
        return f.svc_id if f else None

    def sync(self, desired: DesiredState) -> WriteStats:
        """Converge the maps to exactly ``desired`` (a full reconcile; no-op entries cost nothing)."""
        stale = frozenset(k for k in self._frontends if k not in desired.frontends)
        return self.apply(FrontendChanges(upsert=desired.frontends, remove=stale))

    def apply(self, changes: FrontendChanges) -> WriteStats:
        plan, stats = _Plan(), WriteStats()
        for key, frontend in changes.upsert.items():
            if self._plan_upsert(plan, key, frontend):
                stats.frontends_written += 1
        for key in changes.remove:
            if key not in changes.upsert and self._plan_remove(plan, key):
                stats.frontends_removed += 1
        self._plan_release(plan)
        stats.ops = self._execute(plan)
        return stats

    def _backend_id(self, plan: _Plan, ref: BackendRef) -> int:
        backend_id = self._backend_ids.get(ref)
        if backend_id is None:
            backend_id = self._next_backend_id
            self._next_backend_id += 1
            self._backend_ids[ref] = backend_id
            plan.backends.append((abi.pack_backend_id(backend_id), ref))
        return backend_id

    def _plan_upsert(self, plan: _Plan, key: FrontendKey, frontend: Frontend) -> bool:
        old = self._frontends.get(key)
        wanted = frontend.programmed_as()
        if old is not None and self._applied.get(key) == wanted:
            return False
        self._applied[key] = wanted
        new = [abi.pack_backend(b.ip, b.port, key.protocol) for b in frontend.backends]
        timeout = frontend.affinity_timeout
        if old is None:
            old = ProgrammedFrontend(self._next_svc_id, [], -1)  # -1: no master written yet
            self._next_svc_id += 1
            self._frontends[key] = old
        elif None not in old.slots and set(old.slots) == set(new) and old.affinity_timeout == timeout:
            return False
        old_slots = old.slots
        slots = assign_slots(old_slots, new)
        pack_key = abi.SvcKeyPacker(key.ip, key.port, key.protocol)
        for i, ref in enumerate(slots):
            if i >= len(old_slots) or old_slots[i] != ref:
                plan.slots.append((pack_key(i + 1), abi.pack_slot(self._backend_id(plan, ref))))
        self._plan_matches(plan, old, [self._backend_id(plan, r) for r in slots] if timeout else [])
        if len(slots) != len(old_slots) or not slots or old.affinity_timeout != timeout:
            plan.masters.append((pack_key(abi.MASTER_SLOT), abi.master_val(old.svc_id, len(slots), timeout)))
            old.affinity_timeout = timeout
        for slot in range(len(slots) + 1, len(old_slots) + 1):
            plan.stale_slots.append(pack_key(slot))
        self._retarget(plan, old, slots)
        return True

    def _plan_matches(self, plan: _Plan, frontend: ProgrammedFrontend, backend_ids: list[int]) -> None:
        """Affinity match entries: new ones go in before the master, stale ones after the slots."""
        wanted = set(backend_ids)
        for backend_id in wanted - frontend.affinity_matches:
            plan.matches.append((abi.pack_affinity_match(frontend.svc_id, backend_id), abi.AFF_MATCH_VALUE))
        for backend_id in frontend.affinity_matches - wanted:
            plan.stale_matches.append(abi.pack_affinity_match(frontend.svc_id, backend_id))
        frontend.affinity_matches = wanted

    def _plan_remove(self, plan: _Plan, key: FrontendKey) -> bool:
        old = self._frontends.pop(key, None)
        self._applied.pop(key, None)
        if old is None:
            return False
        pack_key = abi.SvcKeyPacker(key.ip, key.port, key.protocol)
        plan.stale_masters.append(pack_key(abi.MASTER_SLOT))
        for slot in range(1, len(old.slots) + 1):
            plan.stale_slots.append(pack_key(slot))
        self._plan_matches(plan, old, [])
        self._retarget(plan, old, [])
        return True

    def _retarget(self, plan: _Plan, frontend: ProgrammedFrontend, slots: list[BackendRef]) -> None:
        for ref in frontend.slots:
            if ref is not None:
                self._refs[ref] -= 1
                plan.released.add(ref)
        for ref in slots:
            self._refs[ref] += 1
        frontend.slots = list(slots)

    def _plan_release(self, plan: _Plan) -> None:
        for ref in plan.released:
            if self._refs[ref] <= 0:
                del self._refs[ref]
                backend_id = self._backend_ids.pop(ref, None)
                if backend_id is not None:
                    plan.stale_backends.append(abi.pack_backend_id(backend_id))
        rewritten = {key for key, _ in plan.slots}  # a garbage key the plan writes again is live, not garbage
        plan.stale_slots.extend(k for k in self._garbage_slots if k not in rewritten)
        plan.stale_backends.extend(self._garbage_backends)  # new backend ids never collide: they are fresh
        plan.stale_matches.extend(self._garbage_matches)  # svc ids are fresh too
        self._garbage_slots, self._garbage_backends, self._garbage_matches = [], [], []

    def _execute(self, plan: _Plan) -> int:
        steps: list[tuple[str, str, list[bytes] | list[tuple[bytes, bytes]]]] = [
            ("update", abi.MAP_BACKENDS, plan.backends),
            ("update", abi.MAP_AFFINITY_MATCH, plan.matches),
            ("update", abi.MAP_SERVICES, plan.slots),
            ("update", abi.MAP_SERVICES, plan.masters),
            ("delete", abi.MAP_SERVICES, plan.stale_masters),
            ("delete", abi.MAP_SERVICES, plan.stale_slots),
            ("delete", abi.MAP_AFFINITY_MATCH, plan.stale_matches),
            ("delete", abi.MAP_BACKENDS, plan.stale_backends),
        ]
        ops = 0
        try:
            for op, name, items in steps:
                if not items:
                    continue
                if op == "update":
                    self.io.update(name, items)  # type: ignore[arg-type]
                else:
                    self.io.delete(name, items)  # type: ignore[arg-type]
                ops += len(items)
        except Exception:
            log.warning("map write failed after %d operations; re-reading the maps", ops)
            self.recover()
            raise
        return ops
