"""Socket-LB exclusions end to end: manifests → ``balancing agent`` → the socket hooks of the real kernel.

Pods whose socket-level translation would get in the way (a service mesh's sidecar, a KubeVirt VM) are left
alone when their Pod has the annotation, or their Namespace the label, ``balancing.elf.io/socket-lb:
disabled``; with ``--socket-lb-host-namespace-only`` every client outside the host's network namespace is.

"Pods" on node-a are network namespaces of the test topology whose clients run in kubelet-named container
cgroups below node-a's cgroup (systemd driver, containerd), with Pod objects carrying the same UID, as in
tests/kernel/test_policies_kernel.py; the backends are pods of node-b. The VIPs lie in ranges every namespace
routes as unreachable: an untranslated connect fails at once with EHOSTUNREACH (an unconnected datagram
likewise), a translated one reaches a backend, which answers with its name.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancing.datapath import abi, maps, settings
from balancing_testkit.topology import Host, Topology
from helpers.support import AgentProcess, endpoint, endpoint_slice, pod, service, wait_until, write_manifest

NODE = "node-a"
VIP, VIP6 = "10.96.0.10", "fd00:96::10"
KEY = f"{VIP}:80/TCP"
UNREACHABLE = {"EHOSTUNREACH": 3}
DISABLED = {"balancing.elf.io/socket-lb": "disabled"}


class Client:
    """A pod on node-a: a netns, a container cgroup named as the kubelet names it, and its Pod object."""

    def __init__(self, topo: Topology, name: str, namespace: str) -> None:
        self.name, self.namespace, self.uid = name, namespace, str(uuid.uuid4())
        self.host: Host = topo.add_pod(name)
        pod_dir = (
            topo.node_cgroup(NODE)
            / "kubepods.slice"
            / "kubepods-besteffort.slice"
            / f"kubepods-besteffort-pod{self.uid.replace('-', '_')}.slice"
        )
        self.container = pod_dir / f"cri-containerd-{secrets.token_hex(32)}.scope"
        self.container.mkdir(parents=True)

    def doc(self, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        d = pod(self.name, [self.host.ip4, self.host.ip6], {}, [], node=NODE, namespace=self.namespace)
        d["metadata"]["uid"] = self.uid
        d["metadata"]["annotations"] = annotations or {}
        return d

    def cgroup_ids(self) -> set[int]:
        pod_dir = self.container.parent
        return {pod_dir.stat().st_ino, self.container.stat().st_ino}


class Lab:
    """node-a with its agent on a manifest directory, backends on node-b and a Service in front of them."""

    def __init__(self, topo: Topology, manifests: Path) -> None:
        self.topo, self.manifests = topo, manifests
        self.backends = [topo.add_pod(f"be-{i}") for i in (1, 2)]
        self.agent = AgentProcess(topo, manifests, NODE)
        self._procs = [topo.start_backend(b, port=8080, wait=False) for b in self.backends]

    def start(self, *extra: str) -> None:
        for proc in self._procs:
            self.topo.wait_ready(proc)
        self.write("web.yaml", self.service("web", "default"))
        self.agent.extra = list(extra)
        self.agent.start()
        self.agent.wait_frontends(lambda f: KEY in f, what=f"{KEY} programmed")

    def service(self, name: str, namespace: str) -> list[dict[str, Any]]:
        docs = [service(name, [VIP, VIP6], [("http", 80, "TCP", 8080), ("dns", 80, "UDP", 8080)],
                        namespace=namespace)]  # fmt: skip
        for family, attr in ((4, "ip4"), (6, "ip6")):
            eps = [endpoint(getattr(b, attr), node="node-b") for b in self.backends]
            docs.append(
                endpoint_slice(
                    name,
                    eps,
                    [("http", 8080, "TCP"), ("dns", 8080, "UDP")],
                    name=f"{name}-v{family}",
                    namespace=namespace,
                )
            )
        return docs

    def write(self, name: str, docs: list[dict[str, Any]]) -> None:
        write_manifest(self.manifests, name, docs)

    def run(self, client: Host, cgroup: Path | str | None, target: str, mode: str = "tcp") -> dict[str, Any]:
        return self.topo.run_client(client, cgroup, [mode, target, "80", "--count", "3", "--timeout", "1"])

    def translated(self, src: Client, target: str = VIP, mode: str = "tcp") -> bool:
        """Every attempt reached a backend (True) or every one was left to the unreachable route (False)."""
        res = self.run(src.host, src.container, target, mode)
        if res["ok"] == 3 and set(res["backends"]) <= {"be-1", "be-2"}:
            return True
        assert res["errors"] == UNREACHABLE, res
        return False

    def skipped(self) -> set[int]:
        """The cgroup ids in the datapath's skip map."""
        io = maps.KernelMaps(self.agent.bpffs / "maps", names=[abi.MAP_SKIP])
        try:
            return {abi.unpack_skip_key(k) for k, _ in io.items(abi.MAP_SKIP)}
        finally:
            io.close()

    def flags(self) -> int:
        return settings.read_flags(self.agent.bpffs / "maps")

    def wait_skipped(self, want: set[int]) -> None:
        wait_until(lambda: self.skipped() == want, 5.0, f"skip map {want} (now {self.skipped()})")


