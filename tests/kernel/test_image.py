"""The product's image, built on this machine and run the way the chart runs the agent.

No registry and no Docker daemon are needed: ``scripts/build-image.sh`` (``make image``) builds the image
from a debootstrap base with podman, caching the base and podman's storage in ``$BALANCING_IMAGE_CACHE``
(default /var/cache/balancing-image), so a warm build only rebuilds the wheel's layer. The container runs as
the DaemonSet's does: privileged, host network and PID, the host's bpffs, cgroup tree, /run/netns and the
manifest directory mounted, SIGTERM to stop it. It attaches to the test node's cgroup and pins below the
test's bpffs directory, so it touches nothing of the machine's.

Podman (cgroupfs manager) puts the container and its conmon below ``--cgroup-parent`` in every cgroup
hierarchy: the parent is below the topology's cgroup in cgroup2, and the test removes its cgroup v1
directories itself (the harness sweeps only cgroup2); those of a killed test run are swept before the next.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from balancing_testkit.topology import PREFIX_RE, Cluster, pid_alive
from helpers.support import (
    ROOT,
    SMALL_MAPS,
    endpoint,
    endpoint_slice,
    free_port,
    service,
    wait_until,
    write_manifest,
)

BUILD_SCRIPT = ROOT / "scripts/build-image.sh"
TOOLS = ("podman", "runc", "debootstrap", "uv")
VIP = "10.96.0.10"
MANIFESTS_IN_CONTAINER = "/etc/balancing/manifests"  # the chart's agent.manifests.mountPath


@dataclass(frozen=True)
class Image:
    """A built image and the environment podman needs to find it (the build's own configuration)."""

    ref: str
    env: dict[str, str]

    def podman(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], env=self.env, check=check, capture_output=True, text=True, timeout=timeout
        )


def _cgroup_v1_mounts() -> list[Path]:
    with open("/proc/mounts") as f:
        return [Path(line.split()[1]) for line in f if line.split()[2] == "cgroup"]


def _remove_cgroup_dirs(path: Path) -> None:
    """rmdir ``path`` and its subdirectories, deepest first (they hold no processes any more)."""
    if not path.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
        Path(dirpath).rmdir()


def _sweep_dead_runs(image: Image) -> None:
    """Containers and cgroup v1 directories left by test processes that died before their cleanup."""
    listed = image.podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    for name in listed:
        m = PREFIX_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            image.podman("rm", "--force", "--time", "0", name, check=False)
    for mount in _cgroup_v1_mounts():
        for entry in mount.iterdir() if mount.is_dir() else ():
            m = PREFIX_RE.match(entry.name)
            if m and entry.is_dir() and not pid_alive(int(m.group(1))):
                _remove_cgroup_dirs(entry)


