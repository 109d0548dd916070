"""Endpoint selection: which of a service port's endpoints new connections may use on this node.

One pure function, ``select_endpoints``, following kube-proxy's ``CategorizeEndpoints``
(``pkg/proxy/topology.go``): a cluster-wide set (with topology hints when they apply) and a node-local set,
each with its own ready → serving-and-terminating fallback, plus their union and whether any endpoint is
usable anywhere. Every set carries the *reason* it is what it is, as data, for ``balancing trace``.

Topology, as current kube-proxy (the Service's annotation or ``trafficDistribution`` is not read: the
EndpointSlice controller only writes hints for Services that opted in, and a proxy honours what it finds):
only the cluster set's *ready* endpoints are filtered, and only they are looked at. If every one carries a
node hint (``hints.forNodes``) and some name this node, those are used; otherwise, if every one carries a
zone hint (``hints.forZones``) and some name this node's ``topology.kubernetes.io/zone`` label, those are
used; otherwise all of them. So a node without the zone label ignores zone hints, and the
serving-terminating fallback and the local set (traffic policy Local) never use hints.

On top of kube-proxy's sets, ``Selection.for_frontend`` says which set each frontend kind uses:

- ClusterIP: ``internal`` (the local set with internalTrafficPolicy Local, else the cluster set).
- NodePort, LoadBalancer, externalIP (``external``): the clients a socket LB translates are on this node,
  i.e. inside the cluster, and kube-proxy short-circuits in-cluster clients to the cluster set even with
  externalTrafficPolicy Local. Only when the agent runs outside the cluster (``external_client``) does eTP
  Local restrict them: a NodePort on node X's address uses the endpoints on X (``arriving``, each node's set
  with its own terminating fallback); a load-balancer IP or externalIP uses the ready endpoints on any node,
  else the serving-terminating ones, topology ignored (a simplification of "the union of every node's local
  set": the load balancer only sends to nodes whose health check says they have local endpoints).

Neighbours: ``frontends`` turns EndpointSlices and Pods into ``Candidate``s (``candidate_of`` for endpoints
whose backends it keeps; candidates already in order need no sorting: ``select_endpoints(..., ordered=True)``)
and reads the result; nothing here knows about Kubernetes objects. Candidates and the result types are plain
slotted dataclasses, never changed once made: one is made per endpoint on every recomputation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from balancing.model import desired

__all__ = [
    "Candidate",
    "EndpointSet",
    "Selection",
    "SelectionContext",
    "candidate_of",
    "select_endpoints",
]

ZONE_LABEL = "topology.kubernetes.io/zone"  # the Node label zone hints are matched against


@dataclass(slots=True, unsafe_hash=True)
class Candidate:
    """One endpoint of one service port, as the selection sees it (conditions already defaulted).

    Never changed once made, but not a frozen dataclass: one is made per endpoint and port, and a frozen
    one costs seven times as much to make (each field set through ``object.__setattr__``).
    """

    ip: desired.IPAddress
    port: int
    node_name: str = ""
    zone: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    # Made with the candidate (not compared): every frontend that chooses it shares this one object.
    backend: desired.Backend = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.backend = desired.Backend(self.ip, self.port)

    @property
    def fallback(self) -> bool:
        """Usable only when nothing is ready: still serving while terminating."""
        return self.serving and self.terminating

    def __str__(self) -> str:
        return str(self.backend)


_NO_HINTS: frozenset[str] = frozenset()


def candidate_of(
    backend: desired.Backend,
    node_name: str,
    zone: str,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: frozenset[str] = _NO_HINTS,
    node_hints: frozenset[str] = _NO_HINTS,
) -> Candidate:
    """``Candidate(backend.ip, backend.port, ...)`` that shares ``backend`` rather than making its own (for a
    caller that keeps its endpoints' backends: every frontend choosing the endpoint then holds that one)."""
    made = object.__new__(Candidate)
    made.ip, made.port, made.backend = backend.ip, backend.port, backend
    made.node_name, made.zone = node_name, zone
    made.ready, made.serving, made.terminating = ready, serving, terminating
    made.zone_hints, made.node_hints = zone_hints, node_hints
    return made


@dataclass(frozen=True, slots=True)
class SelectionContext:
    """This node and the service's policies, as far as selection needs them."""

    node_name: str
    zone: str = ""
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    externally_accessible: bool = False  # has a nodePort, externalIPs or load-balancer IPs
    external_client: bool = False  # clients are outside the cluster (bare-metal mode): eTP Local applies

    @property
    def external_restricted(self) -> bool:
        """Whether eTP Local restricts what this node's clients of external frontends get."""
        return self.external_client and self.external_local and self.externally_accessible

    @property
    def uses_cluster(self) -> bool:
        # External frontends need the cluster set even with eTP Local: in-cluster clients short-circuit to it.
        return not self.internal_local or self.externally_accessible

    @property
    def uses_local(self) -> bool:
        return self.internal_local or (self.externally_accessible and self.external_local)


@dataclass(slots=True)
class EndpointSet:
    """Chosen endpoints (sorted by address and port) and why. Never changed once made (not frozen, as
    ``Candidate``: a few are made per service port on every recomputation)."""

    endpoints: tuple[Candidate, ...]
    reason: str

    @property
    def backends(self) -> tuple[desired.Backend, ...]:
        return tuple([c.backend for c in self.endpoints])


@dataclass(slots=True)
class Selection:
    """The result. ``None`` means "the service never uses this set", unlike an empty set. Never changed once
    made (not frozen, as ``EndpointSet``)."""

    cluster: EndpointSet | None
    local: EndpointSet | None
    all_reachable: EndpointSet  # union of both (kube-proxy's allReachableEndpoints)
    has_any: bool  # some endpoint is usable somewhere in the cluster (even if none is reachable here)
    internal: EndpointSet  # what in-cluster clients of ClusterIPs use (local if iTP Local, else cluster)
    external: EndpointSet | None = None  # what clients of NodePort/LB/externalIP use; None: no such frontend
    arriving: Mapping[str, EndpointSet] | None = None  # external client, eTP Local: per node a NodePort is on

    def for_frontend(self, kind: desired.FrontendKind, node: str = "") -> EndpointSet:
        """The set a frontend of ``kind`` uses (``node``: the Node a NodePort address belongs to)."""
        if kind is desired.FrontendKind.CLUSTER_IP:
            return self.internal
        if kind is desired.FrontendKind.NODE_PORT and self.arriving is not None:
            found = self.arriving.get(node)
            if found is None:
                where = node or "this host"
                return EndpointSet((), f"{_ETP_LOCAL} via node {where}: no endpoints on {where}")
            return found
        assert self.external is not None, "external frontends need an externally accessible context"
        return self.external


def select_endpoints(
    candidates: Iterable[Candidate], ctx: SelectionContext, *, ordered: bool = False
) -> Selection:
    """Categorize one service port's endpoints for this node (see the module docstring).

    ``ordered``: the caller says ``candidates`` are already sorted by address and port, without duplicates
    (``frontends`` keeps each slice's that way), so they are not sorted again.
    """
    eps = tuple(candidates) if ordered else _sorted(candidates)
    cluster = _cluster_set(eps, ctx) if ctx.uses_cluster else None
    local = _local_set(eps, ctx) if ctx.uses_local else None
    both = _union(cluster, local)
    internal = local if ctx.internal_local else cluster
    assert internal is not None  # internal_local implies uses_local; otherwise uses_cluster
    has_any = any(c.ready or c.fallback for c in eps)
    external, arriving = _external_sets(eps, cluster, ctx)
    return Selection(cluster, local, both, has_any, internal, external, arriving)


_ETP_LOCAL = "externalTrafficPolicy Local, external client"


def _external_sets(
    eps: Sequence[Candidate], cluster: EndpointSet | None, ctx: SelectionContext
) -> tuple[EndpointSet | None, dict[str, EndpointSet] | None]:
    if not ctx.externally_accessible:
        return None, None
    if not ctx.external_restricted:
        assert cluster is not None  # externally_accessible implies uses_cluster
        if ctx.external_local:  # and the client is inside the cluster
            note = "externalTrafficPolicy Local: in-cluster client reaches all endpoints"
            return EndpointSet(cluster.endpoints, f"{note}; {cluster.reason}"), None
        return cluster, None
    ignored = _hints_ignored(eps)
    spread = _ready_or_fallback(
        eps,
        f"{_ETP_LOCAL} via load balancer or external IP: ready on any node{ignored}",
        f"{_ETP_LOCAL} via load balancer or external IP: terminating fallback (no ready endpoint)",
        f"{_ETP_LOCAL} via load balancer or external IP: ",
        "",
    )
    by_node: dict[str, list[Candidate]] = {}
    for c in eps:
        if c.node_name:
            by_node.setdefault(c.node_name, []).append(c)
    arriving = {
        name: _node_set(mine, name, f"{_ETP_LOCAL} via node {name}: ", ignored)
        for name, mine in by_node.items()
    }
    return spread, arriving


def _sorted(candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
    return tuple(sorted(candidates, key=lambda c: (c.ip.version, int(c.ip), c.port, c.node_name)))


def _cluster_set(eps: Sequence[Candidate], ctx: SelectionContext) -> EndpointSet:
    ready = [c for c in eps if c.ready]
    if ready:
        hinted, note = _apply_topology(ready, ctx)
        return EndpointSet(tuple(hinted), "ready" + (f"; {note}" if note else ""))
    return _fallback(eps, "terminating fallback (no ready endpoint)", _empty_reason(eps, ""))


def _local_set(eps: Sequence[Candidate], ctx: SelectionContext) -> EndpointSet:
    mine = [c for c in eps if c.node_name and c.node_name == ctx.node_name]
    return _node_set(mine, ctx.node_name, "", _hints_ignored(eps))


def _node_set(mine: Sequence[Candidate], node: str, prefix: str, ignored: str) -> EndpointSet:
    """The endpoints ``mine`` (all on ``node``): ready ones, else serving-terminating ones."""
    return _ready_or_fallback(
        mine,
        f"{prefix}local ready on {node}{ignored}",
        f"{prefix}local terminating fallback (no ready endpoint on {node})",
        prefix,
        f" on {node}",
    )


def _ready_or_fallback(
    eps: Sequence[Candidate], ready_reason: str, fallback_reason: str, prefix: str, where: str
) -> EndpointSet:
    ready = [c for c in eps if c.ready]
    if ready:
        return EndpointSet(tuple(ready), ready_reason)
    return _fallback(eps, fallback_reason, prefix + _empty_reason(eps, where))


def _hints_ignored(eps: Sequence[Candidate]) -> str:
    """The note for a set that never uses hints, when the endpoints carry some."""
    hinted = any(c.zone_hints or c.node_hints for c in eps)
    return "; topology ignored (traffic policy Local)" if hinted else ""


def _fallback(eps: Sequence[Candidate], reason: str, empty_reason: str) -> EndpointSet:
    chosen = tuple(c for c in eps if c.fallback)
    return EndpointSet(chosen, reason if chosen else empty_reason)


def _empty_reason(eps: Sequence[Candidate], where: str) -> str:
    if not eps:
        return f"no endpoints{where}"
    return f"no usable endpoint{where} ({len(eps)} neither ready nor serving-terminating)"


def _apply_topology(ready: list[Candidate], ctx: SelectionContext) -> tuple[list[Candidate], str]:
    """The ready endpoints hinted for this node, else for its zone, else all of them; and why.

    The note is empty when no ready endpoint carries any hint (the common case: nothing to say).
    """
    if not any(c.node_hints or c.zone_hints for c in ready):
        return ready, ""  # the common case, without a look at each kind
    notes: list[str] = []
    for kind, here in (("node", ctx.node_name), ("zone", ctx.zone)):
        chosen, why = _hinted(ready, kind, here)
        if chosen:
            return chosen, "; ".join([*notes, why])
        if why:
            notes.append(why)
    return ready, "; ".join(notes)


def _hints(candidate: Candidate, kind: str) -> frozenset[str]:
    return candidate.node_hints if kind == "node" else candidate.zone_hints


def _hinted(ready: list[Candidate], kind: str, here: str) -> tuple[list[Candidate], str]:
    """Endpoints hinted for ``here`` if every ready one has a ``kind`` hint; else ``[]`` and why.

    The why is "" when no ready endpoint has a ``kind`` hint at all.
    """
    unhinted = [c for c in ready if not _hints(c, kind)]
    if len(unhinted) == len(ready):
        return [], ""
    ignored = f"{kind} hints ignored"
    if unhinted:
        return [], f"{ignored}: endpoint {unhinted[0]} has no {kind} hint"
    chosen = [c for c in ready if here in _hints(c, kind)]  # as kube-proxy: "" would match a "" hint
    if chosen:
        return chosen, f"topology: {kind} hints for {here}"
    if not here:
        unknown = f"this node has no {ZONE_LABEL} label" if kind == "zone" else "this node's name is unknown"
        return [], f"{ignored}: {unknown}"
    return [], f"{ignored}: no endpoint hinted for {kind} {here}"


def _union(cluster: EndpointSet | None, local: EndpointSet | None) -> EndpointSet:
    if cluster is None or local is None:
        only = cluster or local
        assert only is not None
        return only
    merged = {(c.ip, c.port): c for c in (*cluster.endpoints, *local.endpoints)}
    return EndpointSet(_sorted(merged.values()), f"{cluster.reason} + {local.reason}")
