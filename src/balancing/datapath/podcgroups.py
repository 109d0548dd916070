"""Find the cgroups of pods on this node from the kubelet's naming, so the datapath can recognise a pod's
connections by the cgroup id its processes run in (``bpf_get_current_cgroup_id``).

The kubelet names a pod's cgroup after its UID, by driver and QoS class::

    cgroupfs  kubepods/pod<uid>/<container>              (Guaranteed)
              kubepods/burstable/pod<uid>/<container>     (Burstable; besteffort likewise)
    systemd   kubepods.slice/kubepods-pod<uid_>.slice/cri-containerd-<id>.scope
              kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/crio-<id>.scope

(``uid_`` is the UID with ``-`` written ``_``; containers are ``cri-containerd-``, ``crio-`` or ``docker-``
scopes, or bare ids under cgroupfs). ``scan`` walks a cgroup v2 tree once and returns, per pod UID, the ids of
the pod's cgroup and every cgroup below it, and per cgroup id the pod and container it belongs to.
Neighbours: the agent rescans and hands the result to the datapath writer; events use the reverse index.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_POD_DIR = re.compile(r"^(?:kubepods(?:-[a-z]+)?-)?pod([0-9a-fA-F_-]{8,})(?:\.slice)?$")
_CONTAINER_DIR = re.compile(r"^(?:(?:cri-containerd|crio|docker)-)?([0-9a-f]{12,64})(?:\.scope)?$")


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    pod_uid: str
    container_id: str  # "" for the pod's own cgroup


@dataclass
class PodCgroupIndex:
    by_pod: dict[str, tuple[int, ...]] = field(default_factory=dict)  # pod UID → cgroup ids
    by_cgroup: dict[int, CgroupOwner] = field(default_factory=dict)

    def cgroups_of(self, pod_uid: str) -> tuple[int, ...]:
        return self.by_pod.get(pod_uid, ())


def pod_uid_of(name: str) -> str | None:
    """The pod UID a kubelet cgroup directory name carries, if it is a pod's cgroup."""
    m = _POD_DIR.match(name)
    return m.group(1).replace("_", "-") if m else None


def container_id_of(name: str) -> str:
    m = _CONTAINER_DIR.match(name)
    return m.group(1) if m else name


def scan(root: Path, max_depth: int = 8) -> PodCgroupIndex:
    """Walk ``root`` (a cgroup v2 directory) and index every pod cgroup found below it."""
    index = PodCgroupIndex()
    pods: dict[str, list[int]] = {}

    def walk(path: str, depth: int, pod: str | None) -> None:
        try:
            entries = [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return  # removed while we walked: a container went away
        for entry in entries:
            uid = pod if pod is not None else pod_uid_of(entry.name)
            if uid is not None:
                try:
                    ino = entry.inode()
                except OSError:
                    continue
                pods.setdefault(uid, []).append(ino)
                index.by_cgroup[ino] = CgroupOwner(uid, "" if pod is None else container_id_of(entry.name))
            if depth < max_depth:
                walk(entry.path, depth + 1, uid)

    walk(str(root), 0, pod_uid_of(root.name))
    index.by_pod = {uid: tuple(sorted(ids)) for uid, ids in pods.items()}
    return index
