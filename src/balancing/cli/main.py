"""The ``balancing`` command line (typer): flags are parsed and checked here, work happens in the stages.

Subcommands: ``agent`` (run the node agent, in ``agent_cmd``), ``status`` (a running agent's sync, maps and
programs), ``inspect`` (what the maps hold), ``trace`` (replay the datapath's decision for one frontend),
``monitor`` (stream resolution events from an agent), ``controller`` (the policies' admission webhooks),
``cleanup`` (detach and unpin everything). ``--version`` prints the package's version; shell completion is
``--install-completion``. Help text is plain (no Rich markup: ``[cgroup2 root]`` and ``[fd00::1]:53`` stay as
written) and shows the defaults. Flag errors name the flag.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from balancing.cli import agent_cmd, controller_cmd, inspect, monitor, status, trace
from balancing.cli.inspect_common import DEFAULT_BPFFS
from balancing.datapath import loader

app = typer.Typer(
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    help="Socket-level load balancing for Kubernetes.",
    context_settings={"max_content_width": 120},
)
app.command()(agent_cmd.agent)
app.command()(status.status)
app.add_typer(inspect.app, name="inspect")
app.command()(trace.trace)
app.command()(monitor.monitor)
app.command()(controller_cmd.controller)

BpffsOpt = Annotated[Path, typer.Option("--bpffs", help="Directory on bpffs holding this agent's pins.")]


def version() -> str:
    """The installed package's version."""
    try:
        return metadata.version("balancing")
    except metadata.PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"balancing {version()}")
        raise typer.Exit()


@app.callback()
def main(
    _version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Socket-level load balancing for Kubernetes."""


@app.command()
def cleanup(bpffs: BpffsOpt = DEFAULT_BPFFS) -> None:
    """Detach every program and unpin every map of the agent at --bpffs (safe to run twice)."""
    done = loader.cleanup(bpffs)
    typer.echo("\n".join(done) if done else f"nothing pinned under {bpffs}")
