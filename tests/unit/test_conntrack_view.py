"""``balancing inspect conntrack`` without the kernel: entries packed with the ABI's layouts, paired as flows.

Each flow is written as the datapath writes it: the client-direction entry (keyed by the client's packet to
the frontend, its value the rewrite to [node ->] backend) and the reply entry (keyed by the backend's answer
to the rewritten source, its value the rewrite back to frontend -> client). The documents are built from
in-memory maps (``FakeMaps``), the owners from a ``/state`` the real ``agent.state.build`` made for frontends
the real writer programmed. tests/kernel/test_conntrack_kernel.py runs the command on a real pinned LRU map.
"""

from __future__ import annotations

import contextlib
import io as stdio
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from balancing.agent import state as agentstate
from balancing.cli import agentclient, inspect, inspect_data, inspect_render
from balancing.cli.agentclient import AgentView
from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps
from balancing.datapath.writer import MapWriter
from balancing.metrics import kernel
from balancing.model.desired import (
    Backend,
    DesiredState,
    Frontend,
    FrontendKey,
    FrontendKind,
    Owner,
    Protocol,
)

NOW = 1_000 * 10**9  # the monotonic clock of the tests, ns
SVC = Owner("Service", "shop", "web", "http")
NODEPORT = FrontendKey(ipaddress.ip_address("192.0.2.10"), 30080, Protocol.TCP)
NODE = "192.0.2.10"
Item = tuple[bytes, bytes]


def addr(text: str) -> bytes:
    return abi.pack_addr(ipaddress.ip_address(text))


def split(endpoint: str) -> tuple[bytes, bytes]:
    host, _, port = endpoint.rpartition(":")
    return addr(host.strip("[]")), abi.pack_port(int(port))


def ct_item(
    src: str,
    dst: str,
    new_src: str,
    new_dst: str,
    *,
    flags: int,
    proto: int = 6,
    svc_id: int = 7,
    backend_id: int = 3,
    state: int = abi.CT_ESTABLISHED,
    created: int = NOW - 90 * 10**9,
    seen: int = NOW - 2 * 10**9,
) -> Item:
    """One conntrack entry, packed with the ABI's struct layouts (``ip:port`` or ``[ip6]:port``)."""
    (s, sp), (d, dp), (ns, nsp), (nd, ndp) = (split(e) for e in (src, dst, new_src, new_dst))
    key = abi.CT_KEY.packer.pack(s, d, sp, dp, proto, 0, 0)
    val = abi.CT_VAL.packer.pack(ns, nd, nsp, ndp, svc_id, backend_id, flags, state, 0, created, seen)
    return key, val


def flow_items(
    client: str, frontend: str, backend: str, snat: str | None = None, **kw: Any
) -> tuple[Item, Item]:
    """The (client-direction, reply) entries of a flow; ``snat``: the node's address:port the backend sees."""
    kind = abi.CT_F_SNAT if snat else abi.CT_F_LOCAL
    source = snat or client
    reply_kw = {k: v for k, v in kw.items() if k != "state"}
    forward = ct_item(client, frontend, source, backend, flags=kind, **kw)
    reply = ct_item(backend, source, frontend, client, flags=kind | abi.CT_F_REPLY, **reply_kw)
    return forward, reply


def ct_maps(*items: Item) -> FakeMaps:
    io = FakeMaps(capacity={abi.MAP_CONNTRACK: 1024})
    io.update(abi.MAP_CONNTRACK, list(items))
    return io


def doc(io: FakeMaps, view: AgentView | None = None) -> dict[str, Any]:
    result: dict[str, Any] = inspect_data.conntrack_doc(io, view or AgentView(), now_ns=NOW)
    return result


def test_a_source_nated_flow_is_one_row_from_its_two_entries() -> None:
    forward, reply = flow_items("203.0.113.7:40000", f"{NODE}:30080", "10.244.1.5:8080", f"{NODE}:61000")
    assert inspect_data.ct_reply_key(*forward) == reply[0]
    d = doc(ct_maps(reply, forward))
    assert d["usage"] == {"entries": 2, "capacity": 1024, "flows": 1}
    [row] = d["conntrack"]
    entries = row.pop("entries")
    assert row == {
        "client": "203.0.113.7:40000",
        "frontend": f"{NODE}:30080/TCP",
        "protocol": "TCP",
        "backend": "10.244.1.5:8080",
        "snat": f"{NODE}:61000",
        "local": False,
        "serviceId": 7,
        "backendId": 3,
        "owner": None,
        "state": "established",
        "ageSeconds": 90.0,
        "idleSeconds": 2.0,
        "note": None,
    }
    assert [e["direction"] for e in entries] == ["client", "reply"]
    assert entries[0] == {
        "direction": "client",
        "src": "203.0.113.7:40000",
        "dst": f"{NODE}:30080",
        "protocol": "TCP",
        "newSrc": f"{NODE}:61000",
        "newDst": "10.244.1.5:8080",
        "serviceId": 7,
        "backendId": 3,
        "flags": ["snat"],
        "state": "established",
        "createdNs": NOW - 90 * 10**9,
        "seenNs": NOW - 2 * 10**9,
    }
    assert entries[1]["src"] == "10.244.1.5:8080" and entries[1]["dst"] == f"{NODE}:61000"
    assert entries[1]["newSrc"] == f"{NODE}:30080" and entries[1]["newDst"] == "203.0.113.7:40000"
    assert entries[1]["flags"] == ["reply", "snat"]


