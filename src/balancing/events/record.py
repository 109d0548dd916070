"""One resolution event as a stable JSON object: the decoded ring-buffer record, its client's pod and the
frontend's owner.

Schema (keys always present, in this order; ``null`` where noted)::

    {
      "time":     "2026-01-02T03:04:05.123456789Z",  RFC 3339, UTC, nanoseconds (kernel monotonic clock
                                                     moved to wall-clock time by the reader)
      "hook":     "connect4",          connect4|connect6|sendmsg4|sendmsg6|recvmsg4|recvmsg6|
                                       getpeername4|getpeername6; north-south: tc_ingress|tc_egress
      "protocol": "TCP",               TCP|UDP|SCTP (else the IP protocol number as text)
      "result":   "translated",        translated|affinity|loop_guard_next|
                                       fallback_skip_redirect_from_backend|fallback_loop_guard|
                                       fallback_qos|fallback_no_primary_backend|refused|reversed;
                                       north-south: translated_local|translated_snat|
                                       dropped_no_local_endpoint|dropped_source_range|dropped_no_backend|
                                       dropped_snat_ports|dropped_conntrack_full
      "reason":   "a backend slot of the primary tier",  human-readable text for the result
      "client": {
        "pid": 1234, "command": "curl",                  the process (tgid) and its comm
        "cgroupId": 5678, "netnsCookie": 4097, "socketCookie": 8193,
        "pod": {"namespace": "default", "name": "web-1", "container": "main", "uid": "…"}
            or "host": true                              exactly one of the two keys
      },                                                 pod namespace/name null: no Pod object has the
                                                         UID; container null: the pod's own cgroup
        or, for north-south events (no process, no pod: a packet from outside the node):
      "client": {"address": "203.0.113.7:40000",         the external client (null if the datapath sent none)
                 "deviceIfindex": 3},                    the node device the packet arrived on
      "frontend": "10.96.0.10:80",     what the application asked for ("[v6]:port" for IPv6)
      "backend":  "10.244.1.5:8080",   where it goes; null when refused
      "owner": {"kind": "Service", "namespace": "default", "name": "web", "portName": "http"}
            or null,                   the frontend's Service or policy (namespace "" when cluster-scoped)
      "serviceId": 17                  the frontend identity in the maps (stable across restarts)
    }

For ``reversed`` events (recvmsg/getpeername showed the frontend), ``frontend`` is the address shown to
the application and ``backend`` the real peer. Neighbours: ``abi.Event`` (decoding), ``attribution``
(the client), ``sinks`` and ``stream`` (the encoded line).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from balancing.datapath import abi
from balancing.events.attribution import ClientPod
from balancing.model.desired import IPAddress, Owner, Protocol

REASONS = {
    "translated": "a backend slot of the primary tier",
    "affinity": "session affinity: the client's previous backend",
    "loop_guard_next": "loop guard: the slot after the client's own backend",
    "fallback_skip_redirect_from_backend": "fallback tier: the client is a backend (skipRedirectFromBackend)",
    "fallback_loop_guard": "fallback tier: the client's own backend is the only one (loop guard)",
    "fallback_qos": "fallback tier: the frontend's QoS limit was reached",
    "fallback_no_primary_backend": "fallback tier: the primary tier has no backend",
    "refused": "no usable backend: connection refused",
    "reversed": "reverse translation: the backend shown as the frontend",
    "translated_local": "north-south: a pod on this node, the client's address kept",
    "translated_snat": "north-south: a backend elsewhere, the source translated to this node",
    "dropped_no_local_endpoint": "north-south: externalTrafficPolicy Local and no endpoint on this node",
    "dropped_source_range": "north-south: the client is outside loadBalancerSourceRanges",
    "dropped_no_backend": "north-south: no usable backend",
    "dropped_snat_ports": "north-south: no free SNAT port towards the backend",
    "dropped_conntrack_full": "north-south: the connection-tracking map refused the flow",
}
NORTH_SOUTH_HOOKS = frozenset({abi.HOOKS[abi.HOOK_TC_INGRESS], abi.HOOKS[abi.HOOK_TC_EGRESS]})


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A built record and its JSON line (encoded once, shared by every sink and subscriber)."""

    data: dict[str, Any]
    line: bytes  # compact JSON plus "\n"


def wall_clock_offset_ns() -> int:
    """Add to a ``bpf_ktime_get_ns()`` value (CLOCK_MONOTONIC) to get Unix-epoch nanoseconds."""
    return time.time_ns() - time.monotonic_ns()


@functools.lru_cache(maxsize=4)
def _rfc3339_seconds(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339_ns(epoch_ns: int) -> str:
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    return f"{_rfc3339_seconds(seconds)}.{nanos:09d}Z"


def endpoint(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


_PROTOCOLS = {int(p): p.name for p in Protocol}


def protocol_name(number: int) -> str:
    return _PROTOCOLS.get(number) or str(number)


def is_north_south(event: abi.Event) -> bool:
    """Whether the event is a packet from outside the node (TC hooks): no process, no pod to attribute."""
    return event.hook in NORTH_SOUTH_HOOKS


def client_json(event: abi.Event, pod: ClientPod | None) -> dict[str, Any]:
    if is_north_south(event):
        return {
            "address": endpoint(*event.client) if event.client else None,
            "deviceIfindex": event.ifindex,
        }
    out: dict[str, Any] = {
        "pid": event.pid,
        "command": event.comm,
        "cgroupId": event.cgroup_id,
        "netnsCookie": event.netns_cookie,
        "socketCookie": event.sock_cookie,
    }
    if pod is None:
        out["host"] = True
    else:
        out["pod"] = {
            "namespace": pod.namespace,
            "name": pod.name,
            "container": pod.container,
            "uid": pod.uid,
        }
    return out


def owner_json(owner: Owner | None) -> dict[str, str] | None:
    if owner is None:
        return None
    return {"kind": owner.kind, "namespace": owner.namespace, "name": owner.name, "portName": owner.port_name}


def build(
    event: abi.Event, pod: ClientPod | None, owner: Owner | None, wall_offset_ns: int
) -> dict[str, Any]:
    """The JSON object of one event (see the module docstring for the schema)."""
    return {
        "time": rfc3339_ns(event.ts_ns + wall_offset_ns),
        "hook": event.hook,
        "protocol": protocol_name(event.proto),
        "result": event.result,
        "reason": REASONS.get(event.result, f"result {event.result}"),
        "client": client_json(event, pod),
        "frontend": endpoint(*event.orig),
        "backend": endpoint(*event.backend) if event.backend else None,
        "owner": owner_json(owner),
        "serviceId": event.svc_id,
    }


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(data: dict[str, Any]) -> EventRecord:
    return EventRecord(data, (_ENCODER.encode(data) + "\n").encode())
