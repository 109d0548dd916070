"""The north-south replay (``balancing trace --from-address``) against maps the real writer programmed.

``flow_hash`` is pinned by vectors of nodeport.c's own function: its text, taken verbatim from the C file,
compiled natively (cc -O2, x86-64) around the real ``struct bl_ct_key`` layout, with the keys filled as
``parse_ip`` fills them; one of them is also worked through by hand (the words as the program loads them).
The rest follows ``new_flow``'s steps on ``maps.FakeMaps``: the Maglev tables are the writer's own
(``create_table``), the settings and devices are written as the north-south loader writes them, conntrack
entries as the program writes them. The kernel counterpart (tests/kernel/test_trace_ns.py) compares the
replay with the backends real packets reach and with the conntrack entries the program wrote.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass

import pytest
from rich.console import Console

from balancing.cli import inspect_trace, trace
from balancing.cli.agentclient import AgentView
from balancing.datapath import abi, replay_ns
from balancing.datapath.maps import FakeMaps
from balancing.datapath.replay import Caller, replay
from balancing.datapath.replay_ns import Client, NsTrace, flow_hash, flow_key
from balancing.datapath.writer import MapWriter
from balancing.model.desired import (
    Backend,
    DesiredState,
    Frontend,
    FrontendKey,
    FrontendKind,
    IPAddress,
    IPNetwork,
    Owner,
    Protocol,
)

SIZE = 13
OWNER = Owner("Service", "default", "web", "http")
NODE4, NODE6 = ipaddress.ip_address("192.0.2.11"), ipaddress.ip_address("2001:db8:2::11")
CLIENT4, CLIENT6 = ipaddress.ip_address("203.0.113.10"), ipaddress.ip_address("2001:db8:113::10")
NODE_PORT = FrontendKey(NODE4, 30080, Protocol.TCP)
NODE_PORT6 = FrontendKey(NODE6, 30080, Protocol.TCP)
LB = FrontendKey(ipaddress.ip_address("198.51.100.10"), 80, Protocol.TCP)
LB6 = FrontendKey(ipaddress.ip_address("2001:db8:100::10"), 80, Protocol.TCP)
LB_OPEN = FrontendKey(ipaddress.ip_address("198.51.100.11"), 80, Protocol.TCP)
LOCAL_ONLY = FrontendKey(NODE4, 30081, Protocol.TCP)
EMPTY = FrontendKey(NODE4, 30082, Protocol.UDP)
CLUSTER_IP = FrontendKey(ipaddress.ip_address("10.96.0.50"), 80, Protocol.TCP)
LOCAL_A, LOCAL_B, REMOTE = (
    Backend(ipaddress.ip_address(f"10.244.{n}"), 8080) for n in ("0.10", "0.11", "1.10")
)
LOCAL6, REMOTE6 = (Backend(ipaddress.ip_address(f"fd00:244:{n}"), 8080) for n in ("0::10", "1::10"))
UPLINK, SECOND = 2, 7  # the devices' ifindexes
SNAT_PORTS = (61000, 65535)

# nodeport.c's flow_hash() compiled natively: (client, client port, frontend, frontend port, proto) -> hash
C_VECTORS = [
    ("203.0.113.10", 40000, "192.0.2.11", 30080, 6, 3499089681),
    ("203.0.113.10", 40001, "192.0.2.11", 30080, 6, 492597774),
    ("203.0.113.10", 40000, "192.0.2.11", 30080, 17, 3202633357),
    ("198.51.100.7", 1, "192.0.2.11", 80, 6, 2118455437),
    ("2001:db8:113::10", 40000, "2001:db8:2::11", 30080, 6, 2641142877),
    ("2001:db8:113::10", 65535, "2001:db8:100::10", 443, 17, 2922205110),
    ("0.0.0.0", 0, "0.0.0.0", 0, 0, 1957883299),
]


def external(
    backends: tuple[Backend, ...],
    *,
    kind: FrontendKind = FrontendKind.NODE_PORT,
    local: frozenset[Backend] = frozenset(),
    local_only: tuple[Backend, ...] | None = None,
    ranges: tuple[IPNetwork, ...] = (),
) -> Frontend:
    return Frontend(
        OWNER,
        backends,
        kind=kind,
        external=True,
        external_backends=local_only,
        external_local=local_only is not None,
        local_backends=local,
        source_ranges=ranges,
    )


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def program(
    io: FakeMaps | None = None, *, devices: bool = True, snat: tuple[int, int] = SNAT_PORTS
) -> FakeMaps:
    """This file's frontends, programmed by the writer; the settings and devices as the loader writes them."""
    io = io if io is not None else FakeMaps()
    locals_ = frozenset({LOCAL_A, LOCAL_B, LOCAL6})
    state = {
        NODE_PORT: external((LOCAL_A, LOCAL_B, REMOTE), local=locals_),
        NODE_PORT6: external((LOCAL6, REMOTE6), local=locals_),
        LB: external(
            (LOCAL_A, REMOTE),
            kind=FrontendKind.LOAD_BALANCER,
            local=locals_,
            ranges=nets("203.0.113.0/24", "203.0.113.10/32"),
        ),
        LB6: external(
            (LOCAL6,), kind=FrontendKind.LOAD_BALANCER, local=locals_, ranges=nets("2001:db8:113::/48")
        ),
        LB_OPEN: external((LOCAL_A, REMOTE), kind=FrontendKind.LOAD_BALANCER, local=locals_),
        LOCAL_ONLY: external((REMOTE,), local_only=()),
        EMPTY: external(()),
        CLUSTER_IP: Frontend(OWNER, (LOCAL_A,)),
    }
    MapWriter(io, maglev_size=SIZE).sync(DesiredState(state))
    io.update(abi.MAP_NS_CONFIG, [(abi.CONFIG_KEY, abi.pack_ns_config(SIZE, *snat))])
    if devices:
        io.update(
            abi.MAP_NS_DEVICES,
            [
                (abi.pack_u32(UPLINK), abi.pack_nsdev(NODE4, NODE6)),
                (abi.pack_u32(SECOND), abi.pack_nsdev(ipaddress.ip_address("192.0.2.99"), None)),
            ],
        )
    return io


