"""The Python mirror of bpf/balancing.h: map names, struct layouts, encoders and decoders.

The only module that knows byte layouts. Every struct is declared as an ordered field list (name, struct
format) from which the packer, the size and each field's offset derive; the C enums' values are mirrored as
constants named after them (``BL_RES_TRANSLATED`` is ``RES_TRANSLATED``; ``ENUMS`` lists the prefixes), and
each map's default capacity in ``DEFAULT_ENTRIES``. tests/unit/test_abi.py compares all of that with the BTF
of the compiled objects. Addresses are 16 bytes, IPv4 as ``::ffff:a.b.c.d``; ports are in network order,
everything else native (the maps are read by programs on the same CPU). Beside the one-entry packers, bulk
packers (``pack_backend_refs`` and on) pack a whole run of entries with C-level loops (struct, array, map):
the same bytes, no Python call per entry; tests/unit/test_abi_bulk.py holds them to the one-entry packers.

One module on purpose (over 400 lines): the ABI is mirrored exactly once, next to the BTF test that checks it.
"""

from __future__ import annotations

import array
import ipaddress
import itertools
import operator
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from balancing.model.desired import Backend, FrontendKey, IPAddress, Protocol

ABI_VERSION = 1
MAP_SERVICES = "bl_svc_v1"
MAP_BACKENDS = "bl_be_v1"
MAP_REVERSE = "bl_rev_v1"
MAP_SOCK_REVERSE = "bl_sks_v1"  # socket storage: no capacity, each translated connected socket holds its own
MAP_LEGACY_SOCK_REVERSE = "bl_sock_v2"  # up to 0.3: a cookie-keyed hash; migrated on upgrade (sockmigrate)
MAP_AFFINITY = "bl_aff_v1"
MAP_AFFINITY_MATCH = "bl_affm_v1"
MAP_CLIENTS = "bl_client_v1"
MAP_QOS = "bl_qos_v1"
MAP_STATS = "bl_stats_v1"
MAP_CONFIG = "bl_cfg_v3"
MAP_SKIP = "bl_skip_v1"
MAP_EVENTS = "bl_events_v2"
MAP_EVENT_STATS = "bl_evstat_v1"
MAP_DOOMED = "bl_doom_v1"  # carried by sockterm.o only (socket termination), never pinned: not in ALL_MAPS
SOCKTERM_MAPS = (MAP_SOCK_REVERSE, MAP_DOOMED)  # the maps sockterm.o carries: reused, resp. its own
SOCKMIGRATE_MAPS = (MAP_SOCK_REVERSE, MAP_LEGACY_SOCK_REVERSE)  # sockmigrate.o: both pointed at the pins
LEGACY_SOCK_ENTRIES = 262144  # bl_sock_v2's declared capacity (0.3's default; a pin keeps its own size)
MAP_MAGLEV = "bl_mglv_v1"  # north-south Maglev tables (hash of maps), written by the writer
MAP_SOURCE_RANGES = "bl_srcr_v1"  # loadBalancerSourceRanges (LPM trie), written by the writer
MAP_CONNTRACK = "bl_ct_v1"  # carried by nodeport.o: north-south connection tracking
MAP_NS_DEVICES = "bl_nsdev_v1"  # nodeport.o: the devices north-south runs on
MAP_NS_CONFIG = "bl_nscfg_v1"  # nodeport.o: north-south settings
MAP_NS_STATS = "bl_nsstat_v1"  # nodeport.o: north-south fill counters
# The maps only nodeport.o carries (pinned by the north-south loader; the rest of its maps are shared).
NODEPORT_MAPS = (MAP_CONNTRACK, MAP_NS_DEVICES, MAP_NS_CONFIG, MAP_NS_STATS)
ALL_MAPS = (
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_REVERSE,
    MAP_SOCK_REVERSE,
    MAP_AFFINITY,
    MAP_AFFINITY_MATCH,
    MAP_CLIENTS,
    MAP_QOS,
    MAP_STATS,
    MAP_CONFIG,
    MAP_SKIP,
    MAP_EVENTS,
    MAP_EVENT_STATS,
    MAP_MAGLEV,
    MAP_SOURCE_RANGES,
)
# The maps both balancing.o and nodeport.o carry (nodeport.o reuses balancing.o's pins).
SHARED_MAPS = (
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_STATS,
    MAP_CONFIG,
    MAP_EVENTS,
    MAP_EVENT_STATS,
    MAP_MAGLEV,
    MAP_SOURCE_RANGES,
)

