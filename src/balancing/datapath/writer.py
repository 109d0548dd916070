"""Program a desired state into the maps: diff against what is programmed, apply make-before-break.

For every changed frontend tier the writer keeps backends that stay in their slots, fills freed slots with new
backends and compacts the tail, so one endpoint change costs a few element writes. One plan per write holds
every frontend's operations by phase, in dependency order (``_PHASES``): everything a master entry will point
at (backends, affinity matches, client rules, QoS entries, slots, the fallback tier) is written before the
master; what it no longer points at is deleted after it. A connect that reads the maps at any instant in
between resolves to a backend that was valid before or after the change.

A failure stays with its frontend. A value the ABI cannot hold fails that frontend's planning, before any
write. The plan runs phase by phase in batches; if a map operation fails, each frontend's part of it
(``_Change``) runs again alone, and a frontend that fails before its master switched is written back to its
previous entries (``programmed.entries``). So every frontend ends whole at its old or its new state, the
others are written, the failed ones are reported in ``WriteStats.failed`` (``errors.FrontendWriteError``)
and the writer's record is what the maps hold. Backend entries shared by frontends, and garbage, are deleted
last, once every frontend's outcome is known. Only a failure no frontend owns (deleting those, or writing a
frontend back) raises, after re-reading the maps. Backend and frontend ids are recovered from the maps on
start and allocated monotonically, so an id is never reused under a concurrent reader.
One module over 400 lines on purpose: planning, the failure path and the record it keeps true are one
invariant. Neighbours: ``maps`` (I/O), ``programmed`` (reading state), ``abi`` (encoding). Pod cgroup ids for
policy client rules come from a resolver the agent passes in.

North-south (frontends marked ``external``): the master's flags say so; the backends external clients get
are the primary tier's, or an external tier's (scope ``SCOPE_EXTERNAL``) when they differ; a Maglev table of
them (``maglev``: the same on every node) is made and filled while planning and swapped in by one update of
the outer map before the master, so a packet never sees a half-written table; tables are never changed
once made, so frontends with the same backends share one. Source ranges are added before the master and
removed after it, like client rules. Backends that are pods on this node carry ``BE_F_LOCAL``.

Bulk: a run of at least ``bulk_min`` consecutive new frontends of the plain shape (no fallback, clients,
QoS or north-south; a full sync's bulk) is planned together (``_plan_bulk``): the backend references, ids,
slot keys and values and master entries of the whole run are packed at once by the ``abi`` bulk packers into
the plan's ``maps.Batch`` phases, with the same entries, ids and record the frontend-by-frontend planning
gives (tests/unit/test_writer_bulk.py holds the two to the same maps), and its frontends are recorded
together once written. A failed batch expands the run into one ``_Change`` per frontend.

Socket-LB exclusions (``DesiredState.excluded_pods``) are written before any frontend of a write: the cgroup
ids of the excluded pods (the same resolver) in the skip map, new ones before the config's skip flag is set,
and the flag cleared before the map empties, so the hooks look the map up only while it has entries. The
set belongs to no frontend: a failure re-reads the maps and raises, before any frontend is written.
"""

from __future__ import annotations

import array
import collections
import errno
import functools
import itertools
import logging
import operator
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from struct import error as struct_error
from typing import Any, TypeVar, cast

from balancing import errors
from balancing.datapath import abi, maglev, programmed
from balancing.datapath.maps import Batch, MapIO
from balancing.datapath.programmed import (
    BackendRef,
    ProgrammedFrontend,
    ProgrammedState,
    Tier,
    backend_of,
    read_state,
)
from balancing.model.desired import (
    Backend,
    DesiredState,
    Frontend,
    FrontendChanges,
    FrontendKey,
    FrontendKind,
    PodRef,
    Protocol,
)

log = logging.getLogger(__name__)
Ref = TypeVar("Ref", bound=Hashable)
PodCgroups = Callable[[PodRef], Sequence[int]]

# A tier's count and slot numbers are u16 (struct bl_svc_val.count, bl_svc_key.slot).
MAX_TIER_BACKENDS = 0xFFFF
# Runs of at least this many new frontends of the plain shape are planned in bulk (``_plan_bulk``).
BULK_MIN = 16

# (plan attribute, operation, map), in execution order.
_PHASES = (
    ("backends", "update", abi.MAP_BACKENDS),
    ("matches", "update", abi.MAP_AFFINITY_MATCH),
    ("clients", "update", abi.MAP_CLIENTS),
    ("qos", "update", abi.MAP_QOS),
    ("ranges", "update", abi.MAP_SOURCE_RANGES),
    ("slots", "update", abi.MAP_SERVICES),
    ("fallback_masters", "update", abi.MAP_SERVICES),
    ("external_masters", "update", abi.MAP_SERVICES),
    ("maglev", "update", abi.MAP_MAGLEV),
    ("masters", "update", abi.MAP_SERVICES),
    ("stale_masters", "delete", abi.MAP_SERVICES),
    ("stale_fallback_masters", "delete", abi.MAP_SERVICES),
    ("stale_external_masters", "delete", abi.MAP_SERVICES),
    ("stale_maglev", "delete", abi.MAP_MAGLEV),
    ("stale_slots", "delete", abi.MAP_SERVICES),
    ("stale_clients", "delete", abi.MAP_CLIENTS),
    ("stale_ranges", "delete", abi.MAP_SOURCE_RANGES),
    ("stale_qos", "delete", abi.MAP_QOS),
    ("stale_matches", "delete", abi.MAP_AFFINITY_MATCH),
    ("stale_backends", "delete", abi.MAP_BACKENDS),
)
# Up to this phase a frontend's master still names its old entries: a failure there writes it back.
_SWITCH = [name for name, _, _ in _PHASES].index("stale_masters")
# A frontend's phases by the kind of entry: (write it, delete it). Backend entries are shared (see _finish).
_KINDS = (
    ("matches", "stale_matches"),
    ("clients", "stale_clients"),
    ("qos", "stale_qos"),
    ("ranges", "stale_ranges"),
    ("slots", "stale_slots"),
    ("fallback_masters", "stale_fallback_masters"),
    ("external_masters", "stale_external_masters"),
    ("maglev", "stale_maglev"),
    ("masters", "stale_masters"),
)
# The phases of each tier beside the primary: (its masters, its stale masters).
_SIDE_MASTERS = {
    abi.SCOPE_FALLBACK: ("fallback_masters", "stale_fallback_masters"),
    abi.SCOPE_EXTERNAL: ("external_masters", "stale_external_masters"),
}
_GARBAGE_PHASE = {
    abi.MAP_SERVICES: "stale_slots",
    abi.MAP_BACKENDS: "stale_backends",
    abi.MAP_AFFINITY_MATCH: "stale_matches",
    abi.MAP_CLIENTS: "stale_clients",
    abi.MAP_QOS: "stale_qos",
    abi.MAP_MAGLEV: "stale_maglev",
    abi.MAP_SOURCE_RANGES: "stale_ranges",
}