def test_a_local_backend_keeps_the_client_address_and_has_no_snat() -> None:
    forward, reply = flow_items("203.0.113.7:40000", f"{NODE}:30080", "10.244.0.9:8080", proto=17)
    [row] = doc(ct_maps(forward, reply))["conntrack"]
    assert row["snat"] is None and row["local"] is True and row["protocol"] == "UDP"
    assert row["frontend"] == f"{NODE}:30080/UDP" and row["note"] is None
    assert json.loads(json.dumps(row)) == row  # numbers as numbers, addresses as strings


def test_idle_is_since_the_last_packet_of_either_direction_and_the_state_is_the_clients() -> None:
    forward = ct_item(
        "203.0.113.7:40000",
        f"{NODE}:30080",
        f"{NODE}:61000",
        "10.244.1.5:8080",
        flags=abi.CT_F_SNAT,
        state=abi.CT_CLOSING,
        seen=NOW - 5 * 10**9,
    )
    reply = ct_item(
        "10.244.1.5:8080",
        f"{NODE}:61000",
        f"{NODE}:30080",
        "203.0.113.7:40000",
        flags=abi.CT_F_SNAT | abi.CT_F_REPLY,
        state=abi.CT_NEW,
        seen=NOW - 10**9,
    )
    [row] = doc(ct_maps(forward, reply))["conntrack"]
    assert row["idleSeconds"] == 1.0 and row["state"] == "closing"


def test_a_flow_missing_one_entry_is_shown_with_a_note_not_dropped() -> None:
    orphan_forward, _ = flow_items("203.0.113.7:40000", f"{NODE}:30080", "10.244.1.5:8080", f"{NODE}:61000")
    _, orphan_reply = flow_items(
        "203.0.113.8:50000", f"{NODE}:30080", "10.244.2.6:8080", f"{NODE}:61001", state=abi.CT_NEW
    )
    rows = doc(ct_maps(orphan_forward, orphan_reply))["conntrack"]
    assert [(r["client"], r["note"]) for r in rows] == [
        ("203.0.113.7:40000", inspect_data.NO_REPLY_ENTRY),
        ("203.0.113.8:50000", inspect_data.NO_CLIENT_ENTRY),
    ]
    from_reply = rows[1]
    assert from_reply["frontend"] == f"{NODE}:30080/TCP" and from_reply["backend"] == "10.244.2.6:8080"
    assert from_reply["snat"] == f"{NODE}:61001" and [e["direction"] for e in from_reply["entries"]] == [
        "reply"
    ]


def test_an_entry_at_the_implied_reply_key_that_is_not_a_reply_does_not_pair() -> None:
    forward, reply = flow_items("203.0.113.7:40000", f"{NODE}:30080", "10.244.1.5:8080", f"{NODE}:61000")
    impostor = (reply[0], ct_item("1.1.1.1:1", "2.2.2.2:2", "3.3.3.3:3", "4.4.4.4:4", flags=abi.CT_F_SNAT)[1])
    rows = doc(ct_maps(forward, impostor))["conntrack"]
    assert len(rows) == 2 and {r["note"] for r in rows} == {inspect_data.NO_REPLY_ENTRY}


