"""Who made a connection: a cgroup id from an event → the pod and container it runs in, or the host.

The datapath reports ``bpf_get_current_cgroup_id()``; the kubelet names pod and container cgroups after the
pod UID and container id (``datapath.podcgroups`` knows the driver, runtime and QoS variants). ``Attributor``
keeps a ``PodCgroupIndex`` of the node's cgroup tree and resolves the pod UID to a Pod object through a
lookup the agent provides (its store), so the pod's namespace and name follow the Pod objects of this node.
The container is named from the Pod's ``status.containerStatuses[].containerID`` when the objects carry
it, else it is the container id from the cgroup name.

Containers start all the time, so a cgroup id missing from the index triggers a rescan of the tree — at
most every ``rescan_interval`` seconds. Until a scan that ran after its first sighting confirms it, an
unknown id is attributed to the host provisionally; afterwards it is the host for good (cgroup ids are
inode numbers and are not reused). Anything not below a pod cgroup is the host. Neighbours:
``datapath.podcgroups`` (scan, index), ``record`` (puts the result into the JSON record).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancing.datapath import podcgroups
from balancing.model import objects

log = logging.getLogger(__name__)

PodLookup = Callable[[str], objects.Pod | None]  # pod UID → the Pod object of this node, if known
Scanner = Callable[[Path], podcgroups.PodCgroupIndex]

MAX_HOST_IDS = (
    65536  # remembered host / unknown cgroup ids (forgotten all at once beyond this; cheap to relearn)
)


@dataclass(frozen=True, slots=True)
class ClientPod:
    """The pod (and container) a client process runs in; namespace/name None when no Pod object has the
    UID (a pod the agent does not know about); container None for the pod's own cgroup."""

    uid: str
    namespace: str | None
    name: str | None
    container: str | None
    container_id: str


def container_names(pod: objects.Pod) -> dict[str, str]:
    """Container id → container name from the Pod's container statuses (init and ephemeral ones too).

    Read duck-typed: the statuses are only there when the model keeps ``containerStatuses``.
    """
    names: dict[str, str] = {}
    for attr in ("container_statuses", "init_container_statuses", "ephemeral_container_statuses"):
        for status in _statuses(getattr(pod.status, attr, None)):
            name, cid = getattr(status, "name", ""), getattr(status, "container_id", "") or ""
            if name and cid:
                names[cid.rpartition("://")[2]] = str(name)
    return names


def _statuses(value: Any) -> Iterable[Any]:
    return value if isinstance(value, list | tuple) else ()


def client_pod(owner: podcgroups.CgroupOwner, pod: objects.Pod | None) -> ClientPod:
    """What one cgroup's owner is, named from the Pod object when there is one."""
    cid = owner.container_id
    if pod is None:
        return ClientPod(owner.pod_uid, None, None, cid or None, cid)
    container = container_names(pod).get(cid, cid) if cid else None
    return ClientPod(owner.pod_uid, pod.metadata.namespace, pod.metadata.name, container, cid)


class Attributor:
    """cgroup id → ``ClientPod`` (None: the host), with a cache and rate-limited rescans on misses."""

    def __init__(
        self,
        root: Path,
        pods_by_uid: PodLookup,
        *,
        index: podcgroups.PodCgroupIndex | None = None,
        rescan_interval: float = 2.0,
        scan: Scanner = podcgroups.scan,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.rescan_interval = rescan_interval
        self.scans = 0
        self._pods_by_uid = pods_by_uid
        self._scan = scan
        self._clock = clock
        self._index = index if index is not None else podcgroups.PodCgroupIndex()
        self._scanned_at = clock() if index is not None else float("-inf")
        self._host: set[int] = set()  # confirmed: no scan after first sighting found them below a pod
        self._unknown: dict[int, float] = {}  # provisional host ids → when first seen
        self._cache: dict[int, tuple[objects.Pod | None, ClientPod]] = {}

    def update_index(self, index: podcgroups.PodCgroupIndex) -> None:
        """Take a fresh scan made elsewhere (the agent rescans for the policies' client rules anyway)."""
        self._index = index
        self._scanned_at = self._clock()
        self._cache.clear()

    def attribute(self, cgroup_id: int) -> ClientPod | None:
        """The pod and container of ``cgroup_id``, or None for the host."""
        owner = self._index.by_cgroup.get(cgroup_id)
        if owner is None and cgroup_id not in self._host:
            owner = self._miss(cgroup_id)
        if owner is None:
            return None
        return self._named(cgroup_id, owner)

    def _named(self, cgroup_id: int, owner: podcgroups.CgroupOwner) -> ClientPod:
        pod = self._pods_by_uid(owner.pod_uid)
        cached = self._cache.get(cgroup_id)
        if cached is not None and cached[0] is pod:  # Pod objects are immutable: same object, same names
            return cached[1]
        named = client_pod(owner, pod)
        self._cache[cgroup_id] = (pod, named)
        return named

    def _miss(self, cgroup_id: int) -> podcgroups.CgroupOwner | None:
        now = self._clock()
        if len(self._unknown) >= MAX_HOST_IDS:
            self._unknown.clear()
        first_seen = self._unknown.setdefault(cgroup_id, now)
        if self._scanned_at < first_seen and now - self._scanned_at >= self.rescan_interval:
            self._rescan(now)
            owner = self._index.by_cgroup.get(cgroup_id)
            if owner is not None:
                return owner
        if self._scanned_at >= first_seen:  # a scan made after it existed did not find it under a pod
            self._confirm_host(cgroup_id)
        return None

    def _rescan(self, now: float) -> None:
        try:
            index = self._scan(self.root)
        except OSError as exc:
            log.warning("scanning %s for pod cgroups failed: %s", self.root, exc)
            index = self._index
        self.scans += 1
        self._index, self._scanned_at = index, now
        self._cache.clear()

    def _confirm_host(self, cgroup_id: int) -> None:
        del self._unknown[cgroup_id]
        if len(self._host) >= MAX_HOST_IDS:
            self._host.clear()
        self._host.add(cgroup_id)
