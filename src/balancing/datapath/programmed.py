"""Read what the datapath maps hold, decoded into model terms.

Used by the writer to recover its state on start (nothing is flushed: it converges from what is there) and by
``balancing inspect`` to show the maps as they are. Inconsistencies a crash could leave (slots past the count,
slots or fallback tiers without a master, backends no slot uses, client/QoS/affinity entries of unknown
frontends, affinity matches of a backend the primary slots no longer name) are reported as garbage keys or
``None`` slots rather than hidden. North-south parts of a frontend: its external tier (scope
``SCOPE_EXTERNAL``), its Maglev table (read back to know which backends it names) and its source ranges.
``entries`` goes the other way: the map entries a programmed frontend stands for, which the writer writes back
when a change of that frontend fails half-way. Beside the frontends: the cgroup ids of the skip map (clients
socket LB leaves alone) and whether the config's skip flag is set; an id whose cgroup is gone is not garbage,
the writer's next diff removes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from balancing.datapath import abi
from balancing.datapath.maps import MapIO
from balancing.model.desired import Backend, FrontendKey, Protocol

BackendRef = bytes  # a packed backend map value: address, port and protocol (see abi.pack_backend)


def backend_of(ref: BackendRef) -> Backend:
    be = abi.BackendVal.unpack(ref)
    return Backend(abi.unpack_addr(be.addr), be.port)


@dataclass
class Tier:
    """One tier of a frontend as programmed: its master entry and its slots (slot 1 first)."""

    master: bytes  # the packed master value
    slots: list[BackendRef | None]  # None: the slot or its backend is missing


@dataclass
class ProgrammedFrontend:
    svc_id: int
    primary: Tier
    fallback: Tier | None = None
    affinity_matches: set[int] = field(default_factory=set)  # backend ids in the affinity match map
    clients: dict[int, bytes] = field(default_factory=dict)  # cgroup id → packed client rule
    qos: bytes | None = None  # the packed QoS entry
    external: Tier | None = None  # north-south backends when they differ from the primary tier's
    maglev: bytes | None = None  # the Maglev table's entry in the outer map (its map id), north-south only
    maglev_ids: frozenset[int] = frozenset()  # the backend ids that table names
    maglev_size: int = 0  # its entries
    source_ranges: set[bytes] = field(default_factory=set)  # packed loadBalancerSourceRanges keys

    @property
    def slots(self) -> list[BackendRef | None]:
        return self.primary.slots

    def copy(self) -> ProgrammedFrontend:
        """A copy the writer can change without touching this one."""
        fallback, external = self.fallback, self.external
        return ProgrammedFrontend(
            self.svc_id,
            Tier(self.primary.master, list(self.primary.slots)),
            None if fallback is None else Tier(fallback.master, list(fallback.slots)),
            set(self.affinity_matches),
            dict(self.clients),
            self.qos,
            None if external is None else Tier(external.master, list(external.slots)),
            self.maglev,
            self.maglev_ids,
            self.maglev_size,
            set(self.source_ranges),
        )

    @property
    def master(self) -> abi.SvcVal:
        return abi.SvcVal.unpack(self.primary.master)

    @property
    def affinity_timeout(self) -> int:
        m = self.master
        return m.affinity_timeout if m.flags & abi.SVC_F_AFFINITY else 0


@dataclass
class ProgrammedState:
    frontends: dict[FrontendKey, ProgrammedFrontend] = field(default_factory=dict)
    backend_ids: dict[BackendRef, int] = field(default_factory=dict)
    garbage: dict[str, list[bytes]] = field(default_factory=dict)  # map name → keys to delete
    max_svc_id: int = 0
    max_backend_id: int = 0
    skip: set[int] = field(default_factory=set)  # cgroup ids in the skip map
    skip_flag: bool = False  # abi.CFG_F_SKIP in the config map: the hooks look the skip map up

    def junk(self, map_name: str, key: bytes) -> None:
        self.garbage.setdefault(map_name, []).append(key)


def frontend_key(key: abi.SvcKey) -> FrontendKey:
    return FrontendKey(abi.unpack_addr(key.addr), key.port, Protocol(key.proto))


def read_state(io: MapIO) -> ProgrammedState:
    state = ProgrammedState()
    backends: dict[int, BackendRef] = {}
    for raw_id, raw in io.items(abi.MAP_BACKENDS):
        backend_id = abi.unpack_backend_id(raw_id)
        backends[backend_id] = raw
        state.max_backend_id = max(state.max_backend_id, backend_id)

    masters: dict[bytes, tuple[bytes, bytes]] = {}  # key prefix (address, port, proto, scope) → master
    slots: dict[tuple[bytes, int], tuple[bytes, int]] = {}
    for raw_key, raw_val in io.items(abi.MAP_SERVICES):
        prefix, slot = abi.split_svc_key(raw_key)
        if slot == abi.MASTER_SLOT:
            masters[prefix] = (raw_key, raw_val)
            state.max_svc_id = max(state.max_svc_id, abi.SvcVal.unpack(raw_val).svc_id)
        else:
            slots[(prefix, slot)] = (raw_key, abi.slot_backend_id(raw_val))

    used: set[int] = set()
    primary_ids: dict[int, set[int]] = {}  # svc_id → the backend ids of its primary slots

    def tier(prefix: bytes, raw_val: bytes, ids: set[int]) -> Tier:
        refs: list[BackendRef | None] = []
        for slot in range(1, abi.SvcVal.unpack(raw_val).count + 1):
            entry = slots.pop((prefix, slot), None)
            ref = backends.get(entry[1]) if entry else None
            if entry and ref:
                used.add(entry[1])
                ids.add(entry[1])
            refs.append(ref)
        return Tier(raw_val, refs)

    other_tiers = []
    for prefix, (raw_key, raw_val) in masters.items():
        key = abi.SvcKey.unpack(raw_key)
        if key.scope == abi.SCOPE_PRIMARY:
            svc_id = abi.SvcVal.unpack(raw_val).svc_id
            state.frontends[frontend_key(key)] = ProgrammedFrontend(
                svc_id, tier(prefix, raw_val, primary_ids.setdefault(svc_id, set()))
            )
        else:
            other_tiers.append((key.scope, frontend_key(key), prefix, raw_key, raw_val))
    for scope, fkey, prefix, raw_key, raw_val in other_tiers:
        frontend = state.frontends.get(fkey)
        if frontend is None or scope not in (abi.SCOPE_FALLBACK, abi.SCOPE_EXTERNAL):
            state.junk(abi.MAP_SERVICES, raw_key)  # a tier without its frontend: slots go too
        elif scope == abi.SCOPE_FALLBACK:
            frontend.fallback = tier(prefix, raw_val, set())
        else:
            frontend.external = tier(prefix, raw_val, set())
    for raw_key, _ in slots.values():
        state.junk(abi.MAP_SERVICES, raw_key)
    _read_extras(io, state, primary_ids)
    state.skip = {abi.unpack_skip_key(raw_key) for raw_key, _ in io.items(abi.MAP_SKIP)}
    state.skip_flag = any(abi.config_flags(raw) & abi.CFG_F_SKIP for _, raw in io.items(abi.MAP_CONFIG))
    for backend_id, ref in backends.items():
        if backend_id in used:
            state.backend_ids[ref] = backend_id
        else:
            state.junk(abi.MAP_BACKENDS, abi.pack_backend_id(backend_id))
    return state


def entries(
    key: FrontendKey, frontend: ProgrammedFrontend, backend_ids: Mapping[BackendRef, int]
) -> dict[str, dict[bytes, bytes]]:
    """Map name → the entries (key → value) that ``frontend`` stands for. A ``None`` slot, or one whose
    backend has no id, has no entry; a tier never programmed (empty master) has none either."""
    svc: dict[bytes, bytes] = {}
    tiers = [(abi.SCOPE_PRIMARY, frontend.primary)]
    if frontend.fallback is not None:
        tiers.append((abi.SCOPE_FALLBACK, frontend.fallback))
    if frontend.external is not None:
        tiers.append((abi.SCOPE_EXTERNAL, frontend.external))
    for scope, tier in tiers:
        if not tier.master:
            continue
        pack_key = abi.SvcKeyPacker(key.ip, key.port, key.protocol, scope)
        svc[pack_key(abi.MASTER_SLOT)] = tier.master
        for slot, ref in enumerate(tier.slots, 1):
            backend_id = backend_ids.get(ref) if ref is not None else None
            if backend_id is not None:
                svc[pack_key(slot)] = abi.pack_slot(backend_id)
    svc_id = frontend.svc_id
    return {
        abi.MAP_SERVICES: svc,
        abi.MAP_AFFINITY_MATCH: {
            abi.pack_affinity_match(svc_id, b): abi.AFF_MATCH_VALUE for b in frontend.affinity_matches
        },
        abi.MAP_CLIENTS: {abi.pack_client_key(svc_id, cg): rule for cg, rule in frontend.clients.items()},
        abi.MAP_QOS: {} if frontend.qos is None else {abi.pack_qos_key(svc_id): frontend.qos},
        abi.MAP_MAGLEV: {} if frontend.maglev is None else {abi.pack_maglev_key(svc_id): frontend.maglev},
        abi.MAP_SOURCE_RANGES: {k: abi.SRCR_VALUE for k in frontend.source_ranges},
    }


def _read_extras(io: MapIO, state: ProgrammedState, primary_ids: dict[int, set[int]]) -> None:
    """Attach affinity matches (of a backend in the primary slots), client rules, QoS entries, Maglev tables
    and source ranges to their frontends; the rest is garbage."""
    by_id = {f.svc_id: f for f in state.frontends.values()}

    def orphan(map_name: str, raw_key: bytes, svc_id: int) -> None:
        """Garbage; its svc_id is not handed out again while a reader may still find the entry."""
        state.junk(map_name, raw_key)
        state.max_svc_id = max(state.max_svc_id, svc_id)

    for raw_key, raw_val in io.items(abi.MAP_MAGLEV):
        frontend = by_id.get(abi.unpack_u32(raw_key))
        if frontend is None:
            orphan(abi.MAP_MAGLEV, raw_key, abi.unpack_u32(raw_key))
        else:
            table = io.read_table(raw_val)
            frontend.maglev, frontend.maglev_ids, frontend.maglev_size = raw_val, frozenset(table), len(table)
    for raw_key, _ in io.items(abi.MAP_SOURCE_RANGES):
        frontend = by_id.get(abi.source_range_svc_id(raw_key))
        if frontend is None:
            orphan(abi.MAP_SOURCE_RANGES, raw_key, abi.source_range_svc_id(raw_key))
        else:
            frontend.source_ranges.add(raw_key)
    for raw_key, _ in io.items(abi.MAP_AFFINITY_MATCH):
        svc_id, backend_id = abi.unpack_affinity_match(raw_key)
        frontend = by_id.get(svc_id)
        if frontend is None or not frontend.affinity_timeout or backend_id not in primary_ids[svc_id]:
            orphan(abi.MAP_AFFINITY_MATCH, raw_key, svc_id)
        else:
            frontend.affinity_matches.add(backend_id)
    for raw_key, raw_val in io.items(abi.MAP_CLIENTS):
        svc_id, cgroup_id = abi.unpack_client_key(raw_key)
        frontend = by_id.get(svc_id)
        if frontend is None:
            orphan(abi.MAP_CLIENTS, raw_key, svc_id)
        else:
            frontend.clients[cgroup_id] = raw_val
    for raw_key, raw_val in io.items(abi.MAP_QOS):
        svc_id, _limit = abi.unpack_qos(raw_key, raw_val)
        frontend = by_id.get(svc_id)
        if frontend is None:
            orphan(abi.MAP_QOS, raw_key, svc_id)
        else:
            frontend.qos = abi.pack_qos_val(_limit)