@dataclass
class Routes:
    """A node's routing for ``replay_ns.Routes``: where each client is routed, which addresses are its own."""

    via: dict[IPAddress, int]
    own: frozenset[IPAddress] = frozenset({NODE4, NODE6})

    def device_to(self, address: IPAddress) -> int | None:
        return self.via.get(address)

    def is_local(self, address: IPAddress) -> bool:
        return address in self.own


def run(
    io: FakeMaps,
    key: FrontendKey,
    client: IPAddress = CLIENT4,
    port: int | None = None,
    routes: Routes | None = None,
) -> NsTrace:
    return replay_ns.replay(io, key, Client(client, port, now_ns=10**12), routes)


def table_of(io: FakeMaps, key: FrontendKey) -> list[Backend]:
    svc_id = abi.SvcVal.unpack(
        io.data[abi.MAP_SERVICES][abi.SvcKeyPacker(key.ip, key.port, key.protocol)(0)]
    ).svc_id
    ids = io.read_table(io.data[abi.MAP_MAGLEV][abi.pack_maglev_key(svc_id)])
    return [_backend(io, backend_id) for backend_id in ids]


def _backend(io: FakeMaps, backend_id: int) -> Backend:
    be = abi.BackendVal.unpack(io.data[abi.MAP_BACKENDS][abi.pack_backend_id(backend_id)])
    return Backend(abi.unpack_addr(be.addr), be.port)


def port_reaching(io: FakeMaps, key: FrontendKey, backend: Backend, client: IPAddress = CLIENT4) -> int:
    """A client port whose flow the table sends to ``backend``."""
    table = table_of(io, key)
    return next(
        p for p in range(40000, 41000) if table[flow_hash(flow_key(client, p, key)) % SIZE] == backend
    )


# --- flow_hash ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "proto", "expected"), C_VECTORS)
def test_flow_hash_is_the_programs(
    src: str, sport: int, dst: str, dport: int, proto: int, expected: int
) -> None:
    key = FrontendKey(ipaddress.ip_address(dst), dport, Protocol(proto) if proto else Protocol.TCP)
    raw = flow_key(ipaddress.ip_address(src), sport, key)
    if not proto:  # protocol 0 is no Protocol: patch the key's byte
        raw = raw[:36] + b"\x00" + raw[37:]
    assert flow_hash(raw) == expected


