"""Typed Kubernetes objects the model reads: Service, EndpointSlice, Pod, Node, Namespace (the fields we use)
and the two policy kinds of ``balancing.elf.io/v1beta1`` (defined in ``policies``, registered here in
``KINDS``).

Parsed from the API's JSON shape (camelCase); unknown fields are ignored and null fields are absent, so real
manifests and API objects load as they are. Every field read is validated as the API server validates it
(``meta`` holds the shared rules): names, ports, IP addresses, label keys and values, so nothing that
validates can put an out-of-range number into a map key or a listener, or a control character into a log.
Validation errors are pydantic ``ValidationError``s whose locations name the field (``spec.ports[1].name``);
the sources turn them into errors naming the file or object. Nothing here does I/O.

Deliberately not checked, as the model reads them leniently: endpoint and Node addresses (an unparseable one
is skipped when computing), Pod phases and conditions, and the API server's rules between fields that change
nothing the model does (``sessionAffinityConfig`` with ``sessionAffinity: None``, a nodePort on a ClusterIP
Service, a headless NodePort Service, ``loadBalancerSourceRanges`` on a Service that is no LoadBalancer: each
ignored or skipped).

Socket-LB exclusion (``socket_lb_disabled``): the Pod annotation or Namespace label
``balancing.elf.io/socket-lb: disabled`` leaves a pod's processes to the network (service meshes, KubeVirt).

One module over 400 lines on purpose: it is the one place the API's shapes of the core kinds are written down
(the rules shared with the policy kinds are in ``meta``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from balancing.model.desired import IPAddress, IPNetwork, Protocol, parse_ip
from balancing.model.meta import (
    FieldErrors,
    KubeModel,
    NodePort,
    ObjectMeta,
    Port,
    ProtocolField,
    ServiceMeta,
    check_dns1123_label,
    check_dns1123_subdomain,
    check_label_value,
    check_labels,
    check_port_name,
    null_values_empty,
    port_number_problem,
)
from balancing.model.policies import BalancingPolicy, LocalRedirectPolicy

__all__ = [
    "KINDS",
    "POLICY_API_VERSION",
    "SOCKET_LB",
    "SOCKET_LB_DISABLED",
    "BalancingPolicy",
    "ClientIPConfig",
    "Container",
    "ContainerPort",
    "Endpoint",
    "EndpointConditions",
    "EndpointHints",
    "EndpointPort",
    "EndpointSlice",
    "ForNode",
    "ForZone",
    "KubeModel",
    "KubeObject",
    "LoadBalancerIngress",
    "LoadBalancerStatus",
    "LocalRedirectPolicy",
    "Namespace",
    "NamespaceMeta",
    "Node",
    "NodeAddress",
    "NodeStatus",
    "ObjectMeta",
    "ObjectRef",
    "OptionalCheck",
    "Pod",
    "PodCondition",
    "PodIP",
    "PodSpec",
    "PodStatus",
    "Port",
    "ProtocolField",
    "Service",
    "ServiceMeta",
    "ServicePort",
    "ServiceSpec",
    "ServiceStatus",
    "SessionAffinityConfig",
    "UnknownKind",
    "parse_object",
    "ref",
    "socket_lb_disabled",
]


# --- shared field types ----------------------------------------------------------------------------------


def _ip_text(value: Any) -> IPAddress:
    """An IP address as the API server's ``IsValidIP`` reads one: a string, no zone (``%eth0``), no spaces."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str) or "%" in value or value.strip() != value:
        raise ValueError(f"{value!r}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")
    try:
        return parse_ip(value)  # inet_pton: no leading zeros, and (with no "%") no zone
    except ValueError:
        raise ValueError(
            f"{value!r}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
        ) from None


def _non_special(ip: IPAddress) -> IPAddress:
    """The API server's ``ValidateNonSpecialIP`` (externalIPs)."""
    if ip.is_unspecified:
        raise ValueError(f"{ip}: may not be unspecified (0.0.0.0)")
    if ip.is_loopback:
        raise ValueError(f"{ip}: may not be in the loopback range (127.0.0.0/8, ::1/128)")
    if ip.is_link_local:
        raise ValueError(f"{ip}: may not be in the link-local range (169.254.0.0/16, fe80::/10)")
    link_local_multicast = (
        int(ip) >> 8 == 0xE00000 if ip.version == 4 else (int(ip) >> 112) & 0xFF0F == 0xFF02
    )
    if link_local_multicast:
        raise ValueError(f"{ip}: may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")
    return ip


