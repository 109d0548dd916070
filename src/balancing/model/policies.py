"""The two policy kinds of ``balancing.elf.io/v1beta1``: ``LocalRedirectPolicy`` and ``BalancingPolicy``.

Typed and validated like ``objects`` (camelCase, unknown fields ignored, errors whose location names the
field). Both kinds are cluster-scoped (a ``metadata.namespace`` is dropped) and share:

- ``spec.frontend``: exactly one of ``serviceMatcher {serviceName, namespace, toPorts?}`` (the Service's
  ClusterIPs; without ``toPorts`` every Service port; the names as the API server checks a Service's) or
  ``addressMatcher {ip, toPorts}`` (a custom VIP);
- ``toPorts[]``: ``{port: "1".."65535" (a number is accepted too), protocol: TCP|UDP, name?}``; in a list of
  more than one every port is named and names are unique; a frontend lists each port/protocol once;
- port pairing: one frontend port and one backend port map directly; otherwise by name, and the frontend's
  names must be exactly the backend's (``pair_ports``); paired ports have the same protocol;
- ``spec.config``: ``nodeLabelSelector`` (applies only on matching nodes) and ``enableOutCluster`` (default
  true: applies on a host outside the cluster); ``spec.enabled`` (upstream's, default true).

``LocalRedirectPolicy`` adds ``spec.backend {endpointSelector, toPorts}`` (ready pods on this node),
``spec.skipRedirectFromBackend`` and ``spec.config.qosLimit``. ``BalancingPolicy``'s ``spec.backend`` is
exactly one of ``serviceEndpoint {endpointSelector, toPorts, redirectMode}`` (ready pods anywhere;
``redirectMode`` podEndpoint | hostPort | nodeProxy) or ``addressEndpoint {addresses[], toPorts}``.
``status`` is what the agents and the controller reported (``model.status``), read leniently: it never makes
a policy invalid and changes nothing a policy does.
What they do on a node is ``policy_frontends``; how they layer over Services is ``layering``.
"""

from __future__ import annotations

import ipaddress
import re
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from balancing.model.desired import IPAddress, Protocol
from balancing.model.meta import ObjectMeta, PrunedModel, check_dns1035_label, check_dns1123_label
from balancing.model.selectors import LabelSelector
from balancing.model.status import ObservedStatus, parse_status

__all__ = [
    "BALANCING_POLICY",
    "LOCAL_REDIRECT_POLICY",
    "MAX_PORTS",
    "QOS_LIMIT_MAX",
    "REDIRECT_MODES",
    "AddressEndpoint",
    "AddressMatcher",
    "BalancingBackend",
    "BalancingPolicy",
    "BalancingSpec",
    "LocalRedirectBackend",
    "LocalRedirectConfig",
    "LocalRedirectPolicy",
    "LocalRedirectSpec",
    "NamedPort",
    "ObservedStatus",
    "Policy",
    "PolicyConfig",
    "PolicyFrontend",
    "PolicyPort",
    "RedirectMode",
    "ServiceEndpoint",
    "ServiceMatcher",
    "describe_port",
    "pair_ports",
]

LOCAL_REDIRECT_POLICY = "LocalRedirectPolicy"
BALANCING_POLICY = "BalancingPolicy"
RedirectMode = Literal["podEndpoint", "hostPort", "nodeProxy"]
REDIRECT_MODES: tuple[RedirectMode, ...] = ("podEndpoint", "hostPort", "nodeProxy")
QOS_LIMIT_MAX = 2**32 - 1  # the datapath keeps it in a u32

MAX_PORTS = 64  # per toPorts list, as the CRDs bound them
MAX_ADDRESSES = 64  # per addressEndpoint, as the CRD bounds them (the API server's CEL cost budget)
_PORT_TEXT = re.compile(r"[1-9][0-9]{0,4}")  # with fullmatch ("$" would let a trailing newline through)
_PORT_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
_PORT_NAME_MAX = 63


# --- ports -----------------------------------------------------------------------------------------------


