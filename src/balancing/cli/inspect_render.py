"""Rich tables for the ``balancing inspect`` documents (``inspect_data``); ``wide`` adds columns.

Tables stay one line per row at hundreds of services: long backend lists are cut to a few and a count in
``table`` mode and shown whole in ``wide`` mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from balancing.cli.agentclient import AgentView, Json
from balancing.cli.inspect_common import owner_text, pod_text

SHOWN = 3  # backends listed per row in table mode
MIN_WIDTH = {"id": 2, "kind": 12, "proto": 5, "state": 5}


def console(wide: bool) -> Console:
    c = Console()
    return Console(width=max(c.width, 220)) if wide and not c.is_terminal else c


def table(
    title: str | None, columns: Sequence[str], wide: bool = True, keep: dict[str, int] | None = None
) -> Table:
    """A compact table; ``wide`` folds long cells, otherwise each row stays one line (cut with …) but for
    the ``keep`` columns (column → widest value: addresses are never cut)."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    widths = {**MIN_WIDTH, **(keep or {})}
    for col in columns:
        t.add_column(
            col, overflow="fold" if wide else "ellipsis", no_wrap=not wide, min_width=widths.get(col)
        )
    return t


def widest(rows: Iterable[Json], key: str) -> dict[str, int]:
    return {key: max((len(str(r[key])) for r in rows), default=0)}


def backend_list(backends: Sequence[str | None] | None, wide: bool) -> str:
    if backends is None:
        return "[dim]-[/dim]"
    if not backends:
        return "[red]none: refused[/red]"
    shown = [escape(b) if b else "[red]missing[/red]" for b in backends]
    if wide or len(shown) <= SHOWN:
        return ", ".join(shown)
    return ", ".join(shown[:SHOWN]) + f" [dim]+{len(shown) - SHOWN} more[/dim]"


def _t(value: Any) -> str:
    return escape("" if value is None else str(value))


def print_note(out: Console, view: AgentView) -> None:
    note = view.note()
    if note:
        out.print(escape(note), style="yellow")


def services(doc: Json, view: AgentView, wide: bool) -> Iterable[Table | str]:
    cols = ["frontend", "id", "owner", "kind", "backends", "fallback"] + (["flags", "reason"] if wide else [])
    t = table(f"frontends ({len(doc['services'])})", cols, wide, widest(doc["services"], "frontend"))
    for r in doc["services"]:
        row = [_t(r["frontend"]), _t(r["serviceId"]), _t(owner_text(r["owner"])), _t(r["kind"])]
        row += [backend_list(r["backends"], wide), backend_list(r["fallback"], wide)]
        if wide:
            row += [_t(",".join(r["flags"])), _t(r["reason"])]
        t.add_row(*row)
    yield t
    if doc["unprogrammed"]:
        yield f"[red]in the agent's model but not in the maps: {_t(', '.join(doc['unprogrammed']))}[/red]"
    used = (f"{n}: {u['entries']}/{u['capacity'] or '?'}" for n, u in doc["usage"].items())
    yield f"[dim]{' '.join(used)}[/dim]"


def backends(doc: Json, view: AgentView, wide: bool) -> Iterable[Table | str]:
    cols = ["id", "backend", "proto", "pod", "node", "used by"]
    t = table(f"backends ({len(doc['backends'])})", cols, wide, widest(doc["backends"], "backend"))
    for r in doc["backends"]:
        uses = [f"{u['frontend']}{'' if u['tier'] == 'primary' else ' (fallback)'}" for u in r["usedBy"]]
        if not wide and len(uses) > SHOWN:
            uses = [*uses[:SHOWN], f"+{len(uses) - SHOWN} more"]
        pod = r["pod"] or {}
        used = _t(", ".join(uses)) if uses else "[yellow]no frontend (orphan)[/yellow]"
        t.add_row(
            _t(r["backendId"]),
            _t(r["backend"]),
            _t(r["protocol"]),
            _t(pod_text(pod)),
            _t(pod.get("node")),
            used,
        )
    yield t


def _qos_text(q: Json | None) -> str:
    if q is None:
        return "[dim]-[/dim]"
    text = f"{q['count']}/{q['limit']} per s"
    return f"[red]{text} (exceeded)[/red]" if q["exceeded"] else text


def policies(doc: Json, view: AgentView, wide: bool) -> Iterable[Table | str]:
    cols = ["frontend", "owner", "primary", "fallback", "QoS", "client rules", "skip from backend"]
    keep = widest(doc["policies"], "frontend")
    t = table(f"policy frontends ({len(doc['policies'])})", cols + (["reason"] if wide else []), wide, keep)
    for r in doc["policies"]:
        rules = r["clientRules"]
        fallback = backend_list(r["fallback"], wide)
        if r["fallbackOwner"]:
            fallback += f" [dim]({_t(owner_text(r['fallbackOwner']))})[/dim]"
        row = [_t(r["frontend"]), _t(owner_text(r["owner"])), backend_list(r["primary"], wide), fallback]
        row += [
            _qos_text(r["qos"]),
            f"{rules['total']} ({rules['skip']} skip, {rules['loopGuard']} loop guard)",
        ]
        row.append(_t(r["skipRedirectFromBackend"]))
        t.add_row(*(row + ([_t(r["reason"])] if wide else [])))
    yield t
    status = doc["status"]
    if status is None:
        yield "[dim]policy status: not served by this agent[/dim]" if view.available else ""
        return
    s = table(f"policy status ({len(status)})", ["kind", "name", "ready", "reason", "message"], wide)
    for p in status:
        s.add_row(*(_t(p.get(k)) for k in ("kind", "name", "ready", "reason", "message")))
    yield s


