"""LocalRedirectPolicy and BalancingPolicy end to end: manifests → the agent process → the real kernel.

Each test writes Kubernetes manifests (Services, EndpointSlices, Pods, Nodes, policies) into a directory, runs
``balancing agent`` for node "node-a" on it, and connects from real sockets in the test topology:

- "local" pods run on node-a: their processes sit in kubelet-named cgroups below node-a's cgroup
  (``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope``)
  and their Pod objects carry the same UID, so the agent recognises their connections (loop guard,
  skipRedirectFromBackend);
- "remote" pods are Pod objects on other nodes whose addresses are namespaces of the topology;
- hostPort and nodeProxy backends are node addresses: a namespace of the topology stands in for the node and
  runs a backend on the port the datapath must translate to.

VIPs lie in 10.96.0.0/12 and fd00:96::/108, which every namespace routes as unreachable: an untranslated
connect fails at once with EHOSTUNREACH, a refused one with ECONNREFUSED. Backends answer with their name.

Not covered: ``enableOutCluster`` on a host outside the cluster. ``balancing agent --help`` has no option for
that mode (``ModelConfig.external_client``), so only the in-cluster half (the setting has no effect on a
node of the cluster) is tested.
"""

from __future__ import annotations

import errno
import functools
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from balancing.datapath import abi, maps
from balancing_testkit.topology import Topology
from helpers.support import (
    AgentProcess,
    balancing_policy,
    endpoint,
    endpoint_slice,
    local_redirect_policy,
    node,
    pod,
    service,
    wait_until,
    write_manifest,
)

NODE = "node-a"
VIP, VIP6 = "10.96.0.10", "fd00:96::10"
KEY, KEY6 = f"{VIP}:80/TCP", f"[{VIP6}]:80/TCP"
HTTP = [("", 8080, "TCP")]  # one unnamed backend port: pairs with any single frontend port
FRONT80 = [("", 80, "TCP")]


# --- the simulated node -------------------------------------------------------------------------------


@dataclass
class KubePod:
    """A pod: its addresses, UID, node, labels and, on node-a, the cgroup of its container."""

    name: str
    ip4: str
    ip6: str
    node: str
    labels: dict[str, str]
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    host: Any = None  # the topology's Pod (netns), if it has one
    container: Path | None = None  # its container's cgroup (pods on node-a)
    host_ports: dict[int, int] = field(default_factory=dict)  # containerPort → hostPort

    def ip(self, family: int) -> str:
        return self.ip4 if family == 4 else self.ip6

    def at(self, port: int = 8080, family: int = 4) -> str:
        return f"{self.ip4}:{port}" if family == 4 else f"[{self.ip6}]:{port}"

    def doc(self, *, ready: bool = True, labels: dict[str, str] | None = None) -> dict[str, Any]:
        d = pod(
            self.name,
            [self.ip4, self.ip6],
            self.labels if labels is None else labels,
            [("http", 8080, "TCP"), ("dns", 8080, "UDP")],
            ready=ready,
            node=self.node,
            namespace=self.namespace,
        )
        d["metadata"]["uid"] = self.uid
        for port in d["spec"]["containers"][0]["ports"]:
            host_port = self.host_ports.get(port["containerPort"])
            if host_port and port["protocol"] == "TCP":
                port["hostPort"] = host_port
        return d


