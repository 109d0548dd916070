"""What one policy does on this node: a ``LocalRedirectPolicy`` or ``BalancingPolicy`` in, ``Layer``s out.

``compute_policy`` decides whether the policy applies here (``spec.enabled``, ``nodeLabelSelector`` against
this node's Node labels, ``enableOutCluster`` on a host outside the cluster), its frontend keys (an
addressMatcher's ip x toPorts; a serviceMatcher's Service ClusterIPs x the Service ports its toPorts name by
number and protocol, or every Service port), pairs each frontend port with a backend port
(``policies.pair_ports``), and builds the backends of each key's family:

- LocalRedirectPolicy: ready pods on this node matching ``endpointSelector`` (pod IP : port), with their
  ``PodRef``s; none on a host outside the cluster;
- BalancingPolicy ``serviceEndpoint``: ready pods anywhere; ``podEndpoint`` pod IP : port, ``hostPort`` the
  pod's node InternalIP : the container's hostPort for that port (else the port), ``nodeProxy`` the node's
  ``balancing.elf.io/nodeProxyIpv4``/``Ipv6`` annotation (else its InternalIP) : port;
- BalancingPolicy ``addressEndpoint``: the addresses of the family x port.

A pod is ready when its phase is Running and its Ready condition True. Pods are matched on
``selectors.pod_labels`` (labels plus the namespace label). ``store`` calls ``compute_policy`` for each
policy a change touches, with the pods ``selects_pod`` admits, and ``layering.combine`` layers the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from balancing.model import desired, frontends, objects, policies, selectors
from balancing.model.layering import Layer

__all__ = [
    "NODE_PROXY_ANNOTATIONS",
    "PolicyContext",
    "PolicyKey",
    "PolicyResult",
    "backend_selector",
    "compute_policy",
    "node_entry",
    "not_applied",
    "policy_key",
    "selects_pod",
    "uses_nodes",
]

NODE_PROXY_ANNOTATIONS = {4: "balancing.elf.io/nodeProxyIpv4", 6: "balancing.elf.io/nodeProxyIpv6"}
PolicyKey = tuple[str, str]  # (kind, name): the policy kinds are cluster-scoped

# PolicyResult.reason values (also the status condition's reason)
READY = "Ready"
DISABLED = "Disabled"
NODE_NOT_SELECTED = "NodeNotSelected"
OUT_OF_CLUSTER_DISABLED = "OutOfClusterDisabled"
SERVICE_NOT_FOUND = "ServiceNotFound"
NO_FRONTENDS = "NoFrontends"
NO_BACKENDS = "NoBackends"


def policy_key(policy: policies.Policy) -> PolicyKey:
    return (policy.kind, policy.metadata.name)


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """This node as policies see it (``store`` keeps the parts up to date)."""

    node_name: str
    external_client: bool = False
    own_labels: Mapping[str, str] | None = None  # this node's Node labels; None: no Node object
    nodes: Mapping[str, objects.Node] = field(default_factory=dict)  # every Node, for hostPort/nodeProxy


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """A policy's layers by frontend key, and its state on this node for status."""

    frontends: Mapping[desired.FrontendKey, Layer]
    reason: str  # Ready, Disabled, NodeNotSelected, OutOfClusterDisabled, ServiceNotFound, NoFrontends, ...
    message: str
    backends: int = 0  # distinct backends over every frontend


def not_applied(policy: policies.Policy, ctx: PolicyContext) -> tuple[str, str] | None:
    """``(reason, message)`` when the policy does not apply on this node, else ``None``."""
    spec = policy.spec
    if not spec.enabled:
        return DISABLED, "spec.enabled is false"
    if ctx.external_client:
        if not spec.config.enable_out_cluster:
            return (
                OUT_OF_CLUSTER_DISABLED,
                f"enableOutCluster is false and {ctx.node_name} is outside the cluster",
            )
        return None
    selector = spec.config.node_label_selector
    if selector is None or selector.empty:
        return None
    if ctx.own_labels is None:
        return NODE_NOT_SELECTED, f"nodeLabelSelector {selector}: there is no Node {ctx.node_name}"
    if not selector.matches(ctx.own_labels):
        return NODE_NOT_SELECTED, f"nodeLabelSelector {selector} does not match Node {ctx.node_name}"
    return None


def backend_selector(policy: policies.Policy) -> selectors.LabelSelector | None:
    """The selector that picks the policy's backend pods (``None``: an addressEndpoint has no pods)."""
    if isinstance(policy, policies.LocalRedirectPolicy):
        return policy.spec.backend.endpoint_selector
    endpoint = policy.spec.backend.service_endpoint
    return endpoint.endpoint_selector if endpoint is not None else None


