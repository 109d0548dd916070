"""Replay north-south's decision for one packet from an external client against the maps, read-only.

Mirrors ``handle`` (ingress), ``tracked`` and ``new_flow`` of bpf/nodeport.c step by step, for a TCP or UDP
packet from ``client`` to ``target`` arriving on one of the node's north-south devices:

1. the connection-tracking entry of this exact flow (``bl_ct_v1``, keyed by the packet as it is on the wire):
   a client-direction entry whose backend still exists decides (the flow keeps its backend); one whose
   backend is gone is deleted by the program, and the packet starts a new flow;
2. the frontend's master entry (scope primary) with ``SVC_F_EXTERNAL``: without it the packet is not served
   north-south here and passes to the stack untouched (it may still be a frontend of the socket hooks);
3. the settings (``bl_nscfg_v1``): a Maglev table size of 0 translates nothing;
4. loadBalancerSourceRanges (``SVC_F_SRC_RANGES``): the longest prefix of (svc_id, client address) among
   ``bl_srcr_v1``'s entries, as the LPM trie finds it; none: dropped;
5. the frontend's Maglev table (``bl_mglv_v1``; none: dropped, "no local endpoint" with externalTrafficPolicy
   Local), its entry ``flow_hash(key) % maglev_size``, that entry's backend (missing: dropped);
6. a backend on this node (``BE_F_LOCAL``): the destination is translated, the client's address kept,
   unless ``hairpin()`` holds (the route back to the client leaves by another device than the packet came
   in on, and the frontend is no address of this node): then the source becomes the frontend address and a
   SNAT port; a backend elsewhere: the source is translated to the arriving device's address
   (``bl_nsdev_v1``: every device is reported, since the packet may arrive on any) and a SNAT port.

The arriving device is not known: the replay assumes the packet arrives where this node routes the client
(symmetric routing), through ``Routes``, the node's routing as ``bpf_fib_lookup()`` sees it (``cli.trace``
asks ``ip route get``); without it the hairpin test is left out, and said so.

``flow_hash`` is the program's, bit for bit. Without the client's port the entry is unknown: the replay
gives each backend's share of the table, which is the probability over client ports (the hash spreads
them evenly over the entries). Nothing is written; where the program would write (the two conntrack
entries, a SNAT port) the replay says so. Result names are the datapath's (``abi.RESULTS``).

Neighbours: ``datapath.replay`` (the socket hooks' replay, the same shape), ``cli.trace``
(``balancing trace --from-address``), ``abi``, ``maps.MapIO``; unit-tested against ``maps.FakeMaps``,
checked against the real program by tests/kernel/test_trace_ns.py. One module over 400 lines on purpose: it
mirrors one program's decision step by step, in the program's order, like ``datapath.replay``.
"""

from __future__ import annotations

import array
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol as Interface

from balancing import errors
from balancing.datapath import abi
from balancing.datapath.maps import MapIO
from balancing.datapath.replay import MapSnapshot, backend_by_id
from balancing.model.desired import Backend, FrontendKey, IPAddress, Protocol

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325  # flow_hash(): FNV-1a's offset basis and prime over 32-bit words ...
FNV_PRIME = 0x100000001B3
MIX_MULTIPLIER = 0xBF58476D1CE4E5B9  # ... then a splitmix64-like finaliser
SRCR_BITS = 32 + 128  # the source-range key's data: svc_id, then the address
LOCAL = abi.RESULTS[abi.RES_NS_LOCAL]
SNAT = abi.RESULTS[abi.RES_NS_SNAT]
DROP_NO_LOCAL = abi.RESULTS[abi.RES_DROP_NO_LOCAL]
DROP_SOURCE = abi.RESULTS[abi.RES_DROP_SOURCE]
DROP_NO_BACKEND = abi.RESULTS[abi.RES_DROP_NO_BACKEND]
DROP_SNAT_PORTS = abi.RESULTS[abi.RES_DROP_SNAT_PORTS]