class Lab:
    """node-a: a manifest directory, its agent, a client on it, and pods."""

    def __init__(self, topo: Topology, manifests: Path) -> None:
        self.topo, self.manifests = topo, manifests
        self.client = topo.add_client("client", node=NODE)
        self.agent = AgentProcess(topo, manifests, NODE)
        self._starting: list[Any] = []
        self._paper = 0

    # pods and hosts

    def pod(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        *,
        node: str = NODE,
        namespace: str = "default",
        ports: Iterable[int] = (8080,),
    ) -> KubePod:
        """A pod with a netns and a backend answering ``name`` on ``ports`` (TCP and UDP); on node-a its
        backend runs in a kubelet-named container cgroup."""
        host = self.topo.add_pod(name)
        kp = KubePod(name, host.ip4, host.ip6, node, labels or {}, namespace, host=host)
        if node == NODE:
            kp.container = self.container(kp)
        self.serve(kp.host, name, ports, cgroup=kp.container)
        return kp

    def paper_pod(
        self, name: str, labels: dict[str, str], *, node: str, host_ports: dict[int, int] | None = None
    ) -> KubePod:
        """A Pod object only (no netns, no process): for hostPort/nodeProxy, which never use its IP."""
        self._paper += 1
        kp = KubePod(name, f"10.244.9.{self._paper}", f"fd00:244::9:{self._paper}", node, labels)
        kp.host_ports = host_ports or {}
        return kp

    def host(self, name: str) -> Any:
        """A namespace standing in for a node's address."""
        return self.topo.add_pod(name)

    def serve(self, host: Any, name: str, ports: Iterable[int], cgroup: Path | None = None) -> None:
        proc = self.topo.start_backend(host, name=name, port=list(ports), cgroup=cgroup, wait=False)
        self._starting.append(proc)

    def container(self, kp: KubePod) -> Path:
        """A new container cgroup of ``kp`` named as the kubelet (systemd driver, containerd) names it."""
        pod_dir = (
            self.topo.node_cgroup(NODE)
            / "kubepods.slice"
            / "kubepods-burstable.slice"
            / f"kubepods-burstable-pod{kp.uid.replace('-', '_')}.slice"
        )
        path = pod_dir / f"cri-containerd-{secrets.token_hex(32)}.scope"
        path.mkdir(parents=True)
        return path

    # manifests and the agent

    def write(self, name: str, docs: list[dict[str, Any]]) -> None:
        write_manifest(self.manifests, name, docs)

    def remove(self, name: str) -> None:
        (self.manifests / name).unlink()

    def start(self) -> None:
        for proc in self._starting:
            self.topo.wait_ready(proc)
        self._starting.clear()
        self.agent.start()

    def stop(self) -> None:
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.stop()

    def wait(self, key: str, backends: list[str] | None, what: str = "") -> float:
        """Wait until the maps give ``key`` exactly ``backends`` (None: until ``key`` is gone)."""
        want = None if backends is None else sorted(backends)
        return self.agent.wait_frontends(
            lambda f: f.get(key) == want,
            what=what or f"{key} → {want} (now {self.agent.frontends().get(key)})",
        )

    def state(self, key: str) -> dict[str, Any]:
        code, body = self.agent.get("/state")
        assert code == 200
        (found,) = [f for f in body["frontends"] if f["frontend"] == key]
        assert isinstance(found, dict)
        return found

    def status(self, kind: str, name: str) -> tuple[bool, str]:
        """A policy's (ready, reason) on this node, as the agent serves it."""
        (found,) = [
            p for p in self.agent.get("/state")[1]["policies"] if (p["kind"], p["name"]) == (kind, name)
        ]
        return found["ready"], found["reason"]

    def conflicts(self) -> list[str]:
        return list(self.agent.get("/state")[1]["conflicts"])

    def rules(self) -> set[tuple[int, int, int, int]]:
        """The datapath's client rules: (frontend id, cgroup id, backend id, flags)."""
        io = maps.KernelMaps(self.agent.bpffs / "maps", names=[abi.MAP_CLIENTS])
        try:
            items = io.items(abi.MAP_CLIENTS)
        finally:
            io.close()
        out = set()
        for k, v in items:
            svc_id, cgroup_id = abi.unpack_client_key(k)
            backend_id, flags = abi.CLIENT_VAL.packer.unpack(v)
            out.add((svc_id, cgroup_id, backend_id, flags))
        return out

    def qos(self) -> list[tuple[int, int]]:
        """The datapath's QoS entries: (frontend id, limit)."""
        io = maps.KernelMaps(self.agent.bpffs / "maps", names=[abi.MAP_QOS])
        try:
            return [abi.unpack_qos(k, v) for k, v in io.items(abi.MAP_QOS)]
        finally:
            io.close()

    def ruled_cgroups(self) -> set[int]:
        return {cgroup for _, cgroup, _, _ in self.rules()}

    def cgroups(self, kp: KubePod) -> set[int]:
        """The cgroup ids of ``kp``'s pod cgroup and containers (what its client rules are keyed by)."""
        assert kp.container is not None
        pod_dir = kp.container.parent
        return {pod_dir.stat().st_ino} | {d.stat().st_ino for d in pod_dir.iterdir() if d.is_dir()}

    def remove_cgroups(self, kp: KubePod) -> None:
        """Remove ``kp``'s (empty) cgroups, as the kubelet does when the pod is gone."""
        assert kp.container is not None
        pod_dir = kp.container.parent
        for d in [*(d for d in pod_dir.iterdir() if d.is_dir()), pod_dir]:
            # EBUSY just after the last process left
            wait_until(functools.partial(_rmdir, d), what=f"rmdir {d}")
        kp.container = None

    # clients

    def run(
        self,
        target: str,
        port: int = 80,
        count: int = 20,
        *,
        mode: str = "tcp",
        src: KubePod | None = None,
        cgroup: Path | None = None,
        family: str | None = None,
    ) -> dict[str, Any]:
        """``count`` connects (or datagrams) to target:port from the client, or from ``src``'s container."""
        args = [mode, target, str(port), "--count", str(count), "--timeout", "1"]
        if family is not None:
            args += ["--family", family]
        if src is None:
            return self.topo.run_client(self.client, None, args)
        assert src.container is not None, f"{src.name} is not a pod on {NODE}"
        return self.topo.run_client(src.host, cgroup or src.container, args)

    def answers(self, target: str, port: int = 80, count: int = 20, **kw: Any) -> dict[str, int]:
        """Who answered; every attempt must succeed."""
        res = self.run(target, port, count, **kw)
        assert res["ok"] == count, res["errors"]
        return dict(res["backends"])

    def errors(self, target: str, port: int = 80, count: int = 5, **kw: Any) -> dict[str, int]:
        res = self.run(target, port, count, **kw)
        return dict(res["errors"])


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


@pytest.fixture
def lab(topology: Topology, tmp_path: Path) -> Iterator[Lab]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    lab = Lab(topology, manifests)
    yield lab
    lab.stop()


def svc(
    name: str,
    pods: Iterable[KubePod],
    vips: Iterable[str] = (VIP, VIP6),
    ports: Iterable[tuple[str, int, str, int]] = (("http", 80, "TCP", 8080),),
    namespace: str = "default",
) -> list[dict[str, Any]]:
    """A Service with an EndpointSlice per family of ``pods`` (their nodeName from the pod)."""
    pods, vips, ports = list(pods), list(vips), list(ports)
    docs = [service(name, vips, ports, namespace=namespace)]
    slice_ports = [(n, target, proto) for n, _, proto, target in ports]
    for family in (4, 6):
        if pods and any((":" in v) == (family == 6) for v in vips):
            eps = [endpoint(p.ip(family), node=p.node) for p in pods]
            docs.append(endpoint_slice(name, eps, slice_ports, name=f"{name}-v{family}", namespace=namespace))
    return docs


def names(*pods: KubePod) -> set[str]:
    return {p.name for p in pods}


# --- LocalRedirectPolicy ----------------------------------------------------------------------------------


def test_lrp_redirects_a_service_to_ready_pods_on_this_node_only(lab: Lab) -> None:
    svc1 = lab.pod("svc-1", node="node-b")
    cache = lab.pod("cache-a", {"app": "cache"})
    far = lab.pod("cache-far", {"app": "cache"}, node="node-b")  # matches, but on another node
    down = lab.pod("cache-down", {"app": "cache"})  # on this node, not ready
    other = lab.pod("other-a", {"app": "other"})  # on this node, other labels
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [cache.doc(), far.doc(), down.doc(ready=False), other.doc()])
    lab.write(
        "lrp.yaml",
        [local_redirect_policy("cache", service="default/web", selector={"app": "cache"}, back_ports=HTTP)],
    )
    lab.start()

    assert lab.answers(VIP, count=40) == {"cache-a": 40}
    assert lab.answers(VIP6, count=40) == {"cache-a": 40}
    assert lab.answers(VIP, mode="tcp", count=10, family="mapped") == {"cache-a": 10}  # AF_INET6 socket
    assert lab.run(VIP, count=1, mode="getpeername")["peernames"] == [[VIP, 80]]  # reverse translation
    fe = lab.state(KEY)
    assert fe["owner"]["kind"] == "LocalRedirectPolicy" and fe["owner"]["name"] == "cache"
    assert fe["backends"] == [cache.at()]
    assert fe["fallback"] == [svc1.at()] and fe["fallbackOwner"]["name"] == "web"
    assert [(p["name"], p["uid"]) for p in fe["backendPods"]] == [("cache-a", cache.uid)]
    assert lab.state(KEY6)["backends"] == [cache.at(family=6)]


