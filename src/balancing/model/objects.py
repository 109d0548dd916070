"""Typed Kubernetes objects the model reads: Service, EndpointSlice, Pod, Node (the fields we use) and the
two policy kinds of ``balancing.elf.io/v1beta1`` (defined in ``policies``, registered here in ``KINDS``).

Parsed from the API's JSON shape (camelCase); unknown fields are ignored so real manifests and API objects
load as they are. Validation errors are pydantic ``ValidationError``s whose locations name the field; the
sources turn them into errors naming the file or object. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator

from balancing.model.desired import IPAddress, Protocol, parse_ip
from balancing.model.meta import KubeModel, ObjectMeta, Port, ProtocolField
from balancing.model.policies import BalancingPolicy, LocalRedirectPolicy

__all__ = [
    "KINDS",
    "POLICY_API_VERSION",
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
    "Node",
    "NodeAddress",
    "NodeStatus",
    "ObjectMeta",
    "ObjectRef",
    "Pod",
    "PodCondition",
    "PodIP",
    "PodSpec",
    "PodStatus",
    "Port",
    "ProtocolField",
    "Service",
    "ServicePort",
    "ServiceSpec",
    "ServiceStatus",
    "SessionAffinityConfig",
    "UnknownKind",
    "parse_object",
    "ref",
]


# --- Service -------------------------------------------------------------------------------------------


class ServicePort(KubeModel):
    name: str = ""
    protocol: ProtocolField = Protocol.TCP
    port: Port
    target_port: int | str | None = None
    node_port: int | None = None

    @field_validator("target_port")
    @classmethod
    def _target_port(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 65535:
            raise ValueError("targetPort must be 1-65535 or a port name")
        if isinstance(value, str) and value.isdigit():
            return int(value)
        return value


class ClientIPConfig(KubeModel):
    timeout_seconds: int = Field(default=10800, ge=1, le=86400)


class SessionAffinityConfig(KubeModel):
    client_ip: ClientIPConfig | None = Field(default=None, alias="clientIP")


class ServiceSpec(KubeModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    selector: dict[str, str] | None = None
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    ports: list[ServicePort] = Field(default_factory=list)
    external_ips: list[IPAddress] = Field(default_factory=list, alias="externalIPs")
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    internal_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    health_check_node_port: int | None = None
    publish_not_ready_addresses: bool = False
    traffic_distribution: str | None = None
    ip_families: list[Literal["IPv4", "IPv6"]] = Field(default_factory=list)

    @field_validator("cluster_ip")
    @classmethod
    def _cluster_ip(cls, value: str | None) -> str | None:
        if value not in (None, "", "None"):
            ipaddress.ip_address(value)
        return value

    @field_validator("cluster_ips")
    @classmethod
    def _cluster_ips(cls, value: list[str]) -> list[str]:
        for ip in value:
            if ip != "None":
                ipaddress.ip_address(ip)
        return value

    def service_ips(self) -> list[IPAddress]:
        """Every ClusterIP of the service (``clusterIPs``, else ``clusterIP``); empty for headless."""
        raw = self.cluster_ips or ([self.cluster_ip] if self.cluster_ip else [])
        return [parse_ip(ip) for ip in raw if ip not in ("", "None")]


class LoadBalancerIngress(KubeModel):
    ip: IPAddress | None = None
    hostname: str | None = None
    ip_mode: Literal["VIP", "Proxy"] | None = None


class LoadBalancerStatus(KubeModel):
    ingress: list[LoadBalancerIngress] = Field(default_factory=list)


class ServiceStatus(KubeModel):
    load_balancer: LoadBalancerStatus = Field(default_factory=LoadBalancerStatus)


class Service(KubeModel):
    kind: Literal["Service"] = "Service"
    metadata: ObjectMeta
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: ServiceStatus = Field(default_factory=ServiceStatus)


# --- EndpointSlice -------------------------------------------------------------------------------------


class EndpointConditions(KubeModel):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(KubeModel):
    name: str


class ForNode(KubeModel):
    name: str


class EndpointHints(KubeModel):
    for_zones: list[ForZone] = Field(default_factory=list)
    for_nodes: list[ForNode] = Field(default_factory=list)


class Endpoint(KubeModel):
    addresses: list[str] = Field(min_length=1)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    node_name: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None


class EndpointPort(KubeModel):
    name: str | None = ""
    protocol: ProtocolField = Protocol.TCP
    port: Port | None = None


class EndpointSlice(KubeModel):
    kind: Literal["EndpointSlice"] = "EndpointSlice"
    metadata: ObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] | None = None


# --- Pod and Node --------------------------------------------------------------------------------------


class ContainerPort(KubeModel):
    name: str = ""
    container_port: Port
    protocol: ProtocolField = Protocol.TCP
    host_port: int | None = None


class Container(KubeModel):
    name: str
    ports: list[ContainerPort] = Field(default_factory=list)


class PodSpec(KubeModel):
    node_name: str = ""
    host_network: bool = False
    containers: list[Container] = Field(default_factory=list)


class PodCondition(KubeModel):
    type: str
    status: str


class PodIP(KubeModel):
    ip: IPAddress


class ContainerStatus(KubeModel):
    name: str
    container_id: str = Field(default="", alias="containerID")  # "containerd://<id>", "cri-o://<id>", ...


class PodStatus(KubeModel):
    phase: str = ""
    pod_ip: IPAddress | None = Field(default=None, alias="podIP")
    pod_ips: list[PodIP] = Field(default_factory=list, alias="podIPs")
    conditions: list[PodCondition] = Field(default_factory=list)
    container_statuses: list[ContainerStatus] = Field(default_factory=list)
    init_container_statuses: list[ContainerStatus] = Field(default_factory=list)
    ephemeral_container_statuses: list[ContainerStatus] = Field(default_factory=list)

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
    address: str


class NodeStatus(KubeModel):
    addresses: list[NodeAddress] = Field(default_factory=list)


class Node(KubeModel):
    kind: Literal["Node"] = "Node"
    metadata: ObjectMeta
    status: NodeStatus = Field(default_factory=NodeStatus)


KubeObject = Service | EndpointSlice | Pod | Node | LocalRedirectPolicy | BalancingPolicy

POLICY_API_VERSION = "balancing.elf.io/v1beta1"
KINDS: dict[tuple[str, str], type[KubeModel]] = {
    ("v1", "Service"): Service,
    ("discovery.k8s.io/v1", "EndpointSlice"): EndpointSlice,
    ("v1", "Pod"): Pod,
    ("v1", "Node"): Node,
    (POLICY_API_VERSION, "LocalRedirectPolicy"): LocalRedirectPolicy,
    (POLICY_API_VERSION, "BalancingPolicy"): BalancingPolicy,
}


class UnknownKind(ValueError):
    """The document's apiVersion/kind is not one the model reads (sources skip it with a warning)."""


def parse_object(doc: dict[str, Any]) -> KubeObject:
    """Validate one Kubernetes object document; raises ``UnknownKind`` or pydantic ``ValidationError``."""
    key = (str(doc.get("apiVersion", "")), str(doc.get("kind", "")))
    model = KINDS.get(key)
    if model is None:
        raise UnknownKind(f"apiVersion {key[0]!r} kind {key[1]!r} is not read by balancing")
    obj = model.model_validate(doc)
    assert isinstance(obj, Service | EndpointSlice | Pod | Node | LocalRedirectPolicy | BalancingPolicy)
    return obj


ObjectRef = tuple[str, str, str]  # (kind, namespace, name); namespace "" for Nodes and the policy kinds


def ref(obj: KubeObject) -> ObjectRef:
    """The object's identity. The policy kinds are cluster-scoped: their namespace is always "" (a
    ``metadata.namespace`` in a manifest is dropped when parsing, as the API server ignores it)."""
    return (obj.kind, obj.metadata.namespace, obj.metadata.name)
