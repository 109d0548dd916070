"""``balancing trace VIP:PORT/PROTO``: which backend a connect would reach, and why, from the live maps.

Replays the datapath's lookup (``balancing.datapath.replay``) for a caller: by default this process (its
cgroup and network namespace); ``--from-cgroup PATH`` takes the cgroup of a pod instead (policy client rules
are keyed by it), ``--netns-cookie N`` another network namespace (affinity records are keyed by it; the
caller's own comes from ``getsockopt(SO_NETNS_COOKIE)``), ``--socket-cookie N`` a UDP socket (its slot).
Nothing is written to the maps. With ``--agent URL`` the agent's ``/state`` adds the owner, the model's
reason for the backend set (ready / terminating fallback / topology / traffic policy / policy layering) and
the pods behind backend addresses.

JSON output (``-o json``, the same as YAML with ``-o yaml``; stable, keys are only ever added; owner/pod
objects as in ``balancing inspect``)::

    {"target": "ip:port/PROTO",
     "caller": {"cgroup": str | null, "cgroupId": int | null, "netnsCookie": int | null,
                "socketCookie": int | null, "ipv4Socket": bool},
     "frontend": null | {"serviceId", "flags": [str], "affinityTimeoutSeconds", "owner", "kind", "reason",
                         "fallbackOwner"},                      # null: not a frontend
     "clientRules": int,                                        # rules of this frontend, any cgroup
     "clientRule": null | {"cgroupId", "skip": bool, "ownBackendId": int | null, "ownBackend": str | null,
                           "pod": {...} | null},
     "qos": null | {"limit", "count", "windowAgeSeconds" | null, "windowExpired", "exceeded"},
     "affinity": null | {"backendId", "backend", "pod", "idleSeconds", "timeoutSeconds", "expired",
                         "matched", "ownBackend", "used"},
     "tiers": {"primary" | "fallback": null | {"count", "flags", "owner",
               "slots": [{"slot", "backendId" | null, "backend" | null, "pod", "own": bool}]}},
     "verdict": {"action": "pass" | "translate" | "refuse" | "depends",
                 "decidedBy": "not-a-frontend" | "skip-redirect-from-backend" | "qos-limit" | "affinity"
                              | "loop-guard" | "no-primary-backend" | "random" | "socket-cookie",
                 "mode": "affinity" | "random" | "socket-cookie" | null,   # how the deciding tier picks
                 "deterministic": bool, "backend": "ip:port" | null, "pod": {...} | null,
                 "result": str | null,                          # the counter/event result, if one
                 "outcomes": [{"action", "result", "tier", "slot", "backendId", "backend", "pod",
                               "probability"}]},
     "notes": [str], "agent": {"url", "available", "error"}}

``result`` names are the datapath's (``translated``, ``affinity``, ``loop_guard_next``,
``fallback_skip_redirect_from_backend``, ``fallback_loop_guard``, ``fallback_qos``,
``fallback_no_primary_backend``, ``refused``), the same as in metrics and events.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from balancing.cli import agentclient, inspect_trace
from balancing.cli import output as cli_output
from balancing.cli.agentclient import AgentView, Json
from balancing.cli.inspect_common import (
    DEFAULT_BPFFS,
    AgentOpt,
    BpffsOpt,
    check_output,
    flag_names,
    open_maps,
    parse_frontend,
    seconds,
)
from balancing.datapath import mounts, replay
from balancing.datapath.replay import Outcome, TierView, Trace
from balancing.model.desired import FrontendKey

SO_NETNS_COOKIE = 71


def current_netns_cookie() -> int | None:
    """The cookie of this thread's network namespace (``None`` on kernels before 5.14)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            value: int = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
            return value
    except OSError:
        return None