@pytest.mark.skipif(sys.byteorder != "little", reason="the words as a little-endian CPU loads them")
def test_flow_hash_by_hand() -> None:
    """203.0.113.10:40000 -> 192.0.2.11:30080/TCP: the v4-mapped source's words read little-endian, the ports'
    network-order bytes read as native u16 (40000 = 0x9c40 -> 0x409c, 30080 = 0x7580 -> 0x8075)."""
    words = [0, 0, 0xFFFF0000, 0x0A7100CB, 0x409C << 16 | 0x8075, 6]
    h = 0xCBF29CE484222325
    for w in words:
        h = ((h ^ w) * 0x100000001B3) % 2**64
    h ^= h >> 29
    h = (h * 0xBF58476D1CE4E5B9) % 2**64
    h ^= h >> 32
    assert h % 2**32 == 3499089681 == flow_hash(flow_key(CLIENT4, 40000, NODE_PORT))


def test_the_destination_is_not_hashed() -> None:
    """A flow picks the same entry on every node (the NodePort address differs, the hash does not)."""
    other = FrontendKey(ipaddress.ip_address("192.0.2.12"), 30080, Protocol.TCP)
    assert flow_hash(flow_key(CLIENT4, 40000, NODE_PORT)) == flow_hash(flow_key(CLIENT4, 40000, other))
    assert flow_hash(flow_key(CLIENT4, 40000, NODE_PORT)) != flow_hash(flow_key(CLIENT4, 40001, NODE_PORT))


def test_with_client_ip_affinity_the_address_alone_is_hashed() -> None:
    """sessionAffinity ClientIP: the ports' word is 0 (the program's ``by_client``), so every port of one
    client hashes alike, and another client not necessarily."""
    by_client = {flow_hash(flow_key(CLIENT4, port, NODE_PORT), True) for port in range(40000, 40050)}
    assert len(by_client) == 1
    words = [0, 0, 0xFFFF0000, 0x0A7100CB, 0, 6] if sys.byteorder == "little" else None
    if words is not None:  # by hand, as above
        h = 0xCBF29CE484222325
        for w in words:
            h = ((h ^ w) * 0x100000001B3) % 2**64
        h ^= h >> 29
        h = (h * 0xBF58476D1CE4E5B9) % 2**64
        h ^= h >> 32
        assert by_client == {h % 2**32}
    other = ipaddress.ip_address("203.0.113.11")
    assert flow_hash(flow_key(other, 40000, NODE_PORT), True) not in by_client


# --- new flows ---------------------------------------------------------------------------------------------


def test_a_port_picks_the_table_entry_its_flow_hashes_to() -> None:
    io = program()
    t = run(io, NODE_PORT, port=40000)
    assert t.decided_by == "maglev" and t.flow_hash == 3499089681 and t.index == 3499089681 % SIZE
    assert t.deterministic and len(t.outcomes) == 1
    assert t.outcomes[0].backend == table_of(io, NODE_PORT)[t.index] and t.table_entries == SIZE


def test_a_local_backend_keeps_the_client_and_a_remote_one_is_source_translated() -> None:
    io = program()
    local = run(io, NODE_PORT, port=port_reaching(io, NODE_PORT, LOCAL_B)).outcomes[0]
    assert (local.action, local.result, local.backend, local.local) == (
        "translate",
        "translated_local",
        LOCAL_B,
        True,
    )
    assert local.snat_ports_in_use == {}
    remote = run(io, NODE_PORT, port=port_reaching(io, NODE_PORT, REMOTE)).outcomes[0]
    assert (remote.action, remote.result, remote.backend, remote.local) == (
        "translate",
        "translated_snat",
        REMOTE,
        False,
    )
    assert remote.snat_ports_in_use == {"192.0.2.11": 0, "192.0.2.99": 0}


def test_without_a_port_each_backend_gets_its_share_of_the_table() -> None:
    io = program()
    t = run(io, NODE_PORT)
    assert t.action == "translate" and not t.deterministic and t.flow_hash is None
    table = table_of(io, NODE_PORT)
    assert {o.backend: o.entries for o in t.outcomes} == {b: table.count(b) for b in set(table)}
    assert {o.backend: o.probability for o in t.outcomes} == {b: table.count(b) / SIZE for b in set(table)}
    assert sum(o.entries for o in t.outcomes) == SIZE and {o.entries for o in t.outcomes} <= {4, 5}
    assert {o.result for o in t.outcomes} == {"translated_local", "translated_snat"}


