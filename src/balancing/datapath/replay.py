"""Replay the datapath's decision for one connect()/sendmsg() against the maps, read-only.

Mirrors ``translate`` and ``pick_backend`` of bpf/balancing.c step by step: the master lookup (no entry: the
address is not a frontend and passes untranslated), the client rule of the caller's cgroup (policy
frontends: skipRedirectFromBackend, or the loop guard's own backend), the QoS window, the caller's affinity
record, a slot of the primary tier (random for TCP, by socket cookie for UDP), the fallback tier when the
primary has nothing for this caller, then the backend entry. Nothing is written: where the datapath would
update state (the QoS counter, the affinity record) the replay only says so.

A slot choice that is random (TCP) or depends on a socket the caller has not created yet (UDP) is replayed
for every slot, so the result is a list of ``Outcome``s with probabilities; a deterministic decision has one.
Result names are those of the datapath's counters and events (``abi.RESULTS``). Used by ``balancing trace``;
unit-tested against ``maps.FakeMaps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from balancing import errors
from balancing.datapath import abi
from balancing.datapath.maps import MapIO
from balancing.model.desired import Backend, FrontendKey, Protocol

NS_PER_S = 1_000_000_000
U64 = (1 << 64) - 1  # the datapath subtracts times as __u64: a time "in the future" is a huge age
# The names of the results a replay can end in (``abi.RESULTS``).
SKIP = abi.RESULTS[abi.RES_FALLBACK_SKIP]
LOOP = abi.RESULTS[abi.RES_FALLBACK_LOOP]
QOS = abi.RESULTS[abi.RES_FALLBACK_QOS]
EMPTY = abi.RESULTS[abi.RES_FALLBACK_EMPTY]
TRANSLATED = abi.RESULTS[abi.RES_TRANSLATED]
AFFINITY = abi.RESULTS[abi.RES_AFFINITY]
LOOP_NEXT = abi.RESULTS[abi.RES_LOOP_GUARD_NEXT]
REFUSED = abi.RESULTS[abi.RES_REFUSED]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who connects: what the datapath reads from the socket and the task (``None``: not known)."""

    cgroup_id: int | None = None  # bpf_get_current_cgroup_id(): the task's cgroup v2 inode
    netns_cookie: int | None = None  # bpf_get_netns_cookie(): the socket's network namespace
    socket_cookie: int | None = None  # bpf_get_socket_cookie(): decides the UDP slot
    ipv4_socket: bool | None = None  # an AF_INET socket (IPv6 backends refused); None: the target's family
    # CLOCK_MONOTONIC, as bpf_ktime_get_ns() (run the tool outside a time namespace: it offsets the clock)
    now_ns: int = field(default_factory=time.monotonic_ns)


@dataclass(frozen=True, slots=True)
class SlotView:
    slot: int
    backend_id: int | None  # None: the slot entry is missing
    backend: Backend | None  # None: the slot or its backend entry is missing
    own: bool = False  # the caller's own backend (loop guard): never chosen


@dataclass(frozen=True, slots=True)
class TierView:
    scope: str  # "primary" or "fallback"
    svc_id: int
    count: int
    flags: int
    affinity_timeout: int
    slots: tuple[SlotView, ...]


@dataclass(frozen=True, slots=True)
class ClientRule:
    cgroup_id: int
    backend_id: int  # the caller's own backend (0 with skip)
    skip: bool  # skipRedirectFromBackend: the primary tier is skipped


@dataclass(frozen=True, slots=True)
class QosView:
    limit: int
    count: int
    window_ns: int  # the window's start (0: no redirection counted yet)
    window_age_ns: int
    expired: bool  # the window is over: the next connect starts a new one with count 0
    exceeded: bool


@dataclass(frozen=True, slots=True)
class AffinityView:
    backend_id: int
    backend: Backend | None
    age_ns: int
    timeout_s: int
    expired: bool
    matched: bool  # (frontend, backend) is in the affinity match map: still a valid target
    own: bool  # the caller's own backend: ignored (loop guard)

    @property
    def used(self) -> bool:
        return not self.expired and self.matched and not self.own


@dataclass(frozen=True, slots=True)
class Outcome:
    action: str  # "translate" or "refuse"
    result: str  # abi.RESULTS name the datapath counts this as
    tier: str | None  # "primary", "fallback"; None when refused
    backend_id: int | None
    backend: Backend | None
    probability: float
    slot: int | None = None  # None: by affinity record (or refused)


