"""The ``balancing`` command line (typer): flags are parsed and checked here, work happens in the stages.

Subcommands: ``agent`` (run the node agent, in ``agent_cmd``), ``inspect`` (what the maps hold), ``trace``
(replay the datapath's decision for one frontend), ``monitor`` (stream resolution events from an agent),
``controller`` (the policies' admission webhooks), ``cleanup`` (detach and unpin everything). Flag errors
name the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from balancing.cli import agent_cmd, controller_cmd, inspect, monitor, trace
from balancing.cli.inspect_common import DEFAULT_BPFFS
from balancing.datapath import loader

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Socket-level load balancing for Kubernetes."
)
app.command()(agent_cmd.agent)
app.add_typer(inspect.app, name="inspect")
app.command()(trace.trace)
app.command()(monitor.monitor)
app.command()(controller_cmd.controller)

BpffsOpt = Annotated[Path, typer.Option("--bpffs", help="Directory on bpffs holding this agent's pins.")]


@app.command()
def cleanup(bpffs: BpffsOpt = DEFAULT_BPFFS) -> None:
    """Detach every program and unpin every map of the agent at --bpffs (safe to run twice)."""
    done = loader.cleanup(bpffs)
    typer.echo("\n".join(done) if done else f"nothing pinned under {bpffs}")
