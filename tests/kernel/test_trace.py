"""``balancing trace`` against the live maps: its verdict is the backend real clients reach.

The real writer programs one frontend of each kind into a datapath loaded in a test cgroup; ``balancing
trace -o json`` (the typer command, run in-process on the pinned maps) says where a connect would go, then
client.py connects from the node's cgroup (or a pod's own cgroup) and the backend that answered must be the
one the trace named. Only deterministic cases are compared exactly (one backend, refusal, the loop guard with
two backends, skipRedirectFromBackend to a one-backend fallback, an affinity record after a first connect);
a random pick is compared as a set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from balancing.cli import trace
from balancing.model.desired import BackendPod, Frontend, Owner, PodRef
from balancing_testkit.topology import Cluster, in_netns
from helpers.support import Datapath, backends_of

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
SVC = Owner("Service", "default", "web", "http")
LRP = Owner("LocalRedirectPolicy", "", "node-local-dns")


def run_trace(dp: Datapath, target: str, *args: str) -> dict[str, Any]:
    app = typer.Typer()
    app.command()(trace.trace)
    res = CliRunner().invoke(app, [target, "--bpffs", str(dp.bpffs), "-o", "json", *args])
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def pod_names(cluster: Cluster) -> dict[str, str]:
    """Backend address → pod name (both families, port 8080)."""
    return {a: p.name for p in cluster.pods for a in (f"{p.ip4}:8080", f"[{p.ip6}]:8080")}


def addr(cluster: Cluster, name: str, family: int = 4) -> str:
    pod = next(p for p in cluster.pods if p.name == name)
    return f"{pod.ip4}:8080" if family == 4 else f"[{pod.ip6}]:8080"


def connect(cluster: Cluster, *args: object, host: Any = None, cgroup: Path | None = None) -> dict[str, Any]:
    res: dict[str, Any] = cluster.topo.run_client(host or cluster.client, cgroup, [str(a) for a in args])
    return res


def reached(cluster: Cluster, doc: dict[str, Any]) -> str:
    """The pod the trace says a connect reaches (a deterministic translate)."""
    verdict = doc["verdict"]
    assert verdict["action"] == "translate" and verdict["deterministic"], verdict
    return pod_names(cluster)[verdict["backend"]]


def lrp(
    primary: list[str], fallback: list[str] | None, pods: dict[PodRef, str], *, skip: bool = False
) -> Frontend:
    return Frontend(
        LRP,
        backends_of(primary),
        fallback=None if fallback is None else backends_of(fallback),
        backend_pods=tuple(BackendPod(pod, backends_of([b])[0]) for pod, b in pods.items()),
        skip_redirect_from_backends=skip,
    )


def test_single_backend_frontends_of_each_family_and_protocol(cluster: Cluster, dp: Datapath) -> None:
    dp.program(
        {
            f"{VIP4}:80/TCP": [addr(cluster, "pod-b")],
            f"[{VIP6}]:80/TCP": [addr(cluster, "pod-c", 6)],
            f"{VIP4}:53/UDP": [addr(cluster, "pod-a")],
        }
    )
    doc = run_trace(dp, f"{VIP4}:80/TCP")
    assert doc["verdict"]["decidedBy"] == "random" and doc["verdict"]["result"] == "translated"
    assert connect(cluster, "tcp", VIP4, 80, "--count", 5)["backends"] == {reached(cluster, doc): 5}
    doc6 = run_trace(dp, f"[{VIP6}]:80/TCP")
    res6 = connect(cluster, "tcp", VIP6, 80, "--count", 5, "--family", 6)
    assert res6["backends"] == {reached(cluster, doc6): 5}
    doc_udp = run_trace(dp, f"{VIP4}:53/UDP")
    assert doc_udp["verdict"]["decidedBy"] == "socket-cookie"
    assert connect(cluster, "udp-unconnected", VIP4, 53, "--count", 3)["backends"] == {
        reached(cluster, doc_udp): 3
    }


def test_spread_frontend_names_every_backend_a_client_reaches(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": [addr(cluster, p.name) for p in cluster.pods]})
    doc = run_trace(dp, f"{VIP4}:80/TCP")
    assert not doc["verdict"]["deterministic"]
    candidates = {pod_names(cluster)[o["backend"]] for o in doc["verdict"]["outcomes"]}
    assert [o["probability"] for o in doc["verdict"]["outcomes"]] == [pytest.approx(1 / 3, abs=1e-3)] * 3
    assert set(connect(cluster, "tcp", VIP4, 80, "--count", 60)["backends"]) == candidates


def test_refusal_and_not_a_frontend(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:81/TCP": []})
    doc = run_trace(dp, f"{VIP4}:81/TCP")
    assert doc["verdict"]["action"] == "refuse" and doc["verdict"]["decidedBy"] == "no-primary-backend"
    assert connect(cluster, "tcp", VIP4, 81, "--count", 2)["errors"] == {"ECONNREFUSED": 2}
    other = run_trace(dp, f"{VIP4}:82/TCP")
    assert other["frontend"] is None and other["verdict"]["action"] == "pass"
    res = connect(cluster, "tcp", VIP4, 82, "--count", 1, "--timeout", 1)
    assert res["backends"] == {} and "ECONNREFUSED" not in res["errors"], "untranslated: the route says no"


def test_skip_redirect_from_backend_goes_to_the_one_backend_fallback(
    cluster: Cluster, dp: Datapath, pod_a_cgroup: tuple[PodRef, Path]
) -> None:
    ref, cgroup = pod_a_cgroup
    a, b, c = (addr(cluster, n) for n in ("pod-a", "pod-b", "pod-c"))
    dp.program_frontends({f"{VIP4}:53/TCP": lrp([a, b], [c], {ref: a}, skip=True)})
    doc = run_trace(dp, f"{VIP4}:53/TCP", "--from-cgroup", str(cgroup))
    assert doc["clientRule"]["skip"] and doc["verdict"]["decidedBy"] == "skip-redirect-from-backend"
    assert doc["verdict"]["result"] == "fallback_skip_redirect_from_backend"
    res = connect(cluster, "tcp", VIP4, 53, "--count", 10, host=cluster.pods[0], cgroup=cgroup)
    assert res["backends"] == {reached(cluster, doc): 10} == {"pod-c": 10}
    # from the node's cgroup: not a backend pod, the primary tier
    node = run_trace(dp, f"{VIP4}:53/TCP", "--from-cgroup", str(cluster.cgroup))
    assert node["clientRule"] is None and node["clientRules"] == 1
    primary = {pod_names(cluster)[o["backend"]] for o in node["verdict"]["outcomes"]}
    assert primary == {"pod-a", "pod-b"}
    assert set(connect(cluster, "tcp", VIP4, 53, "--count", 30)["backends"]) <= primary


def test_loop_guard_with_two_backends_sends_the_pod_to_the_other(
    cluster: Cluster, dp: Datapath, pod_a_cgroup: tuple[PodRef, Path]
) -> None:
    ref, cgroup = pod_a_cgroup
    a, b, c = (addr(cluster, n) for n in ("pod-a", "pod-b", "pod-c"))
    dp.program_frontends({f"{VIP4}:53/TCP": lrp([a, b], [c], {ref: a})})
    doc = run_trace(dp, f"{VIP4}:53/TCP", "--from-cgroup", str(cgroup))
    assert doc["verdict"]["decidedBy"] == "loop-guard" and doc["clientRule"]["ownBackend"] == a
    res = connect(cluster, "tcp", VIP4, 53, "--count", 20, host=cluster.pods[0], cgroup=cgroup)
    assert res["backends"] == {reached(cluster, doc): 20} == {"pod-b": 20}
    # its only backend is itself: the fallback
    dp.program_frontends({f"{VIP4}:53/TCP": lrp([a], [c], {ref: a})})
    doc = run_trace(dp, f"{VIP4}:53/TCP", "--from-cgroup", str(cgroup))
    assert doc["verdict"]["result"] == "fallback_loop_guard"
    res = connect(cluster, "tcp", VIP4, 53, "--count", 5, host=cluster.pods[0], cgroup=cgroup)
    assert res["backends"] == {reached(cluster, doc): 5}


def test_affinity_record_after_a_first_connect_decides_the_next(cluster: Cluster, dp: Datapath) -> None:
    dp.program({f"{VIP4}:80/TCP": [addr(cluster, p.name) for p in cluster.pods]}, affinity=600)
    with in_netns(cluster.client):
        cookie = trace.current_netns_cookie()
    assert cookie is not None
    before = run_trace(dp, f"{VIP4}:80/TCP", "--netns-cookie", str(cookie))
    assert before["affinity"] is None and before["verdict"]["decidedBy"] == "random"
    first = connect(cluster, "tcp", VIP4, 80, "--count", 1)["backends"]
    doc = run_trace(dp, f"{VIP4}:80/TCP", "--netns-cookie", str(cookie))
    assert doc["verdict"]["decidedBy"] == "affinity" and doc["affinity"]["used"]
    assert doc["affinity"]["timeoutSeconds"] == 600 and doc["affinity"]["idleSeconds"] < 60
    assert {reached(cluster, doc): 1} == first
    assert connect(cluster, "tcp", VIP4, 80, "--count", 10)["backends"] == {reached(cluster, doc): 10}
    # another namespace (this one) has no record
    assert run_trace(dp, f"{VIP4}:80/TCP")["affinity"] is None


def test_qos_state_is_read_without_counting(cluster: Cluster, dp: Datapath) -> None:
    a, c = addr(cluster, "pod-a"), addr(cluster, "pod-c")
    dp.program_frontends(
        {f"{VIP4}:53/TCP": Frontend(LRP, backends_of([a]), fallback=backends_of([c]), qos_limit=1)}
    )
    assert connect(cluster, "tcp", VIP4, 53, "--count", 1)["backends"] == {"pod-a": 1}
    doc = run_trace(dp, f"{VIP4}:53/TCP")
    again = run_trace(dp, f"{VIP4}:53/TCP")
    assert doc["qos"]["limit"] == 1 and doc["qos"]["count"] == again["qos"]["count"] == 1, (
        "tracing never counts"
    )
    if doc["qos"]["windowExpired"] or doc["qos"]["windowAgeSeconds"] > 0.6:
        pytest.skip("the one-second QoS window ran out before the trace (slow machine)")
    assert doc["verdict"]["decidedBy"] == "qos-limit" and reached(cluster, doc) == "pod-c"
