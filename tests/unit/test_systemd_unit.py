"""The shipped host unit (``deploy/systemd/balancing-agent.service``): systemd accepts it without a warning,
it names one source, and its settings are ones the agent knows. ``tests/kernel/test_baremetal.py`` runs its
ExecStart line against a real datapath."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from balancing.cli import configfile
from helpers import systemd_unit

SOURCES = ("--manifests", "--kubeconfig", "--api-server", "--in-cluster")


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (PID 1 not needed) on the unit as shipped, but for the executable's path:
    it checks the command exists, and /usr/local/bin/balancing is not this machine's to create."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze (the Debian package systemd; scripts/setup.sh installs it)")
    stub = tmp_path / "balancing"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    text = systemd_unit.UNIT.read_text()
    assert text.count("/usr/local/bin/balancing agent") == 1
    unit = tmp_path / systemd_unit.UNIT.name
    unit.write_text(text.replace("/usr/local/bin/balancing agent", f"{stub} agent"))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    mine = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not mine, done.stderr


def test_one_source_and_known_settings() -> None:
    unit = systemd_unit.read(host="node-7")
    argv = systemd_unit.argv(unit.exec_start, unit.environment)
    assert argv[:2] == ["/usr/local/bin/balancing", "agent"]
    assert [a for a in argv if a in SOURCES] == ["--kubeconfig"]
    assert argv[argv.index("--kubeconfig") + 1] == "/etc/balancing/kubeconfig"
    assert unit.environment_files == ["-/etc/default/balancing-agent"]
    # every BALANCING_* setting is a field of the agent's configuration (unknown ones would be ignored)
    fields = configfile.read_environment(
        {k: v for k, v in unit.environment.items() if k.startswith("BALANCING_")}
    )
    assert fields["node_name"] == "node-7"
    assert sorted(k for k in unit.environment if k.startswith("BALANCING_")) == sorted(
        configfile.env_name(path) for path in _leaves(fields)
    )
    assert "BALANCING_BPF_OBJECT" not in unit.environment  # the installed package carries the object


def test_environment_file_overrides_and_word_splitting() -> None:
    unit = systemd_unit.read()
    override = systemd_unit.environment_file(
        'AGENT_SOURCE="--manifests /m"\n# comment\nAGENT_ARGS=--a 1 --b\n'
    )
    argv = systemd_unit.argv(unit.exec_start, {**unit.environment, **override})
    assert argv[2:] == ["--manifests", "/m", "--a", "1", "--b"]


def _leaves(data: dict[str, object], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in data.items():
        out += _leaves(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return out