# The C enums of bpf/balancing.h, each as the prefix its enumerators share here (BL_ dropped there).
ENUMS = {
    "bl_scope": "SCOPE_",
    "bl_svc_flags": "SVC_F_",
    "bl_client_flags": "CLIENT_F_",
    "bl_result": "RES_",
    "bl_hook": "HOOK_",
    "bl_events_mode": "EVENTS_",
    "bl_cfg_flags": "CFG_F_",
    "bl_evstat": "EVSTAT_",
    "bl_backend_flags": "BE_F_",
    "bl_ct_flags": "CT_F_",
    "bl_ct_state": "CT_",
    "bl_nsstat": "NSSTAT_",
}
SCOPE_PRIMARY = 0
SCOPE_FALLBACK = 1
SCOPE_EXTERNAL = 2
SVC_F_NONE = 0
SVC_F_AFFINITY = 1 << 0
SVC_F_FALLBACK = 1 << 1
SVC_F_CLIENTS = 1 << 2
SVC_F_QOS = 1 << 3
SVC_F_HOST_ONLY = 1 << 4
SVC_F_EXTERNAL = 1 << 5
SVC_F_ETP_LOCAL = 1 << 6
SVC_F_SRC_RANGES = 1 << 7
SVC_F_NODE_ADDRESS = 1 << 8
CLIENT_F_SKIP = 1 << 0
BE_F_LOCAL = 1 << 0  # struct bl_backend.flags: a pod on this node

# Resolution results (struct bl_stat_key.result, struct bl_event.result).
RES_TRANSLATED = 1
RES_AFFINITY = 2
RES_LOOP_GUARD_NEXT = 3
RES_FALLBACK_SKIP = 4
RES_FALLBACK_LOOP = 5
RES_FALLBACK_QOS = 6
RES_FALLBACK_EMPTY = 7
RES_REFUSED = 8
RES_REVERSED = 9
RES_NS_LOCAL = 10
RES_NS_SNAT = 11
RES_DROP_NO_LOCAL = 12
RES_DROP_SOURCE = 13
RES_DROP_NO_BACKEND = 14
RES_DROP_SNAT_PORTS = 15
RES_DROP_CT_FULL = 16
# ... and their names in metrics, events and traces.
RESULTS = {
    RES_TRANSLATED: "translated",
    RES_AFFINITY: "affinity",
    RES_LOOP_GUARD_NEXT: "loop_guard_next",
    RES_FALLBACK_SKIP: "fallback_skip_redirect_from_backend",
    RES_FALLBACK_LOOP: "fallback_loop_guard",
    RES_FALLBACK_QOS: "fallback_qos",
    RES_FALLBACK_EMPTY: "fallback_no_primary_backend",
    RES_REFUSED: "refused",
    RES_REVERSED: "reversed",
    RES_NS_LOCAL: "translated_local",
    RES_NS_SNAT: "translated_snat",
    RES_DROP_NO_LOCAL: "dropped_no_local_endpoint",
    RES_DROP_SOURCE: "dropped_source_range",
    RES_DROP_NO_BACKEND: "dropped_no_backend",
    RES_DROP_SNAT_PORTS: "dropped_snat_ports",
    RES_DROP_CT_FULL: "dropped_conntrack_full",
}
# The north-south drops, for the metrics of drops by reason.
NS_DROPS = (RES_DROP_NO_LOCAL, RES_DROP_SOURCE, RES_DROP_NO_BACKEND, RES_DROP_SNAT_PORTS, RES_DROP_CT_FULL)
# The hook that resolved (struct bl_stat_key.hook, struct bl_event.hook), and its name.
HOOK_CONNECT4 = 1
HOOK_CONNECT6 = 2
HOOK_SENDMSG4 = 3
HOOK_SENDMSG6 = 4
HOOK_RECVMSG4 = 5
HOOK_RECVMSG6 = 6
HOOK_GETPEERNAME4 = 7
HOOK_GETPEERNAME6 = 8
HOOK_TC_INGRESS = 9
HOOK_TC_EGRESS = 10
HOOKS = {
    HOOK_CONNECT4: "connect4",
    HOOK_CONNECT6: "connect6",
    HOOK_SENDMSG4: "sendmsg4",
    HOOK_SENDMSG6: "sendmsg6",
    HOOK_RECVMSG4: "recvmsg4",
    HOOK_RECVMSG6: "recvmsg6",
    HOOK_GETPEERNAME4: "getpeername4",
    HOOK_GETPEERNAME6: "getpeername6",
    HOOK_TC_INGRESS: "tc_ingress",
    HOOK_TC_EGRESS: "tc_egress",
}
EVENTS_OFF, EVENTS_SAMPLED, EVENTS_ALL = 0, 1, 2  # struct bl_config.events
# struct bl_config.flags: which clients the socket hooks leave alone.
CFG_F_HOST_NS_ONLY = 1 << 0  # socketLB.hostNamespaceOnly (the agent's configuration, datapath.settings)
CFG_F_SKIP = 1 << 1  # bl_skip_v1 has entries (the writer's)
EVSTAT_LOST = 0  # index in bl_evstat_v1: events dropped, the ring buffer was full
EVSTAT_MAX = 1  # the number of event counters
CT_F_REPLY = 1 << 0  # struct bl_ct_val.flags: the reply direction's entry
CT_F_SNAT = 1 << 1  # the source is translated to the node (remote backend)
CT_F_LOCAL = 1 << 2  # the backend is a pod on this node
CT_NEW, CT_ESTABLISHED, CT_CLOSING = 0, 1, 2  # struct bl_ct_val.state
CT_STATES = {CT_NEW: "new", CT_ESTABLISHED: "established", CT_CLOSING: "closing"}
NSSTAT_SNAT_ALLOCATED = 0  # indexes in bl_nsstat_v1
NSSTAT_SNAT_RETRIES = 1
NSSTAT_CT_CREATED = 2
NSSTAT_BACKEND_GONE = 3
NSSTAT_MAX = 4

