"""The desired state of one node: the contract between the model and the datapath.

A ``DesiredState`` maps each ``FrontendKey`` (address, port, protocol) to a ``Frontend``: who owns it and the
ordered backends new connections may use. An empty backend tuple is meaningful: the frontend is known but
has no usable endpoint, so the datapath refuses connections (ECONNREFUSED) instead of letting them through.
A frontend marked ``external`` is also served north-south: packets from outside the cluster arriving at this
node's devices get one of ``north_south_backends`` (the TC programs, beside the socket hooks). Beside the
frontends, ``excluded_pods``: this node's pods whose processes socket LB leaves alone (their
connections are neither translated nor counted). The datapath reads these types and nothing else from the
model.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress:
    """``ipaddress.ip_address`` for text, several times faster (inet_pton in C; same errors). An IPv6 zone
    (``fe80::1%eth0``) is refused: a frontend or backend address has none."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    except OSError:
        raise ValueError(f"{text!r} does not appear to be an IPv4 or IPv6 address") from None


class Protocol(enum.IntEnum):
    """Transport protocols, numbered as IP protocol numbers (the datapath stores these)."""

    TCP = 6
    UDP = 17
    SCTP = 132


# Frozen dataclasses made by the million (a Backend per endpoint) get an ``__init__`` of their own that sets
# each slot through its descriptor (``_slot_setters``) rather than the generated one's
# ``object.__setattr__`` by name: the same object, made in two thirds of the time.


@dataclass(frozen=True, slots=True, init=False)
class FrontendKey:
    """What a client connects to: address, port and protocol."""

    ip: IPAddress
    port: int
    protocol: Protocol
    # Hashed once: a key is hashed a dozen times on its way through the store (ipaddress's own __hash__
    # formats the address as hex text each time).
    _hash: int = field(init=False, repr=False, compare=False)

    def __init__(self, ip: IPAddress, port: int, protocol: Protocol) -> None:
        set_ip, set_port, set_protocol, set_hash = _KEY_SLOTS
        set_ip(self, ip)
        set_port(self, port)
        set_protocol(self, protocol)
        set_hash(self, hash((int(ip), port, protocol)))

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: FrontendKey) -> bool:  # IPv4 before IPv6 (ipaddress refuses to compare them)
        return (self.ip.version, int(self.ip), self.port, self.protocol) < (
            other.ip.version,
            int(other.ip),
            other.port,
            other.protocol,
        )

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}/{self.protocol.name}"


def _slot_setters(cls: type, *names: str) -> tuple[Callable[[object, Any], None], ...]:
    """The ``__set__`` of each named slot's descriptor (what a frozen dataclass's own ``__init__`` calls
    through ``object.__setattr__``)."""
    return tuple(vars(cls)[name].__set__ for name in names)


_KEY_SLOTS = _slot_setters(FrontendKey, "ip", "port", "protocol", "_hash")


@dataclass(frozen=True, slots=True, init=False)
class Backend:
    """Where a translated connection goes."""

    ip: IPAddress
    port: int

    def __init__(self, ip: IPAddress, port: int) -> None:
        set_ip, set_port = _BACKEND_SLOTS
        set_ip(self, ip)
        set_port(self, port)

    def __hash__(self) -> int:
        return hash((int(self.ip), self.port))

    def __lt__(self, other: Backend) -> bool:
        return (self.ip.version, int(self.ip), self.port) < (other.ip.version, int(other.ip), other.port)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}"


_BACKEND_SLOTS = _slot_setters(Backend, "ip", "port")


