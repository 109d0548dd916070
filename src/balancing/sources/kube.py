"""The Kubernetes API source: the objects in force read from an API server by list+watch.

``KubeSource(node_name, api_base_url=... | kubeconfig=... | neither for in-cluster)`` follows Services,
EndpointSlices, Nodes, LocalRedirectPolicies, BalancingPolicies, the Pods scheduled on ``node_name``
(``fieldSelector=spec.nodeName=<node>``), and the Pods the BalancingPolicies' endpoint selectors pick
anywhere (one ``labelSelector`` watch per distinct selector, started and retired as policies change; see
``sources.selected_pods``). A source whose ``resources`` leave out Pods (the controller follows only the
policies and Nodes) watches no pods at all. ``updates()`` yields ``SourceUpdate``\\ s like the manifest
source: the first is the full initial state (every object as an upsert, plus the errors found), each later
one only a difference: every change since the last one taken, coalesced per object (``Pending``), so a slow
consumer gets fewer, larger updates instead of an ever longer queue. Malformed objects are skipped with a
``errors.KubeObjectError`` (an ``ObjectError``, as ``SourceUpdate.errors`` holds) naming kind,
namespace/name and field. Watch, relist, resync and backoff rules, and the bounds on what is read of the API
server's answers (``Bounds``), are those of ``sources.informer.Informer``; ``counts`` (``Counts``) adds up
what the informers of every run received (watch events by type, lists by reason) for the agent's metrics.

Connection (``KubeConnection.choose``): a plain ``api_base_url`` (no auth, for tests and ``kubectl proxy``);
a ``kubeconfig`` file and a ``context`` of it (else its current one; ``sources.kubeconfig`` reads it: CA,
client certificates, tokens, token files, exec credential plugins); in-cluster (``KUBERNETES_SERVICE_HOST``,
the service account's CA and token, re-read whenever the kubelet rotates it) when ``in_cluster`` is true; and
with neither a URL, a file nor ``in_cluster`` given: the environment's kubeconfig (``KUBECONFIG``, a list
merged as kubectl merges it, else ``~/.kube/config``) when a ``context`` is named or ``KUBECONFIG`` is set,
else in-cluster. The client retries a request once with fresh credentials after a 401 (``auth``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Hashable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx2 as httpx

from balancing.errors import ObjectError, SourceError
from balancing.model.objects import POLICY_API_VERSION, KubeObject, ObjectRef, ref
from balancing.sources import kubeconfig, kubecredentials
from balancing.sources.informer import Bounds, Counts, Informer, Resource, Timing, describe_item
from balancing.sources.selected_pods import PodQuery, PodUnion, pod_queries
from balancing.sources.update import SourceUpdate

__all__ = ["Bounds", "Counts", "KubeConnection", "KubeSource", "Timing", "resources_for"]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def resources_for(node_name: str) -> list[Resource]:
    """The collections the agent follows on ``node_name``."""
    return [
        Resource("/api/v1/services", "v1", "Service"),
        Resource("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
        Resource("/api/v1/nodes", "v1", "Node"),
        Resource("/api/v1/namespaces", "v1", "Namespace"),  # their labels: socket-LB exclusions
        Resource(
            f"/apis/{POLICY_API_VERSION}/localredirectpolicies", POLICY_API_VERSION, "LocalRedirectPolicy"
        ),
        Resource(f"/apis/{POLICY_API_VERSION}/balancingpolicies", POLICY_API_VERSION, "BalancingPolicy"),
        Resource("/api/v1/pods", "v1", "Pod", f"spec.nodeName={node_name}"),
    ]


# --- connection ----------------------------------------------------------------------------------------


@dataclass
class KubeConnection:
    """Where the API server is and how to authenticate to it: ``headers()`` for each request (a token file
    re-read whenever it changes, an exec plugin's credential cached until it expires), and ``auth`` for an
    httpx client to also retry a request once with fresh credentials after a 401."""

    base_url: str
    verify: ssl.SSLContext | bool = True
    credentials: kubecredentials.Credentials = field(default_factory=kubecredentials.Credentials)

    def headers(self) -> dict[str, str]:
        return self.credentials.headers()

    @property
    def auth(self) -> httpx.Auth:
        return kubecredentials.RetryAuth(self.credentials)

    @classmethod
    def plain(cls, base_url: str) -> KubeConnection:
        return cls(base_url.rstrip("/"))

    @classmethod
    def in_cluster(cls, account: Path = SERVICE_ACCOUNT) -> KubeConnection:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise SourceError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT unset; give --kubeconfig")
        host = f"[{host}]" if ":" in host else host
        context = ssl.create_default_context(cafile=str(account / "ca.crt"))
        return cls(f"https://{host}:{port}", context, kubecredentials.TokenFile(account / "token"))

    @classmethod
    def from_kubeconfig(cls, path: Path | str, context_name: str | None = None) -> KubeConnection:
        """Context ``context_name`` (else the current one) of the kubeconfig ``path``."""
        return cls._of(kubeconfig.load(path, context_name))

    @classmethod
    def from_environment(
        cls, context_name: str | None = None, environ: Mapping[str, str] | None = None
    ) -> KubeConnection:
        """Context ``context_name`` (else the current one) of the kubeconfig files ``KUBECONFIG`` lists
        (merged as kubectl merges them), else of ``~/.kube/config``."""
        return cls._of(kubeconfig.load(None, context_name, environ=environ))

    @classmethod
    def choose(
        cls,
        *,
        api_base_url: str | None = None,
        kubeconfig: Path | str | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KubeConnection:
        """The connection asked for: a plain URL; a kubeconfig file; in-cluster when ``in_cluster``; else
        (``in_cluster`` None) the environment's kubeconfig when a ``context`` is named or ``KUBECONFIG`` is
        set, in-cluster otherwise."""
        env = os.environ if environ is None else environ
        if context is not None and (api_base_url is not None or in_cluster):
            raise SourceError("a context needs a kubeconfig (not an API server URL or in-cluster)")
        if api_base_url is not None:
            return cls.plain(api_base_url)
        if kubeconfig is not None:
            return cls.from_kubeconfig(kubeconfig, context)
        if in_cluster is None and (context is not None or env.get("KUBECONFIG")):
            return cls.from_environment(context, env)
        return cls.in_cluster()

    @classmethod
    def _of(cls, config: kubeconfig.ClientConfig) -> KubeConnection:
        return cls(config.server, config.verify, config.credentials)


# --- the source ----------------------------------------------------------------------------------------


class KubeSource:
    """The objects in force from the API server; see the module docstring."""

    def __init__(
        self,
        node_name: str,
        *,
        api_base_url: str | None = None,
        kubeconfig: Path | str | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
        connection: KubeConnection | None = None,
        timing: Timing | None = None,
        bounds: Bounds | None = None,
    ) -> None:
        if connection is None:
            connection = KubeConnection.choose(
                api_base_url=api_base_url, kubeconfig=kubeconfig, context=context, in_cluster=in_cluster
            )
        self.node_name = node_name
        self.connection = connection
        self.timing = timing or Timing()
        self.bounds = bounds or Bounds()
        self.resources = resources_for(node_name)
        self.counts = Counts()  # what every run's informers received (for metrics)

    async def updates(self) -> AsyncGenerator[SourceUpdate, None]:
        """The full initial state, then every non-empty difference, forever (close to stop)."""
        async with httpx.AsyncClient(
            base_url=self.connection.base_url,
            verify=self.connection.verify,
            auth=self.connection.auth,
            timeout=30.0,
        ) as client:
            run = _Run(client, self.connection, self.timing, self.bounds, self.counts)
            try:
                yield await run.start(self.resources, self.timing.pods_wait)
                while True:
                    yield await run.pending.take()
            finally:
                await run.stop()


_NODE_PODS = "this node's pods"  # the PodUnion holder of the spec.nodeName watch


class _Run:
    """One ``updates()`` run: the fixed informers, plus one pod informer per ``PodQuery`` the
    BalancingPolicies in force need, started and retired as policies change.

    A query's informer is retired only once every newly needed query has been listed, so a policy whose
    selector changes keeps its old pods until the new ones are known (make before break)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        connection: KubeConnection,
        timing: Timing,
        bounds: Bounds | None = None,
        counts: Counts | None = None,
    ) -> None:
        self.client = client
        self.connection = connection
        self.timing = timing
        self.bounds = bounds or Bounds()
        self.counts = counts or Counts()
        self.pending = Pending()
        self.pods = PodUnion()
        self.tasks: dict[Hashable, asyncio.Task[None]] = {}
        self.policies: Informer | None = None
        self.listed: set[PodQuery] = set()  # queries whose informer has delivered its first list
        self.follows_pods = False  # pods are among the resources (a policies-only source needs none)
        self.retiring: set[asyncio.Task[None]] = set()  # cancelled, not finished yet
        self.stopped = False

    async def start(self, resources: list[Resource], pods_wait: float = 30.0) -> SourceUpdate:
        """List everything, then watch: the initial state. The policies decide which pods to list next;
        the initial state waits for those lists at most ``pods_wait`` seconds (a pod query the API server
        keeps failing must not hold back every Service), the rest follows as it arrives."""
        fixed = {r: self._informer(r) for r in resources}
        self.follows_pods = any(r.kind == "Pod" for r in resources)
        lists = await asyncio.gather(*(i.list_until_done() for i in fixed.values()))
        for resource, listed in zip(fixed, lists, strict=True):
            if resource.kind == "BalancingPolicy":
                self.policies = fixed[resource]
            self._put(self.pods.apply(_NODE_PODS, listed) if resource.kind == "Pod" else listed)
        for query in sorted(self._needed()):
            self._spawn(query, partial(self._follow, query))
        try:
            async with asyncio.timeout(pods_wait):
                while not self._needed() <= self.listed:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            missing = ", ".join(str(q) for q in sorted(self._needed() - self.listed))
            log.warning("starting without the pods of BalancingPolicies not listed yet: %s", missing)
        initial = self.pending.take_now()  # the fixed lists and the pod lists so far, coalesced
        for resource, informer in fixed.items():
            holder = _NODE_PODS if resource.kind == "Pod" else resource
            self._spawn(holder, partial(informer.run, self._emitter(resource.kind, holder)))
        return initial

    async def stop(self) -> None:
        self.stopped = True
        tasks = [*self.tasks.values(), *self.retiring]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    # --- following the policies ----------------------------------------------------------------------

    def _needed(self) -> set[PodQuery]:
        if self.policies is None or not self.follows_pods:
            return set()
        return pod_queries(self.policies.objects.values())

    def _reconcile(self) -> None:
        """Start the informers newly needed queries want; retire the unneeded ones when it is safe."""
        needed = self._needed()
        for query in sorted(needed - self.tasks.keys()):
            log.info("following %s for BalancingPolicies", query)
            self._spawn(query, partial(self._follow, query))
        pending = {q for q in needed if q not in self.listed}
        if pending:
            return  # retire once the new queries are listed
        for holder in [h for h in self.tasks if isinstance(h, PodQuery) and h not in needed]:
            log.info("no longer following %s", holder)
            task = self.tasks.pop(holder)
            task.cancel()
            self.retiring.add(task)
            task.add_done_callback(self.retiring.discard)
            self.listed.discard(holder)
            self._put(self.pods.drop(holder))

    async def _follow(self, query: PodQuery) -> None:
        informer = self._informer(_query_resource(query))
        self._put(self.pods.apply(query, await informer.list_until_done()))
        self.listed.add(query)
        self._reconcile()
        await informer.run(self._emitter("Pod", query))

    # --- plumbing --------------------------------------------------------------------------------------

    def _informer(self, resource: Resource) -> Informer:
        return Informer(self.client, resource, self.connection.headers, self.timing, self.bounds, self.counts)

    def _spawn(self, holder: Hashable, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` for ``holder``; should it ever fail (a bug: informers retry every API error), log
        it and start it again rather than silently stop following."""
        if self.stopped:
            return
        task = asyncio.create_task(work(), name=f"follow {holder}")
        self.tasks[holder] = task

        def done(finished: asyncio.Task[None]) -> None:
            if finished.cancelled() or self.tasks.get(holder) is not finished:
                return
            log.error("following %s failed; starting again in 1 s", holder, exc_info=finished.exception())
            asyncio.get_running_loop().call_later(1.0, self._spawn, holder, work)

        task.add_done_callback(done)

    def _emitter(self, kind: str, holder: Hashable) -> Callable[[SourceUpdate], Awaitable[None]]:
        async def emit(update: SourceUpdate) -> None:
            self._put(self.pods.apply(holder, update) if kind == "Pod" else update)
            if kind == "BalancingPolicy":
                self._reconcile()

        return emit

    def _put(self, update: SourceUpdate) -> None:
        if update:
            self.pending.add(update)


class Pending:
    """The changes not yet taken, coalesced per object: the latest version of each changed object (or its
    deletion), and the errors found meanwhile about objects not changed since (at most ``max_errors``, the
    oldest dropped first). Whatever the informers deliver while the consumer is busy costs memory per
    object, never per change, and arrives as one update; an error already overtaken by a newer version of
    its object is not delivered after it."""

    def __init__(self, max_errors: int = 1000) -> None:
        self._objects: dict[ObjectRef, KubeObject | None] = {}  # None: deleted
        self._errors: dict[str, list[ObjectError]] = {}  # by the object they are about ("Kind ns/name")
        self._max_errors = max_errors
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._objects) + sum(len(e) for e in self._errors.values())

    def add(self, update: SourceUpdate) -> None:
        for deleted in update.deletes:
            self._objects[deleted] = None
            self._errors.pop(_described(deleted), None)
        for obj in update.upserts:
            key = ref(obj)
            self._objects[key] = obj
            self._errors.pop(_described(key), None)
        for error in update.errors:
            self._errors.setdefault(error.obj, []).append(error)
        while self._errors and sum(len(e) for e in self._errors.values()) > self._max_errors:
            oldest = next(iter(self._errors.values()))
            oldest.pop(0)
            if not oldest:
                del self._errors[next(iter(self._errors))]
        if self:
            self._ready.set()

    async def take(self) -> SourceUpdate:
        """Everything pending, once there is something."""
        await self._ready.wait()
        return self.take_now()

    def take_now(self) -> SourceUpdate:
        """Everything pending (possibly nothing)."""
        self._ready.clear()
        objects, self._objects = self._objects, {}
        errors = [e for found in self._errors.values() for e in found]
        self._errors = {}
        upserts = [o for o in objects.values() if o is not None]
        return SourceUpdate(upserts, [r for r, o in objects.items() if o is None], errors)


def _described(key: ObjectRef) -> str:
    """How errors name an object (``KubeObjectError.obj``)."""
    kind, namespace, name = key
    return describe_item(kind, (namespace, name))


def _query_resource(query: PodQuery) -> Resource:
    return Resource(query.path, "v1", "Pod", label_selector=query.label_selector)
