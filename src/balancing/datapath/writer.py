"""Program a desired state into the maps: diff against what is programmed, apply make-before-break.

For every changed frontend tier the writer keeps backends that stay in their slots, fills freed slots with new
backends and compacts the tail, so one endpoint change costs a few element writes. One plan per change runs
in dependency order (``_PHASES``): everything a master entry will point at (backends, affinity matches,
client rules, QoS entries, slots, the fallback tier) is written before the master; what it no longer
points at is deleted after it. A connect that reads the maps at any instant in between resolves to a backend
that was valid before or after the change. Backend and frontend ids are recovered from the maps on start and
allocated monotonically, so an id is never reused under a concurrent reader.
Neighbours: ``maps`` (I/O), ``programmed`` (reading state), ``abi`` (encoding). Pod cgroup ids for policy
client rules come from a resolver the agent passes in.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from balancing.datapath import abi
from balancing.datapath.maps import MapIO
from balancing.datapath.programmed import BackendRef, ProgrammedFrontend, Tier, backend_of, read_state
from balancing.model.desired import (
    Backend,
    DesiredState,
    Frontend,
    FrontendChanges,
    FrontendKey,
    PodRef,
    Protocol,
)

log = logging.getLogger(__name__)
Ref = TypeVar("Ref", bound=Hashable)
PodCgroups = Callable[[PodRef], Sequence[int]]

# (plan attribute, operation, map), in execution order.
_PHASES = (
    ("backends", "update", abi.MAP_BACKENDS),
    ("matches", "update", abi.MAP_AFFINITY_MATCH),
    ("clients", "update", abi.MAP_CLIENTS),
    ("qos", "update", abi.MAP_QOS),
    ("slots", "update", abi.MAP_SERVICES),
    ("fallback_masters", "update", abi.MAP_SERVICES),
    ("masters", "update", abi.MAP_SERVICES),
    ("stale_masters", "delete", abi.MAP_SERVICES),
    ("stale_fallback_masters", "delete", abi.MAP_SERVICES),
    ("stale_slots", "delete", abi.MAP_SERVICES),
    ("stale_clients", "delete", abi.MAP_CLIENTS),
    ("stale_qos", "delete", abi.MAP_QOS),
    ("stale_matches", "delete", abi.MAP_AFFINITY_MATCH),
    ("stale_backends", "delete", abi.MAP_BACKENDS),
)
_GARBAGE_PHASE = {
    abi.MAP_SERVICES: "stale_slots",
    abi.MAP_BACKENDS: "stale_backends",
    abi.MAP_AFFINITY_MATCH: "stale_matches",
    abi.MAP_CLIENTS: "stale_clients",
    abi.MAP_QOS: "stale_qos",
}


@dataclass
class WriteStats:
    ops: int = 0
    frontends_written: int = 0
    frontends_removed: int = 0
    # UDP frontends that lost backends in this write (removed frontends: all of theirs), with those backends.
    # A connected UDP socket keeps the backend it was given at connect(): sockterm.SocketTerminator destroys
    # the ones these pairs name. A backend still in the frontend's other tier is not in the set.
    udp_backends_removed: dict[FrontendKey, frozenset[Backend]] = field(default_factory=dict)


@dataclass
class _Plan:
    backends: list[tuple[bytes, bytes]] = field(default_factory=list)
    matches: list[tuple[bytes, bytes]] = field(default_factory=list)
    clients: list[tuple[bytes, bytes]] = field(default_factory=list)
    qos: list[tuple[bytes, bytes]] = field(default_factory=list)
    slots: list[tuple[bytes, bytes]] = field(default_factory=list)
    fallback_masters: list[tuple[bytes, bytes]] = field(default_factory=list)
    masters: list[tuple[bytes, bytes]] = field(default_factory=list)
    stale_masters: list[bytes] = field(default_factory=list)
    stale_fallback_masters: list[bytes] = field(default_factory=list)
    stale_slots: list[bytes] = field(default_factory=list)
    stale_clients: list[bytes] = field(default_factory=list)
    stale_qos: list[bytes] = field(default_factory=list)
    stale_matches: list[bytes] = field(default_factory=list)
    stale_backends: list[bytes] = field(default_factory=list)
    released: set[BackendRef] = field(default_factory=set)

    def size(self) -> int:
        return sum(len(getattr(self, name)) for name, _, _ in _PHASES)

    def written_keys(self, map_name: str) -> set[bytes]:
        return {
            k for name, op, m in _PHASES if op == "update" and m == map_name for k, _ in getattr(self, name)
        }


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


def _no_cgroups(_pod: PodRef) -> Sequence[int]:
    return ()


class MapWriter:
    """Owns the programmed maps of one agent (service, backend, affinity-match, client and QoS maps)."""

    def __init__(self, io: MapIO, pod_cgroups: PodCgroups = _no_cgroups) -> None:
        self.io = io
        self.pod_cgroups = pod_cgroups
        self.recover()

    def recover(self) -> None:
        """(Re)read the maps; called on start and after a failed write, so state is always the kernel's."""
        state = read_state(self.io)
        self._frontends: dict[FrontendKey, ProgrammedFrontend] = state.frontends
        self._backend_ids: dict[BackendRef, int] = state.backend_ids
        self._refs: Counter[BackendRef] = Counter(
            r
            for f in state.frontends.values()
            for t in (f.primary, f.fallback)
            if t is not None
            for r in t.slots
            if r is not None
        )
        self._garbage = state.garbage
        self._next_svc_id = state.max_svc_id + 1
        self._next_backend_id = state.max_backend_id + 1
        # The Frontend last programmed per key: the very same object (the model caches them) or an equal
        # programmed_as() is skipped without re-encoding anything.
        self._applied: dict[FrontendKey, Frontend] = {}

    # --- reading -----------------------------------------------------------------------------------------

    def programmed(self) -> dict[FrontendKey, tuple[Backend | None, ...]]:
        return {k: tuple(backend_of(r) if r else None for r in f.slots) for k, f in self._frontends.items()}

    def programmed_fallback(self) -> dict[FrontendKey, tuple[Backend | None, ...]]:
        return {
            k: tuple(backend_of(r) if r else None for r in f.fallback.slots)
            for k, f in self._frontends.items()
            if f.fallback is not None
        }

    def svc_id(self, key: FrontendKey) -> int | None:
        f = self._frontends.get(key)
        return f.svc_id if f else None

    # --- writing -----------------------------------------------------------------------------------------

    def sync(self, desired: DesiredState) -> WriteStats:
        """Converge the maps to exactly ``desired`` (a full reconcile; no-op entries cost nothing)."""
        stale = frozenset(k for k in self._frontends if k not in desired.frontends)
        return self.apply(FrontendChanges(upsert=desired.frontends, remove=stale))

    def apply(self, changes: FrontendChanges) -> WriteStats:
        plan, stats = _Plan(), WriteStats()
        udp_before = self._udp_backends(changes)
        for key, frontend in changes.upsert.items():
            if self._plan_upsert(plan, key, frontend):
                stats.frontends_written += 1
        for key in changes.remove:
            if key not in changes.upsert and self._plan_remove(plan, key):
                stats.frontends_removed += 1
        stats.ops = self._execute(plan)
        stats.udp_backends_removed = self._udp_backends_removed(udp_before)
        return stats

    def refresh_clients(self) -> WriteStats:
        """Re-resolve the cgroups of policy backend pods (containers come and go) and rewrite client rules."""
        plan, stats = _Plan(), WriteStats()
        for key, frontend in self._applied.items():
            programmed = self._frontends[key]
            if frontend.backend_pods or programmed.clients:
                before = plan.size()
                self._plan_clients(plan, key, programmed, frontend)
                self._plan_master(plan, key, programmed, frontend)
                stats.frontends_written += plan.size() > before
        stats.ops = self._execute(plan)
        return stats

    def _plan_upsert(self, plan: _Plan, key: FrontendKey, frontend: Frontend) -> bool:
        old = self._frontends.get(key)
        prev = self._applied.get(key)
        if (
            old is not None
            and prev is not None
            and (prev is frontend or prev.programmed_as() == frontend.programmed_as())
        ):
            return False
        self._applied[key] = frontend
        if old is None:
            old = ProgrammedFrontend(self._next_svc_id, Tier(b"", []))
            self._next_svc_id += 1
            self._frontends[key] = old
        before = plan.size()
        proto = key.protocol
        primary = [abi.pack_backend(b.ip, b.port, proto) for b in frontend.backends]
        self._plan_tier(plan, abi.SvcKeyPacker(key.ip, key.port, proto), old.primary, primary)
        self._plan_fallback(plan, key, old, frontend)
        ids = [self._backend_ids[r] for r in old.primary.slots if r is not None]
        self._plan_matches(plan, old, ids if frontend.affinity_timeout else [])
        self._plan_clients(plan, key, old, frontend)
        self._plan_qos(plan, old, frontend.qos_limit)
        self._plan_master(plan, key, old, frontend)
        return plan.size() > before

    def _plan_tier(self, plan: _Plan, pack_key: abi.SvcKeyPacker, tier: Tier, refs: list[BackendRef]) -> None:
        if None not in tier.slots and len(tier.slots) == len(refs) and set(tier.slots) == set(refs):
            return
        slots = assign_slots(tier.slots, refs)
        for i, ref in enumerate(slots):
            if i >= len(tier.slots) or tier.slots[i] != ref:
                plan.slots.append((pack_key(i + 1), abi.pack_slot(self._backend_id(plan, ref))))
        for slot in range(len(slots) + 1, len(tier.slots) + 1):
            plan.stale_slots.append(pack_key(slot))
        self._retarget(plan, tier, slots)

    def _plan_fallback(
        self, plan: _Plan, key: FrontendKey, old: ProgrammedFrontend, frontend: Frontend
    ) -> None:
        pack_key = abi.SvcKeyPacker(key.ip, key.port, key.protocol, abi.SCOPE_FALLBACK)
        if frontend.fallback is None:
            if old.fallback is not None:
                plan.stale_fallback_masters.append(pack_key(abi.MASTER_SLOT))
                plan.stale_slots.extend(pack_key(s) for s in range(1, len(old.fallback.slots) + 1))
                self._retarget(plan, old.fallback, [])
                old.fallback = None
            return
        if old.fallback is None:
            old.fallback = Tier(b"", [])
        refs = [abi.pack_backend(b.ip, b.port, key.protocol) for b in frontend.fallback]
        self._plan_tier(plan, pack_key, old.fallback, refs)
        master = abi.master_val(old.svc_id, len(old.fallback.slots), 0, 0)
        if master != old.fallback.master:
            plan.fallback_masters.append((pack_key(abi.MASTER_SLOT), master))
            old.fallback.master = master

    def _plan_master(
        self, plan: _Plan, key: FrontendKey, old: ProgrammedFrontend, frontend: Frontend
    ) -> None:
        timeout = frontend.affinity_timeout
        flags = (
            (abi.SVC_F_AFFINITY if timeout else 0)
            | (abi.SVC_F_FALLBACK if old.fallback is not None else 0)
            | (abi.SVC_F_CLIENTS if old.clients else 0)
            | (abi.SVC_F_QOS if old.qos is not None else 0)
            | (abi.SVC_F_HOST_ONLY if frontend.host_only else 0)
        )
        master = abi.master_val(old.svc_id, len(old.primary.slots), flags, timeout)
        if master != old.primary.master:
            plan.masters.append((abi.SvcKeyPacker(key.ip, key.port, key.protocol)(abi.MASTER_SLOT), master))
            old.primary.master = master

    def _plan_matches(self, plan: _Plan, frontend: ProgrammedFrontend, backend_ids: list[int]) -> None:
        """Affinity match entries: new ones go in before the master, stale ones after the slots."""
        wanted = set(backend_ids)
        for backend_id in wanted - frontend.affinity_matches:
            plan.matches.append((abi.pack_affinity_match(frontend.svc_id, backend_id), abi.AFF_MATCH_VALUE))
        for backend_id in frontend.affinity_matches - wanted:
            plan.stale_matches.append(abi.pack_affinity_match(frontend.svc_id, backend_id))
        frontend.affinity_matches = wanted

    def _plan_clients(
        self, plan: _Plan, key: FrontendKey, old: ProgrammedFrontend, frontend: Frontend
    ) -> None:
        """Client rules for the backend pods: skip the primary tier, or never pick their own backend."""
        skip = frontend.skip_redirect_from_backends
        wanted: dict[int, bytes] = {}
        for bp in frontend.backend_pods:
            backend_id = self._backend_ids.get(abi.pack_backend(bp.backend.ip, bp.backend.port, key.protocol))
            if backend_id is None:
                continue  # not (or no longer) a primary backend
            rule = abi.pack_client_val(0 if skip else backend_id, abi.CLIENT_F_SKIP if skip else 0)
            for cgroup_id in self.pod_cgroups(bp.pod):
                wanted[cgroup_id] = rule
        for cgroup_id, rule in wanted.items():
            if old.clients.get(cgroup_id) != rule:
                plan.clients.append((abi.pack_client_key(old.svc_id, cgroup_id), rule))
        for cgroup_id in old.clients.keys() - wanted.keys():
            plan.stale_clients.append(abi.pack_client_key(old.svc_id, cgroup_id))
        old.clients = wanted

    def _plan_qos(self, plan: _Plan, old: ProgrammedFrontend, limit: int) -> None:
        want = abi.pack_qos_val(limit) if limit else None
        if want == old.qos:
            return
        if want is not None:
            plan.qos.append((abi.pack_qos_key(old.svc_id), want))
        else:
            plan.stale_qos.append(abi.pack_qos_key(old.svc_id))
        old.qos = want

    def _plan_remove(self, plan: _Plan, key: FrontendKey) -> bool:
        old = self._frontends.pop(key, None)
        self._applied.pop(key, None)
        if old is None:
            return False
        pack_key = abi.SvcKeyPacker(key.ip, key.port, key.protocol)
        plan.stale_masters.append(pack_key(abi.MASTER_SLOT))
        plan.stale_slots.extend(pack_key(s) for s in range(1, len(old.primary.slots) + 1))
        if old.fallback is not None:
            pack_fb = abi.SvcKeyPacker(key.ip, key.port, key.protocol, abi.SCOPE_FALLBACK)
            plan.stale_fallback_masters.append(pack_fb(abi.MASTER_SLOT))
            plan.stale_slots.extend(pack_fb(s) for s in range(1, len(old.fallback.slots) + 1))
            self._retarget(plan, old.fallback, [])
        self._plan_matches(plan, old, [])
        plan.stale_clients.extend(abi.pack_client_key(old.svc_id, cg) for cg in old.clients)
        if old.qos is not None:
            plan.stale_qos.append(abi.pack_qos_key(old.svc_id))
        self._retarget(plan, old.primary, [])
        return True

    def _backend_id(self, plan: _Plan, ref: BackendRef) -> int:
        backend_id = self._backend_ids.get(ref)
        if backend_id is None:
            backend_id = self._next_backend_id
            self._next_backend_id += 1
            self._backend_ids[ref] = backend_id
            plan.backends.append((abi.pack_backend_id(backend_id), ref))
        return backend_id

    def _retarget(self, plan: _Plan, tier: Tier, slots: list[BackendRef]) -> None:
        for ref in tier.slots:
            if ref is not None:
                self._refs[ref] -= 1
                plan.released.add(ref)
        for ref in slots:
            self._refs[ref] += 1
        tier.slots = list(slots)

    def _plan_release(self, plan: _Plan) -> None:
        for ref in plan.released:
            if self._refs[ref] <= 0:
                del self._refs[ref]
                backend_id = self._backend_ids.pop(ref, None)
                if backend_id is not None:
                    plan.stale_backends.append(abi.pack_backend_id(backend_id))
        for map_name, keys in self._garbage.items():
            rewritten = plan.written_keys(map_name)  # a garbage key the plan writes again is live again
            getattr(plan, _GARBAGE_PHASE[map_name]).extend(k for k in keys if k not in rewritten)
        self._garbage = {}

    def _execute(self, plan: _Plan) -> int:
        self._plan_release(plan)
        ops = 0
        try:
            for name, op, map_name in _PHASES:
                items = getattr(plan, name)
                if not items:
                    continue
                if op == "update":
                    self.io.update(map_name, items)
                else:
                    self.io.delete(map_name, items)
                ops += len(items)
        except Exception:
            log.warning("map write failed after %d operations; re-reading the maps", ops)
            self.recover()
            raise
        return ops

    # --- removed UDP backends (for socket termination) ---------------------------------------------------

    def _udp_backends(self, changes: FrontendChanges) -> dict[FrontendKey, set[BackendRef]]:
        """The programmed backends (both tiers) of the UDP frontends this change may touch: not those whose
        Frontend is the very object last applied (the cheap no-op of a full sync)."""
        out: dict[FrontendKey, set[BackendRef]] = {}
        for key in itertools.chain(changes.upsert, changes.remove):
            if key.protocol is not Protocol.UDP or key in out:
                continue
            programmed = self._frontends.get(key)
            if programmed is None or (
                key in changes.upsert and self._applied.get(key) is changes.upsert[key]
            ):
                continue
            out[key] = _tier_refs(programmed)
        return out

    def _udp_backends_removed(
        self, before: dict[FrontendKey, set[BackendRef]]
    ) -> dict[FrontendKey, frozenset[Backend]]:
        removed: dict[FrontendKey, frozenset[Backend]] = {}
        for key, refs in before.items():
            now = self._frontends.get(key)
            gone = refs - _tier_refs(now) if now is not None else refs
            if gone:
                removed[key] = frozenset(backend_of(r) for r in gone)
        return removed


def _tier_refs(frontend: ProgrammedFrontend) -> set[BackendRef]:
    tiers = (frontend.primary, frontend.fallback) if frontend.fallback is not None else (frontend.primary,)
    return {r for t in tiers for r in t.slots if r is not None}