def current_cgroup() -> Path | None:
    """This process's cgroup v2 directory."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mounts.cgroup2_root() / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def parse_target(text: str) -> tuple[FrontendKey, bool]:
    """The frontend key (a v4-mapped address is its IPv4 frontend) and whether the socket is AF_INET."""
    key = parse_frontend(text)
    mapped = getattr(key.ip, "ipv4_mapped", None)
    if mapped is not None:
        return FrontendKey(mapped, key.port, key.protocol), False
    return key, key.ip.version == 4


def _backend(view: AgentView, backend: Any) -> Json:
    text = None if backend is None else str(backend)
    return {"backend": text, "pod": view.pod(text) if text else None}


def _tier(t: TierView | None, view: AgentView, owner: Any) -> Json | None:
    if t is None:
        return None
    slots = [
        {"slot": s.slot, "backendId": s.backend_id, **_backend(view, s.backend), "own": s.own}
        for s in t.slots
    ]
    return {"count": t.count, "flags": flag_names(t.flags), "owner": owner, "slots": slots}


def _outcome(o: Outcome, view: AgentView) -> Json:
    return {
        "action": o.action,
        "result": o.result,
        "tier": o.tier,
        "slot": o.slot,
        "backendId": o.backend_id,
        **_backend(view, o.backend),
        "probability": round(o.probability, 4),
    }


def _verdict(t: Trace, view: AgentView) -> Json:
    outcomes = [_outcome(o, view) for o in t.outcomes]
    results = {o.result for o in t.outcomes}
    single = t.deterministic and t.action == "translate"
    return {
        "action": t.action,
        "decidedBy": t.decided_by,
        "mode": t.mode or None,
        "deterministic": t.deterministic,
        **(_backend(view, t.outcomes[0].backend) if single else {"backend": None, "pod": None}),
        "result": results.pop() if len(results) == 1 else None,
        "outcomes": outcomes,
    }


def trace_json(t: Trace, view: AgentView, cgroup: Path | None = None) -> Json:
    """The JSON document of one trace (schema in the module docstring)."""
    model = view.frontend(str(t.target)) or {}
    p = t.primary
    frontend = None
    if p is not None:
        frontend = {
            "serviceId": t.svc_id,
            "flags": flag_names(p.flags),
            "affinityTimeoutSeconds": p.affinity_timeout,
        }
        frontend |= {k: model.get(k) for k in ("owner", "kind", "reason", "fallbackOwner")}
    c, rule, q, a = t.caller, t.client_rule, t.qos, t.affinity
    own = next((s.backend for s in p.slots if s.own), None) if p else None
    return {
        "target": str(t.target),
        "caller": {
            "cgroup": str(cgroup) if cgroup else None,
            "cgroupId": c.cgroup_id,
            "netnsCookie": c.netns_cookie,
            "socketCookie": c.socket_cookie,
            "ipv4Socket": c.ipv4_socket if c.ipv4_socket is not None else t.target.ip.version == 4,
        },
        "frontend": frontend,
        "clientRules": t.client_rules,
        "clientRule": None
        if rule is None
        else {
            "cgroupId": rule.cgroup_id,
            "skip": rule.skip,
            "ownBackendId": rule.backend_id or None,
            "ownBackend": str(own) if own else None,
            "pod": view.pod(str(own)) if own else None,
        },
        "qos": None
        if q is None
        else {
            "limit": q.limit,
            "count": q.count,
            "windowAgeSeconds": seconds(q.window_age_ns) if q.window_ns else None,
            "windowExpired": q.expired,
            "exceeded": q.exceeded,
        },
        "affinity": None
        if a is None
        else {
            "backendId": a.backend_id,
            **_backend(view, a.backend),
            "idleSeconds": seconds(a.age_ns),
            "timeoutSeconds": a.timeout_s,
            "expired": a.expired,
            "matched": a.matched,
            "ownBackend": a.own,
            "used": a.used,
        },
        "tiers": {
            "primary": _tier(t.primary, view, model.get("owner")),
            "fallback": _tier(t.fallback, view, model.get("fallbackOwner")),
        },
        "verdict": _verdict(t, view),
        "notes": t.notes,
        "agent": view.describe(),
    }


def trace(
    target: Annotated[
        str, typer.Argument(help="VIP:PORT/PROTO, e.g. 10.96.0.10:53/UDP or [fd00::a]:80/TCP.")
    ],
    bpffs: BpffsOpt = DEFAULT_BPFFS,
    from_cgroup: Annotated[
        Path | None,
        typer.Option("--from-cgroup", help="Connect as a process in this cgroup v2 [this process's]."),
    ] = None,
    agent: AgentOpt = None,
    output: Annotated[str, typer.Option("-o", "--output", help="text, json or yaml.")] = "text",
    netns_cookie: Annotated[
        int | None, typer.Option("--netns-cookie", help="The client's network namespace cookie [this one's].")
    ] = None,
    socket_cookie: Annotated[
        int | None, typer.Option("--socket-cookie", help="UDP: the socket's cookie, which decides its slot.")
    ] = None,
) -> None:
    """Replay the datapath's decision for a connect to VIP:PORT/PROTO: frontend, candidates, rule, backend."""
    output = check_output(output, ("text", *cli_output.DOCUMENT_FORMATS))
    try:
        key, ipv4_socket = parse_target(target)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TARGET") from exc
    cgroup = from_cgroup or current_cgroup()
    try:
        cgroup_id = mounts.cgroup_id(cgroup) if cgroup else None
    except OSError as exc:
        raise typer.BadParameter(f"{cgroup}: {exc.strerror}", param_hint="--from-cgroup") from exc
    cookie = netns_cookie if netns_cookie is not None else current_netns_cookie()
    caller = replay.Caller(cgroup_id, cookie, socket_cookie, ipv4_socket)
    view = agentclient.fetch(agent)
    with open_maps(bpffs) as io:
        result = replay.replay(io, key, caller)
    doc = trace_json(result, view, cgroup)
    if output in cli_output.DOCUMENT_FORMATS:
        typer.echo(cli_output.dumps(doc, output))
        return
    inspect_trace.render(doc, view, Console())