def test_flows_sort_by_frontend_then_client_as_addresses_not_text() -> None:
    items: list[Item] = []
    for client, frontend in (
        ("203.0.113.10:1000", f"{NODE}:30080"),
        ("203.0.113.9:1000", f"{NODE}:30080"),
        ("203.0.113.9:999", f"{NODE}:30080"),
        ("[2001:db8::7]:1000", f"{NODE}:30080"),
        ("203.0.113.1:1000", "192.0.2.9:30080"),
        ("203.0.113.1:1000", "[2001:db8::10]:30080"),
        ("203.0.113.1:1000", f"{NODE}:8080"),
    ):
        items += flow_items(client, frontend, "10.244.1.5:8080")
    rows = doc(ct_maps(*items))["conntrack"]
    assert [(r["frontend"], r["client"]) for r in rows] == [
        ("192.0.2.9:30080/TCP", "203.0.113.1:1000"),
        (f"{NODE}:8080/TCP", "203.0.113.1:1000"),
        (f"{NODE}:30080/TCP", "203.0.113.9:999"),
        (f"{NODE}:30080/TCP", "203.0.113.9:1000"),
        (f"{NODE}:30080/TCP", "203.0.113.10:1000"),
        (f"{NODE}:30080/TCP", "[2001:db8::7]:1000"),
        ("[2001:db8::10]:30080/TCP", "203.0.113.1:1000"),
    ]


def test_ipv6_flows_are_bracketed() -> None:
    forward, reply = flow_items(
        "[2001:db8::7]:40000", "[2001:db8:1::10]:30080", "[fd00:244::5]:8080", "[2001:db8:1::10]:61000"
    )
    [row] = doc(ct_maps(forward, reply))["conntrack"]
    assert (row["client"], row["frontend"], row["backend"], row["snat"]) == (
        "[2001:db8::7]:40000",
        "[2001:db8:1::10]:30080/TCP",
        "[fd00:244::5]:8080",
        "[2001:db8:1::10]:61000",
    )


def programmed_with_names() -> tuple[FakeMaps, AgentView, int]:
    """The real writer's maps for one NodePort frontend, and the agent's /state naming it."""
    io = FakeMaps(capacity={abi.MAP_CONNTRACK: 1024})
    model = DesiredState(
        {
            NODEPORT: Frontend(
                SVC, (Backend(ipaddress.ip_address("10.244.1.5"), 8080),), "ok", FrontendKind.NODE_PORT
            )
        }
    )
    writer = MapWriter(io)
    writer.sync(model)
    svc_id = writer.svc_id(NODEPORT)
    assert svc_id is not None
    state = agentstate.build("node-a", model, writer.svc_id, [], [])
    return io, agentclient.from_state(json.loads(json.dumps(state)), "http://a/state"), svc_id


def test_owners_come_from_the_agent_by_frontend_id_and_degrade_to_the_id() -> None:
    io, view, svc_id = programmed_with_names()
    known = flow_items("203.0.113.7:40000", f"{NODE}:30080", "10.244.1.5:8080", svc_id=svc_id)
    unknown = flow_items("203.0.113.8:40000", f"{NODE}:31000", "10.244.1.5:8080", svc_id=999)
    io.update(abi.MAP_CONNTRACK, [*known, *unknown])
    rows = {r["client"]: r for r in doc(io, view)["conntrack"]}
    owner = {"kind": "Service", "namespace": "shop", "name": "web", "portName": "http"}
    assert rows["203.0.113.7:40000"]["owner"] == owner
    assert rows["203.0.113.8:40000"]["owner"] is None
    assert all(r["owner"] is None for r in doc(io)["conntrack"])  # no agent: ids only
    text = render(doc(io), AgentView(), wide=False)
    assert f"id {svc_id}" in text and "id 999" in text
    named = render(doc(io, view), view, wide=False)
    assert "Service shop/web:http" in named


def render(d: dict[str, Any], view: AgentView, wide: bool) -> str:
    buf = stdio.StringIO()
    out = Console(file=buf, width=250)
    for item in inspect_render.conntrack(d, view, wide):
        if isinstance(item, str):  # as ``inspect._run`` prints them
            out.print(item, highlight=False, soft_wrap=True)
        else:
            out.print(item)
    return buf.getvalue()


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("flows", [50, inspect_render.RICH_ROWS_MAX + 50])  # a rich table; plain columns
def test_the_table_has_one_line_per_flow_with_its_note(wide: bool, flows: int) -> None:
    items: list[Item] = []
    for i in range(flows):
        client = f"203.0.{i // 250}.{i % 250 + 1}:40000"
        items += flow_items(client, f"{NODE}:30080", "10.244.1.5:8080", f"{NODE}:{40000 + i}")
    orphan, _ = flow_items("198.51.100.1:1", f"{NODE}:30080", "10.244.1.5:8080")
    io = ct_maps()
    io.capacity[abi.MAP_CONNTRACK] = 4096
    io.update(abi.MAP_CONNTRACK, [*items, orphan])
    text = render(doc(io), AgentView(), wide)
    lines = [line for line in text.splitlines() if "203.0." in line or "198.51.100.1" in line]
    assert len(lines) == flows + 1
    assert "198.51.100.1" in lines[0]  # sorted by client address
    first = lines[1].split()
    assert first[:4] == ["203.0.0.1:40000", f"{NODE}:30080/TCP", "10.244.1.5:8080", f"{NODE}:40000"]
    assert first[4:8] == ["1m30s", "2.0s", "established", "id"]
    assert "no reply entry" in lines[0]
    assert f"{2 * flows + 1}/4096 conntrack entries" in text
    assert ("backend id" in text) == wide


