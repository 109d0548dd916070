"""The kubelet's cgroup layouts (both drivers, every QoS class, each runtime), as test parameters."""

from __future__ import annotations

import pytest

UID = "3f1c9a2e-8b7d-4c1e-9f00-123456789abc"
CID = "0123456789abcdef" * 4
_U = UID.replace("-", "_")

# (pod cgroup, container cgroup below it), relative to the cgroup root, for UID and CID.
LAYOUTS = [
    pytest.param(f"kubepods/pod{UID}", CID, id="cgroupfs-guaranteed"),
    pytest.param(f"kubepods/burstable/pod{UID}", CID, id="cgroupfs-burstable"),
    pytest.param(f"kubepods/besteffort/pod{UID}", CID, id="cgroupfs-besteffort"),
    pytest.param(
        f"kubepods.slice/kubepods-pod{_U}.slice",
        f"cri-containerd-{CID}.scope",
        id="systemd-guaranteed-containerd",
    ),
    pytest.param(
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{_U}.slice",
        f"crio-{CID}.scope",
        id="systemd-burstable-crio",
    ),
    pytest.param(
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{_U}.slice",
        f"docker-{CID}.scope",
        id="systemd-besteffort-docker",
    ),
]
