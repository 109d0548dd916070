"""The frontends of one Service on this node: Kubernetes objects in, ``FrontendKey → Frontend`` out.

``compute_service`` turns a Service, its EndpointSlices (or, for a selector Service with no slice at all,
the Pods of its namespace) and this node's context into candidates per service port and IP family, asks
``endpoints.select_endpoints`` which to use, and builds one ``desired.Frontend`` per address;
``_frontend_addresses`` is the one place the addresses of each ``FrontendKind`` are decided, and which of
them are external. It also counts the Service's ready local endpoints when it wants a health check node
port. ``store`` calls it for each service a change touches, with a ``NodeContext`` it keeps up to date from
Node objects and ``ModelConfig``.

Slices are read through ``slice_view`` (``SliceView``: parsed once, deduplicated and sorted, kept by the
store instead of the slice), so the candidates of a single slice reach ``select_endpoints`` in its order.
The common Service (endpoints from one slice, every one ready, no hints, no traffic policy Local, no health
check, nothing north-south) skips the selection: ``_ready_backends`` gives every frontend the slice's own
backends, which is what the selection would choose (tests/unit/test_store_fastpath.py holds the two equal).

North-south (``ModelConfig.north_south``, never with ``external_client``): a frontend that clients outside
the cluster reach through this node is marked ``external``: every load-balancer IP (not ``ipMode: Proxy``)
and programmed externalIP, and the NodePorts on this node's own addresses (not loopback, not other nodes').
Its ``external_backends`` are what such packets get: ``None`` (the same as ``backends``) with
externalTrafficPolicy Cluster; with Local, this node's endpoints only (ready, else serving-terminating;
possibly none: dropped, as kube-proxy), ``external_local`` set and ``external_reason`` saying why.
``local_backends`` are the backends of either set on this node; ``source_ranges`` (a load-balancer IP only)
are ``spec.loadBalancerSourceRanges`` of its family, as kube-proxy reads them: the field only (not the cloud
providers' annotation), none when one is a /0. With north-south off every frontend is as before.

One module on purpose (over 400 lines): every kind of frontend address and the endpoint candidates of one
Service are decided here together, so a new frontend kind is added in one place.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from balancing.model import desired, endpoints, healthcheck, objects
from balancing.model.config import IPNetwork, ModelConfig

__all__ = [
    "NodeContext",
    "NodeIP",
    "ServiceResult",
    "SliceView",
    "affinity_timeout",
    "compute_service",
    "node_addresses",
    "node_context",
    "node_port_addresses",
    "selector_matches",
    "service_families",
    "service_frontends",
    "service_ignored",
    "slice_service_name",
    "slice_view",
    "uses_node_ports",
    "uses_pods",
]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = endpoints.ZONE_LABEL  # topology.kubernetes.io/zone
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")  # the Node addresses that get NodePort frontends
LOOPBACKS = (desired.parse_ip("127.0.0.1"), desired.parse_ip("::1"))
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the API default of sessionAffinityConfig.clientIP

# A slice's addressType: its IP version, the socket family its addresses parse in, and the address type.
_FAMILY_OF: dict[str, tuple[int, int, Callable[[int], desired.IPAddress]]] = {
    "IPv4": (4, socket.AF_INET, ipaddress.IPv4Address),
    "IPv6": (6, socket.AF_INET6, ipaddress.IPv6Address),
}
_FAMILY_VERSIONS = {"IPv4": 4, "IPv6": 6}
_FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
_NO_NAMES: frozenset[str] = frozenset()
_ServicePort = objects.ServicePort
_Kind = desired.FrontendKind
# One address of a service port (a plain tuple: made for every address of every recomputed Service): what a
# client connects to, its kind, the Node a NodePort address belongs to ("" for loopback and the other kinds),
# and whether it is external (north-south: clients outside the cluster reach it through this node).
_Address = tuple[desired.FrontendKey, _Kind, str, bool]


@dataclass(frozen=True, slots=True)
class NodeIP:
    """An address NodePort frontends listen on, and the Node it belongs to ("" for loopback)."""

    ip: desired.IPAddress
    node: str


@dataclass(frozen=True, slots=True)
class NodeContext:
    """The node this desired state is for: what frontend addresses and endpoint selection need of it.

    Build it with ``node_context`` (from ``ModelConfig`` and Node objects); the store keeps one up to date.
    """

    name: str
    zone: str = ""  # its topology.kubernetes.io/zone label
    node_ports: tuple[NodeIP, ...] = ()  # NodePort addresses (every Node's, filtered, plus loopback)
    own_addresses: frozenset[desired.IPAddress] = frozenset()  # this node's InternalIP/ExternalIP
    external_ips_local_only: bool = False
    external_client: bool = False
    north_south: bool = (
        False  # mark the frontends external clients reach through this node (never external_client)
    )


def node_addresses(node: objects.Node) -> tuple[desired.IPAddress, ...]:
    """A Node's InternalIP and ExternalIP addresses, parsed, in order, without duplicates or bad text."""
    found: dict[desired.IPAddress, None] = {}
    for address in node.status.addresses:
        if address.type in NODE_ADDRESS_TYPES:
            try:
                found.setdefault(desired.parse_ip(address.address))
            except ValueError:
                continue
    return tuple(found)