def affinity(doc: Json, view: AgentView, wide: bool) -> Iterable[Table | str]:
    if not doc["affinity"]:
        yield "no affinity records"
        return
    cols = ["netns cookie", "frontend", "backend", "pod", "idle s", "timeout s", "state"]
    t = table(f"affinity records ({len(doc['affinity'])})", cols + (["owner"] if wide else []), wide)
    for r in doc["affinity"]:
        if r["valid"]:
            state = "[green]valid[/green]"
        else:
            why = [w for w, bad in (("expired", r["expired"]), ("backend left", not r["matched"])) if bad]
            state = f"[yellow]{', '.join(why)}[/yellow]"
        frontend = r["frontend"] or f"unknown id {r['serviceId']}"
        row = [_t(r["netnsCookie"]), _t(frontend), _t(r["backend"] or f"id {r['backendId']}")]
        row += [_t(pod_text(r["pod"])), _t(r["idleSeconds"]), _t(r["timeoutSeconds"]), state]
        t.add_row(*(row + ([_t(owner_text(r["owner"]))] if wide else [])))
    yield t


def nodes(doc: Json, view: AgentView, wide: bool) -> Iterable[Table | str]:
    if not view.available:
        yield "[yellow]NodePort frontends are known from the agent's model: pass --agent[/yellow]"
        return
    for n in doc["nodes"]:
        where = " ".join(x for x in (n["node"] or "", "(this host)" if n["local"] else "") if x)
        t = table(
            _t(f"{n['address']} {where}".strip()),
            ["frontend", "id", "owner", "backends"] + (["reason"] if wide else []),
        )
        for f in n["frontends"]:
            shown = backend_list(f["backends"], wide) if f["programmed"] else "[red]not programmed[/red]"
            row = [_t(f["frontend"]), _t(f["serviceId"]), _t(owner_text(f["owner"])), shown]
            t.add_row(*(row + ([_t(f["reason"])] if wide else [])))
        yield t
    if not doc["nodes"]:
        yield "no NodePort frontends"


def duration(seconds: float) -> str:
    """``12.3s``, ``4m05s``, ``3h04m``, ``2d03h``: short and sortable by eye."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


CT_STATE_STYLE = {"new": "yellow", "established": "green", "closing": "dim"}
RICH_ROWS_MAX = 1000  # flows laid out by rich (~0.5 ms a row); beyond, plain aligned columns (~30 µs a row)
Cell = tuple[str, str | None]  # plain text, rich style


def _styled(cell: Cell) -> str:
    text, style = cell
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def _flow_cells(r: Json, wide: bool) -> list[Cell]:
    state = r["state"] + (f" ({r['note']})" if r["note"] else "")
    cells: list[Cell] = [(r["client"], None), (r["frontend"], None), (r["backend"], None)]
    cells += [(r["snat"] or "-", None), (duration(r["ageSeconds"]), None), (duration(r["idleSeconds"]), None)]
    cells.append((state, "yellow" if r["note"] else CT_STATE_STYLE.get(r["state"], "red")))
    cells.append((owner_text(r["owner"]) or f"id {r['serviceId']}", None))
    return cells + ([(str(r["serviceId"]), None), (str(r["backendId"]), None)] if wide else [])


def plain_columns(title: str, columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A table as one markup string of space-aligned columns (for row counts rich would take long over)."""
    widths = [max([len(col), *(len(row[i][0]) for row in rows)]) for i, col in enumerate(columns)]

    def line(cells: Sequence[Cell]) -> str:
        padded = (_styled(c) + " " * (w - len(c[0])) for c, w in zip(cells, widths, strict=True))
        return "  ".join(padded).rstrip()

    header = line([(col, "bold") for col in columns])
    rule = "[dim]" + "  ".join("─" * w for w in widths) + "[/dim]"
    return "\n".join([f"[italic]{escape(title)}[/italic]", header, rule, *(line(r) for r in rows)])


def conntrack(doc: Json, view: AgentView, wide: bool) -> Iterable[Table | str]:
    flows = doc["conntrack"]
    usage = doc["usage"]
    footer = f"[dim]{usage['entries']}/{usage['capacity'] or '?'} conntrack entries[/dim]"
    if not flows:
        yield "no north-south flows"
        yield footer
        return
    cols = ["client", "frontend", "backend", "SNAT", "age", "idle", "state", "owner"]
    cols += ["id", "backend id"] if wide else []
    title = f"north-south flows ({len(flows)})"
    rows = [_flow_cells(r, wide) for r in flows]
    if len(rows) > RICH_ROWS_MAX:
        yield plain_columns(title, cols, rows)
    else:
        keep = {**widest(flows, "client"), **widest(flows, "frontend"), **widest(flows, "backend")}
        t = table(title, cols, wide, keep)
        for row in rows:
            t.add_row(*(_styled(c) for c in row))
        yield t
    yield footer