@dataclass(frozen=True, slots=True, init=False)
class Owner:
    """The object a frontend comes from, for names in tools and events."""

    kind: str  # "Service" (later also the policy kinds)
    namespace: str
    name: str
    port_name: str = ""

    def __init__(self, kind: str, namespace: str, name: str, port_name: str = "") -> None:
        set_kind, set_namespace, set_name, set_port_name = _OWNER_SLOTS
        set_kind(self, kind)
        set_namespace(self, namespace)
        set_name(self, name)
        set_port_name(self, port_name)

    def __str__(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {ns}{self.name}{port}"


_OWNER_SLOTS = _slot_setters(Owner, "kind", "namespace", "name", "port_name")


@dataclass(frozen=True, slots=True, order=True)
class PodRef:
    """A pod, as the agent finds its cgroups (kubelet names them by pod UID)."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class BackendPod:
    """A backend that is a pod on this node: connections from that pod get the loop guard (never redirected
    to itself) and, with ``skip_redirect_from_backends``, are not redirected at all."""

    pod: PodRef
    backend: Backend


class FrontendKind(enum.Enum):
    """Which Service address a frontend comes from (selection rules and tools depend on it)."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_IP = "ExternalIP"


@dataclass(frozen=True, slots=True)
class Frontend:
    """One frontend's owner and backends (sorted, deduplicated; empty means refuse)."""

    owner: Owner
    backends: tuple[Backend, ...]
    reason: str = ""  # why the backend set is what it is (e.g. "terminating fallback"), for tools
    kind: FrontendKind = FrontendKind.CLUSTER_IP
    affinity_timeout: int = 0  # sessionAffinity ClientIP: seconds a client keeps its backend; 0 = none
    # Policies (LocalRedirectPolicy, BalancingPolicy) layer frontends: when the primary ``backends`` are
    # skipped for a connection (loop guard, skipRedirectFromBackend, QoS limit), ``fallback`` is the next
    # match (a BalancingPolicy's or the Service's backends); None means such a connection is refused.
    fallback: tuple[Backend, ...] | None = None
    fallback_owner: Owner | None = None
    backend_pods: tuple[BackendPod, ...] = ()  # the primary backends that are pods on this node
    skip_redirect_from_backends: bool = False
    qos_limit: int = 0  # primary redirections per second on this node; beyond, the fallback; 0 = none
    host_only: bool = False  # only clients in the host network namespace (loopback NodePorts)
    # North-south (ModelConfig.north_south): packets from outside the cluster arriving at this node for this
    # frontend (this node's NodePort addresses, load-balancer IPs, externalIPs) are translated on its devices.
    external: bool = False
    # What those external clients get, when it differs from ``backends`` (externalTrafficPolicy Local: this
    # node's endpoints only); None: ``backends``. Empty: dropped (no local endpoint).
    external_backends: tuple[Backend, ...] | None = None
    external_local: bool = False  # externalTrafficPolicy Local (names the drop when there is no backend)
    local_backends: frozenset[Backend] = frozenset()  # the backends that are pods on this node (no SNAT)
    source_ranges: tuple[IPNetwork, ...] = ()  # loadBalancerSourceRanges (LoadBalancer IPs only); () = any
    external_reason: str = ""  # why ``external_backends`` is what it is, for tools

    @property
    def north_south_backends(self) -> tuple[Backend, ...]:
        """The backends external clients reach (Maglev picks among them)."""
        return self.backends if self.external_backends is None else self.external_backends

    def programmed_as(self) -> tuple[object, ...]:
        """What the datapath programs of this frontend (a change in anything else needs no map write)."""
        return (
            self.backends,
            self.affinity_timeout,
            self.fallback,
            self.backend_pods,
            self.skip_redirect_from_backends,
            self.qos_limit,
            self.host_only,
            self.external,
            self.kind if self.external else None,  # a NodePort is flagged for north-south
            self.external_backends,
            self.external_local,
            self.local_backends,
            self.source_ranges,
        )


@dataclass(slots=True)
class DesiredState:
    """Every frontend this node's datapath should translate, and the pods on this node it must leave alone
    (pod annotation or Namespace label ``balancing.elf.io/socket-lb: disabled``)."""

    frontends: dict[FrontendKey, Frontend] = field(default_factory=dict)
    excluded_pods: frozenset[PodRef] = frozenset()


@dataclass(frozen=True, slots=True)
class FrontendChanges:
    """An incremental change: frontends to set (added or changed) and keys to remove; and, when it changed,
    the whole new set of excluded pods (None: unchanged)."""

    upsert: dict[FrontendKey, Frontend]
    remove: frozenset[FrontendKey]
    excluded_pods: frozenset[PodRef] | None = None

    def __bool__(self) -> bool:
        return bool(self.upsert or self.remove) or self.excluded_pods is not None

    def without(self, keys: Collection[FrontendKey]) -> FrontendChanges:
        """The same change less ``keys`` (e.g. the frontends a write could not program)."""
        if not keys:
            return self
        return FrontendChanges(
            {k: f for k, f in self.upsert.items() if k not in keys},
            self.remove.difference(keys),
            self.excluded_pods,
        )