def node_port_addresses(
    addresses: Mapping[str, Sequence[desired.IPAddress]], config: ModelConfig
) -> tuple[NodeIP, ...]:
    """Every address a NodePort frontend listens on, sorted by address, from each node's addresses.

    Node addresses are those of *every* Node (a client on this node connecting to another node's NodePort
    is translated here, at connect time), kept when ``config.nodeport_cidrs`` allows them; an address two
    Nodes report belongs to the first by name. Loopback (``127.0.0.1``, ``::1``: a process on the host
    using ``localhost:nodePort``, which kube-proxy's iptables mode accepts for IPv4 and Cilium's socket LB
    for both families; kube-proxy's nftables mode never does) is added unless
    ``nodeport_cidrs`` is given and none contains it, or in ``external_client`` mode (no node address is
    local to an outside host).
    """
    owner: dict[desired.IPAddress, str] = {}
    for name in sorted(addresses):
        for ip in addresses[name]:
            if config.nodeport_allows(ip):
                owner.setdefault(ip, name)
    if not config.external_client:
        for ip in LOOPBACKS:
            if config.nodeport_allows(ip):
                owner.setdefault(ip, "")
    ordered = sorted(owner, key=lambda ip: (ip.version, int(ip)))
    return tuple(NodeIP(ip, owner[ip]) for ip in ordered)


def node_context(config: ModelConfig, nodes: Iterable[objects.Node]) -> NodeContext:
    """This node's context from the configuration and every Node object (``store`` does it incrementally)."""
    by_name = {n.metadata.name: n for n in nodes}
    own = by_name.get(config.node_name)
    zone = own.metadata.labels.get(ZONE_LABEL, "") if own is not None else ""
    addresses = {name: node_addresses(n) for name, n in by_name.items()}
    return NodeContext(
        name=config.node_name,
        zone=zone,
        node_ports=node_port_addresses(addresses, config),
        own_addresses=frozenset(addresses.get(config.node_name, ())),
        external_ips_local_only=config.external_ips_local_only,
        external_client=config.external_client,
        north_south=config.north_south and not config.external_client,
    )


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


