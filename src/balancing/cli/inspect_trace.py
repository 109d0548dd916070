"""Human output of ``balancing trace``: the steps of the datapath's lookup, the tiers, the verdict.

Renders the JSON document ``trace.trace_json`` builds (so text and JSON never disagree); with
``--from-address``, ``render_north_south`` renders its ``northSouth`` object instead (the TC programs' steps:
conntrack, the external flag, source ranges, the Maglev entry, DNAT or SNAT).
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


# --- north-south (--from-address) --------------------------------------------------------------------------

_NS_ACTIONS = {
    "translate": "[green]TRANSLATE[/green]",
    "drop": "[red]DROP[/red]",
    "pass": "[yellow]PASS (untouched)[/yellow]",
}
_NAT = {
    "dnat": "DNAT, the client's address kept (a pod on this node)",
    "snat": "SNAT to the arriving device's address (a backend elsewhere)",
    "hairpin": "SNAT to the frontend address (hairpin: a pod on this node, the client routed elsewhere)",
}


def render_north_south(doc: Json, view: AgentView, out: Console) -> None:
    ns, f = doc["northSouth"], doc["frontend"]
    inspect_render.print_note(out, view)
    out.print(
        f"[bold]trace[/bold] {escape(doc['target'])}  from external client {escape(ns['client'])} "
        "(north-south: a packet arriving on the node's devices)"
    )
    if f is not None:
        parts = [f"id {f['serviceId']}", owner_text(f["owner"]), f["kind"] or ""]
        parts += [f"north-south {','.join(ns['flags'])}"] if ns["flags"] else ["not external"]
        _line(out, "frontend", escape(" · ".join(p for p in parts if p)))
    if ns["reason"]:
        _line(out, "model", escape(ns["reason"]))
    if ns["loaded"]:
        _render_ns_settings(ns, out)
    _render_ns_steps(ns, out)
    _render_ns_verdict(ns["verdict"], out)
    for note in ns["notes"]:
        out.print(f"  [dim]· {escape(note)}[/dim]")


def _render_ns_settings(ns: Json, out: Console) -> None:
    ports = ns["snatPorts"]
    if ns["maglevSize"] is not None:
        snat = f" · SNAT ports {ports['min']}-{ports['max']}" if ports else ""
        _line(out, "settings", f"Maglev tables of {ns['maglevSize']} entries{snat}")
    devices = [
        f"{d['name'] or '?'} (ifindex {d['ifindex']}): "
        + (f"SNAT {d['snatAddress']}" if d["snatAddress"] else "[red]no address of this family[/red]")
        + (" · local backends hairpinned" if d["hairpin"] else "")
        for d in ns["devices"]
    ]
    _line(out, "devices", "; ".join(devices) if devices else "[yellow]none[/yellow]")
    routes = ns["routes"]
    if routes is not None:
        via = routes["clientDevice"]
        where = f"via {via['name'] or via['ifindex']}" if via else "[yellow]no route[/yellow]"
        own = "a node address" if routes["frontendLocal"] else "not a node address"
        _line(out, "routes", f"client {where} · frontend {own}")


def _render_ns_steps(ns: Json, out: Console) -> None:
    ct = ns["conntrack"]
    if ct is not None:
        state = "decides" if ct["decides"] else "[yellow]its backend is gone: picked again[/yellow]"
        to = f"→ {escape(str(ct['backend'] or ct['newDst']))}{_pod(ct['pod'])}"
        _line(out, "conntrack", f"{to} ({ct['state']}, idle {ct['idleSeconds']} s): {state}")
    elif ns["clientPort"] is not None and ns["loaded"]:
        _line(
            out, "conntrack", f"no entry for this flow ({ns['trackedFlows']} other flow(s) from this client)"
        )
    ranges = ns["sourceRanges"]
    if ranges is not None:
        verdict = (
            f"allowed by {escape(ranges['matched'])}"
            if ranges["allowed"]
            else "[red]outside all: dropped[/red]"
        )
        _line(out, "sources", f"loadBalancerSourceRanges {escape(', '.join(ranges['ranges']))}: {verdict}")
    if ns["index"] is not None:
        _line(out, "maglev", f"flow hash {ns['flowHash']:#010x} → entry {ns['index']} of {ns['maglevSize']}")


def _render_ns_verdict(v: Json, out: Console) -> None:
    head = _NS_ACTIONS.get(v["action"], f"[yellow]{v['action'].upper()}[/yellow]")
    if v["deterministic"] and v["backend"]:
        head += f" → [bold]{escape(v['backend'])}[/bold]{_pod(v['pod'])}"
    nat = f" · {_NAT['hairpin' if v['hairpin'] else v['nat']]}" if v["nat"] else ""
    result = f" · counted as {v['result']}" if v["result"] else ""
    _line(out, "verdict", f"{head}{nat} · decided by {v['decidedBy']}{result}")
    if v["deterministic"]:
        return
    t = inspect_render.table(None, ["p", "action", "backend", "pod", "nat", "result"])
    for o in v["outcomes"]:
        nat = "hairpin" if o["hairpin"] else o["nat"] or ""
        row = (f"{o['probability']:.1%}", o["action"], o["backend"] or "", pod_text(o["pod"]), nat)
        t.add_row(*(escape(str(x)) for x in (*row, o["result"])))
    out.print(t)