def selects_pod(policy: policies.Policy, pod: objects.Pod, node_name: str, external_client: bool) -> bool:
    """Whether ``pod`` is a candidate backend: it matches the backend selector (and, for a
    LocalRedirectPolicy, runs on this node, which a host outside the cluster has no pods on). Readiness is
    not checked: a pod that becomes ready must still reach the policy."""
    selector = backend_selector(policy)
    if selector is None:
        return False
    if isinstance(policy, policies.LocalRedirectPolicy) and (
        external_client or pod.spec.node_name != node_name
    ):
        return False
    return selector.matches(selectors.pod_labels(pod.metadata.namespace, pod.metadata.labels))


def uses_nodes(policy: policies.Policy) -> bool:
    """Whether the policy's backends are node addresses (BalancingPolicy hostPort or nodeProxy)."""
    if isinstance(policy, policies.LocalRedirectPolicy):
        return False
    endpoint = policy.spec.backend.service_endpoint
    return endpoint is not None and endpoint.redirect_mode != "podEndpoint"


def node_entry(node: objects.Node | None) -> tuple[object, ...]:
    """What hostPort and nodeProxy backends read of a Node (a change elsewhere in it does not matter)."""
    if node is None:
        return ()
    return (
        _internal_ips(node),
        tuple(node.metadata.annotations.get(a, "") for a in NODE_PROXY_ANNOTATIONS.values()),
    )


@dataclass(frozen=True, slots=True)
class _FrontPort:
    """A frontend port taken from the Service (serviceMatcher without toPorts)."""

    port: int
    protocol: desired.Protocol
    name: str


def compute_policy(
    policy: policies.Policy,
    service: objects.Service | None,
    pods: Iterable[objects.Pod],
    ctx: PolicyContext,
) -> PolicyResult:
    """The policy's layers on this node (see the module docstring). ``service`` is the Service a
    serviceMatcher names (ignored otherwise); ``pods`` may hold any pods, those that do not match are
    skipped. The output depends only on the inputs, never on their order."""
    skip = not_applied(policy, ctx)
    if skip is not None:
        return PolicyResult({}, *skip)
    frontend = policy.spec.frontend
    back_ports = policy.spec.backend.to_ports
    notes: list[str] = []
    ips: Sequence[desired.IPAddress]
    pairs: list[tuple[policies.NamedPort, policies.PolicyPort]]
    service_names: dict[tuple[int, desired.Protocol], str] = {}
    if frontend.address_matcher is not None:
        ips = [frontend.address_matcher.ip]
        pairs, notes = _pairs(frontend.address_matcher.to_ports, back_ports)
    else:
        matcher = frontend.service_matcher
        assert matcher is not None
        where = f"Service {matcher.namespace}/{matcher.service_name}"
        if service is None:
            return PolicyResult({}, SERVICE_NOT_FOUND, f"{where} does not exist")
        ignored = frontends.service_ignored(service)
        if ignored is not None:
            return PolicyResult({}, NO_FRONTENDS, f"{where} is not served: {ignored}")
        ips = service.spec.service_ips()
        service_names = {(p.port, p.protocol): p.name for p in reversed(service.spec.ports)}
        if matcher.to_ports:
            pairs, notes = _pairs(matcher.to_ports, back_ports)
            notes += [f"port {policies.describe_port(p)} is not a port of {where}"
                      for p in matcher.to_ports if (p.port, p.protocol) not in service_names]  # fmt: skip
            pairs = [(f, b) for f, b in pairs if (f.port, f.protocol) in service_names]
        else:
            service_ports = [_FrontPort(p.port, p.protocol, p.name) for p in service.spec.ports]
            pairs, notes = _pairs(service_ports, back_ports)
    if not ips or not pairs:
        why = "; ".join(notes) or "no frontend address"
        return PolicyResult({}, NO_FRONTENDS, why)
    candidates = sorted(
        (p for p in pods if selects_pod(policy, p, ctx.node_name, ctx.external_client) and _ready(p)),
        key=lambda p: (p.metadata.namespace, p.metadata.name),
    )
    result: dict[desired.FrontendKey, Layer] = {}
    every: set[desired.Backend] = set()
    for front, back in pairs:
        name = front.name or service_names.get((front.port, front.protocol), "")
        owner = desired.Owner(policy.kind, "", policy.metadata.name, name)
        for ip in ips:
            key = desired.FrontendKey(ip, front.port, front.protocol)
            if key in result:
                continue  # a Service listing one port twice (invalid, but manifests can say it): first wins
            layer = result[key] = _layer(policy, owner, back, ip.version, candidates, ctx)
            every.update(layer.backends)
    message = f"{len(every)} backend{_s(len(every))} for {len(result)} frontend{_s(len(result))}"
    if not every:
        message = next(iter(result.values())).reason
    if notes:
        message += "; " + "; ".join(notes)
    return PolicyResult(result, READY if every else NO_BACKENDS, message, len(every))


def _pairs(
    front: Sequence[policies.NamedPort], back: list[policies.PolicyPort]
) -> tuple[list[tuple[policies.NamedPort, policies.PolicyPort]], list[str]]:
    return policies.pair_ports(front, back)


