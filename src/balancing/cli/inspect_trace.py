"""Human output of ``balancing trace``: the steps of the datapath's lookup, the tiers, the verdict.

Renders the JSON document ``trace.trace_json`` builds (so text and JSON never disagree).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from balancing.cli import inspect_render
from balancing.cli.agentclient import AgentView, Json
from balancing.cli.inspect_common import owner_text, pod_text


def _pod(obj: Any) -> str:
    text = pod_text(obj)
    return f" [cyan]({escape(text)})[/cyan]" if text else ""


def _line(out: Console, label: str, text: str) -> None:
    out.print(f"[bold]{label:<10}[/bold] {text}")


def render(doc: Json, view: AgentView, out: Console) -> None:
    c, f = doc["caller"], doc["frontend"]
    inspect_render.print_note(out, view)
    who = "cgroup unknown"
    if c["cgroupId"]:
        who = (
            f"cgroup {escape(str(c['cgroup']))} (id {c['cgroupId']})"
            if c["cgroup"]
            else f"cgroup id {c['cgroupId']}"
        )
    out.print(f"[bold]trace[/bold] {escape(doc['target'])}  from {who}, netns cookie {c['netnsCookie']}")
    if f is None:
        _line(out, "frontend", "[yellow]none: not a frontend, untranslated (paid one lookup)[/yellow]")
        return
    parts = [f"id {f['serviceId']}", owner_text(f["owner"]), f["kind"] or ""]
    parts += [f"flags {','.join(f['flags'])}"] if f["flags"] else []
    _line(out, "frontend", escape(" · ".join(p for p in parts if p)))
    if f["reason"]:
        _line(out, "model", escape(f["reason"]))
    _render_steps(doc, out)
    for name in ("primary", "fallback"):
        tier = doc["tiers"][name]
        if tier is not None:
            _render_tier(name, tier, out)
    _render_verdict(doc["verdict"], out)
    for note in doc["notes"]:
        out.print(f"  [dim]· {escape(note)}[/dim]")


def _render_steps(doc: Json, out: Console) -> None:
    rule, q, a = doc["clientRule"], doc["qos"], doc["affinity"]
    if rule is not None:
        what = (
            "skipRedirectFromBackend: primary skipped"
            if rule["skip"]
            else f"loop guard: own backend {rule['ownBackend']}"
        )
        _line(out, "client", f"a backend pod{_pod(rule['pod'])}: {escape(what)}")
    elif doc["clientRules"]:
        _line(out, "client", f"not a backend pod of this frontend ({doc['clientRules']} client rules)")
    if q is not None:
        state = "[red]exceeded: fallback[/red]" if q["exceeded"] else "within the limit"
        window = "a new window" if q["windowExpired"] else f"window {q['windowAgeSeconds']} s old"
        _line(out, "QoS", f"{q['count']}/{q['limit']} per second ({window}): {state}")
    if a is not None:
        why = _affinity_state(a)
        idle = f"idle {a['idleSeconds']} s of {a['timeoutSeconds']} s"
        _line(out, "affinity", f"→ {escape(str(a['backend']))}{_pod(a['pod'])} {idle}: {why}")


def _affinity_state(a: Json) -> str:
    if a["used"]:
        return "used"
    bad = (("expired", a["expired"]), ("backend left", not a["matched"]), ("own backend", a["ownBackend"]))
    return ", ".join(what for what, is_bad in bad if is_bad)


def _render_tier(name: str, tier: Json, out: Console) -> None:
    owner = f" · {escape(owner_text(tier['owner']))}" if tier["owner"] else ""
    _line(out, name, f"{tier['count']} slot(s){owner}")
    if not tier["slots"]:
        return
    t = inspect_render.table(None, ["slot", "id", "backend", "pod", ""])
    for s in tier["slots"]:
        note = (
            "[yellow]own backend: skipped[/yellow]"
            if s["own"]
            else ("[red]missing[/red]" if not s["backend"] else "")
        )
        t.add_row(
            str(s["slot"]),
            str(s["backendId"] or ""),
            escape(str(s["backend"] or "")),
            escape(pod_text(s["pod"])),
            note,
        )
    out.print(t)


def _render_verdict(v: Json, out: Console) -> None:
    action = {"translate": "[green]TRANSLATE[/green]", "refuse": "[red]REFUSE (ECONNREFUSED)[/red]"}
    head = action.get(v["action"], f"[yellow]{v['action'].upper()}[/yellow]")
    if v["deterministic"] and v["backend"]:
        head += f" → [bold]{escape(v['backend'])}[/bold]{_pod(v['pod'])}"
    result = f" · counted as {v['result']}" if v["result"] else ""
    among = len({o["backend"] for o in v["outcomes"]})
    how = (
        f"{v['decidedBy']} among {among}" if v["decidedBy"] in ("random", "socket-cookie") else v["decidedBy"]
    )
    _line(out, "verdict", f"{head} · decided by {how}{result}")
    if not v["deterministic"]:
        t = inspect_render.table(None, ["p", "action", "tier", "backend", "pod", "result"])
        for o in v["outcomes"]:
            row = (
                f"{o['probability']:.0%}",
                o["action"],
                o["tier"] or "",
                o["backend"] or "",
                pod_text(o["pod"]),
                o["result"],
            )
            t.add_row(*(escape(str(x)) for x in row))
        out.print(t)
