"""Read what the service and backend maps hold, decoded into model terms.

Used by the writer to recover its state on start (nothing is flushed: it converges from what is there) and by
``balancing inspect`` to show the maps as they are. Inconsistencies a crash could leave (slots past the
count, slots without a master, backends no slot uses, slots naming a missing backend) are reported as
garbage keys or ``None`` slots rather than hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balancing.datapath import abi
from balancing.datapath.maps import MapIO
from balancing.model.desired import Backend, FrontendKey, Protocol

BackendRef = bytes  # a packed backend map value: address, port and protocol (see abi.pack_backend)


def backend_of(ref: BackendRef) -> Backend:
    be = abi.BackendVal.unpack(ref)
    return Backend(abi.unpack_addr(be.addr), be.port)


@dataclass
class ProgrammedFrontend:
    svc_id: int
    slots: list[BackendRef | None]  # slot 1 first; None: the slot or its backend is missing
    affinity_timeout: int = 0
    affinity_matches: set[int] = field(default_factory=set)  # backend ids in the affinity match map


@dataclass
class ProgrammedState:
    frontends: dict[FrontendKey, ProgrammedFrontend] = field(default_factory=dict)
    backend_ids: dict[BackendRef, int] = field(default_factory=dict)
    garbage_slots: list[bytes] = field(default_factory=list)  # service-map keys to delete
    garbage_backends: list[bytes] = field(default_factory=list)  # backend-map keys to delete
    garbage_matches: list[bytes] = field(default_factory=list)  # affinity-match keys to delete
    max_svc_id: int = 0
    max_backend_id: int = 0


def frontend_key(key: abi.SvcKey) -> FrontendKey:
    return FrontendKey(abi.unpack_addr(key.addr), key.port, Protocol(key.proto))


def read_state(io: MapIO) -> ProgrammedState:
    state = ProgrammedState()
    backends: dict[int, BackendRef] = {}
    for raw_id, raw in io.items(abi.MAP_BACKENDS):
        backend_id = abi.unpack_backend_id(raw_id)
        backends[backend_id] = raw
        state.max_backend_id = max(state.max_backend_id, backend_id)

    masters: dict[bytes, tuple[bytes, abi.SvcVal]] = {}
    slots: dict[tuple[bytes, int], tuple[bytes, int]] = {}
    for raw_key, raw_val in io.items(abi.MAP_SERVICES):
        prefix, slot = abi.split_svc_key(raw_key)
        if slot == abi.MASTER_SLOT:
            master = abi.SvcVal.unpack(raw_val)
            masters[prefix] = (raw_key, master)
            state.max_svc_id = max(state.max_svc_id, master.svc_id)
        else:
            slots[(prefix, slot)] = (raw_key, abi.slot_backend_id(raw_val))

    used: set[int] = set()
    for prefix, (raw_key, master) in masters.items():
        refs: list[BackendRef | None] = []
        for slot in range(1, master.count + 1):
            entry = slots.pop((prefix, slot), None)
            ref = backends.get(entry[1]) if entry else None
            if entry and ref:
                used.add(entry[1])
            refs.append(ref)
        state.frontends[frontend_key(abi.SvcKey.unpack(raw_key))] = ProgrammedFrontend(
            master.svc_id, refs, master.affinity_timeout if master.flags & abi.SVC_F_AFFINITY else 0
        )
    state.garbage_slots = [raw_key for raw_key, _ in slots.values()]
    _read_affinity_matches(io, state)
    for backend_id, ref in backends.items():
        if backend_id in used:
            state.backend_ids[ref] = backend_id
        else:
            state.garbage_backends.append(abi.pack_backend_id(backend_id))
    return state


def _read_affinity_matches(io: MapIO, state: ProgrammedState) -> None:
    """Attach match entries to their frontends; entries of unknown frontends or backends are garbage."""
    by_id = {f.svc_id: f for f in state.frontends.values()}
    for raw_key, _ in io.items(abi.MAP_AFFINITY_MATCH):
        svc_id, backend_id = abi.unpack_affinity_match(raw_key)
        frontend = by_id.get(svc_id)
        if frontend is None or not frontend.affinity_timeout:
            state.garbage_matches.append(raw_key)
        else:
            frontend.affinity_matches.add(backend_id)
