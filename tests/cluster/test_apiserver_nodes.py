"""Two agents in Kubernetes mode on the real API server: what they translate is what the API says.

Services and Pods are created through the API (pods with ``spec.nodeName``, their status patched as a
kubelet would), the real EndpointSlice controller writes the slices, and both agents (``helpers.kubenodes``:
node-a and node-b, each its own cgroup and bpffs) program them; clients in each node's cgroup send real TCP
and UDP traffic. Covered: endpoints following pod deletion (terminating first, then gone) and readiness,
named targetPorts resolved per pod (two slices when pods disagree on the number), and dual-stack Services
with IPv6 traffic.
"""

from __future__ import annotations

import pytest

from helpers.kubenodes import KubeNodes, key

pytestmark = pytest.mark.kernel


def _backends(result: dict[str, object]) -> set[str]:
    backends = result["backends"]
    assert isinstance(backends, dict)
    return set(backends)


def test_slices_from_the_controller_reach_pods_and_follow_deletion_and_readiness(kn: KubeNodes) -> None:
    a1, a2 = kn.a.pods
    b1 = kn.b.pods[0]
    kn.create(kn.service("web"))
    for pod in (a1, a2, b1):
        kn.run_pod(pod, {"app": "web"})
    kn.wait_endpoints(
        "web", lambda e: {n for n, c in e.items() if c["ready"]} == {"pod-a1", "pod-a2", "pod-b1"}, "3 ready"
    )
    ip = kn.cluster_ips("web")[0]
    tcp, udp = key(ip, 80), key(ip, 53, "UDP")
    kn.wait_frontends(tcp, udp, backends=3, timeout=15)
    for client in (kn.a.client, kn.b.client):  # each node's own agent translates its pods' connects
        res = kn.tcp(client, ip, 80, count=30)
        assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-a2", "pod-b1"}, res
        res = kn.udp(client, ip, 53, count=30)
        assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-a2", "pod-b1"}, res

    # A user deletes pod-b1: its kubelet has not confirmed yet, so the endpoint stays, terminating ...
    kn.delete_pod("pod-b1")
    kn.wait_endpoints("web", lambda e: e.get("pod-b1", {}).get("terminating") is True, "pod-b1 terminating")
    kn.wait_frontends(tcp, udp, backends=2, timeout=15)
    for client in (kn.a.client, kn.b.client):
        res = kn.tcp(client, ip, 80, count=30)
        assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-a2"}, res
    # ... and once it has (the final delete), the endpoint leaves the slice.
    kn.delete_pod("pod-b1", force=True)
    kn.wait_endpoints("web", lambda e: set(e) == {"pod-a1", "pod-a2"}, "pod-b1 gone from the slice")
    kn.wait_frontends(tcp, udp, backends=2)

    # pod-a2's readiness probe fails: not ready in the slice, no longer a backend anywhere.
    kn.set_ready("pod-a2", False)
    kn.wait_endpoints("web", lambda e: e.get("pod-a2", {}).get("ready") is False, "pod-a2 not ready")
    kn.wait_frontends(tcp, udp, backends=1, timeout=15)
    for client in (kn.a.client, kn.b.client):
        res = kn.tcp(client, ip, 80, count=20)
        assert res["ok"] == 20 and _backends(res) == {"pod-a1"}, res
        res = kn.udp(client, ip, 53, count=20)
        assert res["ok"] == 20 and _backends(res) == {"pod-a1"}, res
    # ... and back when it passes again.
    kn.set_ready("pod-a2", True)
    kn.wait_frontends(tcp, udp, backends=2, timeout=15)
    res = kn.tcp(kn.b.client, ip, 80, count=30)
    assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-a2"}, res


def test_named_target_ports_resolve_per_pod(kn: KubeNodes) -> None:
    """targetPort "web" is 8080 in pod-a1 and 9091 in pod-b1: the controller writes one slice per port
    number, and each agent sends each pod's connections to that pod's own port."""
    a1, b1 = kn.a.pods[0], kn.b.pods[0]
    kn.topo.start_backend(b1, name="pod-b1-9091", port=9091)  # replies carry this name on 9091
    kn.create(kn.service("named", [("http", 80, "TCP", "web"), ("dns", 53, "UDP", "web-udp")]))
    kn.run_pod(a1, {"app": "named"}, [("web", 8080, "TCP"), ("web-udp", 8080, "UDP")])
    kn.run_pod(b1, {"app": "named"}, [("web", 9091, "TCP"), ("web-udp", 9091, "UDP")])
    endpoints = kn.wait_endpoints("named", lambda e: set(e) == {"pod-a1", "pod-b1"}, "both pods")
    assert endpoints["pod-a1"]["ports"] == sorted([("http", 8080, "TCP"), ("dns", 8080, "UDP")])
    assert endpoints["pod-b1"]["ports"] == sorted([("http", 9091, "TCP"), ("dns", 9091, "UDP")])
    assert len(kn.slices("named")) == 2  # one per distinct set of port numbers
    ip = kn.cluster_ips("named")[0]
    want = sorted([f"{a1.ip4}:8080", f"{b1.ip4}:9091"])
    kn.wait(lambda f: f.get(key(ip, 80)) == want and f.get(key(ip, 53, "UDP")) == want, "per-pod ports", 15)
    for client in (kn.a.client, kn.b.client):
        res = kn.tcp(client, ip, 80, count=30)
        assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-b1-9091"}, res
        res = kn.udp(client, ip, 53, count=30)
        assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-b1-9091"}, res


def test_dual_stack_service_translates_both_families(kn: KubeNodes) -> None:
    a1, b1 = kn.a.pods[0], kn.b.pods[0]
    kn.create(kn.service("dual", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"]))
    for pod in (a1, b1):
        kn.run_pod(pod, {"app": "dual"})
    want = {"pod-a1", "pod-b1", "pod-a1/IPv6", "pod-b1/IPv6"}
    kn.wait_endpoints("dual", lambda e: {n for n, c in e.items() if c["ready"]} == want, "both families")
    ip4, ip6 = kn.cluster_ips("dual")
    assert ":" in ip6 and ":" not in ip4
    kn.wait_frontends(
        key(ip4, 80), key(ip6, 80), key(ip4, 53, "UDP"), key(ip6, 53, "UDP"), backends=2, timeout=15
    )
    assert kn.a.agent.frontends()[key(ip6, 80)] == sorted([f"[{a1.ip6}]:8080", f"[{b1.ip6}]:8080"])
    for client in (kn.a.client, kn.b.client):
        res = kn.tcp(client, ip6, 80, count=30)
        assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-b1"}, res
        assert res["seen_by_backend"] == [client.ip6], res  # IPv6 end to end, the client's own address
        res = kn.udp(client, ip6, 53, count=30)
        assert res["ok"] == 30 and _backends(res) == {"pod-a1", "pod-b1"}, res
        res = kn.tcp(client, ip4, 80, count=20)
        assert res["ok"] == 20 and _backends(res) == {"pod-a1", "pod-b1"}, res
