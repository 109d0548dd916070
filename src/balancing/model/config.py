"""How the model is configured: one frozen ``ModelConfig`` the agent builds from its flags.

Everything here is plain data; ``parse_cidrs`` turns command-line text into networks with a readable error.
Neighbours: ``store.ClusterStore`` takes a ``ModelConfig``; ``frontends`` reads it (through ``NodeContext``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from balancing.model.desired import IPAddress

__all__ = ["IPNetwork", "ModelConfig", "parse_cidrs"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The node the desired state is for, and the choices that differ between kube-proxy and Cilium.

    ``node_name``: this node's name as in Node objects and endpoints' ``nodeName``. In ``external_client``
    mode it names the host the agent runs on, which usually is no Node at all.

    ``nodeport_cidrs``: like kube-proxy's ``--nodeport-addresses``: NodePort frontends only on node addresses
    inside one of these networks. Empty (the default) means every InternalIP/ExternalIP of every Node, plus
    the loopback addresses; when given, loopback is included only if a network contains it
    (``127.0.0.0/8``, ``::1/128``).

    ``external_ips_local_only``: Cilium's CVE-2020-8554 mitigation: translate a Service's externalIP only
    when it is one of this node's own addresses (its Node's InternalIP/ExternalIP). Default ``False`` is
    kube-proxy's choice: clients on every node get the externalIP translated.

    ``external_client``: bare-metal mode: the agent runs on a host outside the cluster, so every client it
    translates is a genuinely external one. ``externalTrafficPolicy: Local`` then restricts NodePort,
    load-balancer and externalIP frontends (see ``endpoints.select_endpoints``), no loopback NodePort
    frontend exists, and no health check node port is served.

    ``north_south``: the agent also translates packets from outside the cluster on this node's devices (TC):
    frontends external clients reach through this node are marked ``external`` (see ``desired.Frontend``).
    Never with ``external_client``.
    """

    node_name: str
    nodeport_cidrs: tuple[IPNetwork, ...] = ()
    external_ips_local_only: bool = False
    external_client: bool = False
    north_south: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.node_name, str):
            raise TypeError(f"node_name must be a str, not {type(self.node_name).__name__}")
        if not isinstance(self.nodeport_cidrs, tuple):  # a list would make the config unhashable
            object.__setattr__(self, "nodeport_cidrs", tuple(self.nodeport_cidrs))

    def nodeport_allows(self, ip: IPAddress) -> bool:
        """Whether a NodePort frontend may exist on ``ip`` (any address when no CIDR is configured)."""
        return not self.nodeport_cidrs or any(ip in net for net in self.nodeport_cidrs)


def parse_cidrs(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Networks from text such as ``10.0.0.0/8`` or ``fd00::/64`` (host bits allowed, as kube-proxy).

    Raises ``ValueError`` naming the bad entry. Empty strings are skipped, so ``"a,b".split(",")`` of an
    empty flag gives no networks.
    """
    found: list[IPNetwork] = []
    for raw in texts:
        text = raw.strip()
        if not text:
            continue
        try:
            found.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/64)") from None
    return tuple(found)
