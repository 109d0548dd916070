"""``balancing trace VIP:PORT/PROTO``: which backend a connect would reach, and why, from the live maps.

Replays the datapath's lookup (``balancing.datapath.replay``) for a caller: by default this process (its
cgroup and network namespace); ``--from-cgroup PATH`` takes the cgroup of a pod instead (policy client rules
are keyed by it), ``--netns-cookie N`` another network namespace (affinity records are keyed by it; the
caller's own comes from ``getsockopt(SO_NETNS_COOKIE)``), ``--socket-cookie N`` a UDP socket (its slot).
Nothing is written to the maps. With ``--agent URL`` the agent's ``/state`` adds the owner, the model's
reason for the backend set (ready / terminating fallback / topology / traffic policy / policy layering) and
the pods behind backend addresses.

``--from-address IP[:PORT]`` traces a client outside the cluster instead: a packet from it arriving on this
node's north-south devices (``balancing.datapath.replay_ns``, the TC programs' decision: its conntrack entry,
the frontend's external flag, loadBalancerSourceRanges, the Maglev table entry its flow hashes to, DNAT to a
pod on this node or SNAT to a device's address for a backend elsewhere). Without the port, each backend's
share of the Maglev table. The document then also has ``northSouth`` (the text output shows only it); the
devices are named as this network namespace knows their ifindexes (run it in the agent's).

Over 400 lines on purpose: the JSON schema of both traces is documented here, beside the code that builds it.

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
     "notes": [str], "agent": {"url", "available", "error"},
     "northSouth": {                                            # only with --from-address
        "client": str, "clientAddress": str, "clientPort": int | null,
        "loaded": bool,                                         # north-south's maps are pinned here
        "served": bool,                                         # the master entry is flagged external
        "serviceId": int | null, "flags": ["external" | "etpLocal" | "sourceRanges"],
        "reason": str | null,                                   # the agent's externalReason, if it says
        "maglevSize": int | null, "snatPorts": {"min", "max"} | null,
        "sourceRanges": null | {"ranges": [cidr], "matched": cidr | null, "allowed": bool},
        "tableEntries": int | null,                             # null: the frontend has no Maglev table
        "flowHash": int | null, "index": int | null,            # with the client's port
        "conntrack": null | {"direction": "client" | "reply", "backendId", "backend", "pod",
                             "backendPresent": bool, "decides": bool, "newSrc", "newDst", "flags": [str],
                             "state", "ageSeconds", "idleSeconds"},   # this exact flow's entry
        "trackedFlows": int,                                    # from the client's address to the frontend
        "devices": [{"ifindex", "name": str | null, "snatAddress": str | null,
                     "hairpin": bool | null}],                  # a local backend's flow arriving here
        "routes": null | {"clientDevice": {"ifindex", "name"} | null, "frontendLocal": bool},
        "verdict": {"action": "pass" | "translate" | "drop" | "depends",
                    "decidedBy": "not-loaded" | "not-tcp-udp" | "conntrack" | "not-served" | "disabled"
                                 | "source-range" | "no-table" | "maglev",
                    "deterministic": bool, "backend": "ip:port" | null, "pod": {...} | null,
                    "backendId": int | null, "nat": "dnat" | "snat" | null, "hairpin": bool | null,
                    "result": str | null,
                    "outcomes": [{"action", "result", "backendId", "backend", "pod", "local", "nat",
                                  "hairpin", "probability", "tableEntries",
                                  "snatPortsInUse": {"address": int}}]},
        "notes": [str]}}

``nat``: ``dnat`` for a pod on this node (only the destination is translated, the pod sees the client's
address), ``snat`` for a backend elsewhere (the source becomes the arriving device's ``snatAddress`` and a
port of ``snatPorts``; ``snatPortsInUse`` counts the ports taken towards that backend per address) or for a
``hairpin``: a pod on this node reached by a client this node routes through no north-south device (a pod
of its own whose packets came back through the router), the source translated to the frontend address.
``routes`` is this network namespace's routing as ``ip route get`` shows it (null: not available); the
packet is assumed to arrive on ``clientDevice``, where the node routes the client.
North-south ``result`` names: ``translated_local``, ``translated_snat``, ``dropped_no_local_endpoint``,
``dropped_source_range``, ``dropped_no_backend``, ``dropped_snat_ports`` (null: a packet of a tracked flow,
counted only when its flow began).

``result`` names are the datapath's (``translated``, ``affinity``, ``loop_guard_next``,
``fallback_skip_redirect_from_backend``, ``fallback_loop_guard``, ``fallback_qos``,
``fallback_no_primary_backend``, ``refused``), the same as in metrics and events.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from balancing.cli import agentclient, inspect_trace
from balancing.cli import output as cli_output
from balancing.cli.agentclient import AgentView, Json
from balancing.cli.inspect_common import (
    DEFAULT_BPFFS,
    READ_MAPS,
    AgentOpt,
    BpffsOpt,
    check_output,
    flag_names,
    open_maps,
    parse_frontend,
    seconds,
)
from balancing.datapath import abi, mounts, replay, replay_ns
from balancing.datapath.replay import Outcome, TierView, Trace
from balancing.model.desired import FrontendKey, IPAddress, parse_ip

SO_NETNS_COOKIE = 71
# What --from-address reads beyond READ_MAPS: north-south's own pins, those that exist.
NORTH_SOUTH_MAPS = (abi.MAP_NS_CONFIG, abi.MAP_NS_DEVICES, abi.MAP_CONNTRACK)
NS_FLAG_NAMES = {
    abi.SVC_F_EXTERNAL: "external",
    abi.SVC_F_ETP_LOCAL: "etpLocal",
    abi.SVC_F_SRC_RANGES: "sourceRanges",
    abi.SVC_F_NODE_ADDRESS: "nodeAddress",
}
CT_FLAG_NAMES = {abi.CT_F_REPLY: "reply", abi.CT_F_SNAT: "snat", abi.CT_F_LOCAL: "local"}


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


def parse_client(text: str) -> tuple[IPAddress, int | None]:
    """``--from-address``: ``IP``, ``IP:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` (a v4-mapped address is the
    IPv4 client it stands for); ValueError saying what is wrong."""
    host, port = _split_host_port(text.strip())
    try:
        ip = parse_ip(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if port is not None and not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"{text!r}: the port must be 1..65535")
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip, None if port is None else int(port)


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not IP[:PORT] (IPv6 as [addr]:port)")
        return host, rest[1:] if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, None


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


def _device_name(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


def _ns_conntrack(t: replay_ns.NsTrace, view: AgentView) -> Json | None:
    if t.tracked is None:
        return None
    e, now = t.tracked.entry, t.client.now_ns
    backend = None if e.reply else t.tracked.backend
    return {
        "direction": "reply" if e.reply else "client",
        "backendId": e.backend_id,
        **_backend(view, backend),
        "backendPresent": t.tracked.backend is not None,
        "decides": t.tracked.decides,
        "newSrc": _address(*e.new_src),
        "newDst": _address(*e.new_dst),
        "flags": [name for bit, name in CT_FLAG_NAMES.items() if e.flags & bit],
        "state": e.state,
        "ageSeconds": seconds(max(0, now - e.created_ns)),
        "idleSeconds": seconds(max(0, now - e.seen_ns)),
    }


def _address(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _nat(o: replay_ns.NsOutcome) -> str | None:
    if o.action != "translate" or o.backend is None:
        return None
    return "dnat" if o.local and not o.hairpin else "snat"


def _ns_outcome(o: replay_ns.NsOutcome, view: AgentView) -> Json:
    return {
        "action": o.action,
        "result": o.result,
        "backendId": o.backend_id,
        **_backend(view, o.backend),
        "local": o.local,
        "nat": _nat(o),
        "hairpin": o.hairpin,
        "probability": round(o.probability, 4),
        "tableEntries": o.entries,
        "snatPortsInUse": o.snat_ports_in_use,
    }


def _ns_verdict(t: replay_ns.NsTrace, view: AgentView) -> Json:
    outcomes = [_ns_outcome(o, view) for o in t.outcomes]
    one = t.outcomes[0] if t.deterministic and t.outcomes else None
    results = {o.result for o in t.outcomes}
    return {
        "action": t.action,
        "decidedBy": t.decided_by,
        "deterministic": t.deterministic,
        **(_backend(view, one.backend) if one else {"backend": None, "pod": None}),
        "backendId": one.backend_id if one else None,
        "nat": _nat(one) if one else None,
        "hairpin": one.hairpin if one else None,
        "result": results.pop() if len(results) == 1 else None,
        "outcomes": outcomes,
    }


def north_south_json(t: replay_ns.NsTrace, view: AgentView) -> Json:
    """The ``northSouth`` object of a trace with --from-address (schema in the module docstring)."""
    client = t.client
    model = view.frontend(str(t.target)) or {}
    ranges = t.source_ranges
    return {
        "client": str(client.address) if client.port is None else _address(client.address, client.port),
        "clientAddress": str(client.address),
        "clientPort": client.port,
        "loaded": t.loaded,
        "served": t.served,
        "serviceId": t.svc_id,
        "flags": [name for bit, name in NS_FLAG_NAMES.items() if t.flags & bit],
        "reason": model.get("externalReason"),
        "maglevSize": t.maglev_size,
        "snatPorts": None if t.snat_ports is None else dict(zip(("min", "max"), t.snat_ports, strict=True)),
        "sourceRanges": None
        if ranges is None
        else {"ranges": list(ranges.ranges), "matched": ranges.matched, "allowed": ranges.allowed},
        "tableEntries": t.table_entries,
        "flowHash": t.flow_hash,
        "index": t.index,
        "conntrack": _ns_conntrack(t, view),
        "trackedFlows": t.tracked_flows,
        "devices": [
            {
                "ifindex": d.ifindex,
                "name": _device_name(d.ifindex),
                "snatAddress": None if d.snat is None else str(d.snat),
                "hairpin": d.hairpin,
            }
            for d in t.devices
        ],
        "routes": None
        if t.frontend_local is None
        else {
            "clientDevice": None
            if t.client_device is None
            else {"ifindex": t.client_device, "name": _device_name(t.client_device)},
            "frontendLocal": t.frontend_local,
        },
        "verdict": _ns_verdict(t, view),
        "notes": t.notes,
    }


class IpRoutes:
    """This network namespace's routing, as ``ip -j route get`` shows it (``replay_ns.Routes``)."""

    def __init__(self, ip: str) -> None:
        self.ip = ip  # the ip(8) program

    def _get(self, address: IPAddress) -> dict[str, Any]:
        try:
            argv = [self.ip, "-j", "route", "get", str(address)]
            res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=5)
            routes = json.loads(res.stdout) if res.returncode == 0 else []
        except (OSError, subprocess.SubprocessError, ValueError):
            return {}
        return routes[0] if isinstance(routes, list) and routes and isinstance(routes[0], dict) else {}

    def device_to(self, address: IPAddress) -> int | None:
        dev = self._get(address).get("dev")
        try:
            return socket.if_nametoindex(dev) if isinstance(dev, str) else None
        except OSError:
            return None

    def is_local(self, address: IPAddress) -> bool:
        return self._get(address).get("type") == "local"


def _trace_external(
    bpffs: Path,
    key: FrontendKey,
    client: replay_ns.Client,
    caller: replay.Caller,
    view: AgentView,
    cgroup: Path | None,
) -> Json:
    """Both replays (the socket hooks' for the document's other keys) from the pins there are."""
    pinned = [name for name in NORTH_SOUTH_MAPS if (bpffs / "maps" / name).exists()]
    ip = shutil.which("ip")
    routes = IpRoutes(ip) if ip else None  # without ip(8): the hairpin test is left out, and said so
    with open_maps(bpffs, (*READ_MAPS, *pinned)) as io:
        hooks = replay.replay(io, key, caller)
        external = replay_ns.replay(io, key, client, routes)
    doc = trace_json(hooks, view, cgroup)
    doc["northSouth"] = north_south_json(external, view)
    return doc


def _client(text: str, key: FrontendKey) -> replay_ns.Client:
    try:
        address, port = parse_client(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--from-address") from exc
    if address.version != key.ip.version:
        raise typer.BadParameter(
            f"{address} is IPv{address.version}, the frontend IPv{key.ip.version}: a packet has one family",
            param_hint="--from-address",
        )
    return replay_ns.Client(address, port)


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
    from_address: Annotated[
        str | None,
        typer.Option(
            "--from-address",
            metavar="IP[:PORT]",
            help="North-south: a packet from this client outside the cluster arriving on the node's devices "
            "(without PORT: each backend's share of the Maglev table).",
        ),
    ] = None,
) -> None:
    """Replay the datapath's decision for a connect to VIP:PORT/PROTO: frontend, candidates, rule, backend."""
    output = check_output(output, ("text", *cli_output.DOCUMENT_FORMATS))
    try:
        key, ipv4_socket = parse_target(target)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TARGET") from exc
    client = _client(from_address, key) if from_address is not None else None
    cgroup = from_cgroup or current_cgroup()
    try:
        cgroup_id = mounts.cgroup_id(cgroup) if cgroup else None
    except OSError as exc:
        raise typer.BadParameter(f"{cgroup}: {exc.strerror}", param_hint="--from-cgroup") from exc
    cookie = netns_cookie if netns_cookie is not None else current_netns_cookie()
    caller = replay.Caller(cgroup_id, cookie, socket_cookie, ipv4_socket)
    view = agentclient.fetch(agent)
    if client is not None:
        doc = _trace_external(bpffs, key, client, caller, view, cgroup)
    else:
        with open_maps(bpffs) as io:
            result = replay.replay(io, key, caller)
        doc = trace_json(result, view, cgroup)
    if output in cli_output.DOCUMENT_FORMATS:
        typer.echo(cli_output.dumps(doc, output))
        return
    if client is not None:
        inspect_trace.render_north_south(doc, view, Console())
        return
    inspect_trace.render(doc, view, Console())