def test_lrp_falls_back_to_the_service_when_the_local_pod_goes_and_back_when_it_returns(lab: Lab) -> None:
    svc1, svc2 = lab.pod("svc-1", node="node-b"), lab.pod("svc-2", node="node-c")
    cache = lab.pod("cache-a", {"app": "cache"})
    service_backends = [svc1.at(), svc2.at()]
    lab.write("web.yaml", svc("web", [svc1, svc2]))
    lab.write("pods.yaml", [cache.doc()])
    lab.write(
        "lrp.yaml",
        [local_redirect_policy("cache", service="default/web", selector={"app": "cache"}, back_ports=HTTP)],
    )
    lab.start()
    assert lab.answers(VIP) == {"cache-a": 20}

    lab.write("pods.yaml", [cache.doc(ready=False)])  # not ready: the Service's backends
    assert lab.wait(KEY, service_backends) < 1.0
    assert set(lab.answers(VIP, count=40)) == names(svc1, svc2)
    assert set(lab.answers(VIP6, count=40)) == names(svc1, svc2)

    lab.write("pods.yaml", [cache.doc()])  # ready again
    assert lab.wait(KEY, [cache.at()]) < 1.0
    assert lab.answers(VIP) == {"cache-a": 20}

    lab.write("pods.yaml", [cache.doc(labels={"app": "retired"})])  # relabelled: no longer selected
    assert lab.wait(KEY, service_backends) < 1.0
    assert set(lab.answers(VIP, count=40)) == names(svc1, svc2)

    lab.write("pods.yaml", [cache.doc()])
    lab.wait(KEY, [cache.at()])
    old_cgroups = lab.cgroups(cache)
    assert lab.ruled_cgroups() == old_cgroups
    lab.remove("pods.yaml")  # the pod goes away altogether: object, process and cgroups
    lab.topo.stop(lab.topo.backends["cache-a"])
    lab.remove_cgroups(cache)
    assert lab.wait(KEY, service_backends) < 1.0
    assert set(lab.answers(VIP, count=40)) == names(svc1, svc2)

    # it is re-created (a new UID) and starts a container in new cgroups, found on the agent's next rescan
    cache.uid = str(uuid.uuid4())
    cache.container = lab.container(cache)
    lab.serve(cache.host, "cache-a", [8080], cgroup=cache.container)
    lab.topo.wait_ready(lab.topo.backends["cache-a"])
    lab.write("pods.yaml", [cache.doc()])
    assert lab.wait(KEY, [cache.at()]) < 1.0
    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(VIP6) == {"cache-a": 20}
    new_cgroups = lab.cgroups(cache)
    wait_until(lambda: lab.ruled_cgroups() == new_cgroups, timeout=6, what="client rules on the new cgroups")
    assert set(lab.answers(VIP, count=40, src=cache)) == names(svc1, svc2)  # the loop guard holds there too


def test_loop_guard_never_hands_a_backend_pod_its_own_connection(lab: Lab) -> None:
    svc1 = lab.pod("svc-1", node="node-b")
    a = lab.pod("cache-a", {"app": "cache", "solo": "yes"})
    b = lab.pod("cache-b", {"app": "cache"})
    solo_vip = "10.96.0.50"
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [a.doc(), b.doc()])
    lab.write(
        "lrp.yaml",
        [
            local_redirect_policy("cache", service="default/web", selector={"app": "cache"}, back_ports=HTTP),
            local_redirect_policy(
                "solo", address=solo_vip, front_ports=FRONT80, selector={"solo": "yes"}, back_ports=HTTP
            ),
        ],
    )
    lab.start()

    # another local backend: the pod's own connections go there, everyone else's to both
    assert lab.answers(VIP, count=40, src=a) == {"cache-b": 40}
    assert lab.answers(VIP, count=40, src=b) == {"cache-a": 40}
    assert lab.answers(VIP6, count=40, src=a) == {"cache-b": 40}
    assert set(lab.answers(VIP, count=60)) == names(a, b)
    # the only local backend and no fallback (a custom VIP): the pod's own connection is refused
    assert lab.answers(solo_vip, count=10) == {"cache-a": 10}
    assert lab.errors(solo_vip, src=a) == {"ECONNREFUSED": 5}
    assert lab.answers(solo_vip, count=10, src=b) == {"cache-a": 10}

    lab.write("pods.yaml", [a.doc(), b.doc(ready=False)])  # the only local backend: the fallback
    lab.wait(KEY, [a.at()])
    assert lab.answers(VIP, count=40, src=a) == {"svc-1": 40}
    assert lab.answers(VIP6, count=40, src=a) == {"svc-1": 40}
    assert lab.answers(VIP, count=20) == {"cache-a": 20}
    # a client rule per cgroup of the pod (its pod cgroup and its container), none for the other pods
    assert lab.ruled_cgroups() == lab.cgroups(a)