def _cidr_text(value: Any) -> IPNetwork:
    """A ``loadBalancerSourceRanges`` entry as kube-proxy reads one: ``address/bits`` after trimming
    surrounding spaces (the API server lets them through), host bits allowed (``10.0.0.1/8`` is
    ``10.0.0.0/8``). The address is read as ``_ip_text`` reads one (no zone, no leading zeros); the bits are
    decimal digits."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    problem = f"{value!r} is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/64)"
    if not isinstance(value, str):
        raise ValueError(problem)
    address, slash, bits = value.strip().partition("/")
    if not slash or not (bits.isascii() and bits.isdigit()) or len(bits) > 3:
        raise ValueError(problem)
    try:
        ip = parse_ip(address)
    except ValueError:
        raise ValueError(problem) from None
    if int(bits) > ip.max_prefixlen:
        raise ValueError(problem)
    return ipaddress.ip_network((ip, int(bits)), strict=False)


IPField = Annotated[IPAddress, BeforeValidator(_ip_text)]
SourceRange = Annotated[IPNetwork, BeforeValidator(_cidr_text)]
ExternalIP = Annotated[IPAddress, BeforeValidator(_ip_text), AfterValidator(_non_special)]
Name = Annotated[str, AfterValidator(check_dns1123_subdomain)]  # names of Nodes (nodeName fields)
Label = Annotated[str, AfterValidator(check_dns1123_label)]
LabelValue = Annotated[str, AfterValidator(check_label_value)]


class OptionalCheck:
    """``check(value)`` for a value that is set; an empty one is valid (``fastparse`` reads ``check``)."""

    def __init__(self, check: Callable[[str], str]) -> None:
        self.check = check

    def __call__(self, value: str) -> str:
        return self.check(value) if value else value


_optional = OptionalCheck


def _unique_names(ports: Sequence[Any], errors: FieldErrors, *, required: bool) -> None:
    """Port names unique (and, with ``required``, set) in a list of ports."""
    seen: set[str] = set()
    for i, port in enumerate(ports):
        if not port.name:
            if required:
                errors.add((i, "name"), "Required value: with more than one port every port needs a name", "")
            continue
        if port.name in seen:
            errors.add((i, "name"), f"Duplicate value: {port.name!r}", port.name)
        seen.add(port.name)


# --- Service -------------------------------------------------------------------------------------------


def _target_port(value: Any) -> int | str:
    """A number 1-65535, or a port name (IANA_SVC_NAME). A quoted number is a name to the API server, and
    no valid one: it has no letter."""
    if isinstance(value, int) and not isinstance(value, bool):
        problem = port_number_problem(value)
        if problem:
            raise ValueError(problem)
        return value
    if isinstance(value, str):
        try:
            return check_port_name(value)
        except ValueError as exc:
            hint = " (a port number is written without quotes)" if value.isascii() and value.isdigit() else ""
            raise ValueError(f"{exc}{hint}") from None
    raise ValueError(f"{value!r}: must be a port number (1-65535) or a port name")


class ServicePort(KubeModel):
    name: Annotated[str, AfterValidator(_optional(check_dns1123_label))] = ""
    protocol: ProtocolField = Protocol.TCP
    port: Port
    target_port: Annotated[int | str, BeforeValidator(_target_port)] | None = None  # None: the port
    node_port: NodePort | None = None  # None or 0: none


class ClientIPConfig(KubeModel):
    timeout_seconds: StrictInt = 10800

    @field_validator("timeout_seconds")
    @classmethod
    def _timeout(cls, value: int) -> int:
        if not 1 <= value <= 86400:
            raise ValueError(f"{value}: must be greater than 0 and at most 86400")
        return value


class SessionAffinityConfig(KubeModel):
    client_ip: ClientIPConfig | None = Field(default=None, alias="clientIP")


class ServiceSpec(KubeModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    selector: (
        Annotated[dict[str, str], BeforeValidator(null_values_empty), AfterValidator(check_labels)] | None
    ) = None
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    ports: list[ServicePort] = Field(default_factory=list)
    external_ips: list[ExternalIP] = Field(default_factory=list, alias="externalIPs")
    # Parsed; frontends applies them to load-balancer IPs (their family's; none when one is a /0). The
    # annotation service.beta.kubernetes.io/load-balancer-source-ranges is for cloud load balancers:
    # kube-proxy never reads it, and neither does the model.
    load_balancer_source_ranges: list[SourceRange] = Field(default_factory=list)
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    internal_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    health_check_node_port: NodePort | None = None  # None or 0: none
    publish_not_ready_addresses: StrictBool = False
    traffic_distribution: Literal["PreferClose", "PreferSameZone", "PreferSameNode"] | None = None
    ip_families: list[Literal["IPv4", "IPv6"]] = Field(default_factory=list, max_length=2)

    @field_validator("cluster_ip")
    @classmethod
    def _cluster_ip(cls, value: str | None) -> str | None:
        if value not in (None, "", "None"):
            _ip_text(value)
        return value

    @field_validator("cluster_ips")
    @classmethod
    def _cluster_ips(cls, value: list[str]) -> list[str]:
        errors = FieldErrors()
        for i, ip in enumerate(value):
            if ip == "None" and i == 0:
                if len(value) > 1:
                    errors.add((), "'None' must be the first and only value", ip)
            else:
                errors.check((i,), ip, _ip_text)
        if len(value) > 2:
            errors.add((), "may only hold up to 2 values", "")
        errors.raise_any("clusterIPs")
        if len(value) == 2 and _ip_text(value[0]).version == _ip_text(value[1]).version:
            raise ValueError("may specify no more than one IP for each IP family")
        return value

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: list[ServicePort]) -> list[ServicePort]:
        errors = FieldErrors()
        _unique_names(value, errors, required=len(value) > 1)
        seen: set[tuple[Protocol, int]] = set()
        node_ports: set[tuple[Protocol, int]] = set()
        for i, port in enumerate(value):
            if (port.protocol, port.port) in seen:
                errors.add((i,), f"Duplicate value: {port.port}/{port.protocol.name}", port.port)
            seen.add((port.protocol, port.port))
            if port.node_port and (port.protocol, port.node_port) in node_ports:
                errors.add((i, "nodePort"), f"Duplicate value: {port.node_port}", port.node_port)
            if port.node_port:
                node_ports.add((port.protocol, port.node_port))
        errors.raise_any("ports")
        return value

    @field_validator("ip_families")
    @classmethod
    def _ip_families(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("Duplicate value: one of each family at most")
        return value

    @model_validator(mode="after")
    def _cluster_ip_first(self) -> ServiceSpec:
        if self.cluster_ip and self.cluster_ips and self.cluster_ips[0] != self.cluster_ip:
            errors = FieldErrors()
            errors.add(("clusterIPs",), "first value must match `clusterIP`", self.cluster_ips)
            errors.raise_any("spec")
        return self

    @property
    def headless(self) -> bool:
        return self.cluster_ips == ["None"] or (not self.cluster_ips and self.cluster_ip == "None")

    def service_ips(self) -> tuple[IPAddress, ...]:
        """Every ClusterIP of the service (``clusterIPs``, else ``clusterIP``); empty for headless. Parsed
        once, when first asked for (the fields keep the API's text, validated)."""
        return self._parsed_ips

    @functools.cached_property
    def _parsed_ips(self) -> tuple[IPAddress, ...]:
        """Kept in the instance's ``__dict__`` (not a field: equality and copies compare the fields)."""
        raw = self.cluster_ips or ([self.cluster_ip] if self.cluster_ip else [])
        return tuple(parse_ip(ip) for ip in raw if ip not in ("", "None"))


class LoadBalancerIngress(KubeModel):
    ip: IPField | None = None
    hostname: Annotated[str, AfterValidator(_optional(check_dns1123_subdomain))] | None = None
    ip_mode: Literal["VIP", "Proxy"] | None = None

    @model_validator(mode="after")
    def _ip_mode_needs_ip(self) -> LoadBalancerIngress:
        if self.ip_mode is not None and self.ip is None:
            raise ValueError("ipMode: may not be specified when `ip` is not set")
        return self


class LoadBalancerStatus(KubeModel):
    ingress: list[LoadBalancerIngress] = Field(default_factory=list)


class ServiceStatus(KubeModel):
    load_balancer: LoadBalancerStatus = Field(default_factory=LoadBalancerStatus)


class Service(KubeModel):
    kind: Literal["Service"] = "Service"
    metadata: ServiceMeta
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: ServiceStatus = Field(default_factory=ServiceStatus)

    @model_validator(mode="after")
    def _has_ports(self) -> Service:
        spec = self.spec
        if not spec.ports and not spec.headless and spec.type != "ExternalName":
            errors = FieldErrors()
            errors.add(("spec", "ports"), "Required value: a Service needs at least one port", [])
            errors.raise_any("Service")
        return self


# --- EndpointSlice -------------------------------------------------------------------------------------


class EndpointConditions(KubeModel):
    ready: StrictBool | None = None
    serving: StrictBool | None = None
    terminating: StrictBool | None = None


class ForZone(KubeModel):
    name: LabelValue


class ForNode(KubeModel):
    name: Name


def _unique_hint_names(hints: list[Any]) -> list[Any]:
    errors = FieldErrors()
    seen: set[str] = set()
    for i, hint in enumerate(hints):
        if hint.name in seen:
            errors.add((i, "name"), f"Duplicate value: {hint.name!r}", hint.name)
        seen.add(hint.name)
    errors.raise_any("hints")
    return hints


class EndpointHints(KubeModel):
    for_zones: Annotated[list[ForZone], Field(max_length=8), AfterValidator(_unique_hint_names)] = Field(
        default_factory=list
    )
    for_nodes: Annotated[list[ForNode], Field(max_length=8), AfterValidator(_unique_hint_names)] = Field(
        default_factory=list
    )


class Endpoint(KubeModel):
    addresses: list[str] = Field(min_length=1, max_length=100)  # parsed (or skipped) per family when used
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    node_name: Name | None = None
    zone: str | None = None
    hints: EndpointHints | None = None


class EndpointPort(KubeModel):
    name: Annotated[str, AfterValidator(_optional(check_dns1123_label))] | None = ""
    protocol: ProtocolField = Protocol.TCP
    port: Port | None = None  # None: every port (the API server leaves the number unchecked; we do not)


class EndpointSlice(KubeModel):
    kind: Literal["EndpointSlice"] = "EndpointSlice"
    metadata: ObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=1000)
    ports: list[EndpointPort] | None = None

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: list[EndpointPort] | None) -> list[EndpointPort] | None:
        errors = FieldErrors()
        seen: set[str] = set()
        for i, port in enumerate(value or []):
            name = port.name or ""
            if name in seen:
                errors.add((i, "name"), f"Duplicate value: {name!r}", name)
            seen.add(name)
        errors.raise_any("ports")
        return value