def test_ipv6_flows_follow_the_same_steps() -> None:
    io = program()
    port = port_reaching(io, NODE_PORT6, REMOTE6, CLIENT6)
    t = run(io, NODE_PORT6, CLIENT6, port)
    assert t.outcomes[0].backend == REMOTE6 and t.outcomes[0].result == "translated_snat"
    assert [(d.ifindex, d.snat) for d in t.devices] == [(UPLINK, NODE6), (SECOND, None)]
    assert any("ifindex 7 has no IPv6 address" in n for n in t.notes)


# --- what passes untouched ---------------------------------------------------------------------------------


def test_a_frontend_not_served_north_south_passes() -> None:
    io = program()
    hooks_only = run(io, CLUSTER_IP, port=40000)
    assert hooks_only.action == "pass" and hooks_only.decided_by == "not-served" and hooks_only.svc_id
    assert "socket hooks only" in hooks_only.notes[0]
    nothing = run(io, FrontendKey(NODE4, 31999, Protocol.TCP), port=40000)
    assert (
        nothing.action == "pass" and nothing.svc_id is None and nothing.notes[0].startswith("not a frontend")
    )


def test_only_tcp_and_udp_are_translated() -> None:
    t = run(program(), FrontendKey(NODE4, 30080, Protocol.SCTP), port=40000)
    assert t.action == "pass" and t.decided_by == "not-tcp-udp"


def test_a_table_size_of_zero_translates_nothing() -> None:
    io = program()
    io.update(abi.MAP_NS_CONFIG, [(abi.CONFIG_KEY, abi.pack_ns_config(0, *SNAT_PORTS))])
    t = run(io, NODE_PORT, port=40000)
    assert t.action == "pass" and t.decided_by == "disabled" and t.maglev_size == 0


class WithoutNorthSouth(FakeMaps):
    """As ``KernelMaps`` opened without north-south's pins: reading one of them is a KeyError."""

    def items(self, map_name: str) -> list[tuple[bytes, bytes]]:
        if map_name in abi.NODEPORT_MAPS:
            raise KeyError(map_name)
        return super().items(map_name)


def test_without_north_south_loaded_everything_passes() -> None:
    io = WithoutNorthSouth()
    MapWriter(io, maglev_size=SIZE).sync(DesiredState({NODE_PORT: external((REMOTE,))}))
    t = run(io, NODE_PORT, port=40000)
    assert t.action == "pass" and t.decided_by == "not-loaded" and not t.loaded
    assert len(t.notes) == 1 and "--north-south" in t.notes[0]


# --- drops -------------------------------------------------------------------------------------------------


def test_source_ranges_match_the_longest_prefix() -> None:
    io = program()
    exact = run(io, LB, port=40000)
    assert exact.source_ranges is not None and exact.source_ranges.matched == "203.0.113.10/32"
    assert exact.source_ranges.ranges == ("203.0.113.0/24", "203.0.113.10/32")
    assert exact.action == "translate"
    wide = run(io, LB, ipaddress.ip_address("203.0.113.99"), 40000)
    assert wide.source_ranges is not None and wide.source_ranges.matched == "203.0.113.0/24"
    outside = run(io, LB, ipaddress.ip_address("198.51.100.1"))
    assert outside.decided_by == "source-range" and outside.deterministic
    assert [(o.action, o.result) for o in outside.outcomes] == [("drop", "dropped_source_range")]
    ok6 = run(io, LB6, CLIENT6, 1)
    assert ok6.source_ranges is not None and ok6.source_ranges.matched == "2001:db8:113::/48"
    assert run(io, LB6, ipaddress.ip_address("2001:db8:999::1")).decided_by == "source-range"
    unrestricted = run(io, NODE_PORT, ipaddress.ip_address("198.51.100.1"), 40000)
    assert unrestricted.source_ranges is None and unrestricted.action == "translate"


def test_a_range_of_another_frontend_does_not_admit() -> None:
    """Every bit of (svc_id, address) is significant, as in the LPM trie: the client's /32 written for
    another frontend does not admit it here."""
    io = program()
    other = abi.SvcVal.unpack(io.data[abi.MAP_SERVICES][abi.SvcKeyPacker(LB6.ip, 80, Protocol.TCP)(0)]).svc_id
    io.update(
        abi.MAP_SOURCE_RANGES, [(abi.pack_source_range(other, nets("198.51.100.1/32")[0]), abi.SRCR_VALUE)]
    )
    assert run(io, LB, ipaddress.ip_address("198.51.100.1"), 1).decided_by == "source-range"