def test_skip_redirect_from_backend_sends_node_local_dns_to_kube_dns(lab: Lab) -> None:
    dns_vip, dns_vip6 = "10.96.0.53", "fd00:96::53"
    coredns = lab.pod("coredns-1", {"k8s-app": "kube-dns"}, node="node-b", namespace="kube-system")
    labels = {"k8s-app": "node-local-dns"}
    nl_a = lab.pod("nodelocal-a", labels, namespace="kube-system")
    nl_b = lab.pod("nodelocal-b", labels, namespace="kube-system")
    dns_ports = [("dns", 53, "UDP", 8080), ("dns-tcp", 53, "TCP", 8080)]
    lab.write("kube-dns.yaml", svc("kube-dns", [coredns], [dns_vip, dns_vip6], dns_ports, "kube-system"))
    lab.write("pods.yaml", [nl_a.doc(), nl_b.doc()])

    def policy(skip: bool) -> list[dict[str, Any]]:
        ports = [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")]
        back = [("dns", 8080, "UDP"), ("dns-tcp", 8080, "TCP")]
        lrp = local_redirect_policy(
            "node-local-dns",
            service="kube-system/kube-dns",
            front_ports=ports,
            selector=labels,
            back_ports=back,
            skip_redirect_from_backend=skip,
        )
        return [lrp]

    lab.write("lrp.yaml", policy(True))
    lab.start()

    local = names(nl_a, nl_b)
    assert set(lab.answers(dns_vip, 53, 40)) == local
    udp = lab.run(dns_vip, 53, 10, mode="udp-unconnected")
    assert udp["ok"] == 10 and set(udp["backends"]) <= local
    assert udp["reply_sources"] == [[dns_vip, 53]]
    # the cache's own queries, UDP and TCP, IPv4 and IPv6, go to kube-dns although another cache is local
    for target in (dns_vip, dns_vip6):
        assert lab.answers(target, 53, 20, src=nl_a) == {"coredns-1": 20}
        assert lab.answers(target, 53, 10, src=nl_a, mode="udp-unconnected") == {"coredns-1": 10}
        assert lab.answers(target, 53, 10, src=nl_b, mode="udp-connected") == {"coredns-1": 10}
    assert lab.state(f"{dns_vip}:53/UDP")["skipRedirectFromBackends"] is True

    lab.write("lrp.yaml", policy(False))  # without the skip only the loop guard applies
    wait_until(
        lambda: bool(lab.rules()) and all(flags == 0 for *_, flags in lab.rules()),
        what="client rules without the skip flag",
    )
    assert lab.answers(dns_vip, 53, 20, src=nl_a) == {"nodelocal-b": 20}
    assert lab.answers(dns_vip, 53, 10, src=nl_a, mode="udp-unconnected") == {"nodelocal-b": 10}
    assert lab.answers(dns_vip6, 53, 20, src=nl_b) == {"nodelocal-a": 20}


def test_lrp_address_matcher_without_a_local_backend_refuses_at_once(lab: Lab) -> None:
    vip, vip6 = "10.96.0.50", "fd00:96::50"
    cache = lab.pod("cache-a", {"app": "cache"})
    ext = lab.pod("ext-1", node="node-b")
    lrps = [
        local_redirect_policy(
            f"lrp-v{f}", address=v, front_ports=FRONT80, selector={"app": "cache"}, back_ports=HTTP
        )
        for f, v in ((4, vip), (6, vip6))
    ]
    bps = [
        balancing_policy(f"bp-v{f}", address=v, front_ports=FRONT80, addresses=[ext.ip(f)], back_ports=HTTP)
        for f, v in ((4, vip), (6, vip6))
    ]
    lab.write("lrp.yaml", lrps)
    lab.write("bp.yaml", bps)  # a BalancingPolicy below does not change it: the LRP refuses
    lab.start()

    for target in (vip, vip6):
        res = lab.run(target, count=20)
        assert res["errors"] == {"ECONNREFUSED": 20}, res
        assert res["elapsed_s"] < 1.0  # refused by connect() itself, no SYN sent
    assert lab.state(f"{vip}:80/TCP")["owner"]["name"] == "lrp-v4"
    assert lab.status("LocalRedirectPolicy", "lrp-v4") == (False, "NoBackends")

    lab.write("pods.yaml", [cache.doc()])
    lab.wait(f"{vip}:80/TCP", [cache.at()])
    assert lab.answers(vip) == {"cache-a": 20}
    assert lab.answers(vip6) == {"cache-a": 20}

    lab.write("pods.yaml", [cache.doc(ready=False)])
    lab.wait(f"{vip}:80/TCP", [])
    assert lab.errors(vip) == {"ECONNREFUSED": 5}
    assert lab.errors(vip6) == {"ECONNREFUSED": 5}

    lab.remove("lrp.yaml")  # without the LRP the BalancingPolicy serves the VIP
    lab.wait(f"{vip}:80/TCP", [ext.at()])
    assert lab.answers(vip) == {"ext-1": 20}
    assert lab.answers(vip6) == {"ext-1": 20}


def test_qos_limit_lets_the_overflow_fall_through_to_the_service(lab: Lab) -> None:
    svc1 = lab.pod("svc-1", node="node-b")
    cache = lab.pod("cache-a", {"app": "cache"})
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [cache.doc()])

    def policy(limit: int) -> None:
        doc = local_redirect_policy(
            "cache", service="default/web", selector={"app": "cache"}, back_ports=HTTP, qos_limit=limit
        )
        lab.write("lrp.yaml", [doc])

    def burst(limit: int) -> None:
        res = lab.run(VIP, count=30)
        assert res["ok"] == 30, res
        local = res["backends"].get("cache-a", 0)
        assert res["backends"].get("svc-1", 0) == 30 - local
        if res["elapsed_s"] < 0.9:  # all in one second: exactly the limit
            assert local == limit, res
        else:
            assert limit <= local <= 2 * limit, res

    policy(5)
    lab.start()
    assert lab.state(KEY)["qosLimit"] == 5
    assert sorted(limit for _, limit in lab.qos()) == [5, 5]
    burst(5)
    time.sleep(1.05)  # a new second: a new allowance
    burst(5)

    policy(3)
    wait_until(lambda: sorted(limit for _, limit in lab.qos()) == [3, 3], what="the new limit (IPv4, IPv6)")
    burst(3)

    policy(0)  # no limit
    wait_until(lambda: lab.qos() == [], what="the QoS entry to go")
    assert lab.answers(VIP, count=30) == {"cache-a": 30}


# --- BalancingPolicy ----------------------------------------------------------------------------------------


def test_bp_pod_endpoint_replaces_the_services_backends_with_ready_pods_anywhere(lab: Lab) -> None:
    svc1 = lab.pod("svc-1", node="node-b")
    api_a = lab.pod("api-a", {"app": "api"})
    api_b = lab.pod("api-b", {"app": "api"}, node="node-b")
    api_c = lab.pod("api-c", {"app": "api"}, node="node-c")  # not ready
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [api_a.doc(), api_b.doc(), api_c.doc(ready=False)])
    bp = balancing_policy(
        "api", service="default/web", selector={"app": "api"}, back_ports=HTTP, mode="podEndpoint"
    )
    lab.write("bp.yaml", [bp])
    lab.start()

    assert set(lab.answers(VIP, count=60)) == names(api_a, api_b)
    assert set(lab.answers(VIP6, count=60)) == names(api_a, api_b)
    fe = lab.state(KEY)
    assert (fe["owner"]["kind"], fe["owner"]["name"]) == ("BalancingPolicy", "api")
    assert fe["fallback"] == [svc1.at()] and fe["fallbackOwner"]["name"] == "web"

    lab.write("pods.yaml", [api_a.doc(ready=False), api_b.doc(ready=False), api_c.doc()])
    lab.wait(KEY, [api_c.at()])
    assert lab.answers(VIP) == {"api-c": 20}
    lab.write("pods.yaml", [api_a.doc(ready=False), api_b.doc(ready=False), api_c.doc(ready=False)])
    lab.wait(KEY, [svc1.at()])  # no backends: the Service's own again
    assert lab.answers(VIP) == {"svc-1": 20}
    assert lab.answers(VIP6) == {"svc-1": 20}
    assert lab.state(KEY)["owner"]["kind"] == "Service"


