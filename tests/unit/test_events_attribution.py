"""Attributing events to pods: kubelet-named cgroup trees (both drivers, three runtimes, every QoS class)
under tmp_path, Pod objects as the manifest directory holds them, rate-limited rescans on misses."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from balancing.datapath import podcgroups
from balancing.events.attribution import Attributor, ClientPod, container_names
from balancing.model import objects
from helpers import kubelet
from helpers.kubelet import CID, UID

UID2 = "9a9a9a9a-0000-4000-8000-000000000002"
CID2 = "fedcba9876543210" * 4


def pod_doc(uid: str = UID, name: str = "client-0", statuses: list[dict[str, str]] | None = None) -> Any:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid},
        "spec": {"nodeName": "node-a", "containers": [{"name": "main"}]},
        "status": {"phase": "Running", "podIP": "10.244.2.1"},
    }
    if statuses is not None:
        doc["status"]["containerStatuses"] = statuses
    return objects.parse_object(doc)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ino(path: Path) -> int:
    return path.stat().st_ino


def systemd_pod(root: Path, uid: str, qos: str = "burstable") -> Path:
    u = uid.replace("-", "_")
    if qos == "guaranteed":
        return root / "kubepods.slice" / f"kubepods-pod{u}.slice"
    return root / "kubepods.slice" / f"kubepods-{qos}.slice" / f"kubepods-{qos}-pod{u}.slice"


@pytest.mark.parametrize(("pod_dir", "container_dir"), kubelet.LAYOUTS)
def test_container_and_pod_cgroups_name_the_pod(tmp_path: Path, pod_dir: str, container_dir: str) -> None:
    (tmp_path / pod_dir / container_dir).mkdir(parents=True)
    pods = {UID: pod_doc()}
    attr = Attributor(tmp_path, pods.get)
    assert attr.attribute(ino(tmp_path / pod_dir / container_dir)) == ClientPod(
        UID, "default", "client-0", CID, CID
    )
    assert attr.attribute(ino(tmp_path / pod_dir)) == ClientPod(UID, "default", "client-0", None, "")


def test_anything_outside_pod_cgroups_is_the_host(tmp_path: Path) -> None:
    sshd = tmp_path / "system.slice" / "sshd.service"
    sshd.mkdir(parents=True)
    (tmp_path / "kubepods.slice" / "kubepods-burstable.slice").mkdir(parents=True)
    attr = Attributor(tmp_path, {UID: pod_doc()}.get)
    assert attr.attribute(ino(sshd)) is None
    assert attr.attribute(ino(tmp_path)) is None
    assert attr.attribute(ino(tmp_path / "kubepods.slice" / "kubepods-burstable.slice")) is None
    assert attr.attribute(123456789) is None


def test_a_pod_without_pod_object_keeps_its_uid(tmp_path: Path) -> None:
    c = systemd_pod(tmp_path, UID2) / f"cri-containerd-{CID2}.scope"
    c.mkdir(parents=True)
    attr = Attributor(tmp_path, {UID: pod_doc()}.get)
    assert attr.attribute(ino(c)) == ClientPod(UID2, None, None, CID2, CID2)


def test_a_pod_object_arriving_later_names_the_pod(tmp_path: Path) -> None:
    c = systemd_pod(tmp_path, UID, "besteffort") / f"crio-{CID}.scope"
    c.mkdir(parents=True)
    pods: dict[str, objects.Pod] = {}
    attr = Attributor(tmp_path, pods.get)
    assert attr.attribute(ino(c)) == ClientPod(UID, None, None, CID, CID)
    pods[UID] = pod_doc(name="late")
    got = attr.attribute(ino(c))
    assert got is not None and (got.namespace, got.name) == ("default", "late")


def test_container_names_come_from_container_statuses() -> None:
    status = SimpleNamespace(
        container_statuses=[
            SimpleNamespace(name="main", container_id=f"containerd://{CID}"),
            SimpleNamespace(name="waiting", container_id=None),
        ],
        init_container_statuses=[SimpleNamespace(name="init", container_id=f"cri-o://{CID2}")],
    )
    assert container_names(SimpleNamespace(status=status)) == {CID: "main", CID2: "init"}  # type: ignore[arg-type]
    assert container_names(pod_doc()) == {}


def test_pod_objects_with_container_statuses_name_the_container(tmp_path: Path) -> None:
    pod = pod_doc(statuses=[{"name": "main", "containerID": f"containerd://{CID}"}])
    if not hasattr(pod.status, "container_statuses"):
        pytest.skip("objects.PodStatus does not keep containerStatuses yet")
    c = systemd_pod(tmp_path, UID) / f"cri-containerd-{CID}.scope"
    c.mkdir(parents=True)
    assert Attributor(tmp_path, {UID: pod}.get).attribute(ino(c)) == ClientPod(
        UID, "default", "client-0", "main", CID
    )


def test_new_cgroups_are_found_by_a_rate_limited_rescan(tmp_path: Path) -> None:
    clock = Clock()
    calls: list[Path] = []

    def scan(root: Path) -> podcgroups.PodCgroupIndex:
        calls.append(root)
        return podcgroups.scan(root)

    attr = Attributor(
        tmp_path, {UID: pod_doc()}.get, index=scan(tmp_path), rescan_interval=2.0, scan=scan, clock=clock
    )
    assert len(calls) == 1
    c = systemd_pod(tmp_path, UID) / f"cri-containerd-{CID}.scope"
    c.mkdir(parents=True)
    clock.now = 0.5
    assert attr.attribute(ino(c)) is None, "provisionally the host: the last scan is too recent"
    assert len(calls) == 1
    clock.now = 2.5
    assert attr.attribute(ino(c)) == ClientPod(UID, "default", "client-0", CID, CID)
    assert len(calls) == 2 and attr.scans == 1
    for t in (3.0, 10.0, 20.0):  # known now: no more scans
        clock.now = t
        attr.attribute(ino(c))
    assert len(calls) == 2


def test_host_cgroups_are_confirmed_once_and_then_cost_no_scans(tmp_path: Path) -> None:
    clock = Clock()
    host = tmp_path / "system.slice" / "kubelet.service"
    host.mkdir(parents=True)
    index = podcgroups.scan(tmp_path)
    attr = Attributor(tmp_path, lambda _uid: None, index=index, rescan_interval=2.0, clock=clock)
    clock.now = 1.0
    assert attr.attribute(ino(host)) is None and attr.scans == 0
    clock.now = 3.0
    assert attr.attribute(ino(host)) is None and attr.scans == 1
    for t in (6.0, 9.0, 50.0):
        clock.now = t
        assert attr.attribute(ino(host)) is None
    assert attr.scans == 1
    clock.now = 51.0  # another new id: one more scan
    assert attr.attribute(987654321) is None and attr.scans == 2


def test_an_index_from_elsewhere_is_used(tmp_path: Path) -> None:
    c = systemd_pod(tmp_path, UID) / f"cri-containerd-{CID}.scope"
    attr = Attributor(tmp_path, {UID: pod_doc()}.get, index=podcgroups.scan(tmp_path), rescan_interval=1e9)
    c.mkdir(parents=True)
    assert attr.attribute(ino(c)) is None
    attr.update_index(podcgroups.scan(tmp_path))
    got = attr.attribute(ino(c))
    assert got is not None and got.name == "client-0"