@pytest.fixture(scope="module")
def image() -> Image:
    """The image, built (or reused from the cache) by the same script as ``make image``."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:  # not a skip: setup.sh installs them on any machine of this kind
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh (make test does)")
    start = time.monotonic()
    res = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=False, capture_output=True, text=True, timeout=900
    )
    if res.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT.name} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    out = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    env = {**os.environ, **{k: out[k] for k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}}
    print(f"image {out['IMAGE']} ready in {time.monotonic() - start:.1f}s:\n{res.stderr}")
    built = Image(out["IMAGE"], env)
    _sweep_dead_runs(built)
    return built


@dataclass
class Container:
    """``balancing agent`` in the image for one test node, with the DaemonSet's mounts and arguments."""

    image: Image
    cluster: Cluster
    name: str
    cgroup_parent: str
    ports: dict[str, int]

    def run(self, manifests: Path, run_dir: Path) -> None:
        topo, node = self.cluster.topo, self.cluster.node
        args = [
            f"--manifests={MANIFESTS_IN_CONTAINER}",
            f"--node-name={node}",
            f"--cgroup={topo.node_cgroup(node)}",
            f"--bpffs={topo.bpffs / node}",
            f"--health-addr=127.0.0.1:{self.ports['health']}",
            f"--state-addr=127.0.0.1:{self.ports['state']}",
            f"--metrics-addr=127.0.0.1:{self.ports['metrics']}",
            "--healthcheck-address=127.0.0.1",
            "--netns-dir=/run/netns",
            "--events=off",
            "--events-socket=/run/balancing/events.sock",
            *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MAPS.items()),
        ]
        self.image.podman(
            "run",
            "--detach",
            f"--name={self.name}",
            f"--cgroup-parent={self.cgroup_parent}",
            "--privileged",
            "--network=host",
            "--pid=host",
            "--volume=/sys/fs/bpf:/sys/fs/bpf:rshared",
            "--volume=/sys/fs/cgroup:/sys/fs/cgroup:rslave",
            "--volume=/run/netns:/run/netns:ro,rslave",
            f"--volume={run_dir}:/run/balancing",
            f"--volume={manifests}:{MANIFESTS_IN_CONTAINER}:ro",
            f"--env=NODE_NAME={node}",
            self.image.ref,
            "balancing",
            "agent",
            *args,
        )

    def state(self) -> tuple[bool, int]:
        """(running, exit code) from podman."""
        out = self.image.podman("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", self.name)
        running, code = out.stdout.split()
        return running == "true", int(code)

    def logs(self) -> str:
        res = self.image.podman("logs", self.name, check=False)
        return res.stdout + res.stderr

    def get(self, port: str, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port]}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.state()[0]:
                raise AssertionError(f"the agent's container exited:\n{self.logs()}")
            try:
                return self.get("health", "/readyz") == 200
            except OSError:
                return False

        wait_until(ready, timeout, "the containerised agent's /readyz")

    def remove(self) -> None:
        """Remove the container (killing it if it still runs) and its cgroup v1 directories."""
        self.image.podman("rm", "--force", "--time", "0", self.name, check=False)
        top = self.cgroup_parent.strip("/").split("/")[0]
        for mount in _cgroup_v1_mounts():
            _remove_cgroup_dirs(mount / top)


@pytest.fixture
def container(image: Image, cluster: Cluster) -> Iterator[Container]:
    topo = cluster.topo
    c = Container(
        image,
        cluster,
        name=f"{topo.prefix}-agent",
        # Below the topology's cgroup in cgroup2 (removed with it); the same path in each v1 hierarchy.
        cgroup_parent=f"/{topo.cgroup_root.name}/podman",
        ports={"health": free_port(), "state": free_port(), "metrics": free_port()},
    )
    try:
        yield c
    finally:
        c.remove()


def connect(cluster: Cluster, count: int) -> dict[str, int]:
    res = cluster.topo.run_client(cluster.client, None, ["tcp", VIP, "80", "--count", str(count)])
    assert not res["errors"], res
    backends: dict[str, int] = res["backends"]
    return backends


@pytest.mark.timeout(900)  # a fresh machine builds the base image first (a few minutes); warm: seconds
def test_agent_in_the_image_runs_as_the_chart_runs_it(cluster: Cluster, container: Container) -> None:
    topo = cluster.topo
    manifests, run_dir = topo.workdir / "manifests", topo.workdir / "run"
    manifests.mkdir()
    run_dir.mkdir()
    eps = [endpoint(p.ip4) for p in cluster.pods]
    write_manifest(
        manifests,
        "web.yaml",
        [
            service("web", [VIP], [("http", 80, "TCP", 8080)]),
            endpoint_slice("web", eps, [("http", 8080, "TCP")]),
        ],
    )

    container.run(manifests, run_dir)
    container.wait_ready()
    assert set(connect(cluster, 60)) == {"pod-a", "pod-b", "pod-c"}
    assert container.get("state", "/state") == 200
    assert container.get("metrics", "/metrics") == 200

    # `podman stop` sends SIGTERM, as the kubelet does: a clean exit, and the datapath keeps translating.
    container.image.podman("stop", "--time", "20", container.name, timeout=40)
    logs = container.logs()
    assert container.state() == (False, 0), logs
    assert not re.search(r"Traceback|ERROR", logs), logs
    assert set(connect(cluster, 60)) == {"pod-a", "pod-b", "pod-c"}