def test_bp_host_port_goes_to_the_pods_node_on_its_host_port(lab: Lab) -> None:
    vip, vip6 = "10.96.0.80", "fd00:96::80"
    host_b, host_c, host_d = lab.host("host-b"), lab.host("host-c"), lab.host("host-d")
    lab.serve(host_b, "host-b:30080", [30080])
    lab.serve(host_c, "host-c:30081", [30081])
    lab.serve(host_c, "host-c:8080", [8080])
    lab.serve(host_d, "host-d:30080", [30080])
    labels = {"app.kubernetes.io/name": "ingress"}
    pods = [
        lab.paper_pod("ing-1", labels, node="node-b", host_ports={8080: 30080}),
        lab.paper_pod("ing-2", labels, node="node-c", host_ports={8080: 30081}),
        lab.paper_pod("ing-3", labels, node="node-c"),  # no hostPort: the port itself on the node
        lab.paper_pod("ing-4", labels, node="node-x"),  # no Node object: no address to go to
    ]

    def nodes(b: Any) -> list[dict[str, Any]]:
        return [node("node-b", [b.ip4, b.ip6]), node("node-c", [host_c.ip4, host_c.ip6])]

    lab.write("ingress.yaml", svc("ingress", [], [vip, vip6]))
    lab.write("pods.yaml", [p.doc() for p in pods])
    lab.write("nodes.yaml", nodes(host_b))
    ports = [("http", 80, "TCP")]
    bp = balancing_policy(
        "ingress-hostport",
        service="default/ingress",
        front_ports=ports,
        selector={"matchLabels": labels},
        back_ports=[("http", 8080, "TCP")],
        mode="hostPort",
    )
    lab.write("bp.yaml", [bp])
    lab.start()

    want = {"host-b:30080", "host-c:30081", "host-c:8080"}
    assert set(lab.answers(vip, count=60)) == want
    assert set(lab.answers(vip6, count=60)) == want
    assert set(lab.state(f"{vip}:80/TCP")["backends"]) == {
        f"{host_b.ip4}:30080",
        f"{host_c.ip4}:30081",
        f"{host_c.ip4}:8080",
    }

    lab.write("nodes.yaml", nodes(host_d))  # node-b's InternalIP changes: re-evaluated
    lab.wait(f"{vip}:80/TCP", [f"{host_d.ip4}:30080", f"{host_c.ip4}:30081", f"{host_c.ip4}:8080"])
    assert set(lab.answers(vip, count=60)) == {"host-d:30080", "host-c:30081", "host-c:8080"}

    lab.remove("nodes.yaml")  # no Node objects: no node address, and the Service has no endpoints
    lab.wait(f"{vip}:80/TCP", [])
    assert lab.errors(vip) == {"ECONNREFUSED": 5}
    assert lab.errors(vip6) == {"ECONNREFUSED": 5}
    lab.write("nodes.yaml", nodes(host_b))
    lab.wait(f"{vip}:80/TCP", [f"{host_b.ip4}:30080", f"{host_c.ip4}:30081", f"{host_c.ip4}:8080"])
    assert set(lab.answers(vip6, count=60)) == want


def test_bp_node_proxy_uses_the_nodes_annotation_else_its_internal_ip(lab: Lab) -> None:
    vip, vip6 = "10.96.0.90", "fd00:96::90"
    host_b, proxy_b, host_c = lab.host("host-b"), lab.host("proxy-b"), lab.host("host-c")
    for h in (host_b, proxy_b, host_c):
        lab.serve(h, h.name, [8080])
    labels = {"app": "edge"}
    pods = [
        lab.paper_pod("edge-1", labels, node="node-b"),
        lab.paper_pod("edge-2", labels, node="node-b"),  # same node: one backend
        lab.paper_pod("edge-3", labels, node="node-c"),
    ]
    proxy = {
        "balancing.elf.io/nodeProxyIpv4": proxy_b.ip4,
        "balancing.elf.io/nodeProxyIpv6": proxy_b.ip6,
    }

    def nodes(annotations: dict[str, str]) -> list[dict[str, Any]]:
        return [
            node("node-b", [host_b.ip4, host_b.ip6], annotations=annotations),
            node("node-c", [host_c.ip4, host_c.ip6]),
        ]

    lab.write("edge.yaml", svc("edge", [], [vip, vip6]))
    lab.write("pods.yaml", [p.doc() for p in pods])
    lab.write("nodes.yaml", nodes(proxy))
    bp = balancing_policy("edge", service="default/edge", selector=labels, back_ports=HTTP, mode="nodeProxy")
    lab.write("bp.yaml", [bp])
    lab.start()

    assert set(lab.answers(vip, count=60)) == {"proxy-b", "host-c"}
    assert set(lab.answers(vip6, count=60)) == {"proxy-b", "host-c"}
    assert set(lab.state(f"{vip}:80/TCP")["backends"]) == {f"{proxy_b.ip4}:8080", f"{host_c.ip4}:8080"}

    lab.write("nodes.yaml", nodes({}))  # the annotation goes: node-b's InternalIP
    lab.wait(f"{vip}:80/TCP", [f"{host_b.ip4}:8080", f"{host_c.ip4}:8080"])
    assert set(lab.answers(vip, count=60)) == {"host-b", "host-c"}
    assert set(lab.answers(vip6, count=60)) == {"host-b", "host-c"}

    lab.write("nodes.yaml", nodes({"balancing.elf.io/nodeProxyIpv6": proxy_b.ip6}))  # per family
    lab.wait(f"[{vip6}]:80/TCP", [f"[{proxy_b.ip6}]:8080", f"[{host_c.ip6}]:8080"])
    assert set(lab.answers(vip, count=60)) == {"host-b", "host-c"}
    assert set(lab.answers(vip6, count=60)) == {"proxy-b", "host-c"}