def uses_node_ports(service: objects.Service) -> bool:
    """Whether the Service has NodePort frontends (so Node addresses matter to it)."""
    spec = service.spec
    return spec.type in ("NodePort", "LoadBalancer") and any(p.node_port for p in spec.ports)


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Equality-based label selection; an absent or empty selector selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def service_families(
    service: objects.Service, cluster_ips: Sequence[desired.IPAddress] | None = None
) -> list[int]:
    """The IP versions the Service serves: those of its cluster IPs and of ``spec.ipFamilies`` (sorted).

    The API server keeps both consistent; for hand-written manifests the union never drops a cluster IP
    and lets ``ipFamilies: [IPv4, IPv6]`` with one cluster IP still get NodePorts of both families.
    Frontend addresses of another family (externalIPs, load-balancer IPs, node addresses) are skipped, as
    kube-proxy's per-family proxiers do.
    """
    if cluster_ips is None:
        cluster_ips = service.spec.service_ips()
    families = service.spec.ip_families
    if len(cluster_ips) == 1 and (not families or families == [_FAMILY_NAMES[cluster_ips[0].version]]):
        return [cluster_ips[0].version]  # the common case, quickly
    versions: set[int] = {ip.version for ip in cluster_ips}
    versions.update(_FAMILY_VERSIONS[f] for f in service.spec.ip_families)
    return sorted(versions)


def affinity_timeout(service: objects.Service) -> int:
    """Seconds a client keeps its backend (sessionAffinity ClientIP), 0 without affinity."""
    spec = service.spec
    if spec.session_affinity != "ClientIP":
        return 0
    config = spec.session_affinity_config
    if config is None or config.client_ip is None:
        return DEFAULT_AFFINITY_TIMEOUT
    return config.client_ip.timeout_seconds


@dataclass(slots=True)
class ServiceResult:
    """Everything one Service contributes: its frontends and, if it wants one, its health check (never
    changed once made; not frozen, as one is made per recomputed Service)."""

    frontends: dict[desired.FrontendKey, desired.Frontend] = field(default_factory=dict)
    health_check: tuple[int, healthcheck.HealthCheck] | None = None  # (healthCheckNodePort, answer)
    # Traffic policies ("internal", "external") that are Local while this node has no usable local endpoint
    # though some exist elsewhere (kube-proxy's sync_proxy_rules_no_local_endpoints_total).
    no_local: frozenset[str] = frozenset()


def service_frontends(
    service: objects.Service,
    slices: Iterable[objects.EndpointSlice],
    pods: Iterable[objects.Pod],
    node: NodeContext,
) -> dict[desired.FrontendKey, desired.Frontend]:
    """Every frontend of ``service`` on ``node`` (``compute_service(...).frontends``)."""
    return compute_service(service, slices, pods, node).frontends


