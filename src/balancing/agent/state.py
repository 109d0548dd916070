"""The agent's view as JSON, served at ``GET /state`` on its state address for the operator tools.

``balancing inspect`` and ``balancing trace`` read the maps themselves (what connects see) and join this view
for names: which Service or policy owns a frontend id, why its backend set is what it is (endpoint selection,
traffic policy, topology, fallback), and which pod sits behind a backend address. Built on request from the
model's store and the writer's ids (``agent.lifecycle`` caches the encoded answer per change).

Schema (stable; new keys may be added)::

    {"node": str, "frontends": [{"frontend": "ip:port/PROTO", "serviceId": int | null, "kind": str,
      "owner": {"kind", "namespace", "name", "portName"}, "reason": str, "backends": ["ip:port"],
      "fallback": ["ip:port"] | null, "fallbackOwner": {...} | null, "affinityTimeoutSeconds": int,
      "qosLimit": int, "skipRedirectFromBackends": bool, "external": bool (served north-south here),
      "externalReason": str | null (why outside clients get the backends they get),
      "backendPods": [{"namespace", "name", "uid", "backend"}]}],
     "pods": {"ip": {"namespace", "name", "node"}}, "conflicts": [str]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from balancing.model import desired, objects, store


def owner_json(owner: desired.Owner | None) -> dict[str, str] | None:
    if owner is None:
        return None
    return {"kind": owner.kind, "namespace": owner.namespace, "name": owner.name, "portName": owner.port_name}


def frontend_json(key: desired.FrontendKey, f: desired.Frontend, svc_id: int | None) -> dict[str, Any]:
    return {
        "frontend": str(key),
        "serviceId": svc_id,
        "kind": f.kind.value,
        "owner": owner_json(f.owner),
        "reason": f.reason,
        "backends": [str(b) for b in f.backends],
        "fallback": None if f.fallback is None else [str(b) for b in f.fallback],
        "fallbackOwner": owner_json(f.fallback_owner),
        "affinityTimeoutSeconds": f.affinity_timeout,
        "qosLimit": f.qos_limit,
        "skipRedirectFromBackends": f.skip_redirect_from_backends,
        "external": f.external,
        "externalReason": f.external_reason or None,
        "backendPods": [
            {
                "namespace": bp.pod.namespace,
                "name": bp.pod.name,
                "uid": bp.pod.uid,
                "backend": str(bp.backend),
            }
            for bp in f.backend_pods
        ],
    }


def pods_json(pods: Iterable[objects.Pod]) -> dict[str, dict[str, str]]:
    out = {}
    for pod in pods:
        for ip in pod.status.ips():
            out[str(ip)] = {
                "namespace": pod.metadata.namespace,
                "name": pod.metadata.name,
                "node": pod.spec.node_name,
            }
    return out


def policy_json(status: store.PolicyStatus) -> dict[str, Any]:
    """One policy's readiness on this node, as the model reports it."""
    return dataclasses.asdict(status)


def build(
    node: str,
    frontends: desired.DesiredState,
    svc_id: Callable[[desired.FrontendKey], int | None],
    pods: Iterable[objects.Pod],
    conflicts: list[str],
) -> dict[str, Any]:
    return {
        "node": node,
        "frontends": [
            frontend_json(k, frontends.frontends[k], svc_id(k)) for k in sorted(frontends.frontends)
        ],
        "pods": pods_json(pods),
        "conflicts": conflicts,
    }
