"""The built wheel, installed in a clean venv, runs every command with nothing from the checkout.

The wheel is built with ``uv build --wheel`` (hatch_build.py compiles the BPF objects into it) and cached in
``build/wheel-test/<digest of its sources>`` (``helpers.wheel``, shared with the arm64 guest), so an unchanged
tree reuses it. It is installed with its runtime
dependencies only into a throw-away venv of the system Python 3.11, then: ``--help``, ``monitor --help`` and
``controller --help`` run without libbpf (it is never mapped, and they still work in a mount namespace where
``libbpf.so.1`` cannot be loaded, where the agent fails with one line naming the library and the package);
and ``balancing agent``, given no object flag or variable, loads the wheel's own objects on a test node,
so a netns client reaches the pod through a Service VIP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import balancing
from balancing.datapath import libbpf
from balancing_testkit.topology import Cluster
from helpers import wheel as built_wheel
from helpers.support import (
    SMALL_MAPS,
    AgentProcess,
    endpoint,
    endpoint_slice,
    service,
    write_manifest,
)

HELP_COMMANDS = (["--help"], ["monitor", "--help"], ["controller", "--help"])
VIP = "10.96.0.10"

# Run by the venv's python: each command's --help in one process, then what it mapped and imported from where.
PROBE = """
import json, sys
import balancing
from balancing.cli import main
from balancing.datapath import bpfobjects
out = []
for args in json.loads(sys.argv[1]):
    try:
        main.app(args)
    except SystemExit as exc:
        code = exc.code
    out.append({"args": args, "code": code, "libbpf": "libbpf" in open("/proc/self/maps").read()})
print(json.dumps({"runs": out, "package": balancing.__file__, "object": str(bpfobjects.default_object()),
                  "sockterm": str(bpfobjects.sockterm_object())}))
"""


def _python311() -> str:
    """A clean Python 3.11 for the venv: the system's when it is 3.11, else the one the project runs on."""
    system = "/usr/bin/python3"
    if os.path.exists(system):
        out = subprocess.run(
            [system, "-c", "import sys; print(sys.version_info[:2])"], check=False, capture_output=True
        )
        if out.stdout.strip() == b"(3, 11)":
            return system
    return getattr(sys, "_base_executable", sys.executable)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    env: dict[str, str]  # no BALANCING_* variable, no project on the path, LD_LIBRARY_PATH an empty dir
    work: Path  # the commands' working directory (not the checkout)

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            check=False,
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    wheel = built_wheel.built()
    with tempfile.TemporaryDirectory(prefix="blt-wheel-") as tmp:
        work, nolib = Path(tmp) / "work", Path(tmp) / "nolib"
        work.mkdir()
        nolib.mkdir()
        venv = Path(tmp) / "venv"
        built_wheel.uv("venv", "--quiet", "--python", _python311(), str(venv), cwd=work)
        built_wheel.uv(
            "pip", "install", "--quiet", "--python", str(venv / "bin/python"), str(wheel), cwd=work
        )
        keep = ("HOME", "LANG", "LC_ALL", "TERM")
        env = {k: os.environ[k] for k in keep if k in os.environ}
        env |= {"PATH": f"{venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LD_LIBRARY_PATH": str(nolib)}
        yield Installed(wheel, venv, env, work)