def _located(key: FrontendKey, map_name: str, exc: BaseException) -> errors.FrontendWriteError:
    """``exc`` (from a map operation on ``map_name``, or from encoding when that is "") as this frontend's."""
    if isinstance(exc, errors.FrontendWriteError):
        return exc
    if isinstance(exc, errors.DatapathError):
        located = errors.FrontendWriteError(str(key), str(getattr(exc, "map", map_name)), str(exc))
    elif map_name:
        located = errors.FrontendWriteError(str(key), map_name, f"writing BPF map {map_name} failed: {exc!r}")
    else:
        located = errors.FrontendWriteError(
            str(key), "", f"a value does not fit the datapath's maps: {exc!r}"
        )
    located.__cause__ = exc
    return located


@dataclass
class WriteStats:
    ops: int = 0
    frontends_written: int = 0
    frontends_removed: int = 0
    # UDP frontends that lost backends in this write (removed frontends: all of theirs), with those backends.
    # A connected UDP socket keeps the backend it was given at connect(): sockterm.SocketTerminator destroys
    # the ones these pairs name. A backend still in the frontend's other tier is not in the set.
    udp_backends_removed: dict[FrontendKey, frozenset[Backend]] = field(default_factory=dict)
    # Frontends this write could not program as asked, with why (the others are written). A failed frontend
    # is at a complete state (see errors.FrontendWriteError) and the writer knows which; a later write
    # retries it.
    failed: dict[FrontendKey, errors.FrontendWriteError] = field(default_factory=dict)


# The (key, value) sizes of the entries of the maps bulk runs fill.
_BACKENDS_SIZES, _MATCHES_SIZES, _SVC_SIZES = (
    (Batch.of(m).key_size, Batch.of(m).value_size)
    for m in (abi.MAP_BACKENDS, abi.MAP_AFFINITY_MATCH, abi.MAP_SERVICES)
)


class _Plan:
    """Element operations by phase (``_PHASES``): of all the frontends of one write together, of one of them
    (``cut``), or a write's closing deletions; and the backends the changed slots stop and start naming."""

    __slots__ = (*(name for name, _, _ in _PHASES), "released", "acquired", "lists")

    def __init__(self) -> None:
        # the updates bulk runs fill are packed as the batch syscall takes them; the rest are lists
        self.backends = Batch(*_BACKENDS_SIZES)
        self.matches = Batch(*_MATCHES_SIZES)
        self.clients: list[tuple[bytes, bytes]] = []
        self.qos: list[tuple[bytes, bytes]] = []
        self.ranges: list[tuple[bytes, bytes]] = []
        self.slots = Batch(*_SVC_SIZES)
        self.fallback_masters: list[tuple[bytes, bytes]] = []
        self.external_masters: list[tuple[bytes, bytes]] = []
        self.maglev: list[tuple[bytes, bytes]] = []
        self.masters = Batch(*_SVC_SIZES)
        self.stale_masters: list[bytes] = []
        self.stale_fallback_masters: list[bytes] = []
        self.stale_external_masters: list[bytes] = []
        self.stale_maglev: list[bytes] = []
        self.stale_slots: list[bytes] = []
        self.stale_clients: list[bytes] = []
        self.stale_ranges: list[bytes] = []
        self.stale_qos: list[bytes] = []
        self.stale_matches: list[bytes] = []
        self.stale_backends: list[bytes] = []
        self.released: list[BackendRef] = []  # once per slot that named it
        self.acquired: list[BackendRef] = []
        # every list above, the phases in order: what mark/cut/truncate work on
        self.lists: tuple[Batch | list[Any], ...] = (
            *(getattr(self, name) for name, _, _ in _PHASES),
            self.released,
            self.acquired,
        )

    def mark(self) -> tuple[int, ...]:
        return tuple(map(len, self.lists))

    def cut(self, start: tuple[int, ...], end: tuple[int, ...]) -> _Plan:
        """The part added between two marks."""
        part = _Plan()
        for mine, theirs, i, j in zip(part.lists, self.lists, start, end, strict=True):
            mine.extend(theirs[i:j])
        return part

    def truncate(self, start: tuple[int, ...]) -> None:
        """Drop what was added since ``start``."""
        for items, i in zip(self.lists, start, strict=True):
            del items[i:]

    def written_keys(self) -> Iterable[tuple[str, bytes]]:
        for name, op, map_name in _PHASES:
            if op == "update":
                for key, _ in getattr(self, name):
                    yield map_name, key


@dataclass(slots=True)
class _Change:
    """One frontend's part of a write: its record before and after, its operations between two marks."""

    key: FrontendKey
    before: ProgrammedFrontend | None  # None: a new frontend
    after: ProgrammedFrontend | None  # None: removed
    frontend: Frontend | None = None  # what counts as applied once written
    start: tuple[int, ...] = ()
    end: tuple[int, ...] = ()


