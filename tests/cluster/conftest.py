"""Fixtures of the cluster tests: one real control plane per session, a namespace per test.

``kube`` starts etcd, kube-apiserver and the Service controllers (``helpers.controlplane``; the Go fixture in
this directory) once per session and stops them at the end; the tests share it and keep out of each other's
way with their own namespaces (``namespace``) and uniquely named cluster-scoped objects. Tests that also load
the datapath are marked ``kernel`` and use the kernel tests' plugin (``helpers.kernel_fixtures``: skip logic,
leftover sweep, ``topology``); ``kube_nodes``/``kn`` are the two agents of ``helpers.kubenodes``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import kernel_fixtures
from helpers.controlplane import ControlPlane, running
from helpers.kubenodes import KubeCluster, KubeNodes, for_test


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``kernel`` (agents, netns pods) are skipped, with the reason, where the kernel tests
    cannot run; the API-only tests run anywhere the fixture builds."""
    reason = kernel_fixtures.kernel_skip_reason()
    for item in items:
        if reason and item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kube() -> Iterator[ControlPlane]:
    with running() as c:
        yield c


@pytest.fixture
def namespace(kube: ControlPlane) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting for the namespace controller).
    Its pods are force-deleted first: with no kubelet to confirm a graceful deletion they would stay, and
    the namespace controller would retry the namespace for ever."""
    name = kube.create_namespace()
    yield name
    kube.kubectl("delete", "pods", "--all", "-n", name, "--force", "--grace-period=0", check=False)
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def kube_nodes(
    kube: ControlPlane, harness_sweep: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubeCluster]:
    """Two nodes with an agent each in Kubernetes mode (``helpers.kubenodes``), built once per module."""
    cluster = KubeCluster(kube, tmp_path_factory.mktemp("kube-nodes"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def kn(kube_nodes: KubeCluster, namespace: str, request: pytest.FixtureRequest) -> Iterator[KubeNodes]:
    """``kube_nodes`` bound to this test's namespace; what the test made there is removed afterwards."""
    with for_test(kube_nodes, namespace, request) as nodes:
        yield nodes
