"""The control-plane fixture itself: the real API server answers at the release go.mod pins, the controllers
run (the default ServiceAccount appears in a new namespace, an EndpointSlice follows a Service), and a
restart of the API server keeps etcd's data."""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers.controlplane import ControlPlane

GO_MOD = Path(__file__).with_name("go.mod")


def test_server_version_is_the_pinned_release(kube: ControlPlane) -> None:
    pinned = re.search(r"^\tk8s\.io/kubernetes v(\S+)$", GO_MOD.read_text(), re.M)
    assert pinned is not None
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert version["gitVersion"] == f"v{pinned.group(1)}"


def test_endpointslice_controller_writes_slices(kube: ControlPlane, namespace: str) -> None:
    kube.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": namespace},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
            }
        ]
    )
    selector = ["-l", "kubernetes.io/service-name=web", "-o", "name"]

    def sliced() -> str:
        return kube.kubectl("get", "endpointslices", "-n", namespace, *selector).stdout.strip()

    kube.wait_for(sliced, "the EndpointSlice controller's slice for Service web", timeout=30)


def test_restart_keeps_data(kube: ControlPlane, namespace: str) -> None:
    kube.kubectl("create", "configmap", "kept", "-n", namespace, "--from-literal=k=v")
    kube.restart_apiserver()
    assert kube.get("configmap", "kept", namespace)["data"] == {"k": "v"}
