"""The current Kubernetes objects of the cluster, indexed so a change recomputes only what it touches.

``ClusterStore`` takes ``upsert``/``delete`` of Services, EndpointSlices, Pods, Nodes, Namespaces and the
policies, marks the services a change can affect as dirty, and on ``desired()`` or ``take_changes()``
recomputes just those with ``frontends.compute_service``. Per-service results are cached; when two services
claim the same ``FrontendKey`` the older one (creationTimestamp, then namespace/name) wins and
``conflicts()`` says so.
``take_changes`` reports what differs from what the previous call handed out, which is what the datapath
writer applies. ``health_checks`` gives the health check node ports to serve, from the same cache.

Kept as the model reads them, per-Service work done once: an EndpointSlice is parsed on arrival into a
``frontends.SliceView`` (the store keeps that, not the slice), so a Service recomputed for any other reason
parses none of its slices again, and a slice update that changes nothing the model reads (its view is
equal: a new resourceVersion, annotations, an endpoint's zone) recomputes nothing. (A resourceVersion alone
is no proof of equal content: a manifest exported with one and then edited keeps it.) A frontend key only
its Service claims, with no policy, is layered as that Service is recomputed; the dirty and changed sets
are ordered dicts, so a full sync of 100k Services reads them in the order they came rather than scattered
in hash order.

What a change dirties: a Service itself; an EndpointSlice only its service; a Pod only the selector services
of its namespace that have no slice; a Node only when it changes what the services read of Nodes: any
node's NodePort addresses → services with NodePorts; this node's zone → services with topology hints; this
node's addresses (with ``external_ips_local_only``) → services with externalIPs.

Policies (``LocalRedirectPolicy``, ``BalancingPolicy``) are recomputed the same way, with
``policy_frontends.compute_policy``: a policy change recomputes that policy; a Service change the policies
whose serviceMatcher names it; a Pod change the policies whose backend selector matches its old or new labels
(a LocalRedirectPolicy only for pods on this node); a change of this node's labels the policies with a
nodeLabelSelector; a change of a node's InternalIPs or nodeProxy annotations the hostPort/nodeProxy
BalancingPolicies with a selected pod on it. Per frontend key the older policy of each kind wins (creation
timestamp, then name; ``conflicts()`` names both), and ``layering.combine`` layers LocalRedirectPolicy over
BalancingPolicy over Service into the one ``Frontend`` the datapath gets. ``policy_status`` says, per
policy, whether it is in force on this node and why. A policy version that changes only its status or
resourceVersion (the agents and the controller writing status) recomputes nothing.

Socket-LB exclusions: this node's pods whose annotation or Namespace label says
``balancing.elf.io/socket-lb: disabled`` (``objects.socket_lb_disabled``) are kept as a set, updated by a
change of the pod or of its Namespace's labels; ``desired`` carries it and ``take_changes`` reports it when it
changed, for the writer to map to the pods' cgroups.
Pure: no I/O, no clocks; the caller feeds objects in (``sources``) and reads state out.

One module on purpose (over 400 lines): the object indexes, the dirty sets and the per-service and
per-policy caches are one piece of state; the pure computations live in ``frontends``,
``policy_frontends`` and ``layering``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from balancing.model import desired as contract  # the method ``desired`` would shadow the module
from balancing.model import frontends, layering, objects, policies, policy_frontends
from balancing.model.config import ModelConfig
from balancing.model.healthcheck import HealthCheck
from balancing.model.policy_frontends import PolicyKey

__all__ = ["ClusterStore", "HealthCheck", "ModelConfig", "PolicyKey", "PolicyStatus"]

ServiceKey = tuple[str, str]  # (namespace, name)
_Owned = dict[contract.FrontendKey, contract.Frontend]
_POLICY_KINDS = (policies.LOCAL_REDIRECT_POLICY, policies.BALANCING_POLICY)  # precedence order
CONFLICT = "Conflict"  # PolicyStatus.reason when every frontend of the policy went to an older one


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """A policy on this node: what ``status.conditions[Ready]`` and ``balancing inspect policies`` show.

    ``reason``: Ready, NoBackends, NoFrontends, ServiceNotFound, NodeNotSelected, OutOfClusterDisabled,
    Disabled or Conflict. ``backends``: distinct backends of the frontends it holds here; ``frontends``: the
    frontend keys it holds (those it claims, less those an older policy of its kind won).
    """

    kind: str
    name: str
    ready: bool
    reason: str
    message: str
    backends: int = 0
    frontends: int = 0


class ClusterStore:
    """Objects in, one node's desired frontends out, incrementally."""

    def __init__(self, config: ModelConfig | str) -> None:
        """``config``, or just this node's name for the defaults (``ModelConfig(node_name)``)."""
        self._config = ModelConfig(config) if isinstance(config, str) else config
        self._node_name = self._config.node_name
        self._node = frontends.node_context(self._config, ())  # kept up to date by _put_node
        self._node_ips: dict[str, tuple[contract.IPAddress, ...]] = {}  # per Node: InternalIP/ExternalIP
        self._services: dict[ServiceKey, objects.Service] = {}
        self._slices: dict[tuple[str, str], frontends.SliceView] = {}  # parsed: the slices are not kept
        self._slices_of: dict[ServiceKey, dict[str, frontends.SliceView]] = {}
        self._pods: dict[str, dict[str, objects.Pod]] = {}
        self._selecting: dict[str, set[str]] = {}  # namespace → names of services with a selector
        self._nodes: dict[str, objects.Node] = {}
        self._namespace_labels: dict[str, dict[str, str]] = {}  # per Namespace object: its labels
        self._excluded: dict[tuple[str, str], contract.PodRef] = {}  # this node's pods socket LB leaves alone
        self._excluded_taken: frozenset[contract.PodRef] = frozenset()  # as take_changes handed it out
        self._node_port_users: set[ServiceKey] = set()  # services with NodePort frontends
        self._topology_users: set[ServiceKey] = set()  # their slices carry zone hints: they read the zone
        self._external_ip_users: set[ServiceKey] = set()  # services with spec.externalIPs
        # Services to recompute, frontend keys to relayer and keys that may have changed: dicts (ordered
        # sets), so a full sync walks the objects in the order they came, not scattered in hash order (at
        # 100k Services a third faster: the memory they sit in is read in sequence).
        self._dirty: dict[ServiceKey, None] = {}
        self._health: dict[ServiceKey, tuple[int, HealthCheck]] = {}
        self._no_local: dict[ServiceKey, frozenset[str]] = {}
        self._owned: dict[ServiceKey, _Owned] = {}  # per-service cache of its frontends
        # Per frontend key the service claiming it, or (contested) the set of those claiming it: nearly every
        # key has one claimant, and a set for each would be a hundred thousand sets at scale.
        self._claims: dict[contract.FrontendKey, ServiceKey | set[ServiceKey]] = {}
        self._contested: set[contract.FrontendKey] = set()
        self._policies: dict[PolicyKey, policies.Policy] = {}
        self._selected: dict[PolicyKey, dict[tuple[str, str], objects.Pod]] = {}  # candidate backend pods
        self._service_policies: dict[ServiceKey, set[PolicyKey]] = {}  # serviceMatcher → policies
        self._node_users: set[PolicyKey] = set()  # BalancingPolicies redirecting to node addresses
        self._node_selecting: set[PolicyKey] = set()  # policies with a nodeLabelSelector
        self._own_labels: dict[str, str] | None = None  # this node's Node labels (None: no Node object)
        self._policy_dirty: set[PolicyKey] = set()
        self._policy_results: dict[PolicyKey, policy_frontends.PolicyResult] = {}
        self._policy_ages: dict[PolicyKey, tuple[str, str]] = {}  # precedence within a kind: older first
        self._policy_claims: dict[contract.FrontendKey, set[PolicyKey]] = {}
        self._policy_contested: set[contract.FrontendKey] = set()
        self._relayer: dict[contract.FrontendKey, None] = {}  # keys whose layers may have changed
        self._policy_recomputed = 0
        self._frontends: _Owned = {}  # the layered winners: the desired state
        # Keys that may differ from _taken (each with its frontend as last layered, or None: removed).
        self._changed: dict[contract.FrontendKey, contract.Frontend | None] = {}
        self._taken: _Owned = {}  # what take_changes has handed out so far
        self._recomputed = 0

    @property
    def config(self) -> ModelConfig:
        return self._config

    def node(self) -> frontends.NodeContext:
        """This node as the model sees it now (its addresses come from its Node object)."""
        return self._node

    @property
    def recomputed(self) -> int:
        """How many service recomputations ran since creation (for tests and metrics)."""
        return self._recomputed

    @property
    def policy_recomputed(self) -> int:
        """How many policy recomputations ran since creation (for tests and metrics)."""
        return self._policy_recomputed

    # --- input -------------------------------------------------------------------------------------------

    def upsert(self, obj: objects.KubeObject) -> None:
        """Add or replace one object; an identical object changes nothing."""
        if isinstance(obj, objects.Service):
            self._put_service(obj)
        elif isinstance(obj, objects.EndpointSlice):
            self._put_slice(objects.ref(obj), obj)
        elif isinstance(obj, objects.Pod):
            self._put_pod(obj.metadata.namespace, obj.metadata.name, obj)
        elif isinstance(obj, objects.Node):
            self._put_node(obj.metadata.name, obj)
        elif isinstance(obj, objects.Namespace):
            self._put_namespace(obj.metadata.name, obj)
        else:
            self._put_policy(obj)

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
        elif kind == "Namespace":
            self._put_namespace(name, None)
        elif kind in _POLICY_KINDS:
            self._drop_policy((kind, name))  # cluster-scoped: the namespace plays no part

    def refs(self) -> list[objects.ObjectRef]:
        """Every object held, by (kind, namespace, name)."""
        held: list[objects.ObjectRef] = [("Service", ns, name) for ns, name in self._services]
        held += [("EndpointSlice", ns, name) for ns, name in self._slices]
        held += [("Pod", ns, name) for ns, pods in self._pods.items() for name in pods]
        held += [("Node", "", name) for name in self._nodes]
        held += [("Namespace", "", name) for name in self._namespace_labels]
        held += [(kind, "", name) for kind, name in self._policies]
        return held

    # --- output ------------------------------------------------------------------------------------------

    def desired(self) -> contract.DesiredState:
        """The full desired state (a copy; recomputes only dirty services)."""
        self._flush()
        return contract.DesiredState(dict(self._frontends), self.excluded_pods())

    def excluded_pods(self) -> frozenset[contract.PodRef]:
        """This node's pods (with a UID, which their cgroups are named by) that socket LB leaves alone."""
        return frozenset(self._excluded.values())

    def take_changes(self) -> contract.FrontendChanges:
        """What changed since the previous call (since creation for the first one)."""
        self._flush()
        excluded = self.excluded_pods()
        excluded_changed = excluded != self._excluded_taken
        self._excluded_taken = excluded
        upsert: _Owned = {}
        remove: set[contract.FrontendKey] = set()
        for key, now in self._changed.items():
            was = self._taken.get(key)
            if now is was or now == was:
                continue
            if now is None:
                remove.add(key)
                del self._taken[key]
            else:
                upsert[key] = self._taken[key] = now
        self._changed.clear()
        return contract.FrontendChanges(upsert, frozenset(remove), excluded if excluded_changed else None)

    def conflicts(self) -> list[str]:
        """One message per frontend claimed by several services, per frontend and policy kind claimed by
        several policies of that kind, and per health check node port claimed by several services (each
        naming the winner first)."""
        self._flush()
        messages = [self._conflict_message(key) for key in sorted(self._contested, key=_sort_key)]
        for fkey in sorted(self._policy_contested, key=_sort_key):
            messages += self._policy_conflict_messages(fkey)
        for port, claimants in sorted(self._health_claims().items()):
            if len(claimants) > 1:
                names = [f"Service {ns}/{name}" for _, ns, name in sorted(claimants)]
                created = min(claimants)[0] or "no creationTimestamp"
                messages.append(
                    f"health check node port {port} is claimed by {names[0]} and {', '.join(names[1:])}; "
                    f"{names[0]} wins (older: {created})"
                )
        return messages

    def no_local_endpoints(self) -> dict[str, int]:
        """Services per traffic policy ("internal", "external") that are Local with no local endpoint here."""
        self._flush()
        counts = {"internal": 0, "external": 0}
        for wanted in self._no_local.values():
            for policy in wanted:
                counts[policy] += 1
        return counts

    def health_checks(self) -> dict[int, HealthCheck]:
        """The health check node ports to serve, by port: Services of type LoadBalancer or NodePort with
        externalTrafficPolicy Local and a healthCheckNodePort, with their ready endpoints on this node.

        Two services with one port: the older wins (as for frontends; ``conflicts`` names them). Empty in
        ``external_client`` mode: no load balancer health-checks a host outside the cluster.
        """
        self._flush()
        found: dict[int, HealthCheck] = {}
        for port, claimants in self._health_claims().items():
            _, namespace, name = min(claimants)
            found[port] = self._health[namespace, name][1]
        return found

    def policy_status(self) -> dict[PolicyKey, PolicyStatus]:
        """Every policy's state on this node, by (kind, name), in that order."""
        self._flush()
        found: dict[PolicyKey, PolicyStatus] = {}
        for pkey in sorted(self._policies):
            found[pkey] = self._status(pkey)
        return found

    def _status(self, pkey: PolicyKey) -> PolicyStatus:
        kind, name = pkey
        result = self._policy_results[pkey]
        if not result.frontends:
            return PolicyStatus(kind, name, False, result.reason, result.message)
        held: list[contract.FrontendKey] = []
        winners: set[str] = set()
        for fkey in result.frontends:
            winner = self._policy_winner(fkey, kind)
            if winner == pkey:
                held.append(fkey)
            elif winner is not None:
                winners.add(winner[1])
        lost = len(result.frontends) - len(held)
        others = ", ".join(f"{kind} {w}" for w in sorted(winners))
        if not held:
            message = f"every frontend ({lost}) is held by an older {others}"
            return PolicyStatus(kind, name, False, CONFLICT, message)
        backends = len({b for fkey in held for b in result.frontends[fkey].backends})
        message = result.message
        if lost:
            message += f"; {lost} frontend{'' if lost == 1 else 's'} held by an older {others}"
        reason = result.reason if backends else policy_frontends.NO_BACKENDS
        return PolicyStatus(kind, name, backends > 0, reason, message, backends, len(held))

    def _health_claims(self) -> dict[int, list[tuple[str, str, str]]]:
        """Per health check node port, the (creationTimestamp, namespace, name) of each service wanting it."""
        claims: dict[int, list[tuple[str, str, str]]] = {}
        if self._config.external_client:
            return claims
        for key, (port, _) in self._health.items():
            age = (self._services[key].metadata.creation_timestamp, *key)
            claims.setdefault(port, []).append(age)
        return claims

    # --- indexing ----------------------------------------------------------------------------------------

    def _put_service(self, service: objects.Service) -> None:
        meta = service.metadata
        key = (meta.namespace, meta.name)
        old = self._services.get(key)
        if old is not None and old == service:
            return
        self._services[key] = service
        if service.spec.selector:
            self._selecting.setdefault(key[0], set()).add(key[1])
        elif old is not None:
            self._unselect(key)
        if frontends.uses_node_ports(service):
            self._node_port_users.add(key)
        elif old is not None:
            self._node_port_users.discard(key)
        if service.spec.external_ips:
            self._external_ip_users.add(key)
        elif old is not None:
            self._external_ip_users.discard(key)
        self._dirty[key] = None
        self._policy_dirty.update(self._service_policies.get(key, ()))

    def _drop_service(self, key: ServiceKey) -> None:
        if self._services.pop(key, None) is None:
            return
        self._unselect(key)
        for users in (self._node_port_users, self._external_ip_users):  # topology users follow the slices
            users.discard(key)
        self._dirty[key] = None
        self._policy_dirty.update(self._service_policies.get(key, ()))

    def _unselect(self, key: ServiceKey) -> None:
        """``key`` selects no pods (any more); a namespace left without selecting services is forgotten."""
        names = self._selecting.get(key[0])
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._selecting[key[0]]

    def _put_slice(self, ref: objects.ObjectRef, new: objects.EndpointSlice | None) -> None:
        """Keep the slice as the model reads it (``frontends.SliceView``); one equal to the old (nothing the
        model reads changed) recomputes nothing."""
        skey = (ref[1], ref[2])
        old = self._slices.get(skey)
        view = frontends.slice_view(new) if new is not None else None
        if old == view:
            if view is not None:  # the same to the model: the new one kept, nothing recomputed
                self._slices[skey] = view
                if view.service is not None:
                    self._slices_of[view.namespace, view.service][view.name] = view
            return
        if old is not None:
            self._index_slice(old, add=False)
            del self._slices[skey]
        if view is not None:
            self._slices[skey] = view
            self._index_slice(view, add=True)

    def _index_slice(self, view: frontends.SliceView, add: bool) -> None:
        if view.service is None:
            return
        key = (view.namespace, view.service)
        of_service = self._slices_of.setdefault(key, {})
        if add:
            of_service[view.name] = view
        else:
            of_service.pop(view.name, None)
            if not of_service:
                del self._slices_of[key]
        # kube-proxy honours zone hints whenever every ready endpoint has them: a service whose slices carry
        # any reads this node's zone (node hints need no index: the node's name never changes)
        if add and view.zone_hinted:
            self._topology_users.add(key)
        elif key in self._topology_users and not any(s.zone_hinted for s in of_service.values()):
            self._topology_users.discard(key)
        self._dirty[key] = None

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
        self._exclude(namespace, name, new)
        labels = [p.metadata.labels for p in (old, new) if p is not None]
        self._dirty.update(dict.fromkeys(self._pod_users(namespace, labels)))
        for pkey, selected in self._selected.items():
            was = selected.pop((namespace, name), None) is not None
            now = new is not None and self._selects(self._policies[pkey], new)
            if now:
                assert new is not None
                selected[namespace, name] = new
            if was or now:
                self._policy_dirty.add(pkey)

    def _exclude(self, namespace: str, name: str, pod: objects.Pod | None) -> None:
        """Whether socket LB leaves this pod alone (only this node's pods: their cgroups are here)."""
        if (
            pod is not None
            and pod.metadata.uid
            and pod.spec.node_name == self._node_name
            and objects.socket_lb_disabled(pod, self._namespace_labels.get(namespace, {}))
        ):
            self._excluded[namespace, name] = contract.PodRef(namespace, name, pod.metadata.uid)
        else:
            self._excluded.pop((namespace, name), None)

    def _put_namespace(self, name: str, new: objects.Namespace | None) -> None:
        """A Namespace's labels: a change of its socket-LB label re-reads its pods' exclusion."""
        old = self._namespace_labels.get(name, {})
        labels = dict(new.metadata.labels) if new is not None else {}
        if new is None:
            self._namespace_labels.pop(name, None)
        else:
            self._namespace_labels[name] = labels
        if old.get(objects.SOCKET_LB) != labels.get(objects.SOCKET_LB):
            for pod_name, pod in self._pods.get(name, {}).items():
                self._exclude(name, pod_name, pod)

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
        old = self._nodes.get(name)
        if old == new:
            return
        self._policy_node_change(name, old, new)
        if new is None:
            del self._nodes[name]
        else:
            self._nodes[name] = new
        node = self._node
        addresses = frontends.node_addresses(new) if new is not None else ()
        if addresses != self._node_ips.get(name, ()):
            if addresses:
                self._node_ips[name] = addresses
            else:
                del self._node_ips[name]
            node_ports = frontends.node_port_addresses(self._node_ips, self._config)
            if node_ports != node.node_ports:
                node = replace(node, node_ports=node_ports)
                self._dirty.update(dict.fromkeys(self._node_port_users))
        if name == self._node_name:
            own = frozenset(addresses)
            if own != node.own_addresses:
                node = replace(node, own_addresses=own)
                if self._config.external_ips_local_only:
                    self._dirty.update(dict.fromkeys(self._external_ip_users))
            zone = new.metadata.labels.get(frontends.ZONE_LABEL, "") if new is not None else ""
            if zone != node.zone:
                node = replace(node, zone=zone)
                self._dirty.update(dict.fromkeys(self._topology_users))
        self._node = node

    def _policy_node_change(self, name: str, old: objects.Node | None, new: objects.Node | None) -> None:
        """Dirty the policies a Node change touches (this node's labels; a node's addresses for some)."""
        if self._node_users and policy_frontends.node_entry(old) != policy_frontends.node_entry(new):
            for pkey in self._node_users:
                if any(p.spec.node_name == name for p in self._selected.get(pkey, {}).values()):
                    self._policy_dirty.add(pkey)
        if name == self._node_name:
            labels = dict(new.metadata.labels) if new is not None else None
            if labels != self._own_labels:
                self._own_labels = labels
                if not self._config.external_client:
                    self._policy_dirty.update(self._node_selecting)

    def _put_policy(self, policy: policies.Policy) -> None:
        pkey = policy_frontends.policy_key(policy)
        old = self._policies.get(pkey)
        if old == policy:
            return
        if old is not None and _same_intent(old, policy):
            self._policies[pkey] = policy  # a status write or a new resourceVersion: nothing to recompute
            return
        if old is not None:
            self._unindex_policy(pkey, old)
        self._policies[pkey] = policy
        matcher = policy.spec.frontend.service_matcher
        if matcher is not None:
            self._service_policies.setdefault((matcher.namespace, matcher.service_name), set()).add(pkey)
        if policy_frontends.uses_nodes(policy):
            self._node_users.add(pkey)
        selector = policy.spec.config.node_label_selector
        if selector is not None and not selector.empty:
            self._node_selecting.add(pkey)
        if policy_frontends.backend_selector(policy) is not None:
            self._selected[pkey] = {
                (namespace, name): pod
                for namespace, pods in self._pods.items()
                for name, pod in pods.items()
                if self._selects(policy, pod)
            }
        self._policy_dirty.add(pkey)

    def _drop_policy(self, pkey: PolicyKey) -> None:
        old = self._policies.pop(pkey, None)
        if old is not None:
            self._unindex_policy(pkey, old)
            self._policy_dirty.add(pkey)

    def _unindex_policy(self, pkey: PolicyKey, policy: policies.Policy) -> None:
        matcher = policy.spec.frontend.service_matcher
        if matcher is not None:
            skey = (matcher.namespace, matcher.service_name)
            users = self._service_policies[skey]
            users.discard(pkey)
            if not users:
                del self._service_policies[skey]
        self._node_users.discard(pkey)
        self._node_selecting.discard(pkey)
        self._selected.pop(pkey, None)

    def _selects(self, policy: policies.Policy, pod: objects.Pod) -> bool:
        return policy_frontends.selects_pod(policy, pod, self._node_name, self._config.external_client)

    # --- recomputation -----------------------------------------------------------------------------------

    def _flush(self) -> None:
        for key in self._dirty:
            self._recompute(key)
        self._dirty.clear()
        for pkey in self._policy_dirty:
            self._recompute_policy(pkey)
        self._policy_dirty.clear()
        for fkey in self._relayer:
            self._layer(fkey)
        self._relayer.clear()

    def _recompute(self, key: ServiceKey) -> None:
        self._recomputed += 1
        result = self._compute(key)
        new = result.frontends
        if result.no_local:
            self._no_local[key] = result.no_local
        else:
            self._no_local.pop(key, None)
        if result.health_check is None:
            self._health.pop(key, None)
        else:
            self._health[key] = result.health_check
        old = self._owned.pop(key, None)
        if new:
            self._owned[key] = new
        if old:
            for fkey in old.keys() - new.keys():
                self._unclaim(fkey, key)
                self._relayer[fkey] = None
        claims, relayer = self._claims, self._relayer
        for fkey, frontend in new.items():
            held = claims.get(fkey)
            if held is None or held == key:
                claims[fkey] = key
                if fkey in self._policy_claims or fkey in self._contested:
                    relayer[fkey] = None
                else:  # the service's alone (the common case): layered here, while all of it is at hand
                    self._frontends[fkey] = self._changed[fkey] = frontend
                continue
            if isinstance(held, set):
                held.add(key)
            else:
                claims[fkey] = {held, key}
            relayer[fkey] = None

    def _age(self, key: ServiceKey) -> tuple[str, str, str]:
        """A service's precedence: older first (creationTimestamp, then namespace/name)."""
        return (self._services[key].metadata.creation_timestamp, *key)

    def _unclaim(self, fkey: contract.FrontendKey, key: ServiceKey) -> None:
        held = self._claims[fkey]
        if not isinstance(held, set):
            del self._claims[fkey]  # ``key``'s alone
            return
        held.discard(key)
        if len(held) == 1:
            self._claims[fkey] = held.pop()

    def _claimants(self, fkey: contract.FrontendKey) -> tuple[ServiceKey, ...] | set[ServiceKey]:
        held = self._claims.get(fkey)
        if held is None:
            return ()
        return held if isinstance(held, set) else (held,)

    def _compute(self, key: ServiceKey) -> frontends.ServiceResult:
        service = self._services.get(key)
        if service is None:
            return frontends.ServiceResult()
        slices = list(self._slices_of.get(key, {}).values())
        pods = self._pods.get(key[0], {}).values() if frontends.uses_pods(service, bool(slices)) else ()
        return frontends.compute_service(service, slices, pods, self._node)

    def _recompute_policy(self, pkey: PolicyKey) -> None:
        self._policy_recomputed += 1
        old = self._policy_results.pop(pkey, None)
        old_keys = set(old.frontends) if old is not None else set()
        policy = self._policies.get(pkey)
        if policy is None:
            self._policy_ages.pop(pkey, None)
            new_keys: set[contract.FrontendKey] = set()
        else:
            matcher = policy.spec.frontend.service_matcher
            service = self._services.get((matcher.namespace, matcher.service_name)) if matcher else None
            ctx = policy_frontends.PolicyContext(
                self._node_name, self._config.external_client, self._own_labels, self._nodes
            )
            pods = self._selected.get(pkey, {}).values()
            result = self._policy_results[pkey] = policy_frontends.compute_policy(policy, service, pods, ctx)
            self._policy_ages[pkey] = (policy.metadata.creation_timestamp, policy.metadata.name)
            new_keys = set(result.frontends)
        for fkey in old_keys - new_keys:
            claimants = self._policy_claims[fkey]
            claimants.discard(pkey)
            if not claimants:
                del self._policy_claims[fkey]
                self._policy_contested.discard(fkey)  # _layer skips the policies of unclaimed keys
        for fkey in new_keys:
            self._policy_claims.setdefault(fkey, set()).add(pkey)
        self._relayer.update(dict.fromkeys(old_keys | new_keys))

    def _layer(self, fkey: contract.FrontendKey) -> None:
        """Elect ``fkey``'s service and policy of each kind, layer them, and remember it may have changed."""
        service = None
        held = self._claims.get(fkey)
        if isinstance(held, set):
            winner = min(held, key=self._age)
            service = self._owned[winner][fkey]
            self._contested.add(fkey)
        else:
            if held is not None:
                service = self._owned[held][fkey]
            self._contested.discard(fkey)
        final = service if fkey not in self._policy_claims else self._layer_policies(fkey, service)
        if final is None:
            self._frontends.pop(fkey, None)
        else:
            self._frontends[fkey] = final
        self._changed[fkey] = final

    def _layer_policies(
        self, fkey: contract.FrontendKey, service: contract.Frontend | None
    ) -> contract.Frontend | None:
        layers: list[layering.Layer | None] = []
        contested = False
        for kind in _POLICY_KINDS:
            pkey = self._policy_winner(fkey, kind)
            layers.append(self._policy_results[pkey].frontends[fkey] if pkey is not None else None)
            contested |= sum(1 for p in self._policy_claims.get(fkey, ()) if p[0] == kind) > 1
        if contested:
            self._policy_contested.add(fkey)
        else:
            self._policy_contested.discard(fkey)
        return layering.combine(layers[0], layers[1], service)

    def _policy_winner(self, fkey: contract.FrontendKey, kind: str) -> PolicyKey | None:
        """The oldest policy of ``kind`` claiming ``fkey`` (creation timestamp, then name), if any."""
        mine = [p for p in self._policy_claims.get(fkey, ()) if p[0] == kind]
        return min(mine, key=self._policy_ages.__getitem__) if mine else None

    def _policy_conflict_messages(self, fkey: contract.FrontendKey) -> list[str]:
        messages = []
        for kind in _POLICY_KINDS:
            ranked = sorted(
                (p for p in self._policy_claims.get(fkey, ()) if p[0] == kind),
                key=self._policy_ages.__getitem__,
            )
            if len(ranked) < 2:
                continue
            owners = [self._policy_results[p].frontends[fkey].owner for p in ranked]
            losers = ", ".join(str(o) for o in owners[1:])
            created = self._policy_ages[ranked[0]][0] or "no creationTimestamp"
            messages.append(
                f"frontend {fkey} is claimed by {owners[0]} and {losers}; {owners[0]} wins (older: {created})"
            )
        return messages

    def _conflict_message(self, fkey: contract.FrontendKey) -> str:
        ranked = sorted(self._claimants(fkey), key=self._age)
        owners = [self._owned[k][fkey].owner for k in ranked]
        losers = ", ".join(str(o) for o in owners[1:])
        created = self._age(ranked[0])[0] or "no creationTimestamp"
        return f"frontend {fkey} is claimed by {owners[0]} and {losers}; {owners[0]} wins (older: {created})"


def _same_intent(old: policies.Policy, new: policies.Policy) -> bool:
    """Whether two versions of a policy do the same: what ``compute_policy`` and precedence read (spec,
    name, creationTimestamp) is equal; status and resourceVersion, which status writes change, are unread."""
    return (
        old.spec == new.spec
        and old.metadata.name == new.metadata.name
        and old.metadata.creation_timestamp == new.metadata.creation_timestamp
    )


def _sort_key(fkey: contract.FrontendKey) -> tuple[int, int, int, int]:
    """FrontendKey's own ordering raises TypeError across IPv4 and IPv6; this one does not."""
    return (fkey.ip.version, int(fkey.ip), fkey.port, fkey.protocol)