# --- Pod and Node --------------------------------------------------------------------------------------


class ContainerPort(KubeModel):
    name: Annotated[str, AfterValidator(_optional(check_port_name))] = ""
    container_port: Port
    protocol: ProtocolField = Protocol.TCP
    host_port: NodePort | None = None  # None or 0: none


class Container(KubeModel):
    name: Label
    ports: list[ContainerPort] = Field(default_factory=list)

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: list[ContainerPort]) -> list[ContainerPort]:
        errors = FieldErrors()
        _unique_names(value, errors, required=False)
        errors.raise_any("ports")
        return value


class PodSpec(KubeModel):
    node_name: Annotated[str, AfterValidator(_optional(check_dns1123_subdomain))] = ""
    host_network: StrictBool = False
    containers: list[Container] = Field(default_factory=list)


class PodCondition(KubeModel):
    type: str
    status: str


class PodIP(KubeModel):
    ip: IPField


class ContainerStatus(KubeModel):
    name: str
    container_id: str = Field(default="", alias="containerID")  # "containerd://<id>", "cri-o://<id>", ...


class PodStatus(KubeModel):
    phase: str = ""
    pod_ip: IPField | None = Field(default=None, alias="podIP")
    pod_ips: list[PodIP] = Field(default_factory=list, alias="podIPs", max_length=2)
    conditions: list[PodCondition] = Field(default_factory=list)
    container_statuses: list[ContainerStatus] = Field(default_factory=list)
    init_container_statuses: list[ContainerStatus] = Field(default_factory=list)
    ephemeral_container_statuses: list[ContainerStatus] = Field(default_factory=list)

    @field_validator("pod_ips")
    @classmethod
    def _pod_ips(cls, value: list[PodIP]) -> list[PodIP]:
        if len(value) == 2 and value[0].ip.version == value[1].ip.version:
            raise ValueError("may specify no more than one IP for each IP family")
        return value

    @model_validator(mode="after")
    def _pod_ip_first(self) -> PodStatus:
        if self.pod_ip is not None and self.pod_ips and self.pod_ips[0].ip != self.pod_ip:
            raise ValueError("podIP must be the first of podIPs")
        return self

    def ips(self) -> list[IPAddress]:
        if self.pod_ips:
            return [p.ip for p in self.pod_ips]
        return [self.pod_ip] if self.pod_ip else []

    def condition(self, kind: str) -> bool:
        return any(c.type == kind and c.status == "True" for c in self.conditions)