# Where a plan's mark counts what _plan_bulk adds (indexes in _Plan.lists).
_LISTS = [name for name, _, _ in _PHASES] + ["released", "acquired"]
_MATCHES, _SLOTS, _MASTERS, _ACQUIRED = map(_LISTS.index, ("matches", "slots", "masters", "acquired"))


@dataclass(slots=True)
class _Bulk:
    """A run of new frontends planned together (``_plan_bulk``) from plan mark ``start`` on: per frontend
    its key, Frontend, record, slots and affinity matches, in the plan's order."""

    keys: list[FrontendKey]
    frontends: list[Frontend]
    records: list[ProgrammedFrontend]
    counts: list[int]
    matches: list[int]
    start: tuple[int, ...]

    def changes(self) -> Iterator[_Change]:
        """One ``_Change`` per frontend, its marks counted from ``start``. Its new backend entries are not
        in its marks: ``_write_each`` gives each frontend the fresh backends it names."""
        mark = list(self.start)
        for key, frontend, record, count, matches in zip(
            self.keys, self.frontends, self.records, self.counts, self.matches, strict=True
        ):
            start = tuple(mark)
            mark[_SLOTS] += count
            mark[_MATCHES] += matches
            mark[_MASTERS] += 1
            mark[_ACQUIRED] += count
            yield _Change(key, None, record, frontend, start, tuple(mark))


_BACKENDS = operator.attrgetter("backends")
_PROTOCOL = operator.attrgetter("protocol")
_LOCAL = operator.attrgetter("local_backends")
_AFFINITY = operator.attrgetter("affinity_timeout")


def _bulk_shape(frontend: Frontend) -> bool:
    """Whether ``_plan_bulk`` can plan this frontend (when new): one tier and the master, affinity matches."""
    return (
        frontend.fallback is None
        and not frontend.external
        and not frontend.backend_pods
        and not frontend.qos_limit
        and len(frontend.backends) <= MAX_TIER_BACKENDS
    )


