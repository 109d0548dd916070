"""``balancing status``: a running agent at a glance, from its health port's ``GET /statusz``.

Ready and healthy, the last sync and its age, frontends programmed, how full the maps are, the programs
attached, the tasks being restarted and the errors logged (``agent.health`` documents the document; counts
only, so it is safe on a health port listening on every address). ``-o json|yaml`` prints the agent's
document with ``"agent": URL`` added. Exit status: 0 ready and healthy, 1 the agent answered but is not,
2 it did not answer (or a bad flag).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from balancing import errors
from balancing.cli import flags, output

__all__ = ["render", "status", "statusz_url"]

DEFAULT_AGENT = "127.0.0.1:10256"
TIMEOUT = 2.0  # seconds
FILL_WARN = 0.8  # a map fuller than this is shown in yellow

Json = dict[str, Any]


def statusz_url(agent: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT``) or ``http://HOST:PORT[/statusz]`` → the ``/statusz`` URL."""
    if "://" not in agent:
        flags.host_port("--agent", agent)
        agent = f"http://{agent}"
    return agent if agent.rstrip("/").endswith("/statusz") else agent.rstrip("/") + "/statusz"


def fetch(url: str, timeout: float = TIMEOUT) -> Json:
    """The agent's ``/statusz``; ``errors.ConfigError`` naming ``--agent`` when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.load(resp)
    except urllib.error.HTTPError as exc:
        exc.close()
        hint = " (an agent older than /statusz?)" if exc.code == 404 else ""
        raise errors.ConfigError("--agent", f"{url}: HTTP {exc.code}{hint}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise errors.ConfigError("--agent", f"{url}: {reason} (is the agent running?)") from None
    if not isinstance(doc, dict):
        raise errors.ConfigError("--agent", f"{url}: the answer is not a JSON object")
    return doc


def _yes(value: Any, good: str = "yes", bad: str = "no") -> str:
    return f"[green]{good}[/green]" if value else f"[red]{bad}[/red]"


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _sync(doc: Json) -> str:
    if not doc.get("lastSync"):
        return "[yellow]none yet[/yellow]"
    age, stale = doc.get("lastSyncAgeSeconds"), doc.get("staleAfterSeconds")
    late = isinstance(age, int | float) and isinstance(stale, int | float) and age > stale
    text = f"{escape(str(doc['lastSync']))} ({_age(age)} ago; stale after {_age(stale)})"
    return f"[red]{text}[/red]" if late else text


def _maps(doc: Json) -> str:
    parts = []
    for name, m in (doc.get("maps") or {}).items():
        entries, capacity = m.get("entries"), m.get("capacity")
        if isinstance(capacity, int) and capacity > 0 and isinstance(entries, int):
            share = entries / capacity
            text = f"{escape(name)} {entries}/{capacity} ({share:.0%})"
            parts.append(f"[yellow]{text}[/yellow]" if share >= FILL_WARN else text)
        else:
            parts.append(f"{escape(name)} {entries}")
    return ", ".join(parts) or "-"


def _programs(doc: Json) -> str:
    progs = doc.get("programs") or {}
    attached = progs.get("attached") or []
    text = f"{len(attached)} attached" + (f": {escape(', '.join(map(str, attached)))}" if attached else "")
    warnings = progs.get("loadWarnings")
    return text + (f" [yellow]({warnings} load warnings)[/yellow]" if warnings else "")


def _errors(doc: Json) -> str:
    e = doc.get("errors") or {}
    recent, window = e.get("recentErrors", 0), e.get("windowSeconds")
    text = (
        f"{recent} in the last {_age(window)}; {e.get('errors', 0)} errors, {e.get('warnings', 0)} warnings"
    )
    text += " since start"
    if e.get("lastErrorTime"):
        text += f", last at {escape(str(e['lastErrorTime']))}"
    text = f"[red]{text}[/red]" if recent else text
    if e.get("lastError"):
        text += f"\n{'':10} last error: {escape(str(e['lastError']))}"
    return text


def render(doc: Json, url: str, out: Console) -> None:
    """The human view of one ``/statusz`` document."""
    down = doc.get("tasksDown") or []
    rows = [
        ("agent", f"{escape(url)} (balancing {escape(str(doc.get('version', '?')))}, "
                  f"source {escape(str(doc.get('source', '?')))})"),
        ("ready", _yes(doc.get("ready"))),
        ("healthy", _yes(doc.get("healthy"))),
        ("last sync", _sync(doc)),
        ("frontends", f"{doc.get('frontends', '?')} programmed"),
        ("maps", _maps(doc)),
        ("programs", _programs(doc)),
        ("tasks", f"[red]restarting: {escape(', '.join(map(str, down)))}[/red]" if down else "all running"),
        ("errors", _errors(doc)),
    ]  # fmt: skip
    for label, text in rows:
        out.print(f"[bold]{label:<10}[/bold]{text}")


def status(
    agent: Annotated[
        str,
        typer.Option(
            "--agent", help="The agent's health address, HOST:PORT or http://HOST:PORT (its --health-addr)."
        ),
    ] = DEFAULT_AGENT,
    output_format: Annotated[str, typer.Option("-o", "--output", help="text, json or yaml.")] = "text",
) -> None:
    """A running agent: ready, last sync and its age, frontends, map fill, programs, errors."""
    fmt = output.check(output_format, ("text", *output.DOCUMENT_FORMATS))
    try:
        url = statusz_url(agent)
        doc = fetch(url)
    except errors.ConfigError as exc:
        flags.fail(exc)
    if fmt == "text":
        render(doc, url, Console(highlight=False))
    else:
        typer.echo(output.dumps({"agent": url, **doc}, fmt))
    if not (doc.get("ready") and doc.get("healthy")):
        raise typer.Exit(1)