def compute_service(
    service: objects.Service,
    slices: Iterable[objects.EndpointSlice | SliceView],
    pods: Iterable[objects.Pod],
    node: NodeContext,
) -> ServiceResult:
    """Every frontend of ``service`` on ``node`` (one with no usable endpoint has empty backends).

    ``slices`` are its EndpointSlices, or their ``slice_view``s (what the store passes: parsed once).
    When two frontends of one Service give the same key (invalid, but manifests can say it) the first wins:
    ports in order, and per port ClusterIP, externalIP, load-balancer IP, NodePort.
    """
    if service_ignored(service) is not None:
        return ServiceResult()
    views = [s if isinstance(s, SliceView) else slice_view(s) for s in slices]
    ordered = sorted(views, key=_view_name) if len(views) > 1 else views
    from_pods = uses_pods(service, bool(ordered))
    pod_list = sorted(pods, key=lambda p: p.metadata.name) if from_pods else []
    ctx = _context(service, node)
    hc_port = healthcheck.health_check_port(service)
    counted: list[endpoints.Candidate] = []
    timeout = affinity_timeout(service)
    cluster_ips = service.spec.service_ips()
    families = service_families(service, cluster_ips)
    result: dict[desired.FrontendKey, desired.Frontend] = {}
    no_local: set[str] = set()
    # Nearly every Service: endpoints from one slice, all ready, no hints, no traffic policy Local, no health
    # check and nothing north-south: each frontend gets them all (``_ready_backends``).
    plain = not (from_pods or hc_port is not None or ctx.internal_local or ctx.external_local)
    for port in service.spec.ports:
        owner = desired.Owner("Service", service.metadata.namespace, service.metadata.name, port.name)
        for version in families:
            addresses = list(_frontend_addresses(service, cluster_ips, port, version, node))
            if not addresses and hc_port is None:
                continue
            if plain and not any(a[3] for a in addresses):
                backends = _ready_backends(port, ordered, version)
                if backends is not None:
                    _add_ready(result, addresses, owner, backends, timeout)
                    continue
            found: Sequence[endpoints.Candidate]
            if from_pods:
                found, in_order = _pod_candidates(service, port, pod_list, version), False
            else:
                found, in_order = _slice_candidates(port, ordered, version)
            if hc_port is not None:
                counted.extend(found)
            selection = endpoints.select_endpoints(found, ctx, ordered=in_order)
            no_local |= _no_local(ctx, selection)
            per_node = selection.arriving is not None  # else every node's NodePort shares one Frontend
            ranges = _ranges(service, version) if node.north_south else ()
            common = _Common(owner, timeout, from_pods, node.name, ctx.external_local, ranges)
            made: dict[tuple[_Kind, str, bool, bool], desired.Frontend] = {}
            for address in addresses:
                key, kind, via, external = address
                # a loopback NodePort is the host's own: a pod's 127.0.0.1 is the pod's, never translated
                host_only = kind is _Kind.NODE_PORT and key.ip.is_loopback
                shared = (kind, via if per_node else "", host_only, external)
                frontend = made.get(shared)
                if frontend is None:
                    frontend = made[shared] = _frontend(common, address, selection, host_only)
                result.setdefault(key, frontend)
    health = None
    if hc_port is not None and result:
        local = healthcheck.count_local_ready(counted, node.name)
        health = (hc_port, healthcheck.HealthCheck(service.metadata.namespace, service.metadata.name, local))
    return ServiceResult(result, health, frozenset(no_local) if result else frozenset())


def _ready_backends(
    port: _ServicePort, slices: Sequence[SliceView], version: int
) -> tuple[desired.Backend, ...] | None:
    """The backends when this port of this family has its endpoints from one slice, every one ready, none with
    a hint: then ``select_endpoints`` would choose them all ("ready"), and with no traffic policy Local every
    frontend gets them (the slice's own backends, no candidate made). None otherwise: the general way."""
    chosen: SliceView | None = None
    number = 0
    for view in slices:
        if view.version != version:
            continue
        found = _slice_port(port, view.ports)
        if found is None:
            continue
        if chosen is not None:
            return None  # several slices: merged the general way
        chosen, number = view, found
    if chosen is None or not chosen.ready or chosen.hints is not None:
        return None
    if number == chosen.port:
        return chosen.backends
    return tuple([desired.Backend(b.ip, number) for b in chosen.backends])


def _add_ready(
    result: dict[desired.FrontendKey, desired.Frontend],
    addresses: Sequence[_Address],
    owner: desired.Owner,
    backends: tuple[desired.Backend, ...],
    timeout: int,
) -> None:
    """The frontends of ``addresses`` (none external) when every one gets ``backends``, all ready; one
    ``Frontend`` per kind (and per loopback or not), as ``compute_service`` shares them."""
    made: dict[tuple[_Kind, bool], desired.Frontend] = {}
    for key, kind, _, _ in addresses:
        host_only = kind is _Kind.NODE_PORT and key.ip.is_loopback  # as compute_service
        frontend = made.get((kind, host_only))
        if frontend is None:
            frontend = made[kind, host_only] = desired.Frontend(
                owner, backends, "ready", kind, timeout, host_only=host_only
            )
        result.setdefault(key, frontend)


