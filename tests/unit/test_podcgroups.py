"""Pod cgroup discovery over kubelet-named directory trees (both drivers, every QoS class)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancing.datapath import podcgroups
from helpers import kubelet
from helpers.kubelet import CID, UID


@pytest.mark.parametrize(("pod_dir", "container_dir"), kubelet.LAYOUTS)
def test_pod_and_container_cgroups_are_found(tmp_path: Path, pod_dir: str, container_dir: str) -> None:
    pod = tmp_path / pod_dir
    (pod / container_dir).mkdir(parents=True)
    (tmp_path / "system.slice" / "sshd.service").mkdir(parents=True)
    index = podcgroups.scan(tmp_path)
    assert set(index.by_pod) == {UID}
    ids = index.cgroups_of(UID)
    assert ids == tuple(sorted([pod.stat().st_ino, (pod / container_dir).stat().st_ino]))
    assert index.by_cgroup[(pod / container_dir).stat().st_ino] == podcgroups.CgroupOwner(UID, CID)
    assert index.by_cgroup[pod.stat().st_ino] == podcgroups.CgroupOwner(UID, "")


def test_other_directories_are_not_pods(tmp_path: Path) -> None:
    for d in (
        "kubepods/burstable",
        "kubepods.slice/kubepods-besteffort.slice",
        "user.slice/user-0.slice",
        "podcast",
    ):
        (tmp_path / d).mkdir(parents=True)
    assert podcgroups.scan(tmp_path).by_pod == {}
