"""The frontends of one Service on this node: Kubernetes objects in, ``FrontendKey → Frontend`` out.

``service_frontends`` turns a Service, its EndpointSlices (or, for a selector Service with no slice at all,
the Pods of its namespace) and this node's context into candidates per service port and IP family, asks
``endpoints.select_endpoints`` which to use, and builds one ``desired.Frontend`` per address. Only ClusterIP
frontends exist for now; ``_frontend_addresses`` is the one place NodePort, LoadBalancer and externalIPs
frontends are to be added. ``store`` calls this for each service a change touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from balancing.model import desired, endpoints, objects

__all__ = [
    "NodeContext",
    "selector_matches",
    "service_frontends",
    "service_ignored",
    "slice_service_name",
    "uses_pods",
]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"

_FAMILIES = {4: "IPv4", 6: "IPv6"}
_NO_NAMES: frozenset[str] = frozenset()
_ServicePort = objects.ServicePort


@dataclass(frozen=True, slots=True)
class NodeContext:
    """The node this desired state is for."""

    name: str
    zone: str = ""  # its topology.kubernetes.io/zone label


def service_ignored(service: objects.Service) -> str | None:
    """Why the proxy leaves this Service alone, or ``None`` if it is ours to serve."""
    labels = service.metadata.labels
    if service.spec.type == "ExternalName":
        return "type ExternalName"
    if PROXY_NAME_LABEL in labels:
        return f"labelled {PROXY_NAME_LABEL}={labels[PROXY_NAME_LABEL]}"
    if HEADLESS_LABEL in labels:
        return f"labelled {HEADLESS_LABEL}"
    if not service.spec.service_ips():
        return "headless (no cluster IP)"
    return None


def slice_service_name(endpoint_slice: objects.EndpointSlice) -> str | None:
    """The Service an EndpointSlice belongs to (its ``kubernetes.io/service-name`` label)."""
    return endpoint_slice.metadata.labels.get(SERVICE_NAME_LABEL) or None


def uses_pods(service: objects.Service, has_slices: bool) -> bool:
    """Whether endpoints come from Pods: a non-empty selector and no EndpointSlice at all."""
    return bool(service.spec.selector) and not has_slices


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Equality-based label selection; an absent or empty selector selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def service_frontends(
    service: objects.Service,
    slices: Iterable[objects.EndpointSlice],
    pods: Iterable[objects.Pod],
    node: NodeContext,
) -> dict[desired.FrontendKey, desired.Frontend]:
    """Every frontend of ``service`` on ``node``; one with no usable endpoint has empty backends.

    When two ports of one Service give the same key (invalid, but manifests can say it) the first wins.
    """
    if service_ignored(service) is not None:
        return {}
    ordered = sorted(slices, key=lambda s: s.metadata.name)
    from_pods = uses_pods(service, bool(ordered))
    pod_list = sorted(pods, key=lambda p: p.metadata.name) if from_pods else []
    ctx = _context(service, node)
    cluster_ips = service.spec.service_ips()
    result: dict[desired.FrontendKey, desired.Frontend] = {}
    for port in service.spec.ports:
        owner = desired.Owner("Service", service.metadata.namespace, service.metadata.name, port.name)
        for version in sorted({ip.version for ip in cluster_ips}):
            if from_pods:
                found = _pod_candidates(service, port, pod_list, version)
            else:
                found = _slice_candidates(port, ordered, version)
            selection = endpoints.select_endpoints(found, ctx)
            for key, chosen in _frontend_addresses(cluster_ips, port, version, selection):
                reason = f"from pods (no EndpointSlice): {chosen.reason}" if from_pods else chosen.reason
                result.setdefault(key, desired.Frontend(owner, chosen.backends, reason))
    return result


def _frontend_addresses(
    cluster_ips: Sequence[desired.IPAddress],
    port: _ServicePort,
    version: int,
    selection: endpoints.Selection,
) -> Iterator[tuple[desired.FrontendKey, endpoints.EndpointSet]]:
    """Each address a client may use for this port and family, with the endpoint set it gets.

    The one place frontend kinds live. To come (pass the Service in): externalIPs and load-balancer IPs,
    whose in-cluster clients get ``selection.cluster`` (kube-proxy's short-circuit, even with eTP Local),
    and nodePorts on this node's addresses; add their families to the caller's ``version`` loop.
    """
    for ip in cluster_ips:
        if ip.version == version:
            yield desired.FrontendKey(ip, port.port, port.protocol), selection.internal


def _context(service: objects.Service, node: NodeContext) -> endpoints.SelectionContext:
    spec = service.spec
    lb_vips = spec.type == "LoadBalancer" and any(
        i.ip and i.ip_mode != "Proxy" for i in service.status.load_balancer.ingress
    )
    external = any(p.node_port for p in spec.ports) or bool(spec.external_ips) or lb_vips
    return endpoints.SelectionContext(
        node_name=node.name,
        zone=node.zone,
        internal_local=spec.internal_traffic_policy == "Local",
        external_local=spec.external_traffic_policy == "Local",
        externally_accessible=external,
        topology=endpoints.topology_mode(service.metadata.annotations, spec.traffic_distribution),
    )


# --- candidates from EndpointSlices ----------------------------------------------------------------------


def _slice_candidates(
    port: _ServicePort, slices: Sequence[objects.EndpointSlice], version: int
) -> list[endpoints.Candidate]:
    """Endpoints of every usable slice of this family, merged; a duplicate keeps its best conditions."""
    merged: dict[tuple[desired.IPAddress, int], endpoints.Candidate] = {}
    for endpoint_slice in slices:
        if endpoint_slice.address_type != _FAMILIES[version]:
            continue  # also skips FQDN slices
        if HEADLESS_LABEL in endpoint_slice.metadata.labels:
            continue
        number = _slice_port(port, endpoint_slice)
        if number is None:
            continue
        for endpoint in endpoint_slice.endpoints:
            candidate = _slice_candidate(endpoint, number, version)
            if candidate is None:
                continue
            key = (candidate.ip, candidate.port)
            if key not in merged or _rank(candidate) > _rank(merged[key]):
                merged[key] = candidate
    return list(merged.values())


def _slice_port(port: _ServicePort, endpoint_slice: objects.EndpointSlice) -> int | None:
    """The endpoint port for ``port`` in this slice, or ``None`` if the slice does not serve it.

    The slice's ``ports[]`` entry with the Service port's name and protocol gives the number (as kube-proxy);
    a slice that declares no ports at all (hand-written) serves a numeric (or absent) targetPort directly.
    """
    declared = endpoint_slice.ports or []
    for entry in declared:
        if (entry.name or "") == port.name and entry.protocol == port.protocol and entry.port is not None:
            return entry.port
    if not declared and not isinstance(port.target_port, str):
        return port.target_port or port.port
    return None


def _slice_candidate(endpoint: objects.Endpoint, port: int, version: int) -> endpoints.Candidate | None:
    """The endpoint's first address (as kube-proxy: addresses are fungible), if it parses in this family."""
    try:
        ip = desired.parse_ip(endpoint.addresses[0])
    except ValueError:
        return None  # not an address
    if ip.version != version:
        return None  # not an address of this family
    cond = endpoint.conditions
    hints = endpoint.hints
    return endpoints.Candidate(
        ip,
        port,
        endpoint.node_name or "",
        endpoint.zone or "",
        cond.ready is not False,
        cond.serving is not False,
        cond.terminating is True,
        frozenset(z.name for z in hints.for_zones) if hints and hints.for_zones else _NO_NAMES,
        frozenset(n.name for n in hints.for_nodes) if hints and hints.for_nodes else _NO_NAMES,
    )


def _rank(candidate: endpoints.Candidate) -> tuple[bool, bool, bool]:
    return (candidate.ready, candidate.serving, not candidate.terminating)


# --- candidates from Pods (selector Services without any EndpointSlice) ----------------------------------


def _pod_candidates(
    service: objects.Service, port: _ServicePort, pods: Sequence[objects.Pod], version: int
) -> list[endpoints.Candidate]:
    """Running pods of the namespace matching the selector; readiness from the Ready condition."""
    found: dict[tuple[desired.IPAddress, int], endpoints.Candidate] = {}
    for pod in pods:
        if not _selected(service, pod):
            continue
        number = _pod_port(port, pod)
        if number is None:
            continue
        ready = service.spec.publish_not_ready_addresses or pod.status.condition("Ready")
        for ip in pod.status.ips():
            if ip.version == version:
                found.setdefault(
                    (ip, number),
                    endpoints.Candidate(ip, number, node_name=pod.spec.node_name, ready=ready, serving=ready),
                )
    return list(found.values())


def _selected(service: objects.Service, pod: objects.Pod) -> bool:
    return (
        pod.metadata.namespace == service.metadata.namespace
        and pod.status.phase not in ("Succeeded", "Failed")
        and selector_matches(service.spec.selector, pod.metadata.labels)
    )


def _pod_port(port: _ServicePort, pod: objects.Pod) -> int | None:
    """A numeric (or absent) targetPort as is; a named one from the pod's container port of that name."""
    if not isinstance(port.target_port, str):
        return port.target_port or port.port
    for container in pod.spec.containers:
        for cport in container.ports:
            if cport.name == port.target_port and cport.protocol == port.protocol:
                return cport.container_port
    return None