_KEY = abi.CT_KEY.packer
_KEY_OFFSETS = abi.CT_KEY.offsets()
_WORDS = struct.Struct("=4I")  # the address as the program loads it: four native u32
_U16 = struct.Struct("=H")
_SRCR = abi.SRCR_KEY.packer


class Routes(Interface):
    """The node's routing, as the program's ``bpf_fib_lookup()`` calls see it."""

    def device_to(self, address: IPAddress) -> int | None:
        """The ifindex a packet to ``address`` leaves by (None: no route)."""

    def is_local(self, address: IPAddress) -> bool:
        """Whether ``address`` is this node's own (delivered here, not forwarded)."""


@dataclass(frozen=True, slots=True)
class Client:
    """The external client: its address and, if known, its source port."""

    address: IPAddress
    port: int | None = None
    # CLOCK_MONOTONIC, as bpf_ktime_get_ns() (the ages of a conntrack entry)
    now_ns: int = field(default_factory=time.monotonic_ns)


@dataclass(frozen=True, slots=True)
class Device:
    """A device north-south runs on: a remote backend sees this address as the source (None: that family
    has no address on it, and such flows arriving there are dropped)."""

    ifindex: int
    snat: IPAddress | None
    # a local backend's flow arriving here is hairpinned (source translated to the frontend); None: unknown
    hairpin: bool | None = None


@dataclass(frozen=True, slots=True)
class SourceRanges:
    ranges: tuple[str, ...]  # the frontend's loadBalancerSourceRanges, as bl_srcr_v1 holds them
    matched: str | None  # the longest of them holding the client; None: the client is outside all

    @property
    def allowed(self) -> bool:
        return self.matched is not None


@dataclass(frozen=True, slots=True)
class Tracked:
    """The connection-tracking entry of this exact flow."""

    entry: abi.ConntrackEntry
    backend: Backend | None  # the backend id's entry now; None: gone (the flow picks a backend again)

    @property
    def decides(self) -> bool:
        return self.entry.reply or self.backend is not None


@dataclass(frozen=True, slots=True)
class NsOutcome:
    action: str  # "translate" or "drop"
    result: str | None  # abi.RESULTS name the datapath counts this as (None: a packet of a tracked flow)
    backend_id: int | None
    backend: Backend | None
    local: bool  # a pod on this node: the client's address is kept, unless ``hairpin``
    probability: float
    entries: int = 0  # Maglev table entries naming this backend (0: not decided by the table)
    snat_ports_in_use: dict[str, int] = field(default_factory=dict)  # SNAT address → ports taken to it
    hairpin: bool = False  # a local backend reached with the source translated to the frontend