def _port_number(value: Any) -> int:
    """``"53"`` or ``53`` → 53; anything else, or outside 1-65535, is an error naming the value."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _PORT_TEXT.fullmatch(value):
        number = int(value)
    if number is None or not 1 <= number <= 65535:
        raise ValueError(f'port must be 1-65535, as a string of digits such as "53" (got {value!r})')
    return number


def _policy_protocol(value: Any) -> Protocol:
    if isinstance(value, Protocol) and value in (Protocol.TCP, Protocol.UDP):
        return value
    if value in ("TCP", "UDP"):
        return Protocol[value]
    raise ValueError(f"protocol must be TCP or UDP (got {value!r})")


def _port_name(value: str) -> str:
    if value and (len(value) > _PORT_NAME_MAX or not _PORT_NAME.fullmatch(value)):
        raise ValueError(
            f"port name {value!r}: 1-63 letters, digits and '-', starting and ending with a letter or digit"
        )
    return value


class PolicyPort(PrunedModel):
    port: Annotated[int, BeforeValidator(_port_number)]
    protocol: Annotated[Protocol, BeforeValidator(_policy_protocol)]
    name: Annotated[str, AfterValidator(_port_name)] = ""

    def __str__(self) -> str:
        return describe_port(self)


class NamedPort(typing.Protocol):
    """A port with a number, protocol and name: a ``PolicyPort`` or one taken from a Service."""

    @property
    def port(self) -> int: ...

    @property
    def protocol(self) -> Protocol: ...

    @property
    def name(self) -> str: ...


def describe_port(port: NamedPort) -> str:
    """``53/UDP (dns)``, or ``53/UDP`` without a name."""
    text = f"{port.port}/{port.protocol.name}"
    return f"{text} ({port.name})" if port.name else text


def _named_list(ports: list[PolicyPort]) -> list[PolicyPort]:
    if len(ports) > 1:
        for i, port in enumerate(ports):
            if not port.name:
                raise ValueError(f"with more than one port every port needs a name (toPorts[{i}] has none)")
    seen: set[str] = set()
    for port in ports:
        if port.name in seen:
            raise ValueError(f"port name {port.name!r} is used more than once")
        seen.add(port.name)
    return ports


def _frontend_list(ports: list[PolicyPort]) -> list[PolicyPort]:
    _named_list(ports)
    seen: set[tuple[int, Protocol]] = set()
    for port in ports:
        if (port.port, port.protocol) in seen:
            raise ValueError(f"port {port.port}/{port.protocol.name} is listed more than once")
        seen.add((port.port, port.protocol))
    return ports


FrontendPorts = Annotated[list[PolicyPort], Field(max_length=MAX_PORTS), AfterValidator(_frontend_list)]
BackendPorts = Annotated[list[PolicyPort], Field(max_length=MAX_PORTS), AfterValidator(_named_list)]

_F = typing.TypeVar("_F", bound=NamedPort)


def pair_ports(
    front: Sequence[_F], back: Sequence[PolicyPort]
) -> tuple[list[tuple[_F, PolicyPort]], list[str]]:
    """Each frontend port's backend port, and a sentence per frontend port that has none.

    One port on each side: they map directly. Otherwise by name. A pair whose protocols differ is no pair
    (a connect cannot change its protocol). Validation (``check_pairing``) makes explicit lists pair up
    completely; a serviceMatcher without ``toPorts`` pairs the Service's ports here, at run time.
    """
    pairs: list[tuple[_F, PolicyPort]] = []
    problems: list[str] = []
    by_name = {b.name: b for b in back if b.name}
    for f in front:
        if len(front) == 1 and len(back) == 1:
            b: PolicyPort | None = back[0]
        else:
            b = by_name.get(f.name) if f.name else None
        if b is None:
            named = f"named {f.name!r}" if f.name else "for an unnamed port"
            problems.append(f"frontend port {describe_port(f)} has no backend port {named}")
        elif b.protocol != f.protocol:
            problems.append(
                f"frontend port {describe_port(f)} and backend port {describe_port(b)} differ in protocol"
            )
        else:
            pairs.append((f, b))
    return pairs, problems


def check_pairing(front: Sequence[PolicyPort], back: Sequence[PolicyPort]) -> None:
    """``ValueError`` unless explicit frontend and backend port lists pair up completely."""
    _, problems = pair_ports(front, back)
    if len(front) != 1 or len(back) != 1:
        front_names = {f.name for f in front}
        problems += [f"backend port {b} has no frontend port named {b.name!r}" for b in back
                     if b.name not in front_names]  # fmt: skip
    if problems:
        raise ValueError("toPorts do not pair with the frontend's toPorts: " + "; ".join(problems))


# --- addresses -------------------------------------------------------------------------------------------


def _ip(value: Any) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip = value
    elif isinstance(value, str) and value.strip() == value and "%" not in value:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    else:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address")
    if ip.is_unspecified:
        raise ValueError(f"{value!r} is the unspecified address")
    return ip


PolicyIP = Annotated[IPAddress, BeforeValidator(_ip)]


def _at_most_addresses(value: list[IPAddress]) -> list[IPAddress]:
    # checked after the items (a max_length would hide every bad address behind the count)
    if len(value) > MAX_ADDRESSES:
        raise ValueError(f"at most {MAX_ADDRESSES} addresses (got {len(value)})")
    return value


# --- frontend --------------------------------------------------------------------------------------------


class ServiceMatcher(PrunedModel):
    service_name: Annotated[str, Field(min_length=1), AfterValidator(check_dns1035_label)]  # a Service's name
    namespace: Annotated[str, Field(min_length=1), AfterValidator(check_dns1123_label)]
    to_ports: FrontendPorts = Field(default_factory=list)  # empty: every port of the Service


class AddressMatcher(PrunedModel):
    ip: PolicyIP
    to_ports: FrontendPorts = Field(min_length=1)


class PolicyFrontend(PrunedModel):
    service_matcher: ServiceMatcher | None = None
    address_matcher: AddressMatcher | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PolicyFrontend:
        if (self.service_matcher is None) == (self.address_matcher is None):
            raise ValueError("exactly one of serviceMatcher or addressMatcher")
        return self

    @property
    def ports(self) -> list[PolicyPort]:
        """The explicit frontend ports (empty for a serviceMatcher meaning every Service port)."""
        matcher = self.service_matcher or self.address_matcher
        assert matcher is not None
        return matcher.to_ports

    def __str__(self) -> str:
        ports = ",".join(describe_port(p) for p in self.ports)
        if self.address_matcher is not None:
            ip = self.address_matcher.ip
            return f"address {f'[{ip}]' if ip.version == 6 else ip} {ports}"
        assert self.service_matcher is not None
        m = self.service_matcher
        return f"Service {m.namespace}/{m.service_name} {ports or 'all ports'}"


# --- config ----------------------------------------------------------------------------------------------


class PolicyConfig(PrunedModel):
    node_label_selector: LabelSelector | None = None  # None: every node
    enable_out_cluster: StrictBool = True  # applies on a host outside the cluster (external_client mode)


class LocalRedirectConfig(PolicyConfig):
    qos_limit: StrictInt = Field(default=0, ge=0, le=QOS_LIMIT_MAX)  # redirections/second/node; 0 = none


# --- LocalRedirectPolicy ---------------------------------------------------------------------------------


class LocalRedirectBackend(PrunedModel):
    endpoint_selector: LabelSelector
    to_ports: BackendPorts = Field(min_length=1)


def _pair_with_frontend(backend_ports: Sequence[PolicyPort], info: ValidationInfo) -> None:
    frontend = info.data.get("frontend")
    if isinstance(frontend, PolicyFrontend) and frontend.ports:
        check_pairing(frontend.ports, backend_ports)


# What the agents and the controller reported (``model.status``): read leniently, never a validation error.
StatusField = Annotated[ObservedStatus, BeforeValidator(parse_status)]


def _drop_namespace(data: Any) -> Any:
    """Cluster-scoped: a namespace in the manifest is ignored (as the API server does)."""
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict) and "namespace" in data["metadata"]:
        meta = {k: v for k, v in data["metadata"].items() if k != "namespace"}
        return {**data, "metadata": meta}
    return data


class LocalRedirectSpec(PrunedModel):
    enabled: StrictBool = True
    frontend: PolicyFrontend
    backend: LocalRedirectBackend
    skip_redirect_from_backend: StrictBool = False
    config: LocalRedirectConfig = Field(default_factory=LocalRedirectConfig)

    @field_validator("backend")
    @classmethod
    def _pairing(cls, value: LocalRedirectBackend, info: ValidationInfo) -> LocalRedirectBackend:
        _pair_with_frontend(value.to_ports, info)
        return value


class LocalRedirectPolicy(PrunedModel):
    kind: Literal["LocalRedirectPolicy"] = "LocalRedirectPolicy"
    metadata: ObjectMeta
    spec: LocalRedirectSpec
    status: StatusField = Field(default_factory=ObservedStatus)

    @model_validator(mode="before")
    @classmethod
    def _cluster_scoped(cls, data: Any) -> Any:
        return _drop_namespace(data)


# --- BalancingPolicy -------------------------------------------------------------------------------------


class ServiceEndpoint(PrunedModel):
    endpoint_selector: LabelSelector
    to_ports: BackendPorts = Field(min_length=1)
    redirect_mode: RedirectMode = "podEndpoint"


class AddressEndpoint(PrunedModel):
    addresses: Annotated[list[PolicyIP], AfterValidator(_at_most_addresses)] = Field(min_length=1)
    to_ports: BackendPorts = Field(min_length=1)


class BalancingBackend(PrunedModel):
    service_endpoint: ServiceEndpoint | None = None
    address_endpoint: AddressEndpoint | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BalancingBackend:
        if (self.service_endpoint is None) == (self.address_endpoint is None):
            raise ValueError("exactly one of serviceEndpoint or addressEndpoint")
        return self

    @property
    def to_ports(self) -> list[PolicyPort]:
        chosen = self.service_endpoint or self.address_endpoint
        assert chosen is not None
        return chosen.to_ports


class BalancingSpec(PrunedModel):
    enabled: StrictBool = True
    frontend: PolicyFrontend
    backend: BalancingBackend
    config: PolicyConfig = Field(default_factory=PolicyConfig)

    @field_validator("backend")
    @classmethod
    def _pairing(cls, value: BalancingBackend, info: ValidationInfo) -> BalancingBackend:
        _pair_with_frontend(value.to_ports, info)
        return value


class BalancingPolicy(PrunedModel):
    kind: Literal["BalancingPolicy"] = "BalancingPolicy"
    metadata: ObjectMeta
    spec: BalancingSpec
    status: StatusField = Field(default_factory=ObservedStatus)

    @model_validator(mode="before")
    @classmethod
    def _cluster_scoped(cls, data: Any) -> Any:
        return _drop_namespace(data)


Policy = LocalRedirectPolicy | BalancingPolicy
