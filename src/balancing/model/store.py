"""The current Kubernetes objects of the cluster, indexed so a change recomputes only what it touches.

``ClusterStore`` takes ``upsert``/``delete`` of Services, EndpointSlices, Pods and Nodes, marks the services a
change can affect as dirty, and on ``desired()`` or ``take_changes()`` recomputes just those with
``frontends.service_frontends``. Per-service results are cached; when two services claim the same
``FrontendKey`` the older one (creationTimestamp, then namespace/name) wins and ``conflicts()`` says so.
``take_changes`` reports what differs from what the previous call handed out, which is what the datapath
writer applies. Pure: no I/O, no clocks; the caller feeds objects in (``sources``) and reads state out.
"""

from __future__ import annotations

from collections.abc import Iterable

from balancing.model import desired as contract  # the method ``desired`` would shadow the module
from balancing.model import frontends, objects

__all__ = ["ClusterStore"]

ServiceKey = tuple[str, str]  # (namespace, name)
_Owned = dict[contract.FrontendKey, contract.Frontend]


class ClusterStore:
    """Objects in, one node's desired frontends out, incrementally."""

    def __init__(self, node_name: str) -> None:
        self._node_name = node_name
        self._zone = ""
        self._services: dict[ServiceKey, objects.Service] = {}
        self._slices: dict[tuple[str, str], objects.EndpointSlice] = {}
        self._slices_of: dict[ServiceKey, dict[str, objects.EndpointSlice]] = {}
        self._pods: dict[str, dict[str, objects.Pod]] = {}
        self._selecting: dict[str, set[str]] = {}  # namespace → names of services with a selector
        self._nodes: dict[str, objects.Node] = {}
        self._dirty: set[ServiceKey] = set()
        self._owned: dict[ServiceKey, _Owned] = {}  # per-service cache of its frontends
        self._ages: dict[ServiceKey, tuple[str, str, str]] = {}  # precedence: older first
        self._claims: dict[contract.FrontendKey, set[ServiceKey]] = {}
        self._contested: set[contract.FrontendKey] = set()
        self._frontends: _Owned = {}  # the winners: the desired state
        self._changed: set[contract.FrontendKey] = set()  # keys that may differ from _taken
        self._taken: _Owned = {}  # what take_changes has handed out so far
        self._recomputed = 0

    @property
    def recomputed(self) -> int:
        """How many service recomputations ran since creation (for tests and metrics)."""
        return self._recomputed

    # --- input -------------------------------------------------------------------------------------------

    def upsert(self, obj: objects.KubeObject) -> None:
        """Add or replace one object; an identical object changes nothing."""
        if isinstance(obj, objects.Service):
            self._put_service(obj)
        elif isinstance(obj, objects.EndpointSlice):
            self._put_slice(objects.ref(obj), obj)
        elif isinstance(obj, objects.Pod):
            self._put_pod(obj.metadata.namespace, obj.metadata.name, obj)
        else:
            self._put_node(obj.metadata.name, obj)

    def delete(self, ref: objects.ObjectRef) -> None:
        """Remove one object by (kind, namespace, name); an absent object is a no-op."""
        kind, namespace, name = ref
        if kind == "Service":
            self._drop_service((namespace, name))
        elif kind == "EndpointSlice":
            self._put_slice(ref, None)
        elif kind == "Pod":
            self._put_pod(namespace, name, None)
        elif kind == "Node":
            self._put_node(name, None)

    # --- output ------------------------------------------------------------------------------------------

    def desired(self) -> contract.DesiredState:
        """The full desired state (a copy; recomputes only dirty services)."""
        self._flush()
        return contract.DesiredState(dict(self._frontends))

    def take_changes(self) -> contract.FrontendChanges:
        """What changed since the previous call (since creation for the first one)."""
        self._flush()
        upsert: _Owned = {}
        remove: set[contract.FrontendKey] = set()
        for key in self._changed:
            now = self._frontends.get(key)
            if now == self._taken.get(key):
                continue
            if now is None:
                remove.add(key)
                del self._taken[key]
            else:
                upsert[key] = self._taken[key] = now
        self._changed.clear()
        return contract.FrontendChanges(upsert, frozenset(remove))

    def conflicts(self) -> list[str]:
        """One message per frontend claimed by several services, naming the winner and the losers."""
        self._flush()
        return [self._conflict_message(key) for key in sorted(self._contested, key=_sort_key)]

    # --- indexing ----------------------------------------------------------------------------------------

    def _put_service(self, service: objects.Service) -> None:
        key = (service.metadata.namespace, service.metadata.name)
        if self._services.get(key) == service:
            return
        self._services[key] = service
        selecting = self._selecting.setdefault(key[0], set())
        if service.spec.selector:
            selecting.add(key[1])
        else:
            selecting.discard(key[1])
        self._dirty.add(key)

    def _drop_service(self, key: ServiceKey) -> None:
        if self._services.pop(key, None) is None:
            return
        self._selecting.get(key[0], set()).discard(key[1])
        self._dirty.add(key)

    def _put_slice(self, ref: objects.ObjectRef, new: objects.EndpointSlice | None) -> None:
        skey = (ref[1], ref[2])
        old = self._slices.get(skey)
        if old == new:
            return
        if old is not None:
            self._index_slice(old, add=False)
            del self._slices[skey]
        if new is not None:
            self._slices[skey] = new
            self._index_slice(new, add=True)

    def _index_slice(self, endpoint_slice: objects.EndpointSlice, add: bool) -> None:
        service = frontends.slice_service_name(endpoint_slice)
        if service is None:
            return
        key = (endpoint_slice.metadata.namespace, service)
        of_service = self._slices_of.setdefault(key, {})
        if add:
            of_service[endpoint_slice.metadata.name] = endpoint_slice
        else:
            of_service.pop(endpoint_slice.metadata.name, None)
            if not of_service:
                del self._slices_of[key]
        self._dirty.add(key)

    def _put_pod(self, namespace: str, name: str, new: objects.Pod | None) -> None:
        old = self._pods.get(namespace, {}).get(name)
        if old == new:
            return
        if new is None:
            del self._pods[namespace][name]
            if not self._pods[namespace]:
                del self._pods[namespace]
        else:
            self._pods.setdefault(namespace, {})[name] = new
        labels = [p.metadata.labels for p in (old, new) if p is not None]
        self._dirty.update(self._pod_users(namespace, labels))

    def _pod_users(self, namespace: str, labels: Iterable[dict[str, str]]) -> list[ServiceKey]:
        """Services of the namespace whose endpoints come from pods and that select any of ``labels``."""
        found = []
        for name in self._selecting.get(namespace, ()):
            key = (namespace, name)
            selector = self._services[key].spec.selector
            if key not in self._slices_of and any(frontends.selector_matches(selector, x) for x in labels):
                found.append(key)
        return found

    def _put_node(self, name: str, new: objects.Node | None) -> None:
        if new is None:
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = new
        if name != self._node_name:
            return  # only this node's zone matters (other nodes' addresses will, for NodePorts)
        zone = new.metadata.labels.get(frontends.ZONE_LABEL, "") if new is not None else ""
        if zone != self._zone:
            self._zone = zone
            self._dirty.update(self._services)

    # --- recomputation -----------------------------------------------------------------------------------

    def _flush(self) -> None:
        for key in self._dirty:
            self._recompute(key)
        self._dirty.clear()

    def _recompute(self, key: ServiceKey) -> None:
        self._recomputed += 1
        new = self._compute(key)
        old = self._owned.pop(key, {})
        if new:
            self._owned[key] = new
            service = self._services[key]
            self._ages[key] = (service.metadata.creation_timestamp, *key)
        else:
            self._ages.pop(key, None)
        for fkey in old.keys() - new.keys():
            claimants = self._claims[fkey]
            claimants.discard(key)
            if not claimants:
                del self._claims[fkey]
        for fkey in new:
            self._claims.setdefault(fkey, set()).add(key)
        for fkey in old.keys() | new.keys():
            self._elect(fkey)

    def _compute(self, key: ServiceKey) -> _Owned:
        service = self._services.get(key)
        if service is None:
            return {}
        slices = list(self._slices_of.get(key, {}).values())
        pods = self._pods.get(key[0], {}).values() if frontends.uses_pods(service, bool(slices)) else ()
        node = frontends.NodeContext(self._node_name, self._zone)
        return frontends.service_frontends(service, slices, pods, node)

    def _elect(self, fkey: contract.FrontendKey) -> None:
        """Give ``fkey`` to its oldest claimant (or drop it) and remember it may have changed."""
        claimants = self._claims.get(fkey)
        self._changed.add(fkey)
        if not claimants:
            self._frontends.pop(fkey, None)
            self._contested.discard(fkey)
            return
        winner = min(claimants, key=self._ages.__getitem__)
        self._frontends[fkey] = self._owned[winner][fkey]
        if len(claimants) > 1:
            self._contested.add(fkey)
        else:
            self._contested.discard(fkey)

    def _conflict_message(self, fkey: contract.FrontendKey) -> str:
        ranked = sorted(self._claims[fkey], key=self._ages.__getitem__)
        owners = [self._owned[k][fkey].owner for k in ranked]
        losers = ", ".join(str(o) for o in owners[1:])
        created = self._ages[ranked[0]][0] or "no creationTimestamp"
        return f"frontend {fkey} is claimed by {owners[0]} and {losers}; {owners[0]} wins (older: {created})"


def _sort_key(fkey: contract.FrontendKey) -> tuple[int, int, int, int]:
    """FrontendKey's own ordering raises TypeError across IPv4 and IPv6; this one does not."""
    return (fkey.ip.version, int(fkey.ip), fkey.port, fkey.protocol)