def test_wheel_carries_the_objects_and_only_the_package(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = whl.namelist()
    objects = ("balancing.o", "sockterm.o", "sockmigrate.o", "nodeport.o")
    assert {f"balancing/bpf/{o}" for o in objects} <= set(names)
    assert "balancing/cli/main.py" in names
    tops = {n.split("/")[0] for n in names}
    # no testkit, tests, helpers, bench
    assert tops == {"balancing", f"balancing-{balancing.__version__}.dist-info"}, tops
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_help_commands_need_no_libbpf(installed: Installed) -> None:
    balancing = str(installed.venv / "bin/balancing")
    for args in HELP_COMMANDS:
        res = installed.run(balancing, *args)
        assert res.returncode == 0, f"balancing {' '.join(args)}:\n{res.stderr}"
        assert "Usage" in res.stdout
    res = installed.run(str(installed.venv / "bin/python"), "-c", PROBE, json.dumps(HELP_COMMANDS))
    assert res.returncode == 0, res.stderr
    probe = json.loads(res.stdout.splitlines()[-1])  # after the help texts
    assert [(r["code"], r["libbpf"]) for r in probe["runs"]] == [(0, False)] * len(HELP_COMMANDS)
    site = installed.venv / "lib"
    for key in ("package", "object", "sockterm"):  # the installed copy, never the checkout's
        assert Path(probe[key]).is_relative_to(site), (key, probe[key])
    assert Path(probe["object"]).name == "balancing.o" and Path(probe["sockterm"]).name == "sockterm.o"


def _libbpf_path() -> Path:
    """The file this process mapped for libbpf.so.1 (what the dynamic loader resolves the name to)."""
    libbpf.possible_cpus()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libbpf.so" in path:
            return Path(path)
    raise AssertionError("libbpf.so.1 is not mapped after a call into it")


def test_without_libbpf_help_works_and_the_agent_says_what_to_install(
    installed: Installed, cgroup_dir: Path, bpffs_dir: Path
) -> None:
    """In a private mount namespace whose libbpf.so.1 is an empty file, as on a host without the package."""
    manifests = installed.work / "empty"
    manifests.mkdir(exist_ok=True)
    balancing = str(installed.venv / "bin/balancing")
    agent = [
        balancing,
        "agent",
        "--node-name=node-a",
        f"--manifests={manifests}",
        f"--cgroup={cgroup_dir}",
        f"--bpffs={bpffs_dir / 'node-a'}",
        "--health-addr=127.0.0.1:0",
        "--state-addr=",
        "--metrics-addr=",
    ]
    script = 'mount --bind /dev/null "$1" && shift && for c in "$@"; do eval "$c"; echo "rc=$?"; done'
    commands = [f"{balancing} {' '.join(args)} >/dev/null" for args in HELP_COMMANDS]
    commands.append(" ".join(agent))
    res = installed.run(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(_libbpf_path()),
        *commands,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["rc=0", "rc=0", "rc=0", "rc=2"], (res.stdout, res.stderr)
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "libbpf.so.1" in line and libbpf.PACKAGE in line, res.stderr
    assert "Traceback" not in res.stderr


def test_agent_from_the_wheel_translates_a_vip(
    installed: Installed, cluster: Cluster, tmp_path: Path
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    pod = cluster.pods[0]
    write_manifest(
        manifests,
        "web.yaml",
        [
            service("web", [VIP], [("http", 80, "TCP", 8080)]),
            endpoint_slice("web", [endpoint(pod.ip4)], [("http", 8080, "TCP")]),
        ],
    )
    agent = AgentProcess(cluster.topo, manifests, cluster.node)
    argv = [
        str(installed.venv / "bin/balancing"),
        "agent",
        f"--manifests={manifests}",
        f"--node-name={cluster.node}",
        f"--cgroup={agent.cgroup}",
        f"--bpffs={agent.bpffs}",
        f"--health-addr=127.0.0.1:{agent.port}",
        f"--state-addr=127.0.0.1:{agent.state_port}",
        "--metrics-addr=",
        *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MAPS.items()),
    ]
    agent.proc = cluster.topo.spawn(argv, env=installed.env, cwd=installed.work, label="agent-from-wheel")
    agent.wait_ready(timeout=30)
    res = cluster.topo.run_client(cluster.client, None, ["tcp", VIP, "80", "--count", "20"])
    assert res["backends"] == {pod.name: 20}, res
    assert agent.frontends() == {f"{VIP}:80/TCP": [f"{pod.ip4}:8080"]}
    assert "Traceback" not in agent.stop()