@dataclass
class NsTrace:
    target: FrontendKey
    client: Client
    loaded: bool = True  # north-south's maps are pinned (the agent runs with --north-south)
    svc_id: int | None = None  # None: no master entry (not a frontend at all)
    flags: int = 0  # the master entry's flags
    maglev_size: int | None = None  # bl_ns_config.maglev_size (None: no settings)
    snat_ports: tuple[int, int] | None = None
    source_ranges: SourceRanges | None = None  # None: not restricted (no SVC_F_SRC_RANGES)
    table_entries: int | None = None  # entries of the frontend's Maglev table; None: it has none
    flow_hash: int | None = None  # with the client's port
    index: int | None = None  # flow_hash % maglev_size
    tracked: Tracked | None = None  # this exact flow's conntrack entry
    tracked_flows: int = 0  # flows from the client's address to this frontend in conntrack
    devices: list[Device] = field(default_factory=list)
    client_device: int | None = None  # the ifindex this node routes the client through (with ``Routes``)
    frontend_local: bool | None = None  # the frontend is this node's address (None: routes unknown)
    decided_by: str = "not-served"
    outcomes: list[NsOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def served(self) -> bool:
        return bool(self.flags & abi.SVC_F_EXTERNAL)

    @property
    def action(self) -> str:
        if not self.outcomes:
            return "pass"
        actions = {o.action for o in self.outcomes}
        return actions.pop() if len(actions) == 1 else "depends"

    @property
    def deterministic(self) -> bool:
        return len({(o.action, o.backend_id) for o in self.outcomes}) <= 1


class _Maps(MapSnapshot):
    """``replay.MapSnapshot`` and the SNAT ports taken, counted once."""

    def __init__(self, io: MapIO) -> None:
        super().__init__(io)
        self._taken: Counter[tuple[bytes, bytes, int, bytes]] | None = None

    def ports_taken(self) -> Counter[tuple[bytes, bytes, int, bytes]]:
        """Conntrack entries by (source, source port, protocol, destination): for a reply entry from a
        backend to a SNAT address, the ports the program took towards that backend (counted once)."""
        if self._taken is None:
            self._taken = Counter()
            for key, _value in self.items(abi.MAP_CONNTRACK):
                src, dst, sport, _dport, proto, _pad, _pad2 = _KEY.unpack(key)
                self._taken[(src, sport, proto, dst)] += 1
        return self._taken


def flow_key(client: IPAddress, client_port: int, target: FrontendKey) -> bytes:
    """The packet's ``struct bl_ct_key``: from the client to the frontend, as parse_ip() fills it."""
    return _KEY.pack(
        abi.pack_addr(client),
        abi.pack_addr(target.ip),
        abi.pack_port(client_port),
        abi.pack_port(target.port),
        int(target.protocol),
        0,
        0,
    )


def flow_hash(key: bytes, by_client: bool = False) -> int:
    """nodeport.c's ``flow_hash()`` of a packed ``bl_ct_key``, bit for bit.

    The program loads the source address as four ``__u32`` in this CPU's order (the address's bytes are in
    network order, so on little-endian CPUs each word reads byte-swapped), then ``sport << 16 | dport``
    with both ports as the ``__u16`` they are in the key (network-order bytes read natively), then the
    protocol; each word is xor-ed in and multiplied by the FNV prime modulo 2^64; the result is mixed and
    truncated to 32 bits. The destination is left out: a flow picks the same entry on every node.
    ``by_client`` (a frontend with sessionAffinity ClientIP): the ports' word is 0, the client's address alone
    decides.
    """
    src = key[_KEY_OFFSETS["src"] : _KEY_OFFSETS["src"] + 16]
    (sport,) = _U16.unpack_from(key, _KEY_OFFSETS["sport"])
    (dport,) = _U16.unpack_from(key, _KEY_OFFSETS["dport"])
    ports = 0 if by_client else (sport << 16 | dport) & U32
    words = (*_WORDS.unpack(src), ports, key[_KEY_OFFSETS["proto"]])
    h = FNV_OFFSET
    for word in words:
        h = ((h ^ word) * FNV_PRIME) & U64
    h ^= h >> 29
    h = (h * MIX_MULTIPLIER) & U64
    h ^= h >> 32
    return h & U32


def replay(io: MapIO, target: FrontendKey, client: Client, routes: Routes | None = None) -> NsTrace:
    """North-south's decision for a packet from ``client`` to ``target`` arriving on a node device."""
    if client.address.version != target.ip.version:
        raise ValueError(
            f"the client {client.address} and the frontend {target.ip} are of different families"
        )
    maps = _Maps(io)
    out = NsTrace(target, client)
    if not maps.readable(abi.MAP_NS_CONFIG):
        out.loaded, out.decided_by = False, "not-loaded"
        out.notes.append(
            "north-south is not loaded here (no bl_nscfg_v1 pin): no program on the devices, the packet "
            "goes to the stack untouched (run the agent with --north-south or --nodeport-devices)"
        )
        maps.unreadable.remove(abi.MAP_NS_CONFIG)
        return _finish(out, maps)
    out.devices = _devices(maps, target.ip.version)
    _routes(out, routes)
    _master(maps, out)
    _settings(maps, out)
    if target.protocol not in (Protocol.TCP, Protocol.UDP):
        out.decided_by = "not-tcp-udp"
        out.notes.append("north-south translates TCP and UDP only: the packet passes untouched")
        return _finish(out, maps)
    if _tracked(maps, out):
        return _finish(out, maps)
    _new_flow(maps, out)
    return _finish(out, maps)


def _devices(maps: _Maps, version: int) -> list[Device]:
    found = []
    for key, value in maps.items(abi.MAP_NS_DEVICES):
        addr4, addr6 = abi.NSDEV.packer.unpack(value)
        raw = addr6 if version == 6 else addr4
        found.append(Device(abi.unpack_u32(key), None if raw == bytes(16) else abi.unpack_addr(raw)))
    return sorted(found, key=lambda d: d.ifindex)


def _routes(out: NsTrace, routes: Routes | None) -> None:
    """Where the node routes the client, whether the frontend is its own, and so, per device, whether a
    local backend's flow arriving there is hairpinned (``hairpin()``: both FIB lookups)."""
    if routes is None:
        return
    out.client_device = routes.device_to(out.client.address)
    out.frontend_local = routes.is_local(out.target.ip)
    out.devices = [Device(d.ifindex, d.snat, _hairpin_on(out, d.ifindex)) for d in out.devices]


def _hairpin_on(out: NsTrace, ifindex: int) -> bool:
    return not out.frontend_local and out.client_device is not None and out.client_device != ifindex


def _tracked(maps: _Maps, out: NsTrace) -> bool:
    """``tracked()``: whether this exact flow's conntrack entry decides (it is recorded either way)."""
    client, target = out.client, out.target
    out.tracked_flows = _flows_from(maps, client.address, target)
    if client.port is None:
        if out.tracked_flows:
            out.notes.append(
                f"{out.tracked_flows} tracked flow(s) from {client.address} to this frontend keep their "
                "backends (balancing inspect conntrack); a new client port gets the table's pick below"
            )
        return False
    key = flow_key(client.address, client.port, target)
    raw = maps.get(abi.MAP_CONNTRACK, key)
    if raw is None:
        return False
    entry = abi.ConntrackEntry.unpack(key, raw)
    if target.protocol is Protocol.TCP and not entry.reply and entry.state == "closing":
        out.notes.append(
            "the tracked flow with this client port was closed: a new connection (a SYN) on it picks its "
            "backend again, as below"
        )
        return False
    backend = None if entry.reply else backend_by_id(maps, entry.backend_id)
    out.tracked = Tracked(entry, backend)
    if not out.tracked.decides:
        out.notes.append(
            f"a tracked flow names backend id {entry.backend_id}, which is gone: the program deletes both "
            "entries and the packet starts a new flow"
        )
        return False
    out.decided_by = "conntrack"
    out.outcomes = [_tracked_outcome(entry)]
    out.notes.append(_tracked_note(entry))
    return True


def _flows_from(maps: _Maps, address: IPAddress, target: FrontendKey) -> int:
    """Client-direction conntrack entries from ``address`` (any port) to the frontend."""
    src, dst = abi.pack_addr(address), abi.pack_addr(target.ip)
    dport, proto = abi.pack_port(target.port), int(target.protocol)
    count = 0
    for key, value in maps.items(abi.MAP_CONNTRACK):
        k_src, k_dst, _sport, k_dport, k_proto, _pad, _pad2 = _KEY.unpack(key)
        if (k_src, k_dst, k_dport, k_proto) == (src, dst, dport, proto):
            count += not abi.CT_VAL.packer.unpack(value)[6] & abi.CT_F_REPLY
    return count


def _tracked_outcome(entry: abi.ConntrackEntry) -> NsOutcome:
    backend = None if entry.reply else Backend(*entry.new_dst)
    return NsOutcome("translate", None, entry.backend_id, backend, bool(entry.flags & abi.CT_F_LOCAL), 1.0)


def _tracked_note(entry: abi.ConntrackEntry) -> str:
    if entry.reply:
        return (
            "the packet matches the reply entry of a tracked flow: it is rewritten as that flow's reply "
            f"(to {_endpoint(entry.new_src)} -> {_endpoint(entry.new_dst)})"
        )
    how = (
        f"source translated to {_endpoint(entry.new_src)}"
        if entry.flags & abi.CT_F_SNAT
        else "the client's address kept"
    )
    return (
        f"an existing conntrack entry for this flow decides, not the Maglev table: to "
        f"{_endpoint(entry.new_dst)}, {how} (state {entry.state})"
    )


def _endpoint(pair: tuple[IPAddress, int]) -> str:
    ip, port = pair
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _new_flow(maps: _Maps, out: NsTrace) -> None:
    """``new_flow()``: the master entry, the settings, the source ranges, the table, the backend."""
    if not out.served:
        out.decided_by = "not-served"
        what = "not a frontend" if out.svc_id is None else "a frontend of the socket hooks only"
        out.notes.append(f"{what}: not served north-south here, the packet passes to the stack untouched")
        return
    if not out.maglev_size:
        out.decided_by = "disabled"
        out.notes.append(
            "the Maglev table size is 0: north-south translates nothing, the packet passes untouched"
        )
        return
    if out.flags & abi.SVC_F_SRC_RANGES and not _source_allowed(maps, out):
        out.decided_by = "source-range"
        out.outcomes = [NsOutcome("drop", DROP_SOURCE, None, None, False, 1.0)]
        return
    table = _table(maps, out)
    if table is None:
        out.decided_by = "no-table"
        result = DROP_NO_LOCAL if out.flags & abi.SVC_F_ETP_LOCAL else DROP_NO_BACKEND
        out.outcomes = [NsOutcome("drop", result, None, None, False, 1.0)]
        why = "no local endpoint (externalTrafficPolicy Local)" if result == DROP_NO_LOCAL else "no backend"
        out.notes.append(f"the frontend has no Maglev table: dropped, {why}")
        return
    out.decided_by = "maglev"
    _pick(maps, out, table)


def _master(maps: _Maps, out: NsTrace) -> None:
    """The frontend's master entry (scope primary): its identity and flags (read first for the report; the
    program reads it only for a packet of no tracked flow)."""
    target = out.target
    raw = maps.get(abi.MAP_SERVICES, abi.SvcKeyPacker(target.ip, target.port, target.protocol)(0))
    if raw is not None:
        master = abi.SvcVal.unpack(raw)
        out.svc_id, out.flags = master.svc_id, master.flags


def _settings(maps: _Maps, out: NsTrace) -> None:
    """The Maglev table size and SNAT range (read up front for the report, as ``_master``)."""
    raw = maps.get(abi.MAP_NS_CONFIG, abi.CONFIG_KEY)
    size, low, high = abi.unpack_ns_config(raw) if raw is not None else (0, 0, 0)
    out.maglev_size, out.snat_ports = size, (low, high)


def _source_allowed(maps: _Maps, out: NsTrace) -> bool:
    """``source_allowed()``: an LPM lookup of (svc_id, client) with every bit significant; the entry with
    the longest prefix that matches it wins, whichever frontend the writer meant it for."""
    assert out.svc_id is not None
    want = int.from_bytes(_SRCR.pack(SRCR_BITS, out.svc_id, abi.pack_addr(out.client.address))[4:], "big")
    best: tuple[int, bytes] | None = None
    mine = []
    for key, _value in maps.items(abi.MAP_SOURCE_RANGES):
        prefixlen = abi.unpack_u32(key)
        if abi.source_range_svc_id(key) == out.svc_id:
            mine.append(key)
        if prefixlen > SRCR_BITS:
            continue
        shift = SRCR_BITS - prefixlen
        if int.from_bytes(key[4:], "big") >> shift == want >> shift and (best is None or prefixlen > best[0]):
            best = (prefixlen, key)
    ranges = tuple(_range_text(k) for k in sorted(mine, key=lambda k: (abi.unpack_u32(k), k)))
    out.source_ranges = SourceRanges(ranges, None if best is None else _range_text(best[1]))
    if best is None:
        out.notes.append(f"{out.client.address} is outside the frontend's loadBalancerSourceRanges: dropped")
    return best is not None


def _range_text(key: bytes) -> str:
    """A source-range key as its CIDR (an entry the writer would not make: as the raw prefix)."""
    try:
        svc_id, network = abi.unpack_source_range(key)
    except ValueError:
        prefixlen, svc_id, addr = _SRCR.unpack(key)
        return f"{svc_id}/{addr.hex()}/{prefixlen}"
    return str(network)


def _table(maps: _Maps, out: NsTrace) -> array.array[int] | None:
    assert out.svc_id is not None
    ref = maps.get(abi.MAP_MAGLEV, abi.pack_maglev_key(out.svc_id))
    if ref is None:
        return None
    try:
        table = maps.io.read_table(ref)
    except (KeyError, OSError, errors.DatapathError) as exc:
        out.notes.append(f"the frontend's Maglev table could not be read ({exc}): treated as missing")
        return None
    out.table_entries = len(table)
    if len(table) != out.maglev_size:
        out.notes.append(
            f"the table has {len(table)} entries, the settings say {out.maglev_size} (the agent rewrites it "
            "after a size change): indexes beyond the table drop"
        )
    return table


def _pick(maps: _Maps, out: NsTrace, table: array.array[int]) -> None:
    """The table's pick for the client's port; without it, every backend's share of the table."""
    assert out.maglev_size
    by_client = bool(out.flags & abi.SVC_F_AFFINITY)
    if out.client.port is not None or by_client:
        if by_client:
            out.notes.append(
                "sessionAffinity ClientIP: the client's address alone picks the entry (any port)"
            )
        key = flow_key(out.client.address, out.client.port or 0, out.target)
        out.flow_hash = flow_hash(key, by_client)
        out.index = out.flow_hash % out.maglev_size
        backend_id = table[out.index] if out.index < len(table) else None
        out.outcomes = [_outcome(maps, out, backend_id, 1.0, 1)]
        return
    counts: dict[int | None, int] = {}
    for backend_id in table[: out.maglev_size]:
        counts[backend_id] = counts.get(backend_id, 0) + 1
    if len(table) < out.maglev_size:
        counts[None] = out.maglev_size - len(table)
    out.outcomes = [_outcome(maps, out, b, n / out.maglev_size, n) for b, n in counts.items()]
    out.notes.append("without the client's port: each backend's share of the table (the hash spreads ports)")


def _outcome(maps: _Maps, out: NsTrace, backend_id: int | None, p: float, entries: int) -> NsOutcome:
    """What one table entry's backend id becomes: a drop, DNAT to a local pod, or SNAT to a remote one."""
    no_backend = NsOutcome("drop", DROP_NO_BACKEND, backend_id, None, False, p, entries)
    if backend_id is None:
        out.notes.append("an index beyond the table: no entry, dropped")
        return no_backend
    raw = maps.get(abi.MAP_BACKENDS, abi.pack_backend_id(backend_id))
    if raw is None:
        out.notes.append(f"backend id {backend_id} has no backend entry: dropped")
        return no_backend
    be = abi.BackendVal.unpack(raw)
    backend = Backend(abi.unpack_addr(be.addr), be.port)
    if be.flags & abi.BE_F_LOCAL:
        return _local(maps, out, be, backend_id, p, entries)
    if not _snat_possible(out):
        return NsOutcome("drop", DROP_SNAT_PORTS, backend_id, backend, False, p, entries)
    in_use = _snat_in_use(maps, out, be)
    return NsOutcome("translate", SNAT, backend_id, backend, False, p, entries, in_use)


def _local(maps: _Maps, out: NsTrace, be: abi.BackendVal, backend_id: int, p: float, n: int) -> NsOutcome:
    """A pod on this node: DNAT, or (hairpin) SNAT to the frontend address and a port of the range."""
    backend = Backend(abi.unpack_addr(be.addr), be.port)
    if out.frontend_local is None:
        out.notes.append(
            "routes unknown: a local backend is assumed reached without hairpin (the program translates the "
            "source to the frontend when the route back to the client leaves by another device)"
        )
    if not _hairpinned(out):
        return NsOutcome("translate", LOCAL, backend_id, backend, True, p, n)
    out.notes.append(
        f"hairpin: this node routes {out.client.address} through no north-south device and the frontend is "
        "not its address, so a local backend's replies would miss the egress program: the source is "
        f"translated to the frontend {out.target.ip}"
    )
    if not _snat_range(out):
        return NsOutcome("drop", DROP_SNAT_PORTS, backend_id, backend, True, p, n, hairpin=True)
    frontend = abi.pack_addr(out.target.ip)
    taken = maps.ports_taken()[(be.addr, abi.pack_port(be.port), int(out.target.protocol), frontend)]
    return NsOutcome("translate", SNAT, backend_id, backend, True, p, n, {str(out.target.ip): taken}, True)


def _hairpinned(out: NsTrace) -> bool:
    """``hairpin()`` for a packet arriving where this node routes the client: only a client routed through
    no north-south device (a pod of this node, say) can arrive on one, by a detour."""
    devices = {d.ifindex for d in out.devices}
    if out.flags & abi.SVC_F_NODE_ADDRESS:  # a NodePort: the program asks no route
        return False
    return out.frontend_local is False and out.client_device is not None and out.client_device not in devices


def _snat_range(out: NsTrace) -> bool:
    low, high = out.snat_ports or (0, 0)
    if not low or high < low:
        out.notes.append(f"the SNAT port range {low}-{high} is empty: flows that need SNAT are dropped")
        return False
    return True


def _snat_possible(out: NsTrace) -> bool:
    """Whether a remote backend can be reached at all: a valid SNAT range and a device with an address of
    the family (the program drops on a device without one)."""
    family = f"IPv{out.target.ip.version}"
    if not _snat_range(out):
        return False
    if not out.devices:
        out.notes.append("no device in bl_nsdev_v1: flows to remote backends are dropped")
        return False
    for device in out.devices:
        if device.snat is None:
            out.notes.append(
                f"device ifindex {device.ifindex} has no {family} address: flows to remote backends "
                f"arriving there are dropped ({DROP_SNAT_PORTS})"
            )
    return any(d.snat is not None for d in out.devices)


def _snat_in_use(maps: _Maps, out: NsTrace, be: abi.BackendVal) -> dict[str, int]:
    """SNAT ports taken towards the backend, per device address: the reply entries (backend -> node)."""
    taken, proto, port = maps.ports_taken(), int(out.target.protocol), abi.pack_port(be.port)
    in_use = {
        str(d.snat): taken[(be.addr, port, proto, abi.pack_addr(d.snat))]
        for d in out.devices
        if d.snat is not None
    }
    low, high = out.snat_ports or (0, 0)
    for address, count in in_use.items():
        if count >= high - low + 1:
            out.notes.append(
                f"every SNAT port from {address} to {abi.unpack_addr(be.addr)}:{be.port} is taken: a new "
                f"flow through it is dropped ({DROP_SNAT_PORTS}) until entries are evicted"
            )
    return in_use


def _finish(out: NsTrace, maps: _Maps) -> NsTrace:
    out.outcomes.sort(key=lambda o: (-o.probability, o.action, str(o.backend)))
    out.notes = list(dict.fromkeys(out.notes))
    out.notes += [f"map {name} could not be read: treated as empty" for name in maps.unreadable]
    return out