@pytest.fixture
def lab(topology: Topology, tmp_path: Path) -> Iterator[Lab]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    lab = Lab(topology, manifests)
    yield lab
    if lab.agent.proc is not None and lab.agent.proc.poll() is None:
        lab.agent.stop()


def test_a_pod_annotation_leaves_the_pod_untranslated_until_it_is_removed(lab: Lab) -> None:
    mesh = Client(lab.topo, "mesh", "default")
    plain = Client(lab.topo, "plain", "default")
    lab.write("pods.yaml", [mesh.doc(DISABLED), plain.doc()])
    lab.start()
    lab.wait_skipped(mesh.cgroup_ids())
    assert lab.flags() == abi.CFG_F_SKIP
    for target, mode in ((VIP, "tcp"), (VIP6, "tcp"), (VIP, "udp-unconnected"), (VIP6, "udp-connected")):
        assert not lab.translated(mesh, target, mode), (target, mode)
        assert lab.translated(plain, target, mode), (target, mode)

    lab.write("pods.yaml", [mesh.doc(), plain.doc()])  # the annotation removed
    lab.wait_skipped(set())
    assert lab.flags() == 0  # nothing to look up: the hooks read no skip map
    assert lab.translated(mesh) and lab.translated(mesh, VIP6, "udp-unconnected")


def test_a_namespace_label_leaves_every_pod_of_the_namespace_untranslated(lab: Lab) -> None:
    vm1, vm2 = Client(lab.topo, "vm-1", "vms"), Client(lab.topo, "vm-2", "vms")
    web = Client(lab.topo, "web", "default")
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vms", "labels": DISABLED}}
    lab.write("pods.yaml", [vm1.doc(), vm2.doc(), web.doc()])
    lab.write("ns.yaml", [namespace])
    lab.start()
    lab.wait_skipped(vm1.cgroup_ids() | vm2.cgroup_ids())
    assert not lab.translated(vm1) and not lab.translated(vm2, VIP6)
    assert not lab.translated(vm1, VIP, "udp-unconnected")
    assert lab.translated(web) and lab.translated(web, VIP6)

    namespace["metadata"] = {"name": "vms", "labels": {"team": "virt"}}  # the label removed
    lab.write("ns.yaml", [namespace])
    lab.wait_skipped(set())
    assert lab.translated(vm1) and lab.translated(vm2, VIP6)

    namespace["metadata"] = {"name": "vms", "labels": DISABLED}
    lab.write("ns.yaml", [namespace])
    lab.wait_skipped(vm1.cgroup_ids() | vm2.cgroup_ids())
    assert not lab.translated(vm2)


def test_host_namespace_only_translates_the_host_netns_alone(lab: Lab) -> None:
    """With ``--socket-lb-host-namespace-only`` (here ``--host-netns`` names a namespace of the topology as
    the host's), a client in the host's netns is translated and a pod's client is not, whatever cgroup it
    runs in; the pod's own traffic is left to the network (Cilium's socketLB.hostNamespaceOnly)."""
    host = lab.topo.add_client("host", node=NODE)  # runs in node-a's cgroup
    pod_client = Client(lab.topo, "app", "default")
    lab.write("pods.yaml", [pod_client.doc()])
    lab.start("--socket-lb-host-namespace-only", "--host-netns", str(host.netns_path))
    assert lab.flags() & abi.CFG_F_HOST_NS_ONLY
    for target, mode in ((VIP, "tcp"), (VIP6, "tcp"), (VIP, "udp-unconnected")):
        res = lab.run(host, None, target, mode)
        assert res["ok"] == 3 and set(res["backends"]) <= {"be-1", "be-2"}, res
        assert not lab.translated(pod_client, target, mode), (target, mode)
        res = lab.run(pod_client.host, NODE, target, mode)  # in node-a's own cgroup: still a pod netns
        assert res["errors"] == UNREACHABLE, res


def test_without_host_namespace_only_a_pod_netns_is_translated(lab: Lab) -> None:
    """The default: every client below the agent's cgroup is translated, host netns or not."""
    host = lab.topo.add_client("host", node=NODE)
    pod_client = Client(lab.topo, "app", "default")
    lab.write("pods.yaml", [pod_client.doc()])
    lab.start("--host-netns", str(host.netns_path))
    assert lab.flags() == 0
    assert lab.translated(pod_client) and lab.translated(pod_client, VIP6, "udp-unconnected")
    assert lab.run(host, None, VIP)["ok"] == 3