@dataclass(slots=True)
class _Common:
    """What every frontend of one service port and family shares (made on every recomputation: a frozen
    dataclass costs several times as much to make)."""

    owner: desired.Owner
    timeout: int  # affinity
    from_pods: bool  # endpoints come from Pods (no EndpointSlice): reasons say so
    node_name: str
    external_local: bool  # externalTrafficPolicy Local
    source_ranges: tuple[IPNetwork, ...]  # loadBalancerSourceRanges of this family; () when unrestricted

    def explain(self, reason: str) -> str:
        return f"from pods (no EndpointSlice): {reason}" if self.from_pods else reason


def _frontend(
    common: _Common, address: _Address, selection: endpoints.Selection, host_only: bool
) -> desired.Frontend:
    """The Frontend of one address; an external one also says what north-south traffic gets."""
    _, kind, via, external = address
    chosen = selection.for_frontend(kind, via)
    reason = common.explain(chosen.reason)
    frontend = desired.Frontend(
        common.owner, chosen.backends, reason, kind, common.timeout, host_only=host_only
    )
    if not external:
        return frontend
    return _north_south(frontend, common, chosen, selection)


def _north_south(
    frontend: desired.Frontend, common: _Common, chosen: endpoints.EndpointSet, selection: endpoints.Selection
) -> desired.Frontend:
    """``frontend`` marked external: clients outside the cluster reach it through this node.

    externalTrafficPolicy Cluster: they get ``backends``, as in-cluster clients (``external_backends`` None).
    Local: this node's endpoints (``selection.local``: ready ones, else serving-terminating ones), possibly
    none: then the datapath drops, as kube-proxy does (and the health check node port answers 503).
    ``local_backends``: which of either set are on this node; ``source_ranges`` only restrict a
    load-balancer IP (as kube-proxy: a NodePort or an externalIP is never filtered by them).
    """
    outside: endpoints.EndpointSet | None = None
    reason = ""
    if common.external_local:
        outside = selection.local
        assert outside is not None  # eTP Local and externally accessible: the local set is computed
        reason = common.explain(f"externalTrafficPolicy Local: {outside.reason}")
    candidates = (*chosen.endpoints, *(outside.endpoints if outside is not None else ()))
    return replace(
        frontend,
        external=True,
        external_backends=outside.backends if outside is not None else None,
        external_local=common.external_local,
        local_backends=frozenset(
            c.backend for c in candidates if c.node_name and c.node_name == common.node_name
        ),
        source_ranges=common.source_ranges if frontend.kind is _Kind.LOAD_BALANCER else (),
        external_reason=reason,
    )


def _ranges(service: objects.Service, version: int) -> tuple[IPNetwork, ...]:
    """``spec.loadBalancerSourceRanges`` of one family, sorted and deduplicated; none (no restriction) when
    one is a /0, as kube-proxy (``0.0.0.0/0`` allows everything, whatever else is listed)."""
    mine = {net for net in service.spec.load_balancer_source_ranges if net.version == version}
    if any(net.prefixlen == 0 for net in mine):
        return ()
    return tuple(sorted(mine, key=lambda net: (int(net.network_address), net.prefixlen)))


def _no_local(ctx: endpoints.SelectionContext, selection: endpoints.Selection) -> set[str]:
    if not selection.has_any:
        return set()
    local_missing = selection.local is None or not selection.local.endpoints
    out = set()
    if ctx.internal_local and not selection.internal.endpoints:
        out.add("internal")
    if ctx.external_local and ctx.externally_accessible and local_missing:
        out.add("external")
    return out