@dataclass
class Trace:
    target: FrontendKey
    caller: Caller
    svc_id: int | None = None  # None: not a frontend (passes untranslated)
    primary: TierView | None = None
    fallback: TierView | None = None
    client_rules: int = 0  # rules of this frontend (any cgroup)
    client_rule: ClientRule | None = None
    qos: QosView | None = None
    affinity: AffinityView | None = None
    skipped: str | None = None  # why the primary tier is skipped up front (SKIP or QOS)
    decided_by: str = "not-a-frontend"
    mode: str = ""  # how the deciding tier picks: "affinity", "random", "socket-cookie", "" (none)
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    excluded: str | None = None  # why the caller is left untranslated (socket-LB exclusions)

    @property
    def action(self) -> str:
        if self.svc_id is None or self.excluded is not None:
            return "pass"
        actions = {o.action for o in self.outcomes}
        return actions.pop() if len(actions) == 1 else "depends"

    @property
    def deterministic(self) -> bool:
        """One possible result for this caller (the counter it is counted under may still vary)."""
        if self.svc_id is None or self.excluded is not None:
            return True
        return len({(o.action, o.backend_id) for o in self.outcomes}) == 1


class MapSnapshot:
    """Dumps of the maps a replay reads, taken once (a map the caller cannot read reads as empty); also the
    north-south replay's (``replay_ns``)."""

    def __init__(self, io: MapIO) -> None:
        self.io = io
        self._data: dict[str, dict[bytes, bytes]] = {}
        self.unreadable: list[str] = []

    def readable(self, name: str) -> bool:
        self.items(name)
        return name not in self.unreadable

    def get(self, name: str, key: bytes) -> bytes | None:
        if name not in self._data:
            try:
                self._data[name] = dict(self.io.items(name))
            except (KeyError, OSError, errors.DatapathError):
                self._data[name] = {}
                self.unreadable.append(name)
        return self._data[name].get(key)

    def items(self, name: str) -> list[tuple[bytes, bytes]]:
        self.get(name, b"")
        return list(self._data[name].items())


def mix_cookie(cookie: int) -> int:
    """The datapath's hash of a socket cookie (the UDP slot is ``mix_cookie(cookie) % count + 1``)."""
    return ((cookie * 0x9E3779B97F4A7C15) & U64) >> 32


def replay(io: MapIO, target: FrontendKey, caller: Caller) -> Trace:
    """The datapath's decision for ``caller`` connecting to ``target``, from the maps as they are now."""
    maps = MapSnapshot(io)
    out = Trace(target, caller)
    primary = _tier(maps, out, abi.SCOPE_PRIMARY)
    if primary is None:
        out.notes.append("not a frontend: the connect goes out untranslated (it paid one hash lookup)")
        return _finish(out, maps)
    out.svc_id, out.primary = primary.svc_id, primary
    out.excluded = _excluded(maps, out.caller)
    if out.excluded is not None:
        out.decided_by = "socket-lb-excluded"
        out.notes.append(f"{out.excluded}: the hooks leave this caller untranslated")
        return _finish(out, maps)
    own = _client_rule(maps, out)
    if out.skipped is None and primary.flags & abi.SVC_F_QOS:
        _qos(maps, out)
    if own:
        slots = tuple(replace(s, own=s.backend_id == own) for s in primary.slots)
        out.primary = primary = replace(primary, slots=slots)
    if primary.flags & abi.SVC_F_FALLBACK:
        out.fallback = _tier(maps, out, abi.SCOPE_FALLBACK)
        if out.fallback is None:
            out.notes.append("the fallback flag is set but the fallback tier is missing")
    if out.skipped is not None:
        out.decided_by = "skip-redirect-from-backend" if out.skipped == SKIP else "qos-limit"
        out.outcomes = _via_fallback(maps, out, out.skipped, 1.0)
        return _finish(out, maps)
    picks, out.mode, out.affinity = _pick(maps, primary, own, out.caller, target.protocol)
    out.decided_by = _decided_by(primary, out.mode, own)
    _note_pick(out, primary)
    for backend_id, slot, result, p in picks:
        if backend_id is None:
            out.outcomes += _via_fallback(maps, out, LOOP if primary.count else EMPTY, p)
        else:
            out.outcomes.append(_backend(maps, out, "primary", backend_id, slot, result, p))
    return _finish(out, maps)


def _excluded(maps: MapSnapshot, caller: Caller) -> str | None:
    """Why the hooks leave ``caller`` alone once the address is a frontend, as the datapath checks it (the
    config's flags: host network namespace only, excluded pods' cgroups); None: translated."""
    raw = maps.get(abi.MAP_CONFIG, abi.CONFIG_KEY)
    if raw is None:
        return None
    config = dict(zip((name for name, _ in abi.CONFIG.fields), abi.CONFIG.packer.unpack(raw), strict=True))
    flags = abi.config_flags(raw)
    if flags & abi.CFG_F_HOST_NS_ONLY and caller.netns_cookie not in (None, config["host_netns_cookie"]):
        return "socketLB.hostNamespaceOnly: the socket is not in the host network namespace"
    skip_key = abi.pack_skip_key(caller.cgroup_id or 0)
    if (
        flags & abi.CFG_F_SKIP
        and caller.cgroup_id is not None
        and maps.get(abi.MAP_SKIP, skip_key) is not None
    ):
        return "the caller's pod is excluded from the socket LB (balancing.elf.io/socket-lb: disabled)"
    return None


