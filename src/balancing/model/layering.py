"""Precedence: one frontend key's LocalRedirectPolicy, BalancingPolicy and Service layers → one ``Frontend``.

For the same address, port and protocol a LocalRedirectPolicy comes first, then a BalancingPolicy, then the
Service. ``combine`` takes the winner of each kind (``store`` elects them: the older policy of a kind wins)
and decides:

- an LRP with local backends is the primary; ``fallback`` is the next layer with backends (the BP's, else
  the Service's, possibly empty; ``None`` when there is no layer below, as for a custom VIP), and the
  frontend carries the LRP's backend pods, ``skipRedirectFromBackend`` and QoS limit for the datapath;
- an LRP of an addressMatcher without local backends refuses (empty backends), whatever lies below;
- otherwise a BP with backends is the primary, with the Service's backends as fallback (``None`` without);
- otherwise the Service's own frontend, unchanged but for a reason naming the policies that had nothing;
- a policy frontend with nothing usable anywhere and no Service: empty backends (refuse), owned by the
  highest-precedence policy.
Policies are east-west: a policy frontend keeps the Service's north-south part (``_north_south``), so
clients outside the cluster still reach the Service's backends through the node's devices.
Pure data in, data out; no Kubernetes objects here (``policy_frontends`` builds the ``Layer``s).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from balancing.model import desired

__all__ = ["Layer", "combine", "owner_name"]


@dataclass(frozen=True, slots=True)
class Layer:
    """One policy's contribution to one frontend key on this node."""

    owner: desired.Owner  # kind LocalRedirectPolicy or BalancingPolicy, namespace "", the policy's name
    backends: tuple[desired.Backend, ...]  # sorted, deduplicated
    reason: str  # e.g. "1 local backend", "no ready pod on node-1 matches endpointSelector app=dns"
    refuse_when_empty: bool = False  # an LRP addressMatcher: no local backend means refuse, no fall-through
    backend_pods: tuple[desired.BackendPod, ...] = ()  # LRP: the local pods behind ``backends``
    skip_redirect_from_backends: bool = False
    qos_limit: int = 0


def owner_name(owner: desired.Owner) -> str:
    """``Service kube-system/kube-dns`` or ``LocalRedirectPolicy node-local-dns`` (no port name)."""
    return str(replace(owner, port_name=""))


def combine(lrp: Layer | None, bp: Layer | None, service: desired.Frontend | None) -> desired.Frontend | None:
    """The frontend the datapath programs for one key (see the module docstring); ``None``: no layer."""
    if lrp is None and bp is None:
        return service
    combined = _combine(lrp, bp, service)
    return _north_south(combined, service)


def _north_south(combined: desired.Frontend, service: desired.Frontend | None) -> desired.Frontend:
    """``combined`` with the Service's north-south part, if the Service's frontend is served north-south."""
    if service is None or not service.external or combined is service:
        return combined
    outside = service.north_south_backends
    return replace(
        combined,
        external=True,
        external_backends=None if outside == combined.backends else outside,
        external_local=service.external_local,
        local_backends=service.local_backends,
        source_ranges=service.source_ranges,
        external_reason=service.external_reason or service.reason,
    )


def _combine(lrp: Layer | None, bp: Layer | None, service: desired.Frontend | None) -> desired.Frontend:
    kind = service.kind if service is not None else desired.FrontendKind.CLUSTER_IP
    skipped: list[Layer] = []
    if lrp is not None:
        if lrp.backends:
            fallback, fallback_owner = _below(bp, service)
            return desired.Frontend(
                lrp.owner,
                lrp.backends,
                _reason(lrp, fallback_owner, skipped),
                kind,
                fallback=fallback,
                fallback_owner=fallback_owner,
                backend_pods=lrp.backend_pods,
                skip_redirect_from_backends=lrp.skip_redirect_from_backends,
                qos_limit=lrp.qos_limit,
            )
        if lrp.refuse_when_empty:
            return desired.Frontend(lrp.owner, (), f"{owner_name(lrp.owner)}: {lrp.reason}; refused", kind)
        skipped.append(lrp)
    if bp is not None:
        if bp.backends:
            fallback_owner = service.owner if service is not None else None
            return desired.Frontend(
                bp.owner,
                bp.backends,
                _reason(bp, fallback_owner, skipped),
                kind,
                fallback=service.backends if service is not None else None,
                fallback_owner=fallback_owner,
            )
        skipped.append(bp)
    notes = "; ".join(f"{owner_name(s.owner)}: {s.reason}" for s in skipped)
    if service is not None:
        return replace(service, reason=f"{service.reason} ({notes})" if service.reason else notes)
    return desired.Frontend(skipped[0].owner, (), f"{notes}; nothing below: refused", kind)


def _below(
    bp: Layer | None, service: desired.Frontend | None
) -> tuple[tuple[desired.Backend, ...] | None, desired.Owner | None]:
    """An LRP's fallback: the BP's backends if it has any, else the Service's (maybe none), else None."""
    if bp is not None and bp.backends:
        return bp.backends, bp.owner
    if service is not None:
        return service.backends, service.owner
    return None, None


def _reason(primary: Layer, fallback_owner: desired.Owner | None, skipped: list[Layer]) -> str:
    parts = [f"{owner_name(primary.owner)}: {primary.reason}"]
    parts.append(f"fallback {owner_name(fallback_owner)}" if fallback_owner is not None else "no fallback")
    parts += [f"skipped {owner_name(s.owner)}: {s.reason}" for s in skipped]
    return "; ".join(parts)