class _Failed(Exception):
    """A plan stopped at phase ``index`` (on ``map_name``) because of ``exc``."""

    def __init__(self, index: int, map_name: str, exc: BaseException) -> None:
        super().__init__(index, map_name, exc)
        self.index, self.map_name, self.exc = index, map_name, exc


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
    """Owns the programmed maps of one agent (service, backend, affinity-match, client and QoS maps; and for
    north-south the Maglev tables and source ranges). ``maglev_size``: the entries of every Maglev table."""

    def __init__(
        self, io: MapIO, pod_cgroups: PodCgroups = _no_cgroups, maglev_size: int = abi.DEFAULT_MAGLEV_SIZE
    ) -> None:
        self.io = io
        self.pod_cgroups = pod_cgroups
        self.maglev_size = maglev_size
        self.bulk_min = BULK_MIN  # the shortest run planned in bulk (tests compare with a writer that never)
        self._tables = maglev.TableCache()
        self._next_svc_id = self._next_backend_id = 1
        self._excluded: frozenset[PodRef] = frozenset()  # the pods socket LB leaves alone, as last asked
        self.recover()

    def recover(self) -> None:
        """(Re)read the maps; called on start and after a failed write, so state is always the kernel's."""
        state = read_state(self.io)
        self._frontends: dict[FrontendKey, ProgrammedFrontend] = state.frontends
        self._backend_ids: dict[BackendRef, int] = state.backend_ids
        self._refs: Counter[BackendRef] = Counter(r for f in state.frontends.values() for r in _slot_refs(f))
        self._garbage = state.garbage
        # ids only grow, also over a re-read that no longer shows the highest ones this writer handed out
        self._next_svc_id = max(self._next_svc_id, state.max_svc_id + 1)
        self._next_backend_id = max(self._next_backend_id, state.max_backend_id + 1)
        self._fresh: set[BackendRef] = set()  # backends given an id by the write going on
        # The Frontend last programmed per key: the very same object (the model caches them) or an equal
        # programmed_as() is skipped without re-encoding anything.
        self._applied: dict[FrontendKey, Frontend] = {}
        self._skip, self._skip_flag = set(state.skip), state.skip_flag
        # Maglev tables are never changed once made, so frontends with the same backends (a Service's
        # NodePort, load-balancer and externalIP frontends) share one: (size, backend ids) -> (the outer map's
        # value naming it, how many frontends of the record name it); and the tables this write made.
        self._shared: dict[tuple[int, frozenset[int]], tuple[bytes, int]] = {}
        for f in state.frontends.values():
            self._share(f, 1)
        self._made: dict[tuple[int, frozenset[int]], bytes] = {}

    # --- reading -----------------------------------------------------------------------------------------

    def programmed(self) -> dict[FrontendKey, tuple[Backend | None, ...]]:
        return {k: tuple(backend_of(r) if r else None for r in f.slots) for k, f in self._frontends.items()}

    def programmed_fallback(self) -> dict[FrontendKey, tuple[Backend | None, ...]]:
        return {
            k: tuple(backend_of(r) if r else None for r in f.fallback.slots)
            for k, f in self._frontends.items()
            if f.fallback is not None
        }

    def record(self) -> ProgrammedState:
        """What the writer holds to be in the maps, in ``read_state``'s terms (to compare; do not change)."""
        return ProgrammedState(
            dict(self._frontends),
            dict(self._backend_ids),
            {m: list(keys) for m, keys in self._garbage.items()},
            self._next_svc_id - 1,
            self._next_backend_id - 1,
            set(self._skip),
            self._skip_flag,
        )

    def svc_id(self, key: FrontendKey) -> int | None:
        f = self._frontends.get(key)
        return f.svc_id if f else None

    # --- writing -----------------------------------------------------------------------------------------

    def sync(self, desired: DesiredState) -> WriteStats:
        """Converge the maps to exactly ``desired`` (a full reconcile; no-op entries cost nothing)."""
        stale = frozenset(k for k in self._frontends if k not in desired.frontends)
        return self.apply(FrontendChanges(desired.frontends, stale, desired.excluded_pods), full=True)

    def apply(self, changes: FrontendChanges, *, full: bool = False) -> WriteStats:
        """Write ``changes``; frontends that cannot be written are in ``failed`` (raises only for failures no
        frontend owns, as ``errors.DatapathError``, after re-reading the maps). ``full``: re-resolve the
        excluded pods' cgroups even if the set did not change."""
        stats = WriteStats()
        if changes.excluded_pods is not None and changes.excluded_pods != self._excluded:
            self._excluded, full = changes.excluded_pods, True
        if full:
            self._write_skip(stats)
        udp_before = self._udp_backends(changes)
        plan, planned = _Plan(), list[_Change | _Bulk]()
        run: list[tuple[FrontendKey, Frontend]] = []  # new frontends of the plain shape, in a row
        for key, frontend in changes.upsert.items():
            if key not in self._frontends and _bulk_shape(frontend):
                run.append((key, frontend))
                continue
            if run:
                self._plan_run(plan, planned, stats, run)
                run = []
            self._add(plan, planned, stats, key, functools.partial(self._plan_upsert, plan, key, frontend))
        if run:
            self._plan_run(plan, planned, stats, run)
        for key in changes.remove:
            if key not in changes.upsert:
                self._add(plan, planned, stats, key, functools.partial(self._plan_remove, plan, key))
        self._write(plan, planned, stats)
        stats.udp_backends_removed = self._udp_backends_removed(udp_before)
        return stats

    def refresh_clients(self) -> WriteStats:
        """Re-resolve the cgroups of policy backend pods and excluded pods (containers come and go) and
        rewrite client rules and the skip map."""
        stats = WriteStats()
        self._write_skip(stats)
        plan, planned = _Plan(), list[_Change | _Bulk]()
        for key, frontend in list(self._applied.items()):  # a failure drops its key from _applied
            if frontend.backend_pods or self._frontends[key].clients:
                self._add(
                    plan, planned, stats, key, functools.partial(self._plan_refresh, plan, key, frontend)
                )
        self._write(plan, planned, stats)
        return stats

    def _add(
        self,
        plan: _Plan,
        planned: list[_Change | _Bulk],
        stats: WriteStats,
        key: FrontendKey,
        planner: Callable[[], _Change | None],
    ) -> None:
        """Plan one frontend's change into ``plan``; one that cannot be planned fails alone, before any write
        (struct.error, OverflowError, ...: a value the maps cannot hold)."""
        start = plan.mark()
        try:
            change = planner()
        except Exception as exc:
            for _, ref in plan.backends[start[0] :]:  # allocated for it: unknown again, for later frontends
                del self._backend_ids[ref]
                self._fresh.discard(ref)
            plan.truncate(start)
            stats.failed[key] = _located(key, "", exc)
            self._applied.pop(key, None)  # not as asked: the next write plans it again
            return
        if change is None:
            return
        end = plan.mark()
        if end[: len(_PHASES)] == start[: len(_PHASES)]:  # programmed as asked already (e.g. after a re-read)
            if change.frontend is not None:
                self._applied[key] = change.frontend
            return
        change.start, change.end = start, end
        planned.append(change)

    def _plan_run(
        self,
        plan: _Plan,
        planned: list[_Change | _Bulk],
        stats: WriteStats,
        run: list[tuple[FrontendKey, Frontend]],
    ) -> None:
        """Plan a run of new frontends of the plain shape: in bulk when it is long enough and every value fits
        the maps, else (or for what does not fit) frontend by frontend, which fails each alone."""
        if len(run) >= self.bulk_min:
            try:
                bulk = self._plan_bulk(plan, run)
            except (struct_error, OverflowError, ValueError):
                pass  # a value the maps cannot hold: the plain planning says which frontend's
            else:
                planned.append(bulk)
                return
        for key, frontend in run:
            self._add(plan, planned, stats, key, functools.partial(self._plan_upsert, plan, key, frontend))

    def _plan_bulk(self, plan: _Plan, run: list[tuple[FrontendKey, Frontend]]) -> _Bulk:
        """What ``_plan_upsert`` plans for each of these new frontends, the run at once: what can fail (a
        value out of range) packed first, before anything changes; then ids given and the plan extended."""
        keys = [key for key, _ in run]
        frontends = [frontend for _, frontend in run]
        tiers = list(map(_BACKENDS, frontends))
        counts = list(map(len, tiers))
        protocols = list(map(int, map(_PROTOCOL, keys)))
        refs = abi.pack_backend_refs(
            list(itertools.chain.from_iterable(tiers)),
            itertools.chain.from_iterable(map(itertools.repeat, protocols, counts)),
            _local_flags(frontends, tiers) if any(map(_LOCAL, frontends)) else itertools.repeat(0),
        )
        svc_ids = range(self._next_svc_id, self._next_svc_id + len(keys))
        timeouts = list(map(_AFFINITY, frontends))
        flags = [
            (abi.SVC_F_AFFINITY if f.affinity_timeout else 0) | (abi.SVC_F_HOST_ONLY if f.host_only else 0)
            for f in frontends
        ]
        masters = abi.pack_masters(svc_ids, counts, flags, timeouts)
        master_keys = abi.pack_master_keys(keys, protocols)
        if self._next_backend_id + len(refs) > 1 << 32:
            raise OverflowError("backend ids past a u32")
        # nothing above changed the writer or the plan; from here on nothing raises
        new, ids = self._bulk_ids(refs)
        self._next_svc_id += len(keys)
        offsets = list(itertools.accumulate(counts, initial=0))
        matches = [count if timeout else 0 for count, timeout in zip(counts, timeouts, strict=True)]
        match_keys = self._bulk_matches(svc_ids, ids, offsets, matches)
        slot_keys = abi.pack_slot_keys(master_keys, counts)
        first = self._next_backend_id - len(new)
        start = plan.mark()
        plan.backends.extend_packed(abi.pack_backend_ids(range(first, first + len(new))), b"".join(new))
        plan.matches.extend_packed(match_keys, abi.AFF_MATCH_VALUE * (len(match_keys) // 2))
        plan.slots.extend_packed(slot_keys, abi.pack_slot_values(ids))
        plan.masters.extend_packed(b"".join(master_keys), b"".join(masters))
        plan.acquired.extend(refs)
        slots = cast(
            list[list[BackendRef | None]], list(map(refs.__getitem__, map(slice, offsets, offsets[1:])))
        )
        records = list(map(ProgrammedFrontend, svc_ids, map(Tier, masters, slots)))
        for i in itertools.compress(range(len(records)), matches):
            records[i].affinity_matches = set(ids[offsets[i] : offsets[i + 1]])
        return _Bulk(keys, frontends, records, counts, matches, start)

    def _bulk_ids(self, refs: list[BackendRef]) -> tuple[list[BackendRef], array.array[int]]:
        """The backend id of each ref: the known one, or the next one for a new ref (first seen first, as
        ``_backend_id`` gives them), recorded. Returns the new refs and every ref's id (a u32 array)."""
        known, first = self._backend_ids, self._next_backend_id
        size = len(known)
        # the usual bulk (a full sync): every ref new, each once, so each takes the next id in turn
        collections.deque(map(known.setdefault, refs, itertools.count(first)), maxlen=0)
        if len(known) - size == len(refs):
            new, ids = refs, abi.pack_backend_ids(range(first, first + len(refs)))
        else:  # some known, or some twice: undo, then give ids to the new ones once each
            mine = list(map(operator.ge, map(known.__getitem__, refs), itertools.repeat(first)))
            collections.deque(
                map(known.pop, itertools.compress(refs, mine), itertools.repeat(None)), maxlen=0
            )
            got = list(map(known.get, refs))
            new = list(
                dict.fromkeys(itertools.compress(refs, map(operator.is_, got, itertools.repeat(None))))
            )
            new_id = cast(Callable[[bytes, int | None], int], dict(zip(new, itertools.count(first))).get)
            ids = abi.pack_backend_ids(map(new_id, refs, got))  # the new id, else the known one
            known.update(zip(new, itertools.count(first)))
        self._next_backend_id += len(new)
        self._fresh.update(new)
        return new, ids

    @staticmethod
    def _bulk_matches(
        svc_ids: Sequence[int], ids: array.array[int], offsets: list[int], matches: list[int]
    ) -> array.array[int]:
        """The affinity match keys of the frontends with affinity (``matches``: their slot counts)."""
        svc = array.array("I")
        backend_ids = array.array("I")
        for i in itertools.compress(range(len(matches)), matches):
            svc.extend(itertools.repeat(svc_ids[i], matches[i]))
            backend_ids.extend(ids[offsets[i] : offsets[i + 1]])
        return abi.pack_affinity_matches(svc, backend_ids)

    def _plan_upsert(self, plan: _Plan, key: FrontendKey, frontend: Frontend) -> _Change | None:
        before = self._frontends.get(key)
        prev = self._applied.get(key)
        if (
            before is not None
            and prev is not None
            and (prev is frontend or prev.programmed_as() == frontend.programmed_as())
        ):
            return None
        for tier, backends in (("primary", frontend.backends), ("fallback", frontend.fallback or ())):
            if len(backends) > MAX_TIER_BACKENDS:
                reason = f"{len(backends)} {tier} backends, a tier holds at most {MAX_TIER_BACKENDS}"
                raise errors.FrontendWriteError(str(key), abi.MAP_SERVICES, reason)
        if before is None:
            new = ProgrammedFrontend(self._next_svc_id, Tier(b"", []))
            self._next_svc_id += 1
        else:
            new = before.copy()
        proto = key.protocol
        primary = [_ref(b, proto, frontend) for b in frontend.backends]
        self._plan_tier(plan, abi.SvcKeyPacker(key.ip, key.port, proto), new.primary, primary)
        self._plan_fallback(plan, key, new, frontend)
        self._plan_external(plan, key, new, frontend)
        ids = [self._backend_ids[r] for r in new.primary.slots if r is not None]
        self._plan_matches(plan, new, ids if frontend.affinity_timeout else [])
        self._plan_clients(plan, key, new, frontend)
        self._plan_qos(plan, new, frontend.qos_limit)
        self._plan_ranges(plan, new, frontend)
        self._plan_maglev(plan, new, frontend)
        self._plan_master(plan, key, new, frontend)
        return _Change(key, before, new, frontend)

    def _plan_refresh(self, plan: _Plan, key: FrontendKey, frontend: Frontend) -> _Change | None:
        before = self._frontends[key]
        new = before.copy()
        self._plan_clients(plan, key, new, frontend)
        self._plan_master(plan, key, new, frontend)
        return _Change(key, before, new, frontend)

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
        """The fallback tier: where connections the primary tier skips go (policies)."""
        refs = None
        if frontend.fallback is not None:
            refs = [abi.pack_backend(b.ip, b.port, key.protocol) for b in frontend.fallback]
        old.fallback = self._plan_side_tier(plan, key, old, old.fallback, abi.SCOPE_FALLBACK, refs)

    def _plan_external(
        self, plan: _Plan, key: FrontendKey, old: ProgrammedFrontend, frontend: Frontend
    ) -> None:
        """The external tier: the backends north-south picks from when they differ from the primary tier's
        (the writer's record of them, and what keeps their backend entries; the programs read the Maglev
        table)."""
        refs = None
        if frontend.external and frontend.external_backends is not None:
            refs = [_ref(b, key.protocol, frontend) for b in frontend.external_backends]
        old.external = self._plan_side_tier(plan, key, old, old.external, abi.SCOPE_EXTERNAL, refs)

    def _plan_side_tier(
        self,
        plan: _Plan,
        key: FrontendKey,
        old: ProgrammedFrontend,
        tier: Tier | None,
        scope: int,
        refs: list[BackendRef] | None,
    ) -> Tier | None:
        """A tier beside the primary (``scope``) to ``refs``, or gone (None); returns what it becomes."""
        pack_key = abi.SvcKeyPacker(key.ip, key.port, key.protocol, scope)
        masters, stale_masters = _SIDE_MASTERS[scope]
        if refs is None:
            if tier is not None:
                getattr(plan, stale_masters).append(pack_key(abi.MASTER_SLOT))
                plan.stale_slots.extend(pack_key(s) for s in range(1, len(tier.slots) + 1))
                self._retarget(plan, tier, [])
            return None
        if tier is None:
            tier = Tier(b"", [])
        self._plan_tier(plan, pack_key, tier, refs)
        master = abi.master_val(old.svc_id, len(tier.slots), 0, 0)
        if master != tier.master:
            getattr(plan, masters).append((pack_key(abi.MASTER_SLOT), master))
            tier.master = master
        return tier

    def _plan_maglev(self, plan: _Plan, old: ProgrammedFrontend, frontend: Frontend) -> None:
        """A new Maglev table when the north-south backends (or the table size) changed: made and filled now,
        swapped in by one update of the outer map before the master; none without backends (dropped)."""
        tier = old.external if old.external is not None else old.primary
        refs = [r for r in tier.slots if r is not None] if frontend.external else []
        ids = frozenset(self._backend_ids[r] for r in refs)
        if len(refs) > self.maglev_size:  # the table names only the first in identity order (as read back)
            first = sorted(refs, key=abi.maglev_identity)[: self.maglev_size]
            ids = frozenset(self._backend_ids[r] for r in first)
        key = abi.pack_maglev_key(old.svc_id)
        if not refs:
            if old.maglev is not None:
                plan.stale_maglev.append(key)
                old.maglev, old.maglev_ids, old.maglev_size = None, frozenset(), 0
            return
        if old.maglev is not None and old.maglev_ids == ids and old.maglev_size == self.maglev_size:
            return
        warning = maglev.check_size(self.maglev_size, len(refs))
        if warning and (old.maglev_size, len(old.maglev_ids)) != (self.maglev_size, len(ids)):
            log.warning("frontend %d: %s", old.svc_id, warning)
        shared = (self.maglev_size, ids)
        value = self._made.get(shared) or self._shared.get(shared, (None, 0))[0]
        if value is None:
            ordered = sorted(refs, key=abi.maglev_identity)  # the same order, and table, on every node
            indexes = self._tables.table([abi.maglev_identity(r) for r in ordered], self.maglev_size)
            backend_ids = [self._backend_ids[r] for r in ordered]
            value = self._made[shared] = self.io.create_table(
                array.array("I", map(backend_ids.__getitem__, indexes))
            )
        plan.maglev.append((key, value))
        old.maglev, old.maglev_ids, old.maglev_size = value, ids, self.maglev_size

    def _share(self, frontend: ProgrammedFrontend | None, by: int) -> None:
        """Count ``frontend``'s Maglev table in (``by`` 1) or out (-1) of the shared tables."""
        if frontend is None or frontend.maglev is None:
            return
        shared = (frontend.maglev_size, frontend.maglev_ids)
        value, count = self._shared.get(shared, (frontend.maglev, 0))
        if count + by > 0:
            self._shared[shared] = (value, count + by)
        else:
            self._shared.pop(shared, None)

    def _plan_ranges(self, plan: _Plan, old: ProgrammedFrontend, frontend: Frontend) -> None:
        """loadBalancerSourceRanges: new entries before the master, stale ones after it."""
        wanted = (
            {abi.pack_source_range(old.svc_id, n) for n in frontend.source_ranges}
            if frontend.external
            else set()
        )
        plan.ranges.extend((k, abi.SRCR_VALUE) for k in sorted(wanted - old.source_ranges))
        plan.stale_ranges.extend(sorted(old.source_ranges - wanted))
        old.source_ranges = wanted

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
            | (abi.SVC_F_EXTERNAL if frontend.external else 0)
            | (abi.SVC_F_ETP_LOCAL if frontend.external and frontend.external_local else 0)
            | (abi.SVC_F_SRC_RANGES if old.source_ranges else 0)
            | (abi.SVC_F_NODE_ADDRESS if frontend.external and frontend.kind is FrontendKind.NODE_PORT else 0)
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
            backend_id = self._backend_ids.get(_ref(bp.backend, key.protocol, frontend))
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

    def _write_skip(self, stats: WriteStats) -> None:
        """The skip map to the excluded pods' cgroups now; the skip flag set only while it has entries."""
        wanted = {cgroup_id for pod in self._excluded for cgroup_id in self.pod_cgroups(pod)}
        added, gone = sorted(wanted - self._skip), sorted(self._skip - wanted)
        try:
            if added:
                self.io.update(abi.MAP_SKIP, [(abi.pack_skip_key(c), abi.SKIP_VALUE) for c in added])
                stats.ops += len(added)
                self._skip.update(added)
            if bool(wanted) != self._skip_flag:
                self._set_skip_flag(bool(wanted))
                stats.ops += 1
            if gone:
                self.io.delete(abi.MAP_SKIP, [abi.pack_skip_key(c) for c in gone])
                stats.ops += len(gone)
                self._skip.difference_update(gone)
        except Exception as exc:
            self.recover()
            if isinstance(exc, errors.DatapathError):
                raise
            raise errors.MapError(map=abi.MAP_SKIP, op="update", errno=errno.EIO) from exc

    def _set_skip_flag(self, on: bool) -> None:
        """Set or clear ``abi.CFG_F_SKIP``, keeping the rest of the config (``datapath.settings`` owns it)."""
        raw = next((value for _, value in self.io.items(abi.MAP_CONFIG)), None)
        flags = abi.config_flags(raw) & ~abi.CFG_F_SKIP | (abi.CFG_F_SKIP if on else 0)
        self.io.update(abi.MAP_CONFIG, [(abi.CONFIG_KEY, abi.with_config_flags(raw, flags))])
        self._skip_flag = on

    def _plan_qos(self, plan: _Plan, old: ProgrammedFrontend, limit: int) -> None:
        want = abi.pack_qos_val(limit) if limit else None
        if want == old.qos:
            return
        if want is not None:
            plan.qos.append((abi.pack_qos_key(old.svc_id), want))
        else:
            plan.stale_qos.append(abi.pack_qos_key(old.svc_id))
        old.qos = want

    def _plan_remove(self, plan: _Plan, key: FrontendKey) -> _Change | None:
        before = self._frontends.get(key)
        if before is None:
            self._applied.pop(key, None)
            return None
        old = before.copy()  # scratch for the helpers below
        pack_key = abi.SvcKeyPacker(key.ip, key.port, key.protocol)
        plan.stale_masters.append(pack_key(abi.MASTER_SLOT))
        plan.stale_slots.extend(pack_key(s) for s in range(1, len(old.primary.slots) + 1))
        old.fallback = self._plan_side_tier(plan, key, old, old.fallback, abi.SCOPE_FALLBACK, None)
        old.external = self._plan_side_tier(plan, key, old, old.external, abi.SCOPE_EXTERNAL, None)
        if old.maglev is not None:
            plan.stale_maglev.append(abi.pack_maglev_key(old.svc_id))
        plan.stale_ranges.extend(old.source_ranges)
        self._plan_matches(plan, old, [])
        plan.stale_clients.extend(abi.pack_client_key(old.svc_id, cg) for cg in old.clients)
        if old.qos is not None:
            plan.stale_qos.append(abi.pack_qos_key(old.svc_id))
        self._retarget(plan, old.primary, [])
        return _Change(key, before, None)

    def _backend_id(self, plan: _Plan, ref: BackendRef) -> int:
        backend_id = self._backend_ids.get(ref)
        if backend_id is None:
            backend_id = self._next_backend_id
            self._next_backend_id += 1
            self._backend_ids[ref] = backend_id
            self._fresh.add(ref)
            plan.backends.append((abi.pack_backend_id(backend_id), ref))
        return backend_id

    def _retarget(self, plan: _Plan, tier: Tier, slots: list[BackendRef]) -> None:
        plan.released.extend(ref for ref in tier.slots if ref is not None)
        plan.acquired.extend(slots)
        tier.slots = list(slots)

    # --- executing ---------------------------------------------------------------------------------------

    def _write(self, plan: _Plan, planned: list[_Change | _Bulk], stats: WriteStats) -> None:
        """Run the plan of all frontends; after a failure, each frontend's part alone (see the module
        docstring). Then delete what no frontend names any more."""
        try:
            self._write_plan(plan, planned, stats)
        finally:
            self._made.clear()
            self.io.release_tables()  # the Maglev tables made for this write: inserted ones live on

    def _write_plan(self, plan: _Plan, planned: list[_Change | _Bulk], stats: WriteStats) -> None:
        try:
            self._run(plan, stats)
        except _Failed as failed:
            log.warning("batched map write failed (%s); writing frontend by frontend", failed.exc)
            if failed.index == 0:  # only new backend entries were written, none is used yet: make room
                self._run_or_raise(_deletes(abi.MAP_BACKENDS, plan.backends), stats)
            changes = [c for p in planned for c in (p.changes() if isinstance(p, _Bulk) else (p,))]
            written, reread = self._write_each(plan, changes, stats)
        else:
            written, reread = [plan], False
            for change in planned:
                if isinstance(change, _Bulk):
                    self._commit_bulk(change, stats)
                else:
                    self._commit(change, stats)
            self._count(plan)
        self._finish(written, stats)
        if reread:
            self.recover()

    def _write_each(self, plan: _Plan, planned: list[_Change], stats: WriteStats) -> tuple[list[_Plan], bool]:
        """Each frontend alone; one that fails is written back, or if its master switched, kept (the maps are
        then re-read at the end, for what its failed deletions left). Returns the parts written, and whether
        to re-read."""
        written, reread = [], False
        acquired = Counter(plan.acquired)  # the batch may have written entries naming these, of any frontend
        for change in planned:
            part = plan.cut(change.start, change.end)
            # a backend new in this write is written with each frontend that uses it, whichever others fail
            part.backends.clear()
            part.backends.extend(
                (abi.pack_backend_id(self._backend_ids[ref]), ref)
                for ref in dict.fromkeys(part.acquired)
                if ref in self._fresh
            )
            try:
                self._run(part, stats)
            except _Failed as failed:
                stats.failed[change.key] = _located(change.key, failed.map_name, failed.exc)
                self._applied.pop(change.key, None)  # not as asked: the next write plans it again
                if failed.index <= _SWITCH:
                    self._write_back(change, part, stats, acquired)
                    continue
                # Switched: its backends stay until the re-read finds them unused, after what still names
                # them (an affinity match left behind would send a client to a deleted backend).
                part.released.clear()
                reread = True
            self._commit(change, stats)
            self._count(part)
            written.append(part)
        return written, reread

    def _write_back(
        self, change: _Change, part: _Plan, stats: WriteStats, acquired: Counter[BackendRef]
    ) -> None:
        """Return a frontend whose change failed before its master switched to the entries it had, in
        make-before-break order: what the old master names, then the masters, then what it does not name."""
        old = programmed.entries(change.key, change.before, self._backend_ids) if change.before else {}
        mine = Counter(part.acquired)
        # make room: the new backends no other frontend of this write names (the batch may have written those)
        room = (e for e in part.backends if self._refs[e[1]] <= 0 and acquired[e[1]] <= mine[e[1]])
        undo = _deletes(abi.MAP_BACKENDS, room)
        for write, delete in _KINDS:
            map_name = _MAP[write]
            touched = dict.fromkeys(
                itertools.chain((k for k, _ in getattr(part, write)), getattr(part, delete))
            )
            for key in touched:
                value = old.get(map_name, {}).get(key)
                if value is None:
                    getattr(undo, delete).append(key)
                else:
                    getattr(undo, write).append((key, value))
        try:
            self._run(undo, stats)
        except _Failed as failed:
            self.recover()
            error = stats.failed[change.key]
            raise errors.FrontendWriteError(
                error.frontend, failed.map_name, f"{error.reason}; writing it back failed too: {failed.exc}"
            ) from failed.exc

    def _commit(self, change: _Change, stats: WriteStats) -> None:
        """The change is in the maps: make it the record."""
        self._share(change.before, -1)
        self._share(change.after, 1)
        if change.after is None:
            del self._frontends[change.key]
            self._applied.pop(change.key, None)
            stats.frontends_removed += 1
        else:
            self._frontends[change.key] = change.after
            if change.frontend is not None:
                self._applied[change.key] = change.frontend
            stats.frontends_written += 1

    def _commit_bulk(self, bulk: _Bulk, stats: WriteStats) -> None:
        """``_commit`` of each frontend of a bulk run (new, without Maglev tables)."""
        self._frontends.update(zip(bulk.keys, bulk.records, strict=True))
        self._applied.update(zip(bulk.keys, bulk.frontends, strict=True))
        stats.frontends_written += len(bulk.keys)

    def _count(self, written: _Plan) -> None:
        refs = self._refs
        for ref in written.released:
            refs[ref] -= 1
        refs.update(written.acquired)  # one each (Counter counts a list in C)

    def _finish(self, written: list[_Plan], stats: WriteStats) -> None:
        """Delete the backends no frontend names any more (those new to failed frontends too) and the
        garbage."""
        tail = _Plan()
        unused = set(itertools.chain.from_iterable(p.released for p in written))
        if stats.failed:
            unused.update(self._fresh)
        for ref in unused:
            if self._refs[ref] <= 0:
                self._refs.pop(ref, None)
                backend_id = self._backend_ids.pop(ref, None)
                if backend_id is not None:
                    tail.stale_backends.append(abi.pack_backend_id(backend_id))
        self._fresh = set()
        if self._garbage:
            live = {k for p in written for k in p.written_keys()}  # a garbage key written again is live
            for map_name, keys in self._garbage.items():
                getattr(tail, _GARBAGE_PHASE[map_name]).extend(k for k in keys if (map_name, k) not in live)
            self._garbage = {}
        self._run_or_raise(tail, stats)

    def _run_or_raise(self, plan: _Plan, stats: WriteStats) -> None:
        """Run a plan no frontend owns; a failure re-reads the maps and raises."""
        try:
            self._run(plan, stats)
        except _Failed as failed:
            self.recover()
            if isinstance(failed.exc, errors.DatapathError):
                raise failed.exc from None
            raise errors.MapError(map=failed.map_name, op="delete", errno=errno.EIO) from failed.exc

    def _run(self, plan: _Plan, stats: WriteStats) -> None:
        for index, ((_, op, map_name), items) in enumerate(zip(_PHASES, plan.lists, strict=False)):
            count = len(items)
            if not count:
                continue
            try:
                if op == "update":
                    self.io.update(map_name, items)
                else:
                    self.io.delete(map_name, cast(list[bytes], items))
            except Exception as exc:
                raise _Failed(index, map_name, exc) from exc
            stats.ops += count

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
            kept = {backend_of(r) for r in _tier_refs(now)} if now is not None else set()
            gone = {backend_of(r) for r in refs} - kept  # by address: one flagged local anew is kept
            if gone:
                removed[key] = frozenset(gone)
        return removed


_MAP = {name: map_name for name, _, map_name in _PHASES}


def _deletes(map_name: str, items: Iterable[tuple[bytes, bytes]]) -> _Plan:
    """A plan that deletes the keys of ``items`` from ``map_name`` (the backend or a stale phase)."""
    plan = _Plan()
    getattr(plan, _GARBAGE_PHASE[map_name]).extend(k for k, _ in items)
    return plan


def _local_flags(frontends: list[Frontend], tiers: list[tuple[Backend, ...]]) -> Iterator[int]:
    """``BE_F_LOCAL`` or 0 for each backend of each frontend, as ``_ref`` flags it."""
    for frontend, backends in zip(frontends, tiers, strict=True):
        local = frontend.local_backends
        if local:
            yield from (abi.BE_F_LOCAL if b in local else 0 for b in backends)
        else:
            yield from itertools.repeat(0, len(backends))


def _slot_refs(frontend: ProgrammedFrontend) -> Iterable[BackendRef]:
    """Every backend the frontend's slots name, once per slot (every tier)."""
    tiers = [t for t in (frontend.primary, frontend.fallback, frontend.external) if t is not None]
    return [r for t in tiers for r in t.slots if r is not None]


def _ref(backend: Backend, protocol: Protocol, frontend: Frontend) -> BackendRef:
    """A backend's entry (and identity) for this frontend: a pod on this node is flagged local (north-south
    reaches it without SNAT)."""
    local = abi.BE_F_LOCAL if backend in frontend.local_backends else 0
    return abi.pack_backend(backend.ip, backend.port, protocol, local)


def _tier_refs(frontend: ProgrammedFrontend) -> set[BackendRef]:
    return set(_slot_refs(frontend))
