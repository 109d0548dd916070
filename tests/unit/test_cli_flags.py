"""Bad flags to ``balancing agent`` give a one-line error naming the flag and exit 2, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from balancing import errors
from balancing.cli import flags, logs
from balancing.cli.main import app
from balancing.datapath import mounts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:10256", ("127.0.0.1", 10256)),
        (":9", ("0.0.0.0", 9)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:0", ("localhost", 0)),
        ("node-1.example.com:65535", ("node-1.example.com", 65535)),
    ],
)
def test_host_port_accepts(value: str, expected: tuple[str, int]) -> None:
    assert flags.host_port("--x", value) == expected


@pytest.mark.parametrize(
    "value",
    ["abc", "1.2.3.4", ":", "1.2.3.4:", "1.2.3.4:65536", "1.2.3.4:-1", "::1:80", "[::1:80", "[1.2.3.4]:80",
     "999.1.1.1:80", "bad host:80", "a\nb:80"],
)  # fmt: skip
def test_host_port_rejects_naming_the_flag(value: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        flags.host_port("--health-addr", value)
    assert "--health-addr" in str(exc.value)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_positive_seconds_rejects(value: float) -> None:
    with pytest.raises(errors.ConfigError):
        flags.positive_seconds("--resync-interval", value)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--health-addr", "nonsense"], "--health-addr"),
        (["--metrics-addr", "1.2.3.4:99999"], "--metrics-addr"),
        (["--state-addr", "[::1"], "--state-addr"),
        (["--resync-interval", "nan"], "--resync-interval"),
        (["--resync-interval", "-5"], "--resync-interval"),
        (["--node-name", ""], "--node-name"),
        (["--node-name", "a\x1bb"], "--node-name"),
        (["--log-level", "verbose"], "--log-level"),
        (["--max-backends", "0"], "--max-backends"),
        (["--event-sample-every", "0"], "--event-sample-every"),
        (["--event-log-backups", "-1"], "--event-log-backups"),
        (["--events", "most"], "--events"),
        (["--nodeport-devices", "nosuchdev0"], "--nodeport-devices"),
        (["--north-south", "--maglev-table-size", "16380"], "--maglev-table-size"),
        (["--north-south", "--snat-ports", "61000"], "--snat-ports"),
        (["--north-south", "--snat-ports", "70000-70001"], "--snat-ports"),
        (["--north-south", "--tc-attach-mode", "xdp"], "--tc-attach-mode"),
        (["--north-south", "--max-conntrack", "1"], "--max-conntrack"),
        (["--north-south", "--out-of-cluster"], "--north-south"),
        ([], "BPF object"),  # an empty file: not a BPF object (a datapath error, still one line)
    ],
)
def test_agent_flag_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], flag: str) -> None:
    obj = tmp_path / "balancing.o"
    obj.write_bytes(b"")
    base = ["agent", "--node-name", "n1", "--manifests", str(tmp_path), "--bpf-object", str(obj),
            "--cgroup", str(mounts.cgroup2_root())]  # fmt: skip
    if flag == "--node-name":
        base = [base[0], *base[3:]]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in result.output, result.output


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_help_keeps_brackets_and_shows_defaults() -> None:
    """Help is plain text: ``[cgroup2 root]`` is not eaten as markup, defaults are shown."""
    agent = _help("agent")
    assert (
        "[cgroup2 root]" in agent and "[the agent's own]" in agent and "[/run/netns, /var/run/netns]" in agent
    )
    assert "[default: 0.0.0.0:10256]" in agent and "[default: info]" in agent
    assert "--config FILE" in agent and "--socket-lb-host-namespace-only" in agent and "--context" in agent
    assert "[this process's]" in _help("trace") and "[default: table]" in _help("inspect", "services")
    assert "[generated]" in _help("controller")


def test_version_and_completion() -> None:
    from importlib import metadata

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"balancing {metadata.version('balancing')}"
    assert "--install-completion" in _help()


def test_new_agent_flags_reach_the_agent_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from balancing import agent as agent_mod

    seen: list[agent_mod.AgentConfig] = []
    monkeypatch.setattr(agent_mod, "run", seen.append)
    monkeypatch.setattr(logs, "setup", lambda *_args: None)  # the root logger stays the test runner's
    obj = tmp_path / "balancing.o"
    obj.write_bytes(b"")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    args = ["agent", "--node-name", "n1", "--kubeconfig", str(kubeconfig), "--context", "prod",
            "--bpf-object", str(obj), "--cgroup", str(mounts.cgroup2_root()),
            "--socket-lb-host-namespace-only",
            "--netns-dir", "/a,/b", "--netns-dir", "/a", "--nodeport-addresses", "10.0.0.0/8,fd00::/64",
            "--log-format", "json", "--state-addr", ""]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.kube == agent_mod.KubeSourceConfig(kubeconfig, None, "prod", in_cluster=False)
    assert cfg.socket_lb_host_namespace_only and cfg.netns_dirs == (Path("/a"), Path("/b"))
    assert len(cfg.model.nodeport_cidrs) == 2 and cfg.state_addr is None


def test_the_deprecated_max_sockets_flag_runs_the_agent_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--max-sockets has no effect since 0.4: an agent started with it runs, and says so naming the flag."""
    from balancing import agent as agent_mod

    seen: list[agent_mod.AgentConfig] = []
    monkeypatch.setattr(agent_mod, "run", seen.append)
    monkeypatch.setattr(logs, "setup", lambda *_args: None)
    obj = tmp_path / "balancing.o"
    obj.write_bytes(b"")
    args = ["agent", "--node-name", "n1", "--manifests", str(tmp_path), "--bpf-object", str(obj),
            "--cgroup", str(mounts.cgroup2_root()), "--max-sockets", "5"]  # fmt: skip
    with caplog.at_level("WARNING", logger="balancing.agent"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and not hasattr(seen[0].datapath, "max_sockets")
    warnings = [r.getMessage() for r in caplog.records if r.name == "balancing.agent"]
    assert len(warnings) == 1 and warnings[0].startswith("--max-sockets: has no effect since 0.4"), warnings


def test_north_south_flags_reach_the_agent_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--nodeport-devices turns north-south on (the model marks external frontends); its settings arrive."""
    from balancing import agent as agent_mod

    seen: list[agent_mod.AgentConfig] = []
    monkeypatch.setattr(agent_mod, "run", seen.append)
    monkeypatch.setattr(logs, "setup", lambda *_args: None)
    obj = tmp_path / "balancing.o"
    obj.write_bytes(b"")
    (tmp_path / "nodeport.o").write_bytes(b"")
    base = ["agent", "--node-name", "n1", "--manifests", str(tmp_path), "--bpf-object", str(obj),
            "--cgroup", str(mounts.cgroup2_root())]  # fmt: skip
    north_south = ["--nodeport-devices", "lo", "--maglev-table-size", "251", "--snat-ports", "50000-50099",
                   "--tc-attach-mode", "clsact"]  # fmt: skip
    result = CliRunner().invoke(app, [*base, *north_south])
    assert result.exit_code == 0, result.output
    ns = seen[-1].north_south
    assert ns is not None and seen[-1].model.north_south
    assert (ns.devices, ns.maglev_size, ns.snat_ports, ns.attach_mode) == (
        ("lo",),
        251,
        (50000, 50099),
        "clsact",
    )
    assert ns.object_path == tmp_path / "nodeport.o"
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0 and seen[-1].north_south is None and not seen[-1].model.north_south
