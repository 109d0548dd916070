"""The documents ``balancing inspect`` prints: map contents joined with the agent's names, as plain data.

Every function takes a ``MapIO`` (the kernel's pinned maps, or ``FakeMaps`` in tests) and the agent's
``/state`` (``AgentView``; without it the names are ``null``) and returns the JSON document of one
subcommand; the schemas are documented in ``balancing.cli.inspect``. Nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from balancing.cli import inspect_common as common
from balancing.cli.agentclient import POLICY_KINDS, AgentView, Json
from balancing.datapath import abi, programmed
from balancing.datapath.maps import MapIO
from balancing.datapath.replay import NS_PER_S
from balancing.model.desired import IPAddress


def _refs(tier: programmed.Tier | None) -> list[str | None] | None:
    if tier is None:
        return None
    return [str(programmed.backend_of(r)) if r else None for r in tier.slots]


def _names(view: AgentView, key: str) -> Json:
    model = view.frontend(key) or {}
    return {
        "owner": model.get("owner"),
        "kind": model.get("kind"),
        "reason": model.get("reason"),
        "fallbackOwner": model.get("fallbackOwner"),
    }


def usage(io: MapIO) -> Json:
    capacity: dict[str, int] = getattr(io, "capacity", {})
    return {
        name: {"entries": len(io.items(name)), "capacity": capacity.get(name)}
        for name in (abi.MAP_SERVICES, abi.MAP_BACKENDS, abi.MAP_AFFINITY)
    }


def services_doc(io: MapIO, view: AgentView) -> Json:
    """``{"services": [...], "unprogrammed": [...], "usage": {...}}``."""
    state = programmed.read_state(io)
    rows = []
    for key in sorted(state.frontends):
        f = state.frontends[key]
        rows.append(
            {
                "frontend": str(key),
                "address": str(key.ip),
                "port": key.port,
                "protocol": key.protocol.name,
                "serviceId": f.svc_id,
                "affinityTimeoutSeconds": f.affinity_timeout,
                "backends": _refs(f.primary),
                "fallback": _refs(f.fallback),
                "flags": common.flag_names(f.master.flags),
                **_names(view, str(key)),
            }
        )
    programmed_keys = {str(k) for k in state.frontends}
    missing = [
        str(f.get("frontend")) for f in view.frontends if str(f.get("frontend")) not in programmed_keys
    ]
    return {"services": rows, "unprogrammed": missing, "usage": usage(io)}


def backends_doc(io: MapIO, view: AgentView) -> Json:
    """``{"backends": [{"backendId", "backend", "protocol", "pod", "usedBy": [...]}]}``."""
    state = programmed.read_state(io)
    used: dict[bytes, list[Json]] = {}
    for key in sorted(state.frontends):
        f = state.frontends[key]
        for name, tier in (("primary", f.primary), ("fallback", f.fallback)):
            for slot, ref in enumerate(tier.slots if tier else [], start=1):
                if ref is not None:
                    use = {"frontend": str(key), "serviceId": f.svc_id, "tier": name, "slot": slot}
                    used.setdefault(ref, []).append(use)
    rows = []
    for raw_id, raw in sorted(io.items(abi.MAP_BACKENDS), key=lambda kv: abi.unpack_backend_id(kv[0])):
        be = abi.BackendVal.unpack(raw)
        address = str(programmed.backend_of(raw))
        rows.append(
            {
                "backendId": abi.unpack_backend_id(raw_id),
                "backend": address,
                "protocol": _proto_name(be.proto),
                "pod": view.pod(address),
                "usedBy": used.get(raw, []),
            }
        )
    return {"backends": rows}


def _proto_name(proto: int) -> str:
    return {6: "TCP", 17: "UDP", 132: "SCTP"}.get(proto, str(proto))


def _qos(io: MapIO) -> dict[int, Json]:
    now = time.monotonic_ns()
    out = {}
    for raw_key, raw_val in io.items(abi.MAP_QOS):
        limit, count, window_ns = abi.QOS_VAL.packer.unpack(raw_val)
        age = (now - window_ns) & ((1 << 64) - 1)
        current = age < NS_PER_S
        out[int(abi.unpack_qos(raw_key, raw_val)[0])] = {
            "limit": limit,
            "count": count if current else 0,
            "windowAgeSeconds": common.seconds(age) if window_ns else None,
            "exceeded": current and count >= limit,
        }
    return out


def policies_doc(io: MapIO, view: AgentView) -> Json:
    """``{"policies": [...], "status": [...] | null}``: frontends owned by a policy (or with policy tiers)."""
    state = programmed.read_state(io)
    qos = _qos(io)
    rows = []
    for key in sorted(state.frontends):
        f = state.frontends[key]
        names = _names(view, str(key))
        owner = names["owner"] or {}
        flags = f.master.flags & (abi.SVC_F_FALLBACK | abi.SVC_F_CLIENTS | abi.SVC_F_QOS)
        if owner.get("kind") not in POLICY_KINDS and not flags and f.fallback is None:
            continue
        skip = sum(1 for v in f.clients.values() if abi.CLIENT_VAL.packer.unpack(v)[1] & abi.CLIENT_F_SKIP)
        model = view.frontend(str(key)) or {}
        rows.append(
            {
                "frontend": str(key),
                "serviceId": f.svc_id,
                **names,
                "primary": _refs(f.primary),
                "fallback": _refs(f.fallback),
                "qos": qos.get(f.svc_id),
                "clientRules": {"total": len(f.clients), "skip": skip, "loopGuard": len(f.clients) - skip},
                "skipRedirectFromBackend": model.get(
                    "skipRedirectFromBackends", bool(skip) if f.clients else None
                ),
                "backendPods": model.get("backendPods"),
            }
        )
    return {"policies": rows, "status": view.policies}


def affinity_doc(io: MapIO, view: AgentView, now_ns: int | None = None) -> Json:
    """``{"affinity": [...]}``: the records of the affinity LRU, each checked as the datapath would."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    state = programmed.read_state(io)
    by_id = {f.svc_id: (k, f) for k, f in state.frontends.items()}
    backends = {
        abi.unpack_backend_id(k): str(programmed.backend_of(v)) for k, v in io.items(abi.MAP_BACKENDS)
    }
    rows = []
    for raw_key, raw_val in io.items(abi.MAP_AFFINITY):
        cookie, svc_id, _ = abi.AFF_KEY.packer.unpack(raw_key)
        last_used, backend_id, _ = abi.AFF_VAL.packer.unpack(raw_val)
        key, f = by_id.get(svc_id, (None, None))
        timeout = f.affinity_timeout if f is not None else 0
        age = (now - last_used) & ((1 << 64) - 1)
        expired = f is None or age > timeout * NS_PER_S
        matched = f is not None and backend_id in f.affinity_matches
        backend = backends.get(backend_id)
        rows.append(
            {
                "netnsCookie": cookie,
                "serviceId": svc_id,
                "frontend": str(key) if key is not None else None,
                "owner": _names(view, str(key))["owner"] if key is not None else None,
                "backendId": backend_id,
                "backend": backend,
                "pod": view.pod(backend) if backend else None,
                "idleSeconds": common.seconds(age),
                "timeoutSeconds": timeout,
                "expired": expired,
                "matched": matched,
                "valid": not expired and matched,
            }
        )
    rows.sort(key=lambda r: (r["serviceId"], r["netnsCookie"]))
    return {"affinity": rows}