def _decided_by(primary: TierView, mode: str, own: int) -> str:
    if primary.count == 0:
        return "no-primary-backend"
    if mode == "affinity":
        return "affinity"
    if own and any(s.own for s in primary.slots):
        return "loop-guard"
    return mode


def _note_pick(out: Trace, tier: TierView) -> None:
    if tier.flags & abi.SVC_F_AFFINITY and out.mode != "affinity":
        if out.caller.netns_cookie is None:
            out.notes.append("the caller's network namespace is unknown: its affinity record was not read")
        out.notes.append("this connect writes a new affinity record for the caller's network namespace")


def _tier(maps: MapSnapshot, out: Trace, scope: int) -> TierView | None:
    target = out.target
    pack = abi.SvcKeyPacker(target.ip, target.port, target.protocol, scope)
    raw = maps.get(abi.MAP_SERVICES, pack(abi.MASTER_SLOT))
    if raw is None:
        return None
    master = abi.SvcVal.unpack(raw)
    slots = []
    for slot in range(1, master.count + 1):
        entry = maps.get(abi.MAP_SERVICES, pack(slot))
        backend_id = abi.slot_backend_id(entry) if entry is not None else None
        backend = backend_by_id(maps, backend_id) if backend_id is not None else None
        slots.append(SlotView(slot, backend_id, backend))
    name = "primary" if scope == abi.SCOPE_PRIMARY else "fallback"
    for view in slots:
        if view.backend is None:
            what = "entry" if view.backend_id is None else f"backend (id {view.backend_id})"
            out.notes.append(f"{name} slot {view.slot}: its {what} is missing (inconsistent maps)")
    return TierView(name, master.svc_id, master.count, master.flags, master.affinity_timeout, tuple(slots))


def backend_by_id(maps: MapSnapshot, backend_id: int) -> Backend | None:
    raw = maps.get(abi.MAP_BACKENDS, abi.pack_backend_id(backend_id))
    if raw is None:
        return None
    be = abi.BackendVal.unpack(raw)
    return Backend(abi.unpack_addr(be.addr), be.port)


def _client_rule(maps: MapSnapshot, out: Trace) -> int:
    """Look the caller's cgroup up (policy frontends); returns its own backend id (0: none)."""
    assert out.primary is not None
    out.client_rules = sum(
        1 for k, _ in maps.items(abi.MAP_CLIENTS) if abi.unpack_client_key(k)[0] == out.svc_id
    )
    if not out.primary.flags & abi.SVC_F_CLIENTS:
        return 0
    cgroup_id = out.caller.cgroup_id
    if cgroup_id is None:
        out.notes.append("the caller's cgroup is unknown: assuming it is not a backend pod")
        return 0
    raw = maps.get(abi.MAP_CLIENTS, abi.pack_client_key(out.primary.svc_id, cgroup_id))
    if raw is None:
        return 0
    backend_id, flags = abi.CLIENT_VAL.packer.unpack(raw)
    out.client_rule = ClientRule(cgroup_id, int(backend_id), bool(flags & abi.CLIENT_F_SKIP))
    if out.client_rule.skip:
        out.skipped = SKIP
        return 0
    return int(backend_id)


def _qos(maps: MapSnapshot, out: Trace) -> None:
    assert out.svc_id is not None
    raw = maps.get(abi.MAP_QOS, abi.pack_qos_key(out.svc_id))
    if raw is None:
        out.notes.append("the QoS flag is set but the frontend has no QoS entry: not limited")
        return
    limit, count, window_ns = abi.QOS_VAL.packer.unpack(raw)
    age = (out.caller.now_ns - window_ns) & U64
    expired = age >= NS_PER_S
    exceeded = not expired and count >= limit
    out.qos = QosView(limit, count, window_ns, age, expired, exceeded)
    if exceeded:
        out.skipped = QOS
    else:
        out.notes.append(
            f"QoS: this connect counts as {1 if expired else count + 1} of {limit} in its window"
        )


Pick = tuple[int | None, int | None, str, float]  # (backend id or None: nothing, slot, result, probability)