class Pod(KubeModel):
    kind: Literal["Pod"] = "Pod"
    metadata: ObjectMeta
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)


class NodeAddress(KubeModel):
    type: str
    address: str  # parsed (or skipped) when used


class NodeStatus(KubeModel):
    addresses: list[NodeAddress] = Field(default_factory=list)


class Node(KubeModel):
    kind: Literal["Node"] = "Node"
    metadata: ObjectMeta
    status: NodeStatus = Field(default_factory=NodeStatus)


class NamespaceMeta(ObjectMeta):
    """A Namespace's ``metadata``: its name is a DNS-1123 label (it names the namespace of other objects)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_dns1123_label(value)


class Namespace(KubeModel):
    """A Namespace: only its labels are read (``SOCKET_LB``). Cluster-scoped: a ``metadata.namespace`` in a
    manifest is dropped, as the API server ignores it."""

    kind: Literal["Namespace"] = "Namespace"
    metadata: NamespaceMeta

    @model_validator(mode="before")
    @classmethod
    def _cluster_scoped(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and isinstance(data.get("metadata"), dict)
            and "namespace" in data["metadata"]
        ):
            meta = {k: v for k, v in data["metadata"].items() if k != "namespace"}
            return {**data, "metadata": meta}
        return data


# A Pod annotation, or a label of the Pod's Namespace: "disabled" leaves the pod's processes to the network
# (no socket-level translation; e.g. a service mesh's sidecar or a KubeVirt VM translates on its own).
SOCKET_LB = "balancing.elf.io/socket-lb"
SOCKET_LB_DISABLED = "disabled"


def socket_lb_disabled(pod: Pod, namespace_labels: dict[str, str]) -> bool:
    """Whether socket LB leaves ``pod`` alone: its annotation or its Namespace's label (``namespace_labels``,
    empty when the Namespace is unknown) ``balancing.elf.io/socket-lb`` is "disabled". Any other value is as
    good as none: the default, translated."""
    return SOCKET_LB_DISABLED in (pod.metadata.annotations.get(SOCKET_LB), namespace_labels.get(SOCKET_LB))


KubeObject = Service | EndpointSlice | Pod | Node | Namespace | LocalRedirectPolicy | BalancingPolicy

POLICY_API_VERSION = "balancing.elf.io/v1beta1"
KINDS: dict[tuple[str, str], type[KubeModel]] = {
    ("v1", "Service"): Service,
    ("discovery.k8s.io/v1", "EndpointSlice"): EndpointSlice,
    ("v1", "Pod"): Pod,
    ("v1", "Node"): Node,
    ("v1", "Namespace"): Namespace,
    (POLICY_API_VERSION, "LocalRedirectPolicy"): LocalRedirectPolicy,
    (POLICY_API_VERSION, "BalancingPolicy"): BalancingPolicy,
}


class UnknownKind(ValueError):
    """The document's apiVersion/kind is not one the model reads (sources skip it with a warning)."""