def _node_names(state: Json | None) -> dict[str, str]:
    """Address → Node name, if the agent serves ``nodes`` (a dict by name, or a list of objects)."""
    found = (state or {}).get("nodes")
    items: list[tuple[Any, Any]] = []
    if isinstance(found, dict):
        items = [(name, v.get("addresses") if isinstance(v, dict) else v) for name, v in found.items()]
    elif isinstance(found, list):
        items = [(n.get("name"), n.get("addresses")) for n in found if isinstance(n, dict)]
    return {str(a): str(name) for name, addrs in items if isinstance(addrs, list) for a in addrs}


def nodes_doc(io: MapIO, view: AgentView, is_local: Callable[[str], bool] | None = None) -> Json:
    """``{"nodes": [...]}``: NodePort frontends (the agent's kind NodePort) grouped by node address."""
    state = programmed.read_state(io)
    names = _node_names(view.state)
    groups: dict[IPAddress, list[Json]] = {}
    for model in view.frontends:
        if model.get("kind") != "NodePort":
            continue
        key = common.parse_frontend(str(model.get("frontend")))
        f = state.frontends.get(key)
        row = {
            "frontend": str(key),
            "port": key.port,
            "protocol": key.protocol.name,
            "serviceId": f.svc_id if f is not None else None,
            "owner": model.get("owner"),
            "reason": model.get("reason"),
            "backends": _refs(f.primary) if f is not None else model.get("backends"),
            "programmed": f is not None,
        }
        groups.setdefault(key.ip, []).append(row)
    rows = []
    for ip in sorted(groups, key=lambda ip: (ip.version, int(ip))):
        address = str(ip)
        rows.append(
            {
                "address": address,
                "node": names.get(address),
                "local": is_local(address) if is_local else None,
                "frontends": groups[ip],
            }
        )
    return {"nodes": rows}