MASTER_SLOT = 0
DEFAULT_SVC_ENTRIES = 65536 + 1048576
DEFAULT_BACKENDS = 262144
DEFAULT_REV_ENTRIES = 131072
DEFAULT_AFF_ENTRIES = 65536
DEFAULT_CLIENT_ENTRIES = 65536
DEFAULT_QOS_ENTRIES = 4096
DEFAULT_STAT_ENTRIES = 262144
DEFAULT_EVENT_BYTES = 4 << 20
DEFAULT_DOOM_ENTRIES = 65536
DEFAULT_SKIP_ENTRIES = 16384
DEFAULT_MAGLEV_ENTRIES = 65536
DEFAULT_MAGLEV_SIZE = 16381
DEFAULT_SRCR_ENTRIES = 16384
DEFAULT_CT_ENTRIES = 262144
DEFAULT_NSDEV_ENTRIES = 64
# The capacity each map is declared with (the loaders override most from flags before load).
DEFAULT_ENTRIES = {
    MAP_SERVICES: DEFAULT_SVC_ENTRIES,
    MAP_BACKENDS: DEFAULT_BACKENDS,
    MAP_REVERSE: DEFAULT_REV_ENTRIES,
    MAP_SOCK_REVERSE: 0,  # socket storage is sized by the sockets, declared without max_entries
    MAP_LEGACY_SOCK_REVERSE: LEGACY_SOCK_ENTRIES,
    MAP_AFFINITY: DEFAULT_AFF_ENTRIES,
    MAP_AFFINITY_MATCH: DEFAULT_BACKENDS,
    MAP_CLIENTS: DEFAULT_CLIENT_ENTRIES,
    MAP_QOS: DEFAULT_QOS_ENTRIES,
    MAP_STATS: DEFAULT_STAT_ENTRIES,
    MAP_CONFIG: 1,
    MAP_SKIP: DEFAULT_SKIP_ENTRIES,
    MAP_EVENTS: DEFAULT_EVENT_BYTES,
    MAP_EVENT_STATS: EVSTAT_MAX,
    MAP_DOOMED: DEFAULT_DOOM_ENTRIES,
    MAP_MAGLEV: DEFAULT_MAGLEV_ENTRIES,
    MAP_SOURCE_RANGES: DEFAULT_SRCR_ENTRIES,
    MAP_CONNTRACK: DEFAULT_CT_ENTRIES,
    MAP_NS_DEVICES: DEFAULT_NSDEV_ENTRIES,
    MAP_NS_CONFIG: 1,
    MAP_NS_STATS: NSSTAT_MAX,
}


@dataclass(frozen=True)
class Layout:
    """A C struct as an ordered field list; ``=`` formats, so padding is explicit in the fields."""

    c_name: str
    fields: tuple[tuple[str, str], ...]

    @property
    def packer(self) -> struct.Struct:
        return struct.Struct("=" + "".join(fmt for _, fmt in self.fields))

    @property
    def size(self) -> int:
        return self.packer.size

    def offsets(self) -> dict[str, int]:
        out, pos = {}, 0
        for name, fmt in self.fields:
            out[name] = pos
            pos += struct.calcsize("=" + fmt)
        return out