def _pick(
    maps: MapSnapshot, tier: TierView, own: int, caller: Caller, proto: Protocol
) -> tuple[list[Pick], str, AffinityView | None]:
    """``pick_backend``: the affinity record, else a slot; returns the picks, the mode, the record."""
    if tier.count == 0:
        return [(None, None, TRANSLATED, 1.0)], "", None
    aff = _affinity(maps, tier, own, caller) if tier.flags & abi.SVC_F_AFFINITY else None
    if aff is not None and aff.used:
        return [(aff.backend_id, None, AFFINITY, 1.0)], "affinity", aff
    if proto == Protocol.UDP:
        mode = "socket-cookie"
        if caller.socket_cookie is not None:
            chosen = [(mix_cookie(caller.socket_cookie) % tier.count + 1, 1.0)]
        else:
            chosen = [(s, 1.0 / tier.count) for s in range(1, tier.count + 1)]
    else:
        mode, chosen = "random", [(s, 1.0 / tier.count) for s in range(1, tier.count + 1)]
    picks: dict[tuple[int | None, int | None, str], float] = {}
    for slot, p in chosen:
        pick = _slot_pick(tier, slot, own)
        picks[pick] = picks.get(pick, 0.0) + p
    return [(b, s, r, p) for (b, s, r), p in picks.items()], mode, aff


def _slot_pick(tier: TierView, slot: int, own: int) -> tuple[int | None, int | None, str]:
    view = tier.slots[slot - 1]
    if view.backend_id is None:
        return None, None, TRANSLATED
    if not own or view.backend_id != own:
        return view.backend_id, slot, TRANSLATED
    if tier.count == 1:
        return None, None, LOOP_NEXT
    nxt = tier.slots[slot % tier.count]
    return (nxt.backend_id, nxt.slot, LOOP_NEXT) if nxt.backend_id is not None else (None, None, LOOP_NEXT)


def _affinity(maps: MapSnapshot, tier: TierView, own: int, caller: Caller) -> AffinityView | None:
    if caller.netns_cookie is None:
        return None
    raw = maps.get(abi.MAP_AFFINITY, abi.AFF_KEY.packer.pack(caller.netns_cookie, tier.svc_id, 0))
    if raw is None:
        return None
    last_used, backend_id, _pad = abi.AFF_VAL.packer.unpack(raw)
    age = (caller.now_ns - last_used) & U64
    matched = maps.get(abi.MAP_AFFINITY_MATCH, abi.pack_affinity_match(tier.svc_id, backend_id)) is not None
    expired = age > tier.affinity_timeout * NS_PER_S
    backend = backend_by_id(maps, backend_id)
    return AffinityView(backend_id, backend, age, tier.affinity_timeout, expired, matched, backend_id == own)


def _via_fallback(maps: MapSnapshot, out: Trace, why: str, p: float) -> list[Outcome]:
    """The primary tier had nothing for this caller (``why``): the fallback tier, or a refusal."""
    tier = out.fallback
    if tier is None:
        return [Outcome("refuse", REFUSED, None, None, None, p)]
    picks, mode, aff = _pick(maps, tier, 0, out.caller, out.target.protocol)
    out.affinity = out.affinity or aff
    if not out.mode:
        out.mode = mode
        _note_pick(out, tier)
    found = []
    for backend_id, slot, _result, q in picks:
        if backend_id is None:
            found.append(Outcome("refuse", REFUSED, None, None, None, p * q))
        else:
            found.append(_backend(maps, out, "fallback", backend_id, slot, why, p * q))
    return found


def _backend(
    maps: MapSnapshot, out: Trace, tier: str, backend_id: int, slot: int | None, result: str, p: float
) -> Outcome:
    backend = backend_by_id(maps, backend_id)
    ipv4_socket = out.caller.ipv4_socket if out.caller.ipv4_socket is not None else out.target.ip.version == 4
    if backend is None:
        out.notes.append(f"backend id {backend_id} has no backend entry: refused")
        return Outcome("refuse", REFUSED, None, backend_id, None, p, slot)
    if ipv4_socket and backend.ip.version == 6:
        out.notes.append(f"{backend} is IPv6 and an AF_INET socket cannot reach it: refused")
        return Outcome("refuse", REFUSED, None, backend_id, backend, p, slot)
    return Outcome("translate", result, tier, backend_id, backend, p, slot)


def _finish(out: Trace, maps: MapSnapshot) -> Trace:
    merged: dict[tuple[str, str, str | None, int | None, int | None], Outcome] = {}
    for o in out.outcomes:
        k = (o.action, o.result, o.tier, o.backend_id, o.slot)
        prev = merged.get(k)
        merged[k] = o if prev is None else replace(prev, probability=prev.probability + o.probability)
    out.outcomes = sorted(merged.values(), key=lambda o: (-o.probability, o.slot or 0))
    if out.mode == "socket-cookie" and out.caller.socket_cookie is None and not out.deterministic:
        out.notes.append("UDP: the slot depends on the socket (its cookie); one socket keeps its backend")
    out.notes = list(dict.fromkeys(out.notes))
    out.notes += [f"map {name} could not be read: treated as empty" for name in maps.unreadable]
    return out