def test_bp_address_endpoint_balances_a_custom_vip_over_fixed_addresses(lab: Lab) -> None:
    vip, vip6 = "10.96.0.100", "fd00:96::100"
    ext1, ext2 = lab.host("ext-1"), lab.host("ext-2")
    for h in (ext1, ext2):
        lab.serve(h, f"{h.name}:8080", [8080])
        lab.serve(h, f"{h.name}:8443", [8443])
    front = [("https", 443, "TCP"), ("http", 80, "TCP")]
    back = [("https", 8443, "TCP"), ("http", 8080, "TCP")]
    lab.write(
        "bp.yaml",
        [
            # an IPv6 address in the list serves only IPv6 frontends
            balancing_policy(
                "external-vip",
                address=vip,
                front_ports=front,
                addresses=[ext1.ip4, ext2.ip4, ext1.ip6],
                back_ports=back,
            ),
            balancing_policy(
                "external-vip6", address=vip6, front_ports=front, addresses=[ext1.ip6], back_ports=back
            ),
        ],
    )
    lab.start()

    assert set(lab.answers(vip, 80, 60)) == {"ext-1:8080", "ext-2:8080"}
    assert set(lab.answers(vip, 443, 60)) == {"ext-1:8443", "ext-2:8443"}
    assert lab.answers(vip6, 80) == {"ext-1:8080": 20}
    assert lab.answers(vip6, 443) == {"ext-1:8443": 20}
    assert lab.errors(vip, 8080) == {"EHOSTUNREACH": 5}  # not a frontend port: untranslated


# --- both kinds -------------------------------------------------------------------------------------------


def test_precedence_local_redirect_over_balancing_over_service_on_one_vip(lab: Lab) -> None:
    svc1 = lab.pod("svc-1", node="node-b")
    api = lab.pod("api-b", {"app": "api"}, node="node-b")
    cache = lab.pod("cache-a", {"app": "cache"})
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [api.doc(), cache.doc()])
    lab.write(
        "bp.yaml", [balancing_policy("api", service="default/web", selector={"app": "api"}, back_ports=HTTP)]
    )
    lrp = local_redirect_policy(
        "cache",
        service="default/web",
        selector={"app": "cache"},
        back_ports=HTTP,
        skip_redirect_from_backend=True,
    )
    lab.write("lrp.yaml", [lrp])
    lab.start()

    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(VIP6) == {"cache-a": 20}
    fe = lab.state(KEY)
    assert fe["owner"]["name"] == "cache"
    assert (fe["fallbackOwner"]["kind"], fe["fallbackOwner"]["name"]) == ("BalancingPolicy", "api")
    assert lab.answers(VIP, src=cache) == {"api-b": 20}  # the LRP's fallback is the BP, not the Service

    lab.write("pods.yaml", [api.doc(), cache.doc(ready=False)])  # no local pod: the BP
    lab.wait(KEY, [api.at()])
    assert lab.answers(VIP) == {"api-b": 20}
    assert lab.state(KEY)["fallbackOwner"]["kind"] == "Service"

    lab.write("pods.yaml", [api.doc(ready=False), cache.doc(ready=False)])  # neither: the Service
    lab.wait(KEY, [svc1.at()])
    assert lab.answers(VIP) == {"svc-1": 20}
    assert lab.answers(VIP6) == {"svc-1": 20}

    lab.write("pods.yaml", [api.doc(ready=False), cache.doc()])  # the LRP over the Service directly
    lab.wait(KEY, [cache.at()])
    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(VIP, src=cache) == {"svc-1": 20}

    lab.write("pods.yaml", [api.doc(), cache.doc()])
    lab.wait(KEY, [cache.at()])
    lab.remove("lrp.yaml")
    lab.wait(KEY, [api.at()])
    assert lab.answers(VIP) == {"api-b": 20}
    lab.remove("bp.yaml")
    lab.wait(KEY, [svc1.at()])
    assert lab.answers(VIP) == {"svc-1": 20}


def test_two_policies_of_a_kind_on_one_frontend_the_older_wins_and_the_other_is_reported(lab: Lab) -> None:
    bp_vip = "10.96.0.110"
    svc1 = lab.pod("svc-1", node="node-b")
    cache_a, cache_b = lab.pod("cache-a", {"app": "a"}), lab.pod("cache-b", {"app": "b"})
    ext1, ext2 = lab.pod("ext-1", node="node-b"), lab.pod("ext-2", node="node-c")
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [cache_a.doc(), cache_b.doc()])
    old, new = "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"
    lab.write(
        "lrp.yaml",
        [  # the older wins although its name sorts last
            local_redirect_policy(
                "zz-old", service="default/web", selector={"app": "a"}, back_ports=HTTP, created=old
            ),
            local_redirect_policy(
                "aa-new", service="default/web", selector={"app": "b"}, back_ports=HTTP, created=new
            ),
        ],
    )
    lab.write(
        "bp.yaml",
        [  # same creationTimestamp: the name decides
            balancing_policy(
                "bp-b", address=bp_vip, front_ports=FRONT80, addresses=[ext2.ip4], back_ports=HTTP
            ),
            balancing_policy(
                "bp-a", address=bp_vip, front_ports=FRONT80, addresses=[ext1.ip4], back_ports=HTTP
            ),
        ],
    )
    lab.start()

    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(VIP6) == {"cache-a": 20}
    assert lab.answers(bp_vip) == {"ext-1": 20}
    log = lab.agent.stderr()
    for fkey, winner, loser in (
        (re.escape(KEY), "LocalRedirectPolicy zz-old", "LocalRedirectPolicy aa-new"),
        (re.escape(KEY6), "LocalRedirectPolicy zz-old", "LocalRedirectPolicy aa-new"),
        (re.escape(f"{bp_vip}:80/TCP"), "BalancingPolicy bp-a", "BalancingPolicy bp-b"),
    ):
        pattern = (
            rf"frontend conflict: frontend {fkey} is claimed by {winner}\S* and {loser}\S*; {winner}\S* wins"
        )
        assert re.search(pattern, log), f"no conflict {pattern!r} in the agent log:\n{log}"
    assert len(lab.conflicts()) == 3
    assert lab.status("LocalRedirectPolicy", "zz-old") == (True, "Ready")
    assert lab.status("LocalRedirectPolicy", "aa-new") == (False, "Conflict")
    assert lab.status("BalancingPolicy", "bp-a") == (True, "Ready")
    assert lab.status("BalancingPolicy", "bp-b") == (False, "Conflict")
    assert "LocalRedirectPolicy aa-new: not ready (Conflict)" in log
    # the loser's pod is no backend here: its connections are translated like anyone's
    assert lab.answers(VIP, src=cache_b) == {"cache-a": 20}

    lab.write(
        "lrp.yaml",
        [
            local_redirect_policy(
                "aa-new", service="default/web", selector={"app": "b"}, back_ports=HTTP, created=new
            )
        ],
    )
    lab.write(
        "bp.yaml",
        [
            balancing_policy(
                "bp-b", address=bp_vip, front_ports=FRONT80, addresses=[ext2.ip4], back_ports=HTTP
            )
        ],
    )
    lab.wait(KEY, [cache_b.at()])
    lab.wait(f"{bp_vip}:80/TCP", [ext2.at()])
    assert lab.answers(VIP) == {"cache-b": 20}
    assert lab.answers(bp_vip) == {"ext-2": 20}
    assert lab.answers(VIP, src=cache_b) == {"svc-1": 20}  # now its own backend: the loop guard
    assert lab.conflicts() == []
    assert lab.status("LocalRedirectPolicy", "aa-new") == (True, "Ready")