def _frontend_addresses(
    service: objects.Service,
    cluster_ips: Sequence[desired.IPAddress],
    port: _ServicePort,
    version: int,
    node: NodeContext,
) -> Iterator[_Address]:
    """Each address a client may use for this port and family: its key, kind, (NodePort) Node, and whether
    it is external (``node.north_south``: packets from outside the cluster arriving at this node use it).

    The one place frontend kinds live:
    - ClusterIP: every cluster IP, any type.
    - externalIP: every ``spec.externalIPs`` entry, any type; with ``external_ips_local_only`` only those
      that are this node's own addresses (Cilium's CVE-2020-8554 mitigation).
    - LoadBalancer: every ``status.loadBalancer.ingress[].ip`` of a type LoadBalancer Service, except
      ``ipMode: Proxy`` ones (the load balancer proxies; its IP must reach it, not be short-circuited).
    - NodePort: ``node.node_ports`` (see ``node_port_addresses``) on the port's nodePort, for types NodePort
      and LoadBalancer.
    Addresses of another family than ``version`` are skipped (the caller loops over the Service's families).
    External (north-south): every externalIP and load-balancer IP here; a NodePort only on this node's own
    addresses (never loopback, never another node's: packets for those do not arrive here); a ClusterIP never.
    """
    spec = service.spec
    number, protocol = port.port, port.protocol
    outside = node.north_south and not node.external_client
    for ip in cluster_ips:
        if ip.version == version:
            yield desired.FrontendKey(ip, number, protocol), _Kind.CLUSTER_IP, "", False
    for ip in spec.external_ips:
        if ip.version == version and (not node.external_ips_local_only or ip in node.own_addresses):
            yield desired.FrontendKey(ip, number, protocol), _Kind.EXTERNAL_IP, "", outside
    if spec.type == "LoadBalancer":
        for ingress in service.status.load_balancer.ingress:
            if ingress.ip is not None and ingress.ip.version == version and ingress.ip_mode != "Proxy":
                yield desired.FrontendKey(ingress.ip, number, protocol), _Kind.LOAD_BALANCER, "", outside
    if port.node_port and spec.type in ("NodePort", "LoadBalancer"):
        for address in node.node_ports:
            if address.ip.version == version:
                mine = outside and address.node == node.name and not address.ip.is_loopback
                key = desired.FrontendKey(address.ip, port.node_port, protocol)
                yield key, _Kind.NODE_PORT, address.node, mine


def _context(service: objects.Service, node: NodeContext) -> endpoints.SelectionContext:
    spec = service.spec
    lb_vips = spec.type == "LoadBalancer" and any(
        i.ip and i.ip_mode != "Proxy" for i in service.status.load_balancer.ingress
    )
    external = uses_node_ports(service) or bool(spec.external_ips) or lb_vips
    return _selection_context(
        node.name,
        node.zone,
        spec.internal_traffic_policy == "Local",
        spec.external_traffic_policy == "Local",
        external,
        node.external_client,
    )


@functools.lru_cache(maxsize=64)
def _selection_context(
    name: str, zone: str, internal_local: bool, external_local: bool, accessible: bool, external_client: bool
) -> endpoints.SelectionContext:
    """One context per combination (a node has a few at a time), made once rather than per Service."""
    return endpoints.SelectionContext(name, zone, internal_local, external_local, accessible, external_client)


# --- candidates from EndpointSlices ----------------------------------------------------------------------

# A declared port of a slice: name ("" for none), protocol, number (None: every port).
_SlicePort = tuple[str, desired.Protocol, int | None]