def test_etp_local_without_a_local_endpoint_drops() -> None:
    t = run(program(), LOCAL_ONLY, port=40000)
    assert t.decided_by == "no-table" and t.table_entries is None
    assert [(o.action, o.result) for o in t.outcomes] == [("drop", "dropped_no_local_endpoint")]
    assert "no local endpoint" in t.notes[0]


def test_no_backend_drops() -> None:
    t = run(program(), EMPTY)
    assert [(o.action, o.result) for o in t.outcomes] == [("drop", "dropped_no_backend")]


def test_a_table_shorter_than_the_settings_drops_beyond_its_end() -> None:
    io = program()
    io.update(abi.MAP_NS_CONFIG, [(abi.CONFIG_KEY, abi.pack_ns_config(17, *SNAT_PORTS))])
    t = run(io, NODE_PORT)
    drops = [o for o in t.outcomes if o.action == "drop"]
    assert [(o.result, o.entries) for o in drops] == [("dropped_no_backend", 4)]
    assert sum(o.probability for o in t.outcomes) == pytest.approx(1.0) and t.action == "depends"
    assert any("13 entries, the settings say 17" in n for n in t.notes)


def test_remote_backends_need_a_device_address_and_a_snat_range() -> None:
    no_devices = program(devices=False)
    t = run(no_devices, NODE_PORT, port=port_reaching(no_devices, NODE_PORT, REMOTE))
    assert [(o.action, o.result) for o in t.outcomes] == [("drop", "dropped_snat_ports")]
    empty_range = program(snat=(0, 0))
    t = run(empty_range, NODE_PORT, port=port_reaching(empty_range, NODE_PORT, REMOTE))
    assert t.outcomes[0].result == "dropped_snat_ports" and any("range 0-0" in n for n in t.notes)
    local = run(empty_range, NODE_PORT, port=port_reaching(empty_range, NODE_PORT, LOCAL_A))
    assert local.outcomes[0].result == "translated_local"  # no SNAT needed


# --- connection tracking -----------------------------------------------------------------------------------


def ct_entries(
    client_port: int, backend: Backend, backend_id: int, snat: tuple[IPAddress, int] | None
) -> list[tuple[bytes, bytes]]:
    """Both entries of a flow to NODE_PORT as new_flow() writes them."""
    src, sport = snat if snat else (CLIENT4, client_port)
    flags = abi.CT_F_SNAT if snat else abi.CT_F_LOCAL
    pack = abi.CT_VAL.packer.pack
    client_val = pack(
        abi.pack_addr(src), abi.pack_addr(backend.ip), abi.pack_port(sport), abi.pack_port(backend.port),
        7, backend_id, flags, abi.CT_ESTABLISHED, 0, 10**11, 5 * 10**11,
    )  # fmt: skip
    reply_key = abi.CT_KEY.packer.pack(
        abi.pack_addr(backend.ip),
        abi.pack_addr(src),
        abi.pack_port(backend.port),
        abi.pack_port(sport),
        6,
        0,
        0,
    )
    reply_val = pack(
        abi.pack_addr(NODE4), abi.pack_addr(CLIENT4), abi.pack_port(30080), abi.pack_port(client_port),
        7, backend_id, flags | abi.CT_F_REPLY, 0, 0, 10**11, 5 * 10**11,
    )  # fmt: skip
    return [(flow_key(CLIENT4, client_port, NODE_PORT), client_val), (reply_key, reply_val)]


def backend_id_of(io: FakeMaps, backend: Backend, local: bool) -> int:
    wanted = abi.pack_backend(backend.ip, backend.port, Protocol.TCP, abi.BE_F_LOCAL if local else 0)
    return next(abi.unpack_backend_id(k) for k, v in io.data[abi.MAP_BACKENDS].items() if v == wanted)