def parse_object(doc: dict[str, Any]) -> KubeObject:
    """Validate one Kubernetes object document; raises ``UnknownKind`` or pydantic ``ValidationError``.

    The kinds ``model.fastparse`` covers take its lane first (the same object, without the Python calls per
    nested object); what it refuses is validated by the model class, whose errors are the ones raised."""
    key = (str(doc.get("apiVersion", "")), str(doc.get("kind", "")))
    model = KINDS.get(key)
    if model is None:
        raise UnknownKind(f"apiVersion {key[0]!r} kind {key[1]!r} is not read by balancing")
    from balancing.model import fastparse  # it builds on the classes here

    fast = fastparse.parse(doc)
    obj = fast if fast is not None else model.model_validate(doc)
    assert isinstance(
        obj, Service | EndpointSlice | Pod | Node | Namespace | LocalRedirectPolicy | BalancingPolicy
    )
    return obj


ObjectRef = tuple[str, str, str]  # (kind, namespace, name); namespace "" for the cluster-scoped kinds


def ref(obj: KubeObject) -> ObjectRef:
    """The object's identity. Namespaces and the policy kinds are cluster-scoped: their namespace is always ""
    (a ``metadata.namespace`` in a manifest is dropped when parsing, as the API server ignores it)."""
    return (obj.kind, obj.metadata.namespace, obj.metadata.name)