@dataclass(slots=True)
class SliceView:
    """One EndpointSlice as the model reads it, parsed once (``slice_view``); equal when the model would
    compute the same from either. Never changed once made (not a frozen dataclass: one is made per slice
    update, and a frozen one of this many fields costs microseconds more to make).

    The store keeps these, not the slices: a slice updated with nothing the model reads changed (its
    resourceVersion, annotations, unused fields) is equal to the one it replaces and recomputes nothing, and
    a Service recomputed while its slices did not change parses none of them again. Its endpoints are kept
    as columns (a backend, node, conditions and hints each) rather than an object per endpoint: at a million
    endpoints that is a few hundred MB and as many objects less, and the backends are the very objects
    every frontend choosing them holds. An endpoint's zone is not kept: nothing reads it (topology goes by
    the hints).
    """

    namespace: str
    name: str
    service: str | None  # its kubernetes.io/service-name label (``slice_service_name``)
    version: int  # the IP version of its addresses; 0 when never used (FQDN, or labelled headless)
    ports: tuple[_SlicePort, ...]  # as declared; none declared: it serves a numeric targetPort directly
    # Its endpoints whose first address parses in the slice's family: one per address (a duplicate keeps its
    # best conditions, the first of equals), sorted by address; each a backend on ``port``, its node's name,
    # its conditions (``_rank``) and, when any endpoint has hints, its zone and node hints (else None).
    backends: tuple[desired.Backend, ...]
    nodes: tuple[str, ...]
    conditions: bytes
    hints: tuple[tuple[frozenset[str], frozenset[str]], ...] | None
    port: int  # the backends' port: its first declared port number (0 when none is declared)
    ready: bool  # every endpoint is ready (and there is one): what ``_ready_backends`` looks for
    zone_hinted: bool  # some endpoint has zone hints (its Service then reads this node's zone)

    def candidates(self, number: int) -> list[endpoints.Candidate]:
        """The endpoints as candidates on port ``number`` (sorted by address, as ``select_endpoints``)."""
        if number == self.port:
            backends: Sequence[desired.Backend] = self.backends
        else:
            backends = [desired.Backend(b.ip, number) for b in self.backends]
        made = endpoints.candidate_of
        ranks = self.conditions
        if self.hints is None:
            return [
                made(b, node, "", r >= _READY, r & _SERVING > 0, not r & _NOT_TERMINATING)
                for b, node, r in zip(backends, self.nodes, ranks, strict=True)
            ]
        return [
            made(b, node, "", r >= _READY, r & _SERVING > 0, not r & _NOT_TERMINATING, *hinted)
            for b, node, r, hinted in zip(backends, self.nodes, ranks, self.hints, strict=True)
        ]


# An endpoint's conditions as one number, ordered as kube-proxy ranks a duplicate's copies: ready first,
# then serving, then not terminating.
_READY, _SERVING, _NOT_TERMINATING = 4, 2, 1
_NO_HINTS = (_NO_NAMES, _NO_NAMES)  # an endpoint's zone and node hints when it has none


def slice_view(endpoint_slice: objects.EndpointSlice) -> SliceView:
    """``endpoint_slice`` parsed for ``compute_service`` (see ``SliceView``)."""
    meta = endpoint_slice.metadata
    ports = tuple([(p.name or "", p.protocol, p.port) for p in endpoint_slice.ports or ()])
    port = next((number for _, _, number in ports if number is not None), 0)
    service = slice_service_name(endpoint_slice)
    family = _FAMILY_OF.get(endpoint_slice.address_type)  # FQDN slices are never used
    if family is None or HEADLESS_LABEL in meta.labels:
        hinted = any(e.hints is not None and e.hints.for_zones for e in endpoint_slice.endpoints)
        return SliceView(meta.namespace, meta.name, service, 0, ports, (), (), b"", None, port, False, hinted)
    numbers, ranks, nodes, hints, hinted, any_hints = _columns(endpoint_slice.endpoints, family[1])
    ordered = sorted(numbers)
    if ordered != numbers or len(set(numbers)) < len(numbers):  # the rare case: put in order, deduplicate
        best: dict[int, int] = {}  # address → the index of its first copy with the best conditions
        for i, number in enumerate(numbers):
            kept = best.get(number)
            if kept is None or ranks[i] > ranks[kept]:
                best[number] = i
        order = [best[number] for number in sorted(best)]
        ordered = [numbers[i] for i in order]
        ranks, nodes, hints = [ranks[i] for i in order], [nodes[i] for i in order], [hints[i] for i in order]
    make = family[2]
    conditions = bytes(ranks)
    return SliceView(
        meta.namespace,
        meta.name,
        service,
        family[0],
        ports,
        tuple([desired.Backend(make(number), port) for number in ordered]),
        tuple(nodes),
        conditions,
        tuple(hints) if any_hints else None,
        port,
        bool(conditions) and min(conditions) >= _READY,
        hinted,
    )