def test_update_of_a_policys_selector_and_ports(lab: Lab) -> None:
    vip = "10.96.0.50"
    svc1 = lab.pod("svc-1", node="node-b")
    cache_a = lab.pod("cache-a", {"app": "a"})
    cache_b = lab.pod("cache-b", {"app": "b"})
    lab.serve(cache_b.host, "cache-b:9090", [9090], cgroup=cache_b.container)
    api_x, api_y = (
        lab.pod("api-x", {"tier": "x"}, node="node-b"),
        lab.pod("api-y", {"tier": "y"}, node="node-c"),
    )
    lab.write("pods.yaml", [cache_a.doc(), cache_b.doc(), api_x.doc(), api_y.doc()])
    ports = [("http", 80, "TCP", 8080), ("metrics", 9100, "TCP", 8080)]
    lab.write("web.yaml", svc("web", [svc1], ports=ports))

    def lrp(selector: dict[str, str], front: int = 80, back: int = 8080) -> None:
        doc = local_redirect_policy(
            "cache",
            address=vip,
            front_ports=[("", front, "TCP")],
            selector=selector,
            back_ports=[("", back, "TCP")],
        )
        lab.write("lrp.yaml", [doc])

    def bp(tier: str, *, only_http: bool = False) -> None:
        front = [("http", 80, "TCP")] if only_http else None
        back = [("http", 8080, "TCP")] + ([] if only_http else [("metrics", 8080, "TCP")])
        doc = balancing_policy(
            "api", service="default/web", front_ports=front, selector={"tier": tier}, back_ports=back
        )
        lab.write("bp.yaml", [doc])

    lrp({"app": "a"})
    bp("x")
    lab.start()
    assert lab.answers(vip) == {"cache-a": 20}
    assert lab.answers(VIP, 80) == {"api-x": 20}
    assert lab.answers(VIP, 9100) == {"api-x": 20}  # no toPorts: every port of the Service

    lrp({"app": "b"})  # selector
    lab.wait(f"{vip}:80/TCP", [cache_b.at()])
    assert lab.answers(vip) == {"cache-b": 20}
    wait_until(lambda: lab.ruled_cgroups() == lab.cgroups(cache_b), what="client rules moved to cache-b")

    lrp({"app": "b"}, back=9090)  # backend port
    lab.wait(f"{vip}:80/TCP", [cache_b.at(9090)])
    assert lab.answers(vip) == {"cache-b:9090": 20}

    lrp({"app": "b"}, front=81, back=9090)  # frontend port
    lab.wait(f"{vip}:80/TCP", None)
    assert lab.answers(vip, 81) == {"cache-b:9090": 20}
    assert lab.errors(vip, 80) == {"EHOSTUNREACH": 5}

    bp("y")  # the BalancingPolicy's selector
    lab.wait(KEY, [api_y.at()])
    assert lab.answers(VIP, 80) == {"api-y": 20}
    assert lab.answers(VIP6, 9100) == {"api-y": 20}

    bp("y", only_http=True)  # its ports: 9100 returns to the Service
    lab.wait(f"{VIP}:9100/TCP", [svc1.at()])
    assert lab.answers(VIP, 80) == {"api-y": 20}
    assert lab.answers(VIP, 9100) == {"svc-1": 20}
    assert lab.answers(VIP6, 9100) == {"svc-1": 20}


def test_delete_and_recreate_policies(lab: Lab) -> None:
    vip = "10.96.0.120"
    svc1 = lab.pod("svc-1", node="node-b")
    cache = lab.pod("cache-a", {"app": "cache"})
    ext = lab.pod("ext-1", node="node-b")
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [cache.doc()])
    lrp = [local_redirect_policy("cache", service="default/web", selector={"app": "cache"}, back_ports=HTTP)]
    bp = [balancing_policy("ext", address=vip, front_ports=FRONT80, addresses=[ext.ip4], back_ports=HTTP)]
    lab.write("lrp.yaml", lrp)
    lab.write("bp.yaml", bp)
    lab.start()
    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(vip) == {"ext-1": 20}
    assert lab.ruled_cgroups()

    lab.remove("lrp.yaml")
    lab.remove("bp.yaml")
    lab.wait(KEY, [svc1.at()])
    lab.wait(f"{vip}:80/TCP", None)
    assert lab.answers(VIP) == {"svc-1": 20}
    assert lab.answers(VIP, src=cache) == {"svc-1": 20}
    assert lab.errors(vip) == {"EHOSTUNREACH": 5}  # the custom VIP is gone: untranslated
    assert lab.rules() == set()  # no client rule left behind

    lab.write("lrp.yaml", lrp)
    lab.write("bp.yaml", bp)
    lab.wait(KEY, [cache.at()])
    lab.wait(f"{vip}:80/TCP", [ext.at()])
    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(VIP6) == {"cache-a": 20}
    assert lab.answers(vip) == {"ext-1": 20}
    wait_until(lambda: bool(lab.ruled_cgroups()), what="the client rules back")
    assert lab.answers(VIP, src=cache) == {"svc-1": 20}

    # the Service under a serviceMatcher policy is deleted, then re-created with another ClusterIP
    lab.remove("web.yaml")
    lab.wait(KEY, None)
    assert lab.errors(VIP) == {"EHOSTUNREACH": 5}
    assert lab.rules() == set()
    assert lab.status("LocalRedirectPolicy", "cache") == (False, "ServiceNotFound")
    new_vip = "10.96.0.11"
    lab.write("web.yaml", svc("web", [svc1], [new_vip]))
    lab.wait(f"{new_vip}:80/TCP", [cache.at()])
    assert lab.answers(new_vip) == {"cache-a": 20}
    assert lab.errors(VIP) == {"EHOSTUNREACH": 5}
    assert lab.errors(VIP6) == {"EHOSTUNREACH": 5}
    wait_until(lambda: bool(lab.ruled_cgroups()), what="the client rules on the new ClusterIP")
    assert lab.answers(new_vip, src=cache) == {"svc-1": 20}