# Ports are packed big-endian by hand (">H") into 2-byte "2s" fields, so the layouts stay native-endian.
SVC_KEY = Layout(
    "bl_svc_key",
    (("addr", "16s"), ("port", "2s"), ("proto", "B"), ("scope", "B"), ("slot", "H"), ("pad", "H")),
)
SVC_VAL = Layout(
    "bl_svc_val",
    (("backend_id", "I"), ("svc_id", "I"), ("count", "H"), ("flags", "H"), ("affinity_timeout", "I")),
)
BACKEND = Layout(
    "bl_backend", (("addr", "16s"), ("port", "2s"), ("proto", "B"), ("flags", "B"), ("pad", "I"))
)
BACKEND_ID = Layout("__u32", (("id", "I"),))
REV_KEY = Layout(
    "bl_rev_key", (("cookie", "Q"), ("addr", "16s"), ("port", "2s"), ("pad", "H"), ("pad2", "I"))
)
REV_VAL = Layout("bl_rev_val", (("addr", "16s"), ("port", "2s"), ("pad", "H"), ("svc_id", "I")))
SOCK_REV = Layout(
    "bl_sock_rev",
    (("frontend", "24s"), ("backend_addr", "16s"), ("backend_port", "2s"), ("pad", "H"), ("pad2", "I")),
)
AFF_KEY = Layout("bl_aff_key", (("netns_cookie", "Q"), ("svc_id", "I"), ("pad", "I")))
AFF_VAL = Layout("bl_aff_val", (("last_used_ns", "Q"), ("backend_id", "I"), ("pad", "I")))
AFF_MATCH_KEY = Layout("bl_aff_match_key", (("svc_id", "I"), ("backend_id", "I")))
CLIENT_KEY = Layout("bl_client_key", (("svc_id", "I"), ("pad", "I"), ("cgroup_id", "Q")))
CLIENT_VAL = Layout("bl_client_val", (("backend_id", "I"), ("flags", "I")))
QOS_VAL = Layout("bl_qos_val", (("limit", "I"), ("count", "I"), ("window_ns", "Q")))
STAT_KEY = Layout(
    "bl_stat_key", (("svc_id", "I"), ("result", "B"), ("proto", "B"), ("hook", "B"), ("pad", "B"))
)
CONFIG = Layout(
    "bl_config",
    (
        ("events", "I"),
        ("sample_every", "I"),
        ("wakeup_bytes", "I"),
        ("reverse_events", "I"),
        ("host_netns_cookie", "Q"),
        ("flags", "I"),
        ("pad", "I"),
    ),
)
EVENT = Layout(
    "bl_event",
    (
        ("ts_ns", "Q"),
        ("cgroup_id", "Q"),
        ("netns_cookie", "Q"),
        ("sock_cookie", "Q"),
        ("pid", "I"),
        ("svc_id", "I"),
        ("orig_addr", "16s"),
        ("backend_addr", "16s"),
        ("orig_port", "2s"),
        ("backend_port", "2s"),
        ("hook", "B"),
        ("proto", "B"),
        ("result", "B"),
        ("pad", "B"),
        ("comm", "16s"),
        ("client_addr", "16s"),
        ("client_port", "2s"),
        ("pad2", "H"),
        ("ifindex", "I"),
    ),
)
CT_KEY = Layout(
    "bl_ct_key",
    (
        ("src", "16s"),
        ("dst", "16s"),
        ("sport", "2s"),
        ("dport", "2s"),
        ("proto", "B"),
        ("pad", "B"),
        ("pad2", "H"),
    ),
)
CT_VAL = Layout(
    "bl_ct_val",
    (
        ("src", "16s"),
        ("dst", "16s"),
        ("sport", "2s"),
        ("dport", "2s"),
        ("svc_id", "I"),
        ("backend_id", "I"),
        ("flags", "B"),
        ("state", "B"),
        ("pad", "H"),
        ("created_ns", "Q"),
        ("seen_ns", "Q"),
    ),
)
NSDEV = Layout("bl_nsdev", (("addr4", "16s"), ("addr6", "16s")))
NS_CONFIG = Layout(
    "bl_ns_config", (("maglev_size", "I"), ("snat_min", "H"), ("snat_max", "H"), ("flags", "I"), ("pad", "I"))
)
SRCR_KEY = Layout("bl_srcr_key", (("prefixlen", "I"), ("svc_id", "I"), ("addr", "16s")))
LAYOUTS = (
    SVC_KEY,
    SVC_VAL,
    BACKEND,
    REV_KEY,
    REV_VAL,
    SOCK_REV,
    AFF_KEY,
    AFF_VAL,
    AFF_MATCH_KEY,
    CLIENT_KEY,
    CLIENT_VAL,
    QOS_VAL,
    STAT_KEY,
    CONFIG,
    EVENT,
    SRCR_KEY,
)
# North-south (bpf/nodeport.c): checked against nodeport.o's BTF by tests/unit/test_abi.py.
NODEPORT_LAYOUTS = (CT_KEY, CT_VAL, NSDEV, NS_CONFIG)
# Socket termination (bpf/sockterm.c): checked against sockterm.o's BTF by tests/unit/test_abi.py.
DOOM_KEY = Layout(
    "bl_doom_key",
    (
        ("frontend_addr", "16s"),
        ("backend_addr", "16s"),
        ("frontend_port", "2s"),
        ("backend_port", "2s"),
        ("proto", "B"),
        ("pad", "B"),
        ("pad2", "H"),
    ),
)
TERM_REC = Layout("bl_term_rec", (("cookie", "Q"), ("svc_id", "I"), ("err", "i")))
SOCKTERM_LAYOUTS = (DOOM_KEY, TERM_REC)

_SVC_KEY = SVC_KEY.packer
_SVC_VAL = SVC_VAL.packer
_BACKEND = BACKEND.packer
_BACKEND_ID = BACKEND_ID.packer
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


def pack_addr(ip: IPAddress) -> bytes:
    return _V4_PREFIX + ip.packed if ip.version == 4 else ip.packed


def unpack_addr(raw: bytes) -> IPAddress:
    if raw[:12] == _V4_PREFIX:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def pack_port(port: int) -> bytes:
    return port.to_bytes(2, "big")


