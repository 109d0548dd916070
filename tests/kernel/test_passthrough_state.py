"""Pass-through sockets leave no state behind: connections to anything that is not a frontend are untouched.

With a frontend programmed, clients in the node cgroup talk straight to the pods (TCP over IPv4 and IPv6,
connected and unconnected UDP, getpeername): the hooks run for every one of those sockets, and afterwards the
per-socket maps (connected-socket reverse state, unconnected-UDP reverse map) and the resolution counters hold
nothing for them, and not even a socket cookie was generated for them. Translated sockets, interleaved with
them, still get their state and lose it on close.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

from balancing.datapath import maps
from balancing_testkit.topology import Cluster
from helpers.support import Datapath

VIP4 = "10.96.0.10"
STATE_MAPS = ["bl_sock_v2", "bl_rev_v1", "bl_stats_v1", "bl_aff_v1"]


def client(cluster: Cluster, *args: object) -> dict[str, Any]:
    return cluster.topo.run_client(cluster.client, None, [str(a) for a in args])


def entries(dp: Datapath) -> dict[str, int]:
    io = maps.KernelMaps(dp.cfg.map_dir, names=STATE_MAPS)
    try:
        return {name: len(io.items(name)) for name in STATE_MAPS}
    finally:
        io.close()


def test_pass_through_sockets_leave_no_entries(cluster: Cluster, dp: Datapath) -> None:
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:80/TCP": [f"{pod.ip4}:8080"], f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"]})
    assert client(cluster, "tcp", pod.ip4, 8080, "--count", 100)["ok"] == 100
    assert client(cluster, "tcp", pod.ip6, 8080, "--count", 30, "--family", 6)["ok"] == 30
    assert client(cluster, "tcp", pod.ip4, 8080, "--count", 30, "--family", "mapped")["ok"] == 30
    assert client(cluster, "getpeername", pod.ip4, 8080, "--count", 20)["peernames"] == [[pod.ip4, 8080]]
    udp = client(cluster, "udp-unconnected", pod.ip4, 8080, "--count", 50)
    assert udp["ok"] == 50 and udp["reply_sources"] == [[pod.ip4, 8080]]
    assert client(cluster, "udp-connected", pod.ip4, 8080, "--count", 30)["ok"] == 30
    assert entries(dp) == dict.fromkeys(STATE_MAPS, 0)


def test_a_pass_through_socket_with_a_cookie_leaves_no_entry(cluster: Cluster, dp: Datapath) -> None:
    """sock_release skips sockets whose cookie was never generated; one that has a cookie (asked for by the
    application here) takes the lookup path and finds nothing to delete either."""
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:80/TCP": [f"{pod.ip4}:8080"]})
    script = textwrap.dedent(
        f"""
        import socket
        for _ in range(20):
            s = socket.create_connection(({pod.ip4!r}, 8080), timeout=2)
            assert int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")  # SO_COOKIE
            s.close()
        """
    )
    cluster.topo.run([sys.executable, "-c", script], netns=cluster.client, cgroup=cluster.cgroup)
    assert entries(dp)["bl_sock_v2"] == 0


def test_translated_and_pass_through_sockets_interleaved(cluster: Cluster, dp: Datapath) -> None:
    """Translated sockets keep working (getpeername shows the VIP) and their state goes with them."""
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:80/TCP": [f"{pod.ip4}:8080"], f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"]})
    for _ in range(3):
        assert client(cluster, "tcp", VIP4, 80, "--count", 30)["peernames"] == [[VIP4, 80]]
        assert client(cluster, "tcp", pod.ip4, 8080, "--count", 30)["peernames"] == [[pod.ip4, 8080]]
        assert client(cluster, "udp-connected", VIP4, 53, "--count", 10)["peernames"] == [[VIP4, 53]]
    left = entries(dp)
    assert left["bl_sock_v2"] == 0  # every translated connected socket's entry was deleted on release
    assert left["bl_stats_v1"] > 0  # the translations were counted (the pass-through ones were not)


def test_receiving_on_a_pass_through_socket_generates_no_cookie(cluster: Cluster, dp: Datapath) -> None:
    """recvmsg4/getpeername4 of a socket that was never translated read its cookie without generating one:
    cookies are handed out in increasing order on a CPU, so a socket whose cookie is first asked for after
    another's has the larger one. Pinned to one CPU, a pass-through UDP socket that sent, received and asked
    its peer's name still gets its cookie only when the test asks (after a fresh socket's); a socket sent
    through the VIP (translated: its cookie made at sendmsg) has the smaller one."""
    pod = cluster.pods[0]
    dp.program({f"{VIP4}:53/UDP": [f"{pod.ip4}:8080"]})
    script = textwrap.dedent(
        f"""
        import json, os, socket
        os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})

        def cookie(s):
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")  # SO_COOKIE

        def exchanged(dest):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(b"x", dest)
            s.recvfrom(2048)
            s.connect(dest)
            s.getpeername()
            return s

        passed = exchanged(({pod.ip4!r}, 8080))
        translated = exchanged(({VIP4!r}, 53))
        fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        later = cookie(fresh)
        print(json.dumps({{"passed": cookie(passed), "translated": cookie(translated), "fresh": later}}))
        """
    )
    out = cluster.topo.run([sys.executable, "-c", script], netns=cluster.client, cgroup=cluster.cgroup)
    cookies = json.loads(out.stdout)
    assert cookies["translated"] < cookies["fresh"] < cookies["passed"], cookies