def test_node_label_selector_follows_this_nodes_labels_and_enable_out_cluster_is_moot_inside(
    lab: Lab,
) -> None:
    vip, inside_vip, off_vip = "10.96.0.130", "10.96.0.131", "10.96.0.132"
    svc1 = lab.pod("svc-1", node="node-b")
    cache = lab.pod("cache-a", {"app": "cache"})
    ext = lab.pod("ext-1", node="node-b")
    lab.write("web.yaml", svc("web", [svc1]))
    lab.write("pods.yaml", [cache.doc()])
    lab.write("node.yaml", [node(NODE, [lab.client.ip4], labels={"zone": "east"})])
    selected = {"matchLabels": {"balancing.elf.io/local-cache": "true"}}
    east = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["east"]}]}
    lab.write(
        "policies.yaml",
        [
            local_redirect_policy(
                "cache",
                service="default/web",
                selector={"app": "cache"},
                back_ports=HTTP,
                node_selector=selected,
            ),
            balancing_policy(
                "east",
                address=vip,
                front_ports=FRONT80,
                addresses=[ext.ip4],
                back_ports=HTTP,
                node_selector=east,
            ),
            balancing_policy(
                "inside",
                address=inside_vip,
                front_ports=FRONT80,
                addresses=[ext.ip4],
                back_ports=HTTP,
                enable_out_cluster=False,  # only for hosts outside the cluster; node-a is a Node
            ),
            balancing_policy(
                "off",
                address=off_vip,
                front_ports=FRONT80,
                addresses=[ext.ip4],
                back_ports=HTTP,
                enabled=False,
            ),
        ],
    )
    lab.start()
    assert lab.answers(VIP) == {"svc-1": 20}  # the LRP's label is missing
    assert lab.answers(vip) == {"ext-1": 20}
    assert lab.answers(inside_vip) == {"ext-1": 20}
    assert lab.errors(off_vip) == {"EHOSTUNREACH": 5}  # spec.enabled false: nowhere
    assert lab.status("LocalRedirectPolicy", "cache") == (False, "NodeNotSelected")
    assert lab.status("BalancingPolicy", "east") == (True, "Ready")
    assert lab.status("BalancingPolicy", "inside") == (True, "Ready")
    assert lab.status("BalancingPolicy", "off") == (False, "Disabled")

    lab.write(
        "node.yaml",
        [node(NODE, [lab.client.ip4], labels={"zone": "west", "balancing.elf.io/local-cache": "true"})],
    )
    lab.wait(KEY, [cache.at()])
    lab.wait(f"{vip}:80/TCP", None)
    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(VIP6) == {"cache-a": 20}
    assert lab.errors(vip) == {"EHOSTUNREACH": 5}
    assert lab.status("LocalRedirectPolicy", "cache") == (True, "Ready")
    assert lab.status("BalancingPolicy", "east") == (False, "NodeNotSelected")

    lab.remove("node.yaml")  # no Node object: no selector matches
    lab.wait(KEY, [svc1.at()])
    assert lab.answers(VIP) == {"svc-1": 20}
    assert lab.errors(vip) == {"EHOSTUNREACH": 5}
    assert lab.answers(inside_vip) == {"ext-1": 20}  # no nodeLabelSelector: applies everywhere

    lab.write(
        "node.yaml",
        [node(NODE, [lab.client.ip4], labels={"zone": "east", "balancing.elf.io/local-cache": "true"})],
    )
    lab.wait(KEY, [cache.at()])
    lab.wait(f"{vip}:80/TCP", [ext.at()])
    assert lab.answers(VIP) == {"cache-a": 20}
    assert lab.answers(vip) == {"ext-1": 20}


def test_ipv6_vips_for_both_kinds(lab: Lab) -> None:
    vip6, lrp_vip6, bp_vip6 = "fd00:96::60", "fd00:96::61", "fd00:96::62"
    svc1 = lab.pod("svc-1", node="node-b")
    a = lab.pod("cache-a", {"app": "cache"})
    b = lab.pod("cache-b", {"app": "cache"})
    api = lab.pod("api-1", {"app": "api"}, node="node-b")
    lab.write("web6.yaml", svc("web6", [svc1], [vip6], (("dns", 53, "UDP", 8080), ("http", 80, "TCP", 8080))))
    lab.write("pods.yaml", [a.doc(), b.doc(), api.doc()])
    lab.write(
        "policies.yaml",
        [
            local_redirect_policy(
                "cache",
                service="default/web6",
                selector={"app": "cache"},
                back_ports=[("dns", 8080, "UDP"), ("http", 8080, "TCP")],
                skip_redirect_from_backend=True,
            ),
            local_redirect_policy(
                "solo", address=lrp_vip6, front_ports=FRONT80, selector={"app": "cache"}, back_ports=HTTP
            ),
            balancing_policy(
                "api", address=bp_vip6, front_ports=FRONT80, selector={"app": "api"}, back_ports=HTTP
            ),
        ],
    )
    lab.start()

    assert set(lab.answers(vip6, 80, 40)) == names(a, b)
    udp = lab.run(vip6, 53, 10, mode="udp-unconnected")
    assert udp["ok"] == 10 and set(udp["backends"]) <= names(a, b) and udp["reply_sources"] == [[vip6, 53]]
    assert lab.answers(vip6, 80, src=a) == {"svc-1": 20}  # skipRedirectFromBackend
    assert lab.answers(vip6, 53, 10, src=a, mode="udp-unconnected") == {"svc-1": 10}
    assert set(lab.answers(lrp_vip6, 80, 40)) == names(a, b)
    assert lab.answers(lrp_vip6, 80, src=a) == {"cache-b": 20}  # loop guard
    assert lab.answers(bp_vip6) == {"api-1": 20}
    assert set(lab.state(f"[{lrp_vip6}]:80/TCP")["backends"]) == {a.at(family=6), b.at(family=6)}

    lab.write("pods.yaml", [a.doc(ready=False), b.doc(ready=False), api.doc(ready=False)])
    lab.wait(f"[{vip6}]:80/TCP", [svc1.at(family=6)])
    assert lab.answers(vip6, 80) == {"svc-1": 20}
    assert lab.errors(lrp_vip6) == {"ECONNREFUSED": 5}
    assert lab.errors(bp_vip6) == {"ECONNREFUSED": 5}  # a custom VIP with nothing anywhere: refused
