"""Health check node ports: which Services want one, and how many ready endpoints this node has for them.

A Service of type LoadBalancer (or NodePort) with ``externalTrafficPolicy: Local`` and a
``healthCheckNodePort`` asks every node to answer HTTP on that port: 200 with the number of *ready* local
endpoints when it is at least one, else 503, so the load balancer only sends traffic to nodes with local
endpoints. This module holds the data the agent's HTTP server needs (``HealthCheck``) and the two pure rules;
``frontends.compute_service`` applies them to the endpoint candidates it already built, and
``store.ClusterStore.health_checks`` collects the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from balancing.model import endpoints, objects

__all__ = ["HealthCheck", "count_local_ready", "health_check_port"]


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What the health check node port answers for one Service."""

    namespace: str
    name: str
    local_endpoints: int  # ready endpoints on this node; the server answers 503 when 0

    @property
    def healthy(self) -> bool:
        return self.local_endpoints > 0


def health_check_port(service: objects.Service) -> int | None:
    """The Service's health check node port, or ``None`` if it does not want one served."""
    spec = service.spec
    if spec.type not in ("LoadBalancer", "NodePort") or spec.external_traffic_policy != "Local":
        return None
    return spec.health_check_node_port or None


def count_local_ready(candidates: Iterable[endpoints.Candidate], node_name: str) -> int:
    """Ready endpoints of one Service on ``node_name``, counted like kube-proxy's ``LocalReadyEndpoints``.

    kube-proxy counts distinct endpoint *addresses* over all ports of the Service (a pod serving three ports
    counts once; an endpoint listed in two slices counts once, ready if any copy is). It does so per IP
    family, one proxier per family; here the answer is the larger of the two family counts, so a dual-stack
    pod counts once (not twice) and a single-stack service gets exactly kube-proxy's number.
    """
    if not node_name:
        return 0
    per_family: dict[int, set[int]] = {4: set(), 6: set()}
    for c in candidates:
        if c.ready and c.node_name == node_name:
            per_family[c.ip.version].add(int(c.ip))
    return max(len(ips) for ips in per_family.values())
