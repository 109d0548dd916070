"""``balancing inspect``: what the pinned maps hold, as rich tables or stable JSON.

Reads the maps through the datapath's own decoder (``programmed.read_state``), so it shows exactly what
connects see, including inconsistencies (missing slots or backends).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from balancing.datapath import abi, maps, programmed

app = typer.Typer(no_args_is_help=True, help="Show what the datapath maps hold.")

OutputOpt = Annotated[str, typer.Option("-o", "--output", help="table or json.")]


def services_json(state: programmed.ProgrammedState) -> list[dict[str, object]]:
    out = []
    for key in sorted(state.frontends):
        f = state.frontends[key]
        out.append(
            {
                "frontend": str(key),
                "address": str(key.ip),
                "port": key.port,
                "protocol": key.protocol.name,
                "serviceId": f.svc_id,
                "affinityTimeoutSeconds": f.affinity_timeout,
                "backends": [str(programmed.backend_of(r)) if r else None for r in f.slots],
            }
        )
    return out


@app.command()
def services(
    bpffs: Annotated[Path, typer.Option("--bpffs")] = Path("/sys/fs/bpf/balancing"),
    output: OutputOpt = "table",
) -> None:
    """Frontends and their backends as the maps hold them."""
    try:
        io = maps.KernelMaps(bpffs / "maps")
    except OSError as exc:
        typer.secho(f"error: cannot open the maps under {bpffs}/maps: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    try:
        state = programmed.read_state(io)
        usage = {
            name: (len(io.items(name)), io.capacity[name]) for name in (abi.MAP_SERVICES, abi.MAP_BACKENDS)
        }
    finally:
        io.close()
    rows = services_json(state)
    if output == "json":
        typer.echo(json.dumps({"services": rows}, indent=2))
        return
    table = Table(title=f"frontends in {bpffs}")
    for col in ("frontend", "id", "backends"):
        table.add_column(col)
    for row in rows:
        backends = row["backends"]
        assert isinstance(backends, list)
        shown = (
            escape(", ".join(b or "[missing]" for b in backends)) or "[red]none: connects are refused[/red]"
        )
        table.add_row(escape(str(row["frontend"])), str(row["serviceId"]), shown)
    console = Console()
    console.print(table)
    console.print(" ".join(f"{n}: {used}/{cap}" for n, (used, cap) in usage.items()), style="dim")