# --- north-south connection tracking ---------------------------------------------------------------------

_CT_KEY = abi.CT_KEY.packer
_CT_VAL = abi.CT_VAL.packer
CT_FLAG_NAMES = {abi.CT_F_REPLY: "reply", abi.CT_F_SNAT: "snat", abi.CT_F_LOCAL: "local"}
NO_REPLY_ENTRY = "no reply entry (evicted?)"
NO_CLIENT_ENTRY = "no client entry (evicted?): read from the reply entry"
Flow = tuple[abi.ConntrackEntry | None, abi.ConntrackEntry | None]  # (client direction, reply); one is set
Endpoint = tuple[IPAddress, int]


def ct_reply_key(raw_key: bytes, raw_val: bytes) -> bytes:
    """The key of the reply entry a client-direction entry implies: the packet it is rewritten to, reversed
    (from the backend's address and port to the rewritten source: the node's SNAT address or the client)."""
    proto = _CT_KEY.unpack(raw_key)[4]
    new_src, new_dst, new_sport, new_dport = _CT_VAL.unpack(raw_val)[:4]
    return _CT_KEY.pack(new_dst, new_src, new_dport, new_sport, proto, 0, 0)


def pair_flows(items: list[tuple[bytes, bytes]]) -> list[Flow]:
    """The conntrack map's entries as flows: each client-direction entry with the reply entry its value
    implies, then every reply entry no client entry claimed (the LRU evicts the two independently)."""
    entries = {raw_key: abi.ConntrackEntry.unpack(raw_key, raw_val) for raw_key, raw_val in items}
    flows: list[Flow] = []
    claimed: set[bytes] = set()
    for raw_key, raw_val in items:
        entry = entries[raw_key]
        if entry.reply:
            continue
        reply_key = ct_reply_key(raw_key, raw_val)
        reply = entries.get(reply_key)
        if reply is not None and reply.reply:
            claimed.add(reply_key)
            flows.append((entry, reply))
        else:
            flows.append((entry, None))
    flows += [(None, e) for k, e in entries.items() if e.reply and k not in claimed]
    return flows


def _endpoint(addr_port: Endpoint) -> str:
    ip, port = addr_port
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _ct_entry_json(e: abi.ConntrackEntry) -> Json:
    return {
        "direction": "reply" if e.reply else "client",
        "src": _endpoint(e.src),
        "dst": _endpoint(e.dst),
        "protocol": _proto_name(e.proto),
        "newSrc": _endpoint(e.new_src),
        "newDst": _endpoint(e.new_dst),
        "serviceId": e.svc_id,
        "backendId": e.backend_id,
        "flags": [name for bit, name in CT_FLAG_NAMES.items() if e.flags & bit],
        "state": e.state,
        "createdNs": e.created_ns,
        "seenNs": e.seen_ns,
    }


