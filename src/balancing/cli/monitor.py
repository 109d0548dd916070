"""``balancing monitor``: the agent's resolution events, live, one per line — human-readable or JSON.

Connects to the agent's event stream (``events.stream``: NDJSON on a unix socket, ``--events-socket`` of
the agent) and prints every record that passes the filters: ``--service NS/NAME`` keeps events whose
frontend belongs to that Service or policy (``NAME`` alone: any namespace, or a cluster-scoped policy),
``--pod NS/NAME`` events made by that client pod. ``-o json`` prints the records unchanged (schema in
``events.record``), ``-o yaml`` each as a YAML document (``---`` first). The stream ends when the agent
stops; Ctrl-C ends the command.
"""

from __future__ import annotations

import contextlib
import json
import socket as sockets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from balancing.cli import inspect_common
from balancing.cli import output as cli_output
from balancing.events import stream

NOT_RUNNING_HINT = "is the agent running with events on? (agent flags --events sampled|all, --events-socket)"


def parse_ref(text: str | None, flag: str) -> tuple[str | None, str] | None:
    """``NS/NAME`` → (NS, NAME); ``NAME`` → (None, NAME): any namespace."""
    if text is None:
        return None
    namespace, sep, name = text.rpartition("/")
    if not name or (sep and not namespace):
        raise typer.BadParameter(f"{text!r} is not NAMESPACE/NAME or NAME", param_hint=flag)
    return (namespace if sep else None), name


def _ref_matches(obj: Any, ref: tuple[str | None, str]) -> bool:
    if not isinstance(obj, dict):
        return False
    namespace, name = ref
    return obj.get("name") == name and (namespace is None or obj.get("namespace") == namespace)


def matches(
    rec: dict[str, Any], service: tuple[str | None, str] | None, pod: tuple[str | None, str] | None
) -> bool:
    """Whether an event passes ``--service`` (its owner) and ``--pod`` (its client pod)."""
    if service is not None and not _ref_matches(rec.get("owner"), service):
        return False
    client = rec.get("client")
    return pod is None or (isinstance(client, dict) and _ref_matches(client.get("pod"), pod))


def _client_text(client: dict[str, Any]) -> str:
    if "deviceIfindex" in client:  # north-south: an external client, no process
        return f"client {client.get('address') or '?'} via ifindex {client['deviceIfindex']}"
    proc = f"{client.get('command', '')}({client.get('pid', '?')})"
    pod = client.get("pod")
    if not isinstance(pod, dict):
        return f"host {proc}"
    name = f"{pod.get('namespace')}/{pod.get('name')}" if pod.get("name") else f"pod {pod.get('uid')}"
    container = f"[{pod['container']}]" if pod.get("container") else ""
    return f"{name}{container} {proc}"


def _text(value: Any) -> str:
    return escape("" if value is None else str(value))


def format_text(rec: dict[str, Any]) -> str:
    """One event as one line of rich markup."""
    when = str(rec.get("time", ""))[11:26]
    result = str(rec.get("result", ""))
    bad = result == "refused" or result.startswith("dropped")
    color = "red" if bad else "yellow" if result.startswith("fallback") else "green"
    client = rec.get("client")
    who = _client_text(client if isinstance(client, dict) else {})
    owner = inspect_common.owner_text(rec.get("owner")) or "-"
    return (
        f"[dim]{_text(when)}[/] {_text(rec.get('hook')):<12} {_text(rec.get('protocol'))} {_text(who)} "
        f"→ [bold]{_text(owner)}[/] {_text(rec.get('frontend'))} "
        f"⇒ {_text(rec.get('backend') or '-')} [{color}]{_text(result)}[/]"
    )


def connect(path: Path) -> sockets.socket:
    sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        typer.secho(
            f"error: cannot connect to the event stream {path}: {exc.strerror or exc}", fg="red", err=True
        )
        typer.secho(NOT_RUNNING_HINT, err=True)
        raise typer.Exit(2) from exc
    return sock


def read_lines(sock: sockets.socket) -> Iterator[str]:
    """The stream's lines until the agent closes it (or drops this client, or resets the connection)."""
    with sock.makefile("r", encoding="utf-8", errors="replace") as f:
        try:
            for line in f:
                if line.strip():
                    yield line
        except ConnectionResetError:
            return


def monitor(
    socket: Annotated[
        Path, typer.Option("--socket", help="The agent's event stream (its --events-socket).")
    ] = stream.DEFAULT_SOCKET,
    service: Annotated[
        str | None, typer.Option("--service", help="Only events of this Service or policy: NS/NAME or NAME.")
    ] = None,
    pod: Annotated[
        str | None, typer.Option("--pod", help="Only events from this client pod: NS/NAME.")
    ] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="text, json or yaml.")] = "text",
    count: Annotated[int, typer.Option("--count", help="Stop after this many events (0: never).")] = 0,
) -> None:
    """Live stream of resolution events (which client reached which backend through which frontend)."""
    cli_output.check(output, ("text", *cli_output.DOCUMENT_FORMATS))
    service_ref, pod_ref = parse_ref(service, "--service"), parse_ref(pod, "--pod")
    console = Console(highlight=False, soft_wrap=True)
    shown = 0
    sock = connect(socket)
    with contextlib.closing(sock), contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        for line in read_lines(sock):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not matches(rec, service_ref, pod_ref):
                continue
            if output == "json":
                sys.stdout.write(line if line.endswith("\n") else line + "\n")
                sys.stdout.flush()
            elif output == "yaml":
                sys.stdout.write(cli_output.dumps_line(rec, "yaml") + "\n")
                sys.stdout.flush()
            else:
                console.print(format_text(rec))
            shown += 1
            if count and shown >= count:
                return
        typer.secho("the event stream ended (the agent stopped)", err=True)