def _ready(pod: objects.Pod) -> bool:
    return pod.status.phase == "Running" and pod.status.condition("Ready")


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _layer(
    policy: policies.Policy,
    owner: desired.Owner,
    port: policies.PolicyPort,
    version: int,
    pods: list[objects.Pod],
    ctx: PolicyContext,
) -> Layer:
    if isinstance(policy, policies.LocalRedirectPolicy):
        return _local_layer(policy, owner, port, version, pods, ctx)
    backend = policy.spec.backend
    if backend.address_endpoint is not None:
        found = {
            desired.Backend(ip, port.port)
            for ip in backend.address_endpoint.addresses
            if ip.version == version
        }
        reason = (
            f"{len(found)} address{'' if len(found) == 1 else 'es'}" if found else f"no IPv{version} address"
        )
        return Layer(owner, tuple(sorted(found)), reason)
    endpoint = backend.service_endpoint
    assert endpoint is not None
    mode = endpoint.redirect_mode
    chosen: set[desired.Backend] = set()
    for pod in pods:
        if mode == "podEndpoint":
            chosen.update(desired.Backend(ip, port.port) for ip in pod.status.ips() if ip.version == version)
            continue
        node = ctx.nodes.get(pod.spec.node_name)
        ip = _node_ip(node, version, proxy=mode == "nodeProxy") if node is not None else None
        if ip is not None:
            number = _host_port(pod, port) if mode == "hostPort" else port.port
            chosen.add(desired.Backend(ip, number))
    if chosen:
        reason = f"{len(chosen)} backend{_s(len(chosen))} ({mode})"
    elif pods and mode != "podEndpoint":
        reason = f"no IPv{version} node address for the {len(pods)} ready pod{_s(len(pods))} ({mode})"
    else:
        reason = f"no ready pod matches endpointSelector {endpoint.endpoint_selector} (IPv{version})"
    return Layer(owner, tuple(sorted(chosen)), reason)


def _local_layer(
    policy: policies.LocalRedirectPolicy,
    owner: desired.Owner,
    port: policies.PolicyPort,
    version: int,
    pods: list[objects.Pod],
    ctx: PolicyContext,
) -> Layer:
    spec = policy.spec
    if ctx.external_client:
        return _lrp_layer(policy, owner, (), f"no local pods on {ctx.node_name}, a host outside the cluster")
    pod_backends: set[desired.BackendPod] = set()
    for pod in pods:
        meta = pod.metadata
        ref = desired.PodRef(meta.namespace, meta.name, meta.uid)
        pod_backends.update(
            desired.BackendPod(ref, desired.Backend(ip, port.port))
            for ip in pod.status.ips()
            if ip.version == version
        )
    backends = tuple(sorted({b.backend for b in pod_backends}))
    if backends:
        reason = f"{len(backends)} local backend{_s(len(backends))}"
    else:
        selector = spec.backend.endpoint_selector
        reason = f"no ready pod on {ctx.node_name} matches endpointSelector {selector} (IPv{version})"
    ordered = tuple(sorted(pod_backends, key=lambda b: (b.pod, b.backend)))
    return _lrp_layer(policy, owner, backends, reason, ordered)


def _lrp_layer(
    policy: policies.LocalRedirectPolicy,
    owner: desired.Owner,
    backends: tuple[desired.Backend, ...],
    reason: str,
    pods: tuple[desired.BackendPod, ...] = (),
) -> Layer:
    spec = policy.spec
    return Layer(
        owner,
        backends,
        reason,
        refuse_when_empty=spec.frontend.address_matcher is not None,
        backend_pods=pods,
        skip_redirect_from_backends=spec.skip_redirect_from_backend,
        qos_limit=spec.config.qos_limit,
    )


def _internal_ips(node: objects.Node) -> tuple[desired.IPAddress, ...]:
    found: list[desired.IPAddress] = []
    for address in node.status.addresses:
        if address.type == "InternalIP":
            try:
                found.append(desired.parse_ip(address.address))
            except ValueError:
                continue
    return tuple(found)


def _node_ip(node: objects.Node, version: int, *, proxy: bool) -> desired.IPAddress | None:
    """The node's entry address of this family: its nodeProxy annotation (``proxy``), else its InternalIP."""
    if proxy:
        text = node.metadata.annotations.get(NODE_PROXY_ANNOTATIONS[version], "")
        try:
            ip = desired.parse_ip(text.strip()) if text.strip() else None
        except ValueError:
            ip = None
        if ip is not None and ip.version == version:
            return ip
    return next((ip for ip in _internal_ips(node) if ip.version == version), None)


def _host_port(pod: objects.Pod, port: policies.PolicyPort) -> int:
    """The hostPort a container declares for this container port and protocol, else the port itself."""
    for container in pod.spec.containers:
        for cport in container.ports:
            if cport.container_port == port.port and cport.protocol == port.protocol and cport.host_port:
                return cport.host_port
    return port.port