def test_an_empty_map_says_so() -> None:
    text = render(doc(ct_maps()), AgentView(), False)
    assert "no north-south flows" in text and "0/1024" in text


def test_durations_read_at_a_glance() -> None:
    assert [inspect_render.duration(s) for s in (0.25, 59.94, 60, 3599, 3600, 86399, 90000)] == [
        "0.2s",
        "59.9s",
        "1m00s",
        "59m59s",
        "1h00m",
        "23h59m",
        "1d01h",
    ]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """``balancing inspect conntrack`` on in-memory maps holding two flows, joined with the agent's view."""
    io, view, svc_id = programmed_with_names()
    io.update(
        abi.MAP_CONNTRACK,
        [
            *flow_items(
                "203.0.113.7:40000", f"{NODE}:30080", "10.244.1.5:8080", f"{NODE}:61000", svc_id=svc_id
            ),
            *flow_items("[2001:db8::7]:40000", "[2001:db8:1::10]:30080", "[fd00:244::5]:8080", svc_id=svc_id),
        ],
    )

    @contextlib.contextmanager
    def fake_maps(_bpffs: Path) -> Iterator[FakeMaps]:
        yield io

    monkeypatch.setattr(inspect, "open_conntrack", fake_maps)
    monkeypatch.setattr(agentclient, "fetch", lambda agent, timeout=0: view)
    yield CliRunner()


def test_the_command_prints_json_yaml_and_tables(cli: CliRunner) -> None:
    import yaml

    from balancing.cli.main import app

    res = cli.invoke(app, ["inspect", "conntrack", "-o", "json", "--agent", "http://a"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert set(d) == {"conntrack", "usage", "agent"} and d["agent"]["available"] is True
    assert [r["client"] for r in d["conntrack"]] == ["203.0.113.7:40000", "[2001:db8::7]:40000"]
    assert d["conntrack"][0]["owner"]["name"] == "web"
    as_yaml = cli.invoke(app, ["inspect", "conntrack", "-o", "yaml", "--agent", "http://a"])
    assert as_yaml.exit_code == 0
    assert timeless(yaml.safe_load(as_yaml.stdout)) == timeless(d)  # ages follow the clock between runs
    for output in ("table", "wide"):
        res = cli.invoke(app, ["inspect", "conntrack", "-o", output], env={"COLUMNS": "220", "TERM": "dumb"})
        assert res.exit_code == 0, res.output
        assert "[2001:db8::7]:40000" in res.output and f"{NODE}:61000" in res.output, res.output


def timeless(d: dict[str, Any]) -> dict[str, Any]:
    for row in d["conntrack"]:
        del row["ageSeconds"], row["idleSeconds"]
    return d


def test_without_the_pin_it_says_north_south_is_not_running(tmp_path: Path) -> None:
    from balancing.cli.main import app

    res = CliRunner().invoke(app, ["inspect", "conntrack", "--bpffs", str(tmp_path)])
    assert res.exit_code == 2
    assert f"north-south is not running on this node (no {tmp_path}/maps/{abi.MAP_CONNTRACK})" in res.output
    res = CliRunner().invoke(app, ["inspect", "conntrack", "-o", "xml", "--bpffs", str(tmp_path)])
    assert res.exit_code == 2


def test_the_help_documents_the_json() -> None:
    from balancing.cli.main import app

    res = CliRunner().invoke(app, ["inspect", "conntrack", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for field in ("conntrack", "snat", "ageSeconds", "idleSeconds", "note", "entries", "newSrc", "usage"):
        assert f'"{field}"' in res.output, field


def test_the_snat_port_range_is_read_from_the_north_south_settings() -> None:
    assert kernel.snat_port_range(abi.pack_ns_config(16381, 32768, 60999)) == 60999 - 32768 + 1
    assert kernel.snat_port_range(abi.pack_ns_config(16381, 61000, 61000)) == 1
    assert kernel.snat_port_range(bytes(abi.NS_CONFIG.size)) == 0  # never written
    assert kernel.snat_port_range(None) == 0