def test_a_tracked_flow_keeps_its_backend() -> None:
    io = program()
    port = port_reaching(io, NODE_PORT, LOCAL_A)  # the table would say LOCAL_A ...
    io.update(abi.MAP_CONNTRACK, ct_entries(port, REMOTE, backend_id_of(io, REMOTE, False), (NODE4, 61234)))
    t = run(io, NODE_PORT, port=port)  # ... the flow keeps REMOTE
    assert t.decided_by == "conntrack" and t.tracked is not None and t.tracked.decides
    assert [(o.action, o.result, o.backend, o.local) for o in t.outcomes] == [
        ("translate", None, REMOTE, False)
    ]
    assert "conntrack entry for this flow decides" in t.notes[0] and "192.0.2.11:61234" in t.notes[0]
    assert t.flow_hash is None and t.tracked_flows == 1
    other = run(io, NODE_PORT, port=port + 1)
    assert other.decided_by == "maglev" and other.tracked is None and other.tracked_flows == 1
    spread = run(io, NODE_PORT)
    assert any("1 tracked flow(s)" in n for n in spread.notes)


def test_a_tracked_flow_whose_backend_is_gone_picks_again() -> None:
    io = program()
    port = port_reaching(io, NODE_PORT, LOCAL_A)
    io.update(abi.MAP_CONNTRACK, ct_entries(port, REMOTE, 4242, (NODE4, 61234)))
    t = run(io, NODE_PORT, port=port)
    assert t.tracked is not None and not t.tracked.decides and t.tracked.backend is None
    assert t.decided_by == "maglev" and t.outcomes[0].backend == LOCAL_A
    assert any("4242, which is gone" in n for n in t.notes)


def test_snat_ports_in_use_are_counted_per_backend_and_address() -> None:
    io = program(snat=(61000, 61001))
    remote_id = backend_id_of(io, REMOTE, False)
    io.update(abi.MAP_CONNTRACK, ct_entries(50001, REMOTE, remote_id, (NODE4, 61000)))
    io.update(abi.MAP_CONNTRACK, ct_entries(50002, REMOTE, remote_id, (NODE4, 61001)))
    t = run(io, NODE_PORT, port=port_reaching(io, NODE_PORT, REMOTE))
    assert t.outcomes[0].snat_ports_in_use == {"192.0.2.11": 2, "192.0.2.99": 0}
    assert any("every SNAT port from 192.0.2.11 to 10.244.1.10:8080 is taken" in n for n in t.notes)


# --- hairpin ---------------------------------------------------------------------------------------------

POD_CLIENT = ipaddress.ip_address("10.244.0.10")  # a pod of this node, behind its bridge (ifindex 9)


def test_a_client_routed_through_a_north_south_device_gets_dnat() -> None:
    io = program()
    t = run(io, LB_OPEN, port=port_reaching(io, LB_OPEN, LOCAL_A), routes=Routes({CLIENT4: UPLINK}))
    assert t.client_device == UPLINK and t.frontend_local is False
    assert [(d.ifindex, d.hairpin) for d in t.devices] == [(UPLINK, False), (SECOND, True)]
    assert [(o.result, o.local, o.hairpin) for o in t.outcomes] == [("translated_local", True, False)]


def test_a_pod_of_this_node_reaching_a_load_balancer_ip_is_hairpinned() -> None:
    """The route back to it leaves by the bridge: the source becomes the LB IP, so the replies go out through
    the uplink's egress program."""
    io = program()
    routes = Routes({POD_CLIENT: 9})
    local = run(io, LB_OPEN, POD_CLIENT, port_reaching(io, LB_OPEN, LOCAL_A, POD_CLIENT), routes)
    assert [(o.result, o.backend, o.local, o.hairpin) for o in local.outcomes] == [
        ("translated_snat", LOCAL_A, True, True)
    ]
    assert local.outcomes[0].snat_ports_in_use == {"198.51.100.11": 0}
    assert any(n.startswith("hairpin: this node routes 10.244.0.10") for n in local.notes)
    remote = run(io, LB_OPEN, POD_CLIENT, port_reaching(io, LB_OPEN, REMOTE, POD_CLIENT), routes)
    assert [(o.result, o.hairpin) for o in remote.outcomes] == [("translated_snat", False)]
    node_port = run(io, NODE_PORT, POD_CLIENT, port_reaching(io, NODE_PORT, LOCAL_A, POD_CLIENT), routes)
    assert node_port.frontend_local and [(o.result, o.hairpin) for o in node_port.outcomes] == [
        ("translated_local", False)
    ]  # to its own node's address, the replies are delivered locally: no hairpin


def test_without_routes_the_hairpin_test_is_left_out() -> None:
    io = program()
    t = run(io, LB_OPEN, POD_CLIENT, port_reaching(io, LB_OPEN, LOCAL_A, POD_CLIENT))
    assert t.frontend_local is None and t.outcomes[0].result == "translated_local"
    assert any(n.startswith("routes unknown") for n in t.notes)