def unpack_port(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


@dataclass(frozen=True, slots=True)
class SvcKey:
    addr: bytes  # 16-byte packed address
    port: int
    proto: int
    slot: int
    scope: int = SCOPE_PRIMARY

    def pack(self) -> bytes:
        return _SVC_KEY.pack(self.addr, pack_port(self.port), self.proto, self.scope, self.slot, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> SvcKey:
        addr, port, proto, scope, slot, _pad = _SVC_KEY.unpack(raw)
        return cls(addr, unpack_port(port), proto, slot, scope)


@dataclass(frozen=True, slots=True)
class SvcVal:
    backend_id: int = 0
    svc_id: int = 0
    count: int = 0
    flags: int = 0
    affinity_timeout: int = 0

    def pack(self) -> bytes:
        return _SVC_VAL.pack(self.backend_id, self.svc_id, self.count, self.flags, self.affinity_timeout)

    @classmethod
    def unpack(cls, raw: bytes) -> SvcVal:
        return cls(*_SVC_VAL.unpack(raw))


def master_val(svc_id: int, count: int, flags: int, affinity_timeout: int) -> bytes:
    """A tier's master entry: the frontend's identity, the tier's backend count, flags, affinity timeout."""
    return _SVC_VAL.pack(0, svc_id, count, flags, affinity_timeout)


_CLIENT_KEY = CLIENT_KEY.packer
_CLIENT_VAL = CLIENT_VAL.packer
_QOS_VAL = QOS_VAL.packer
_U32_KEY = struct.Struct("=I")


def pack_client_key(svc_id: int, cgroup_id: int) -> bytes:
    return _CLIENT_KEY.pack(svc_id, 0, cgroup_id)


def unpack_client_key(raw: bytes) -> tuple[int, int]:
    svc_id, _pad, cgroup_id = _CLIENT_KEY.unpack(raw)
    return int(svc_id), int(cgroup_id)


def pack_client_val(backend_id: int, flags: int) -> bytes:
    return _CLIENT_VAL.pack(backend_id, flags)


def pack_qos_key(svc_id: int) -> bytes:
    return _U32_KEY.pack(svc_id)


def unpack_qos(raw_key: bytes, raw_val: bytes) -> tuple[int, int]:
    """(svc_id, limit) of a QoS entry."""
    return int(_U32_KEY.unpack(raw_key)[0]), int(_QOS_VAL.unpack(raw_val)[0])


def pack_qos_val(limit: int) -> bytes:
    return _QOS_VAL.pack(limit, 0, 0)


_AFF_MATCH = AFF_MATCH_KEY.packer
AFF_MATCH_VALUE = b"\x01\x00\x00\x00"


def pack_affinity_match(svc_id: int, backend_id: int) -> bytes:
    return _AFF_MATCH.pack(svc_id, backend_id)


def unpack_affinity_match(raw: bytes) -> tuple[int, int]:
    svc_id, backend_id = _AFF_MATCH.unpack(raw)
    return int(svc_id), int(backend_id)


@dataclass(frozen=True, slots=True)
class BackendVal:
    addr: bytes
    port: int
    proto: int
    flags: int = 0

    def pack(self) -> bytes:
        return _BACKEND.pack(self.addr, pack_port(self.port), self.proto, self.flags, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> BackendVal:
        addr, port, proto, flags, _pad = _BACKEND.unpack(raw)
        return cls(addr, unpack_port(port), proto, flags)


def pack_backend(ip: IPAddress, port: int, protocol: Protocol | int, flags: int = 0) -> bytes:
    """A backend map value; also the writer's identity of a backend (bytes hash fast and compare exactly).
    ``flags``: ``BE_F_LOCAL`` for a pod on this node that north-south reaches without SNAT (the same address
    is another backend entry without it, for frontends that do not care)."""
    return _BACKEND.pack(pack_addr(ip), pack_port(port), int(protocol), flags, 0)


def pack_slot(backend_id: int) -> bytes:
    """The service-map value of a backend slot."""
    return _SVC_VAL.pack(backend_id, 0, 0, 0, 0)


_SLOT_OFFSET = SVC_KEY.offsets()["slot"]
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")


def split_svc_key(raw: bytes) -> tuple[bytes, int]:
    """(the frontend's part of a service-map key, its slot) without decoding the address."""
    return raw[:_SLOT_OFFSET], _U16.unpack_from(raw, _SLOT_OFFSET)[0]


def slot_backend_id(raw_value: bytes) -> int:
    """The backend id of a slot entry's value."""
    return int(_U32.unpack_from(raw_value, 0)[0])


def pack_backend_id(backend_id: int) -> bytes:
    return _BACKEND_ID.pack(backend_id)


def unpack_backend_id(raw: bytes) -> int:
    return int(_BACKEND_ID.unpack(raw)[0])


def svc_key(
    ip: IPAddress, port: int, protocol: Protocol | int, slot: int, scope: int = SCOPE_PRIMARY
) -> SvcKey:
    return SvcKey(pack_addr(ip), port, int(protocol), slot, scope)


class SvcKeyPacker:
    """Packs the keys of one frontend tier's entries, encoding its address and port once."""

    __slots__ = ("_addr", "_port", "_proto", "_scope")

    def __init__(
        self, ip: IPAddress, port: int, protocol: Protocol | int, scope: int = SCOPE_PRIMARY
    ) -> None:
        self._addr, self._port, self._proto = pack_addr(ip), pack_port(port), int(protocol)
        self._scope = scope

    def __call__(self, slot: int) -> bytes:
        return _SVC_KEY.pack(self._addr, self._port, self._proto, self._scope, slot, 0)


# --- bulk packers: a run of entries at once (the writer's bulk path) ---------------------------------------
# The 24-byte records "16-byte address, big-endian port, two bytes, four zero bytes": a backend value (the
# bytes: protocol, flags; pad zero) and a service key of slot 0 (protocol, scope; slot and pad zero). One
# big-endian struct packs them from the address as an integer (IPv4 as ::ffff:a.b.c.d).
_ADDR_PORT_V4 = struct.Struct(">10xHIHBB4x")
_ADDR_PORT_V6 = struct.Struct(">QQHBB4x")
_V4_MAPPED = 0xFFFF
_LOW64 = (1 << 64) - 1
_IP = operator.attrgetter("ip")
_PORT = operator.attrgetter("port")
_SLOT_U16 = _SLOT_OFFSET // 2  # a service key's slot, in the key seen as native u16s
_SVC_KEY_U16 = SVC_KEY.size // 2
_SVC_VAL_U32 = SVC_VAL.size // 4  # a slot value seen as native u32s; its backend id is the first
assert _ADDR_PORT_V4.size == _ADDR_PORT_V6.size == BACKEND.size == SVC_KEY.size
assert SVC_KEY.offsets()["pad"] == _SLOT_OFFSET + 2 == SVC_KEY.size - 2 and _SLOT_OFFSET % 2 == 0
assert SVC_VAL.offsets()["backend_id"] == 0 and SVC_VAL.size % 4 == 0
assert array.array("H").itemsize == 2 and array.array("I").itemsize == 4


def _pack_addr_ports(
    ips: Sequence[IPAddress], ports: Iterable[int], byte1: Iterable[int], byte2: Iterable[int]
) -> list[bytes]:
    """The 24-byte records above, one per address; struct.error for a value out of range."""
    if set(map(type, ips)) <= {ipaddress.IPv4Address}:
        return list(map(_ADDR_PORT_V4.pack, itertools.repeat(_V4_MAPPED), map(int, ips), ports, byte1, byte2))
    mapped: dict[type, int] = {ipaddress.IPv4Address: _V4_MAPPED << 32, ipaddress.IPv6Address: 0}
    addrs = list(map(operator.or_, map(int, ips), map(mapped.__getitem__, map(type, ips))))
    high = map(operator.rshift, addrs, itertools.repeat(64))
    low = map(operator.and_, addrs, itertools.repeat(_LOW64))
    return list(map(_ADDR_PORT_V6.pack, high, low, ports, byte1, byte2))


def pack_backend_refs(
    backends: Sequence[Backend], protocols: Iterable[int], flags: Iterable[int]
) -> list[bytes]:
    """``pack_backend`` of each backend (with its protocol and flags, as ints)."""
    return _pack_addr_ports(list(map(_IP, backends)), map(_PORT, backends), protocols, flags)


def pack_master_keys(
    frontends: Sequence[FrontendKey], protocols: Iterable[int], scope: int = SCOPE_PRIMARY
) -> list[bytes]:
    """The master entry's key (slot 0) of each frontend tier: ``SvcKeyPacker(...)(MASTER_SLOT)``."""
    return _pack_addr_ports(
        list(map(_IP, frontends)), map(_PORT, frontends), protocols, itertools.repeat(scope)
    )


def pack_slot_keys(master_keys: Sequence[bytes], counts: Sequence[int]) -> array.array[int]:
    """The keys of slots 1..count of each tier whose master key is given, tier after tier (a packed buffer,
    as native u16s: the slot is a u16 column of it). OverflowError past slot 65535."""
    keys = array.array("H")
    keys.frombytes(b"".join(map(operator.mul, master_keys, counts)))
    ends = map(operator.add, counts, itertools.repeat(1))
    keys[_SLOT_U16::_SVC_KEY_U16] = array.array(
        "H", itertools.chain.from_iterable(map(range, itertools.repeat(1), ends))
    )
    return keys


def pack_slot_values(backend_ids: array.array[int]) -> array.array[int]:
    """``pack_slot`` of each backend id (``array("I")``), as one packed buffer."""
    values = array.array("I", [0]) * (len(backend_ids) * _SVC_VAL_U32)
    values[::_SVC_VAL_U32] = backend_ids
    return values


def pack_masters(
    svc_ids: Iterable[int], counts: Iterable[int], flags: Iterable[int], affinity_timeouts: Iterable[int]
) -> list[bytes]:
    """``master_val`` of each tier."""
    return list(map(_SVC_VAL.pack, itertools.repeat(0), svc_ids, counts, flags, affinity_timeouts))


def pack_backend_ids(backend_ids: Iterable[int]) -> array.array[int]:
    """``pack_backend_id`` of each id, as one packed buffer (OverflowError past a u32)."""
    return array.array("I", backend_ids)


def pack_affinity_matches(svc_ids: array.array[int], backend_ids: array.array[int]) -> array.array[int]:
    """``pack_affinity_match`` of each (svc_id, backend_id) pair, as one packed buffer."""
    keys = array.array("I", [0]) * (2 * len(backend_ids))
    keys[0::2], keys[1::2] = svc_ids, backend_ids
    return keys


# Map name → (key layout, value layout) for tools that read maps generically.
MAP_LAYOUTS: dict[str, tuple[Layout, Layout]] = {
    MAP_SERVICES: (SVC_KEY, SVC_VAL),
    MAP_BACKENDS: (BACKEND_ID, BACKEND),
    MAP_REVERSE: (REV_KEY, REV_VAL),
    MAP_SOCK_REVERSE: (Layout("int", (("socket_fd", "i"),)), SOCK_REV),
    MAP_LEGACY_SOCK_REVERSE: (Layout("__u64", (("cookie", "Q"),)), SOCK_REV),
    MAP_AFFINITY: (AFF_KEY, AFF_VAL),
    MAP_AFFINITY_MATCH: (AFF_MATCH_KEY, Layout("__u32", (("value", "I"),))),
    MAP_CLIENTS: (CLIENT_KEY, CLIENT_VAL),
    MAP_QOS: (Layout("__u32", (("svc_id", "I"),)), QOS_VAL),
    MAP_STATS: (STAT_KEY, Layout("__u64", (("count", "Q"),))),
    MAP_CONFIG: (Layout("__u32", (("index", "I"),)), CONFIG),
    MAP_SKIP: (Layout("__u64", (("cgroup_id", "Q"),)), Layout("__u32", (("value", "I"),))),
    MAP_DOOMED: (DOOM_KEY, Layout("__u32", (("value", "I"),))),
    MAP_MAGLEV: (Layout("__u32", (("svc_id", "I"),)), Layout("__u32", (("map_id", "I"),))),
    MAP_SOURCE_RANGES: (SRCR_KEY, Layout("__u32", (("value", "I"),))),
    MAP_CONNTRACK: (CT_KEY, CT_VAL),
    MAP_NS_DEVICES: (Layout("__u32", (("ifindex", "I"),)), NSDEV),
    MAP_NS_CONFIG: (Layout("__u32", (("index", "I"),)), NS_CONFIG),
}


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded resolution event."""

    ts_ns: int
    cgroup_id: int
    netns_cookie: int
    sock_cookie: int
    pid: int
    svc_id: int
    orig: tuple[IPAddress, int]
    backend: tuple[IPAddress, int] | None  # None when refused
    hook: str
    proto: int
    result: str
    comm: str
    client: tuple[IPAddress, int] | None = None  # north-south: the external client
    ifindex: int = 0  # north-south: the device the packet arrived on

    @classmethod
    def unpack(cls, raw: bytes) -> Event:
        (ts, cg, netns, sock, pid, svc_id, orig, be, oport, bport, hook, proto, result, _pad, comm, *rest) = (
            _EVENT.unpack_from(raw)
        )
        client_addr, client_port, _pad2, ifindex = rest
        backend = None if be == bytes(16) else (unpack_addr(be), unpack_port(bport))
        client = None if client_addr == bytes(16) else (unpack_addr(client_addr), unpack_port(client_port))
        return cls(
            ts,
            cg,
            netns,
            sock,
            pid,
            svc_id,
            (unpack_addr(orig), unpack_port(oport)),
            backend,
            HOOKS.get(hook, str(hook)),
            proto,
            RESULTS.get(result, str(result)),
            comm.split(b"\0", 1)[0].decode(errors="replace"),
            client,
            ifindex,
        )


_EVENT = EVENT.packer
_STAT_KEY = STAT_KEY.packer
_CONFIG = CONFIG.packer


def unpack_stat_key(raw: bytes) -> tuple[int, str, int, str]:
    """(svc_id, result name, protocol number, hook name) of a counter key."""
    svc_id, result, proto, hook, _ = _STAT_KEY.unpack(raw)
    return int(svc_id), RESULTS.get(result, str(result)), int(proto), HOOKS.get(hook, str(hook))


def pack_config(
    events: int,
    sample_every: int,
    wakeup_bytes: int,
    reverse_events: bool,
    host_netns_cookie: int = 0,
    flags: int = 0,
) -> bytes:
    return _CONFIG.pack(events, sample_every, wakeup_bytes, int(reverse_events), host_netns_cookie, flags, 0)


CONFIG_KEY = struct.pack("=I", 0)  # the config map's one entry
_CONFIG_FLAGS = CONFIG.offsets()["flags"]


def config_flags(raw: bytes | None) -> int:
    """``flags`` of a packed config value (0 for None: the kernel's array holds zeros until written)."""
    return int(_U32.unpack_from(raw, _CONFIG_FLAGS)[0]) if raw else 0


def with_config_flags(raw: bytes | None, flags: int) -> bytes:
    """A packed config value with ``flags`` replaced, every other field kept (zero for None)."""
    value = bytearray(raw or bytes(CONFIG.size))
    _U32.pack_into(value, _CONFIG_FLAGS, flags)
    return bytes(value)


_U64_KEY = struct.Struct("=Q")
SKIP_VALUE = b"\x01\x00\x00\x00"


def pack_skip_key(cgroup_id: int) -> bytes:
    return _U64_KEY.pack(cgroup_id)


def unpack_skip_key(raw: bytes) -> int:
    return int(_U64_KEY.unpack(raw)[0])


_DOOM_KEY = DOOM_KEY.packer
_TERM_REC = TERM_REC.packer
DOOM_VALUE = b"\x01\x00\x00\x00"


def pack_doom_key(
    frontend_ip: IPAddress,
    frontend_port: int,
    backend_ip: IPAddress,
    backend_port: int,
    protocol: Protocol | int,
) -> bytes:
    """A doomed (frontend, backend) pair: connected sockets of that frontend sent to that backend."""
    return _DOOM_KEY.pack(
        pack_addr(frontend_ip),
        pack_addr(backend_ip),
        pack_port(frontend_port),
        pack_port(backend_port),
        int(protocol),
        0,
        0,
    )


def unpack_term_recs(raw: bytes) -> list[tuple[int, int, int]]:
    """(socket cookie, svc_id, result) of each record the termination iterator wrote (result: what
    bpf_sock_destroy() returned) or the upgrade's migration iterators (0 migrated, -EEXIST kept, -ENOMEM no
    storage)."""
    return [
        (int(c), int(s), int(e))
        for c, s, e in _TERM_REC.iter_unpack(raw[: len(raw) - len(raw) % _TERM_REC.size])
    ]


# --- north-south (bpf/nodeport.c) ------------------------------------------------------------------------

_SRCR_KEY = SRCR_KEY.packer
_CT_KEY = CT_KEY.packer
_CT_VAL = CT_VAL.packer
_NSDEV = NSDEV.packer
_NS_CONFIG = NS_CONFIG.packer
SRCR_VALUE = b"\x01\x00\x00\x00"


def pack_source_range(svc_id: int, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bytes:
    """A loadBalancerSourceRanges entry's key: the frontend, then the prefix (IPv4 as v4-mapped)."""
    length = network.prefixlen + (96 if network.version == 4 else 0)
    return _SRCR_KEY.pack(32 + length, svc_id, pack_addr(network.network_address))


def unpack_source_range(raw: bytes) -> tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]:
    prefixlen, svc_id, addr = _SRCR_KEY.unpack(raw)
    ip = unpack_addr(addr)
    length = prefixlen - 32 - (96 if ip.version == 4 else 0)
    return int(svc_id), ipaddress.ip_network(f"{ip}/{length}")


def source_range_svc_id(raw: bytes) -> int:
    """The frontend of a source-range key (whatever its prefix)."""
    return int(_U32.unpack_from(raw, 4)[0])


def maglev_identity(ref: bytes) -> bytes:
    """What Maglev hashes of a backend (a packed backend value): its address and port, the same on every node
    (backend ids and flags are this node's)."""
    return ref[:18]


# A Maglev table (an inner map of bl_mglv_v1): an array of backend-id pairs (a __u64 value holds entries 2k
# and 2k + 1, in memory order: an array map rounds each value up to 8 bytes, so single ids would cost twice
# the memory), named after its size (the name is how a table read back says its size).
MAGLEV_TABLE_PREFIX = "bl_mglv_"


def maglev_table_name(size: int) -> str:
    return f"{MAGLEV_TABLE_PREFIX}{size}"


def maglev_table_size(name: str) -> int | None:
    """The size a table's name gives, None for a name that does not say it."""
    digits = name.removeprefix(MAGLEV_TABLE_PREFIX)
    return int(digits) if name.startswith(MAGLEV_TABLE_PREFIX) and digits.isdigit() else None


def pack_maglev_key(svc_id: int) -> bytes:
    return _U32_KEY.pack(svc_id)


def unpack_u32(raw: bytes) -> int:
    return int(_U32.unpack_from(raw, 0)[0])


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def pack_ns_config(maglev_size: int, snat_min: int, snat_max: int) -> bytes:
    return _NS_CONFIG.pack(maglev_size, snat_min, snat_max, 0, 0)


def unpack_ns_config(raw: bytes) -> tuple[int, int, int]:
    """(maglev_size, snat_min, snat_max)."""
    size, low, high, _flags, _pad = _NS_CONFIG.unpack(raw)
    return int(size), int(low), int(high)


def pack_nsdev(addr4: IPAddress | None, addr6: IPAddress | None) -> bytes:
    """A north-south device's SNAT addresses (None: that family is not source-NATed through it)."""
    return _NSDEV.pack(pack_addr(addr4) if addr4 else bytes(16), pack_addr(addr6) if addr6 else bytes(16))


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """One decoded north-south connection-tracking entry: the packet it matches and what it becomes."""

    src: tuple[IPAddress, int]
    dst: tuple[IPAddress, int]
    proto: int
    new_src: tuple[IPAddress, int]
    new_dst: tuple[IPAddress, int]
    svc_id: int
    backend_id: int
    flags: int
    state: str
    created_ns: int
    seen_ns: int

    @property
    def reply(self) -> bool:
        return bool(self.flags & CT_F_REPLY)

    @classmethod
    def unpack(cls, raw_key: bytes, raw_val: bytes) -> ConntrackEntry:
        src, dst, sport, dport, proto, _p, _p2 = _CT_KEY.unpack(raw_key)
        nsrc, ndst, nsport, ndport, svc_id, backend_id, flags, state, _pad, created, seen = _CT_VAL.unpack(
            raw_val
        )
        return cls(
            (unpack_addr(src), unpack_port(sport)),
            (unpack_addr(dst), unpack_port(dport)),
            int(proto),
            (unpack_addr(nsrc), unpack_port(nsport)),
            (unpack_addr(ndst), unpack_port(ndport)),
            int(svc_id),
            int(backend_id),
            int(flags),
            CT_STATES.get(state, str(state)),
            int(created),
            int(seen),
        )