def _columns(
    found: Iterable[objects.Endpoint], af: int
) -> tuple[list[int], list[int], list[str], list[tuple[frozenset[str], frozenset[str]]], bool, bool]:
    """The endpoints whose first address parses in family ``af`` (as kube-proxy: addresses are fungible), in
    order, as columns: the address as a number (cheap to compare, sorts as the addresses do), the conditions
    (``_READY`` ...), the node's name, the zone and node hints; and whether any endpoint has zone hints,
    whether any has hints at all."""
    numbers: list[int] = []
    ranks: list[int] = []
    nodes: list[str] = []
    hints: list[tuple[frozenset[str], frozenset[str]]] = []
    zone_hinted = any_hints = False
    intern = sys.intern  # node names repeat across endpoints: kept once
    for endpoint in found:
        found_hints = endpoint.hints
        pair = _NO_HINTS
        if found_hints is not None and (found_hints.for_zones or found_hints.for_nodes):
            zone_hinted = zone_hinted or bool(found_hints.for_zones)
            any_hints = True
            pair = (
                frozenset([z.name for z in found_hints.for_zones]),
                frozenset([n.name for n in found_hints.for_nodes]),
            )
        try:  # what ``desired.parse_ip`` accepts and then finds of this family
            number = int.from_bytes(socket.inet_pton(af, endpoint.addresses[0]), "big")
        except (OSError, ValueError):  # ValueError: a NUL in the text
            continue
        cond = endpoint.conditions
        ranks.append(
            (_READY if cond.ready is not False else 0)
            | (_SERVING if cond.serving is not False else 0)
            | (_NOT_TERMINATING if cond.terminating is not True else 0)
        )
        numbers.append(number)
        node = endpoint.node_name
        nodes.append(intern(node) if node else "")
        hints.append(pair)
    return numbers, ranks, nodes, hints, zone_hinted, any_hints


def _view_name(view: SliceView) -> str:
    return view.name


def _rank(candidate: endpoints.Candidate) -> tuple[bool, bool, bool]:
    return (candidate.ready, candidate.serving, not candidate.terminating)


def _slice_candidates(
    port: _ServicePort, slices: Sequence[SliceView], version: int
) -> tuple[Sequence[endpoints.Candidate], bool]:
    """Endpoints of every usable slice of this family, merged (a duplicate keeps its best conditions), and
    whether they are already in ``select_endpoints``'s order (one slice: its cached candidates)."""
    found: list[list[endpoints.Candidate]] = []
    for view in slices:
        if view.version != version:
            continue  # also skips FQDN and headless slices
        number = _slice_port(port, view.ports)
        if number is not None:
            found.append(view.candidates(number))
    if len(found) == 1:
        return found[0], True
    merged: dict[tuple[desired.IPAddress, int], endpoints.Candidate] = {}
    for candidates in found:
        for candidate in candidates:
            key = (candidate.ip, candidate.port)
            kept = merged.get(key)
            if kept is None or _rank(candidate) > _rank(kept):
                merged[key] = candidate
    return list(merged.values()), False


def _slice_port(port: _ServicePort, declared: Sequence[_SlicePort]) -> int | None:
    """The endpoint port for ``port`` in a slice declaring ``declared``, or ``None`` if it does not serve it.

    The slice's ``ports[]`` entry with the Service port's name and protocol gives the number (as kube-proxy);
    a slice that declares no ports at all (hand-written) serves a numeric (or absent) targetPort directly.
    """
    for name, protocol, number in declared:
        if name == port.name and protocol == port.protocol and number is not None:
            return number
    if not declared and not isinstance(port.target_port, str):
        return port.target_port or port.port
    return None


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