def test_family_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="different families"):
        run(program(), NODE_PORT, CLIENT6, 1)


# --- the command's document and text -----------------------------------------------------------------------


def test_client_addresses_parse() -> None:
    assert trace.parse_client("203.0.113.10:40000") == (CLIENT4, 40000)
    assert trace.parse_client("203.0.113.10") == (CLIENT4, None)
    assert trace.parse_client("2001:db8:113::10") == (CLIENT6, None)
    assert trace.parse_client("[2001:db8:113::10]:5") == (CLIENT6, 5)
    assert trace.parse_client("[2001:db8:113::10]") == (CLIENT6, None)
    assert trace.parse_client("[::ffff:203.0.113.10]:7") == (CLIENT4, 7)
    for bad in ("203.0.113.10:0", "203.0.113.10:x", "[2001:db8::1", "[2001:db8::1]x", "host:80", ""):
        with pytest.raises(ValueError):
            trace.parse_client(bad)


def document(
    io: FakeMaps, key: FrontendKey, client: IPAddress = CLIENT4, port: int | None = None
) -> dict[str, object]:
    doc = trace.trace_json(replay(io, key, Caller()), AgentView())
    doc["northSouth"] = trace.north_south_json(run(io, key, client, port), AgentView())
    return doc


def test_the_document_adds_north_south() -> None:
    io = program()
    port = port_reaching(io, NODE_PORT, REMOTE)
    doc = document(io, NODE_PORT, port=port)
    ns = doc["northSouth"]
    assert isinstance(ns, dict)
    assert set(ns) == {
        "client", "clientAddress", "clientPort", "loaded", "served", "serviceId", "flags", "reason",
        "maglevSize", "snatPorts", "sourceRanges", "tableEntries", "flowHash", "index", "conntrack",
        "trackedFlows", "devices", "routes", "verdict", "notes",
    }  # fmt: skip
    assert (
        ns["client"] == f"203.0.113.10:{port}" and ns["flags"] == ["external", "nodeAddress"] and ns["served"]
    )
    assert ns["snatPorts"] == {"min": 61000, "max": 65535} and ns["maglevSize"] == SIZE
    v = ns["verdict"]
    assert v["action"] == "translate" and v["nat"] == "snat" and v["backend"] == str(REMOTE)
    assert v["result"] == "translated_snat" and v["decidedBy"] == "maglev" and v["deterministic"]
    assert [d["snatAddress"] for d in ns["devices"]] == ["192.0.2.11", "192.0.2.99"]
    lb = document(io, LB, ipaddress.ip_address("198.51.100.1"))["northSouth"]
    assert isinstance(lb, dict) and lb["flags"] == ["external", "sourceRanges"]
    assert lb["sourceRanges"] == {
        "ranges": ["203.0.113.0/24", "203.0.113.10/32"],
        "matched": None,
        "allowed": False,
    }
    assert lb["verdict"]["action"] == "drop" and lb["verdict"]["nat"] is None


def render(doc: dict[str, object]) -> str:
    out = Console(record=True, width=200)
    inspect_trace.render_north_south(doc, AgentView(), out)
    return out.export_text()


def test_the_text_shows_the_programs_steps() -> None:
    io = program()
    port = port_reaching(io, NODE_PORT, LOCAL_A)
    text = render(document(io, NODE_PORT, port=port))
    assert (
        "from external client 203.0.113.10" in text
        and f"entry {flow_hash(flow_key(CLIENT4, port, NODE_PORT)) % SIZE} of 13" in text
    )
    assert "TRANSLATE → 10.244.0.10:8080" in text and "DNAT, the client's address kept" in text
    spread = render(document(io, NODE_PORT))
    assert "decided by maglev" in spread and "translated_snat" in spread and "%" in spread
    dropped = render(document(io, LOCAL_ONLY, port=1))
    assert "DROP" in dropped and "dropped_no_local_endpoint" in dropped
    io.update(abi.MAP_CONNTRACK, ct_entries(port, REMOTE, backend_id_of(io, REMOTE, False), (NODE4, 61234)))
    tracked = render(document(io, NODE_PORT, port=port))
    assert "conntrack" in tracked and "decided by conntrack" in tracked and "10.244.1.10:8080" in tracked
