"""Shared pieces of ``balancing inspect`` and ``balancing trace``: opening the pins, parsing, formatting
(``owner_text`` is also how ``balancing monitor`` names owners).

The tools open the pinned maps read-only in spirit (they never write) and close them before printing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from balancing.cli import output as cli_output
from balancing.datapath import abi, maps
from balancing.model.desired import FrontendKey, Protocol, parse_ip

DEFAULT_BPFFS = Path("/sys/fs/bpf/balancing")
# What the tools read: the writer's maps and the affinity LRU (``inspect conntrack`` adds north-south's).
READ_MAPS = (*maps.KernelMaps.WRITER_MAPS, abi.MAP_AFFINITY)
CONNTRACK_MAPS = (*READ_MAPS, abi.MAP_CONNTRACK)
FLAG_NAMES = {
    abi.SVC_F_AFFINITY: "affinity",
    abi.SVC_F_FALLBACK: "fallback",
    abi.SVC_F_CLIENTS: "clients",
    abi.SVC_F_QOS: "qos",
    abi.SVC_F_HOST_ONLY: "host-only",
    abi.SVC_F_EXTERNAL: "external",
    abi.SVC_F_ETP_LOCAL: "etp-local",
    abi.SVC_F_SRC_RANGES: "source-ranges",
    abi.SVC_F_NODE_ADDRESS: "node-address",
}

BpffsOpt = Annotated[Path, typer.Option("--bpffs", help="Directory on bpffs holding the agent's pins.")]
AgentOpt = Annotated[
    str | None,
    typer.Option(
        "--agent", help="The agent's state address (its --state-addr, http://127.0.0.1:10264) for names."
    ),
]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="table, wide, json or yaml.")]


def check_output(output: str, allowed: tuple[str, ...] = ("table", "wide", "json", "yaml")) -> str:
    return cli_output.check(output, allowed)


@contextmanager
def open_maps(bpffs: Path, names: Sequence[str] = READ_MAPS) -> Iterator[maps.KernelMaps]:
    """The pins ``names`` under ``bpffs``; a clear error and exit status 2 when one cannot be opened."""
    try:
        io = maps.KernelMaps(bpffs / "maps", names)
    except OSError as exc:
        typer.secho(f"error: cannot open the maps under {bpffs}/maps: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    try:
        yield io
    finally:
        io.close()


def parse_frontend(text: str) -> FrontendKey:
    """``VIP:PORT/PROTO`` (IPv6 as ``[addr]:port/PROTO``; ``/PROTO`` defaults to TCP) → a frontend key."""
    addr, _, proto = text.strip().partition("/")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r} is not VIP:PORT/PROTO (IPv6 as [addr]:port/PROTO)")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [addr]:port/PROTO")
    try:
        protocol = Protocol[(proto or "TCP").upper()]
    except KeyError:
        raise ValueError(f"{text!r}: the protocol must be TCP, UDP or SCTP") from None
    return FrontendKey(parse_ip(host.strip("[]")), int(port), protocol)


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES.items() if flags & bit]


def owner_text(owner: Any) -> str:
    """``Service default/web:http`` from the agent's owner object ('' when unknown)."""
    if not isinstance(owner, dict):
        return ""
    ns = f"{owner.get('namespace')}/" if owner.get("namespace") else ""
    port = f":{owner.get('portName')}" if owner.get("portName") else ""
    return f"{owner.get('kind', '')} {ns}{owner.get('name', '')}{port}".strip()


def pod_text(pod: Any) -> str:
    if not isinstance(pod, dict):
        return ""
    return f"{pod.get('namespace')}/{pod.get('name')}" if pod.get("namespace") else str(pod.get("name", ""))


def ms(ns: int) -> float:
    return round(ns / 1e6, 1)


def seconds(ns: int) -> float:
    return round(ns / 1e9, 3)
