"""``balancing inspect``: what the pinned maps hold, joined with the agent's names, as tables or stable JSON.

Reads the maps through the datapath's own decoders, so it shows exactly what connects see, including
inconsistencies (missing slots or backends). With ``--agent URL`` it joins the agent's ``GET /state``
(``balancing.agent.state``): owners, frontend kinds, the model's reasons, the pods behind backend addresses.
Without it, or when the agent does not answer within a second or two, it shows the maps alone and says that
names are unavailable (the name fields are then ``null``).

JSON output (``-o json``, or the same document as YAML with ``-o yaml``; stable: keys are only ever
added). Every document also has ``"agent": {"url": str | null, "available": bool, "error": str | null}``.
``owner`` objects are the agent's: ``{"kind", "namespace", "name", "portName"}``; ``pod`` objects
``{"namespace", "name", "node"}``; a ``null`` in a backend list marks a slot whose entry is missing::

    services:  {"services": [{"frontend": "ip:port/PROTO", "address", "port", "protocol", "serviceId",
                 "affinityTimeoutSeconds", "backends": ["ip:port" | null], "fallback": [...] | null,
                 "flags": ["affinity" | "fallback" | "clients" | "qos"], "owner": {...} | null,
                 "kind": "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalIP" | null,
                 "reason": str | null, "fallbackOwner": {...} | null}],
                "unprogrammed": ["ip:port/PROTO"],       # in the agent's model, not in the maps
                "usage": {map: {"entries": int, "capacity": int | null}}}
    backends:  {"backends": [{"backendId", "backend": "ip:port", "protocol", "pod": {...} | null,
                 "usedBy": [{"frontend", "serviceId", "tier": "primary" | "fallback", "slot"}]}]}
    policies:  {"policies": [{"frontend", "serviceId", "owner", "kind", "reason", "fallbackOwner",
                 "primary": [...], "fallback": [...] | null,
                 "qos": {"limit", "count", "windowAgeSeconds", "exceeded"} | null,
                 "clientRules": {"total", "skip", "loopGuard"}, "skipRedirectFromBackend": bool | null,
                 "backendPods": [{"namespace", "name", "uid", "backend"}] | null}],
                "status": [agent's policy status objects] | null}   # null until the agent serves them
    affinity:  {"affinity": [{"netnsCookie", "serviceId", "frontend" | null, "owner", "backendId",
                 "backend" | null, "pod", "idleSeconds", "timeoutSeconds", "expired", "matched", "valid"}]}
    nodes:     {"nodes": [{"address", "node": str | null, "local": bool | null,
                 "frontends": [{"frontend", "port", "protocol", "serviceId" | null, "owner", "reason",
                   "backends": [...], "programmed": bool}]}]}
    conntrack: {"conntrack": [{"client": "ip:port", "frontend": "ip:port/PROTO", "protocol",
                 "backend": "ip:port", "snat": "ip:port" | null, "local": bool, "serviceId", "backendId",
                 "owner": {...} | null, "state": "new" | "established" | "closing",
                 "ageSeconds", "idleSeconds", "note": str | null,
                 "entries": [{"direction": "client" | "reply", "src", "dst", "protocol", "newSrc", "newDst",
                   "serviceId", "backendId", "flags": ["reply" | "snat" | "local"], "state",
                   "createdNs", "seenNs"}]}],
                "usage": {"entries": int, "capacity": int | null, "flows": int}}

``policies`` lists frontends owned by a LocalRedirectPolicy or BalancingPolicy, and (names or not) every
frontend with a fallback tier, client rules or a QoS limit. ``nodes`` needs the agent (frontend kinds are
the model's); ``local`` says whether the address is one of this host's. ``conntrack`` reads north-south's
connection tracking (``bl_ct_v1``, pinned only where north-south runs): one row per flow, its client-direction
entry paired with the reply entry that entry's rewrite implies; a flow with only one of the two (the LRU
evicts them independently) is shown with a ``note``, read from the entry that is left.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import typer
from rich.table import Table

from balancing.cli import agentclient, inspect_data, inspect_render
from balancing.cli import output as cli_output
from balancing.cli.agentclient import AgentView, Json
from balancing.cli.inspect_common import (
    CONNTRACK_MAPS,
    DEFAULT_BPFFS,
    AgentOpt,
    BpffsOpt,
    OutputOpt,
    check_output,
    open_maps,
)
from balancing.datapath import abi
from balancing.datapath.maps import MapIO
from balancing.model.desired import parse_ip

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Show what the datapath maps hold, with the agent's names.",
)

Builder = Callable[[MapIO, AgentView], Json]
Renderer = Callable[[Json, AgentView, bool], Iterable[Table | str]]
Opener = Callable[[Path], AbstractContextManager[MapIO]]


def services_json(io: MapIO, view: AgentView | None = None) -> list[Json]:
    """The ``services`` rows (kept for callers of the original JSON)."""
    rows: list[Json] = inspect_data.services_doc(io, view or AgentView())["services"]
    return rows


def is_local_address(address: str) -> bool:
    """Whether ``address`` is one of this host's (binding to it succeeds)."""
    ip = parse_ip(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def _run(
    bpffs: Path,
    agent: str | None,
    output: str,
    build: Builder,
    render: Renderer,
    opener: Opener | None = None,
) -> None:
    output = check_output(output)
    view = agentclient.fetch(agent)
    with (opener or open_maps)(bpffs) as io:
        doc = build(io, view)
    if output in cli_output.DOCUMENT_FORMATS:
        typer.echo(cli_output.dumps({**doc, "agent": view.describe()}, output))
        return
    out = inspect_render.console(output == "wide")
    inspect_render.print_note(out, view)
    for item in render(doc, view, output == "wide"):
        if isinstance(item, str):  # markup lines, styled already: no highlighter, no re-wrapping (fast)
            if item:
                out.print(item, highlight=False, soft_wrap=True)
        else:
            out.print(item)


@app.command()
def services(bpffs: BpffsOpt = DEFAULT_BPFFS, agent: AgentOpt = None, output: OutputOpt = "table") -> None:
    """Frontends: their backends and fallback as the maps hold them, owners and reasons from the agent."""
    _run(bpffs, agent, output, inspect_data.services_doc, inspect_render.services)


@app.command()
def backends(bpffs: BpffsOpt = DEFAULT_BPFFS, agent: AgentOpt = None, output: OutputOpt = "table") -> None:
    """Backends: id, address, the frontends and tiers that use them, the pod behind them."""
    _run(bpffs, agent, output, inspect_data.backends_doc, inspect_render.backends)


@app.command()
def policies(bpffs: BpffsOpt = DEFAULT_BPFFS, agent: AgentOpt = None, output: OutputOpt = "table") -> None:
    """Policy frontends (LocalRedirectPolicy, BalancingPolicy): tiers, QoS, client rules."""
    _run(bpffs, agent, output, inspect_data.policies_doc, inspect_render.policies)


@app.command()
def affinity(bpffs: BpffsOpt = DEFAULT_BPFFS, agent: AgentOpt = None, output: OutputOpt = "table") -> None:
    """Session-affinity records: client network namespace, frontend, backend, idle time, validity."""
    _run(bpffs, agent, output, inspect_data.affinity_doc, inspect_render.affinity)


@app.command()
def nodes(bpffs: BpffsOpt = DEFAULT_BPFFS, agent: AgentOpt = None, output: OutputOpt = "table") -> None:
    """NodePort frontends grouped by node address (needs --agent: frontend kinds are the model's)."""

    def build(io: MapIO, view: AgentView) -> Json:
        return inspect_data.nodes_doc(io, view, is_local_address)

    _run(bpffs, agent, output, build, inspect_render.nodes)


@contextmanager
def open_conntrack(bpffs: Path) -> Iterator[MapIO]:
    """The maps ``inspect conntrack`` reads; without north-south's pin, a clear error and exit status 2."""
    pin = bpffs / "maps" / abi.MAP_CONNTRACK
    if not pin.exists():
        typer.secho(f"error: north-south is not running on this node (no {pin})", fg="red", err=True)
        raise typer.Exit(2)
    with open_maps(bpffs, CONNTRACK_MAPS) as io:
        yield io


@app.command()
def conntrack(bpffs: BpffsOpt = DEFAULT_BPFFS, agent: AgentOpt = None, output: OutputOpt = "table") -> None:
    """North-south flows (one row per flow): client, frontend, backend, SNAT address, age, idle, state, owner.

    \b
    Reads <bpffs>/maps/bl_ct_v1. Ages are since the flow's first packet, idle times since its last one. A flow
    whose reply or client entry was evicted is still shown, with a note. Sorted by frontend, then client.
    -o json (stable, keys are only ever added; -o yaml is the same document):
      {"conntrack": [{"client": "ip:port", "frontend": "ip:port/PROTO", "protocol": "TCP|UDP|SCTP",
                      "backend": "ip:port", "snat": "ip:port" | null, "local": bool,
                      "serviceId": int, "backendId": int, "owner": {"kind", "namespace", "name",
                      "portName"} | null, "state": "new|established|closing",
                      "ageSeconds": float, "idleSeconds": float, "note": str | null,
                      "entries": [{"direction": "client|reply", "src", "dst", "protocol",
                                   "newSrc", "newDst", "serviceId", "backendId",
                                   "flags": ["reply", "snat", "local"], "state",
                                   "createdNs": int, "seenNs": int}]}],
       "usage": {"entries": int, "capacity": int | null, "flows": int},
       "agent": {"url", "available", "error"}}
    """
    _run(bpffs, agent, output, inspect_data.conntrack_doc, inspect_render.conntrack, open_conntrack)