class FlowEnds(NamedTuple):
    """Who a flow connects, whichever of its entries it is read from."""

    main: abi.ConntrackEntry  # the client direction's entry, else the reply's
    client: Endpoint
    frontend: Endpoint
    backend: Endpoint
    snat: Endpoint | None  # the node's address and port the backend sees, for a source-NATed flow


def flow_ends(flow: Flow) -> FlowEnds:
    client, reply = flow
    if client is not None:
        snat = client.new_src if client.flags & abi.CT_F_SNAT else None
        return FlowEnds(client, client.src, client.dst, client.new_dst, snat)
    assert reply is not None
    snat = reply.dst if reply.flags & abi.CT_F_SNAT else None
    return FlowEnds(reply, reply.new_dst, reply.new_src, reply.src, snat)


def _flow_order(ends: FlowEnds) -> tuple[int, ...]:
    """By frontend (address, port, protocol), then client (address, port)."""
    (f_ip, f_port), (c_ip, c_port) = ends.frontend, ends.client
    return (f_ip.version, int(f_ip), f_port, ends.main.proto, c_ip.version, int(c_ip), c_port)


def flow_json(flow: Flow, now_ns: int) -> Json:
    """One row of ``inspect conntrack`` (the schema is in ``balancing.cli.inspect``) but its owner."""
    ends = flow_ends(flow)
    main = ends.main
    present = [e for e in flow if e is not None]
    protocol = _proto_name(main.proto)
    return {
        "client": _endpoint(ends.client),
        "frontend": f"{_endpoint(ends.frontend)}/{protocol}",
        "protocol": protocol,
        "backend": _endpoint(ends.backend),
        "snat": _endpoint(ends.snat) if ends.snat else None,
        "local": bool(main.flags & abi.CT_F_LOCAL),
        "serviceId": main.svc_id,
        "backendId": main.backend_id,
        "owner": None,  # the agent's name for serviceId (conntrack_doc)
        "state": main.state,
        "ageSeconds": common.seconds(max(0, now_ns - main.created_ns)),
        "idleSeconds": common.seconds(max(0, now_ns - max(e.seen_ns for e in present))),
        "note": NO_REPLY_ENTRY if flow[1] is None else NO_CLIENT_ENTRY if flow[0] is None else None,
        "entries": [_ct_entry_json(e) for e in present],
    }


def _owners_by_id(io: MapIO, view: AgentView) -> dict[int, Json]:
    """Frontend id → the agent's owner object, through the service map's ids (empty without the agent)."""
    if not view.available:
        return {}
    out: dict[int, Json] = {}
    for key, f in programmed.read_state(io).frontends.items():
        owner = _names(view, str(key))["owner"]
        if owner is not None:
            out[f.svc_id] = owner
    return out


def conntrack_doc(io: MapIO, view: AgentView, now_ns: int | None = None) -> Json:
    """``{"conntrack": [...], "usage": {...}}``: the north-south flows, one row per flow."""
    now = time.monotonic_ns() if now_ns is None else now_ns  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
    items = io.items(abi.MAP_CONNTRACK)
    owners = _owners_by_id(io, view)
    flows = sorted(pair_flows(items), key=lambda flow: _flow_order(flow_ends(flow)))
    rows = []
    for flow in flows:
        row = flow_json(flow, now)
        row["owner"] = owners.get(row["serviceId"]) or _names(view, row["frontend"])["owner"]
        rows.append(row)
    capacity: dict[str, int] = getattr(io, "capacity", {})
    usage = {"entries": len(items), "capacity": capacity.get(abi.MAP_CONNTRACK), "flows": len(rows)}
    return {"conntrack": rows, "usage": usage}
