"""``balancing agent --config``: the BalancingConfiguration file, the environment and the flags merged
(flags > environment > file > defaults), each error naming the file field, variable or flag it is about."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from balancing import errors
from balancing.cli import agent_cmd, configfile
from balancing.cli.main import app
from balancing.datapath import abi, loader, mounts

FULL = """\
apiVersion: balancing.elf.io/v1alpha1
kind: BalancingConfiguration
nodeName: node-1
source:
  manifests: {manifests}
cgroup: null
bpffs: /sys/fs/bpf/balancing-test
bpfObject: null
healthAddr: 0.0.0.0:10256
stateAddr: ""
metricsAddr: 127.0.0.1:10249
healthcheckAddress: 0.0.0.0
resyncInterval: 15
nodeportAddresses: [10.0.0.0/8, "fd00::/64"]
externalIPsLocalOnly: true
outOfCluster: false
hostNetns: null
policyStatus: false
terminateUDPSockets: false
netnsDirs: [/run/netns]
maps: {{services: 1000, backends: 100, reverse: 100, sockets: 100, affinity: 100}}
events: {{mode: sampled, sampleEvery: 10, reverse: true, ringBytes: 8192, stdout: false, log: null,
          logMaxBytes: 1000, logBackups: 1, socket: /run/balancing/test.sock}}
socketLB: {{hostNamespaceOnly: true}}
logging: {{level: debug, format: json}}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def doc(**fields: Any) -> str:
    return yaml.safe_dump({"apiVersion": configfile.API_VERSION, "kind": configfile.KIND, **fields})


def test_the_whole_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.format(manifests=tmp_path))
    c = configfile.load(path, {}, environ={}).config
    assert c.node_name == "node-1" and c.source.manifests == tmp_path and c.source.kubernetes is None
    assert (
        c.state_addr == "" and c.resync_interval == 15 and c.nodeport_addresses == ["10.0.0.0/8", "fd00::/64"]
    )
    assert c.external_ips_local_only and not c.policy_status and not c.terminate_udp_sockets
    assert c.maps.services == 1000 and c.events.mode == "sampled" and c.events.ring_bytes == 8192
    assert c.socket_lb.host_namespace_only and c.logging.level == "debug" and c.logging.format == "json"


def test_defaults_are_the_flags_defaults() -> None:
    c = configfile.load(None, {}, environ={}).config
    assert c == configfile.DEFAULTS
    assert (c.health_addr, c.state_addr, c.metrics_addr) == (
        "0.0.0.0:10256",
        "127.0.0.1:10264",
        "127.0.0.1:10249",
    )
    assert [str(d) for d in c.netns_dirs] == ["/run/netns", "/var/run/netns"]


def test_flags_over_environment_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, doc(healthAddr="10.0.0.1:1", metricsAddr="10.0.0.1:2", stateAddr="10.0.0.1:3"))
    env = {"BALANCING_METRICS_ADDR": "10.0.0.2:2", "BALANCING_STATE_ADDR": "10.0.0.2:3",
           "BALANCING_EVENTS__MODE": "all", "BALANCING_LOGGING__FORMAT": "json"}  # fmt: skip
    loaded = configfile.load(path, {"--state-addr": "10.0.0.3:3"}, environ=env)
    c = loaded.config
    assert (c.health_addr, c.metrics_addr, c.state_addr) == ("10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3")
    assert c.events.mode == "all" and c.logging.format == "json"
    assert loaded.where("health_addr") == f"{path}: healthAddr"
    assert loaded.where("metrics_addr") == "BALANCING_METRICS_ADDR"
    assert loaded.where("state_addr") == "--state-addr"


def test_a_higher_layer_naming_a_source_replaces_the_lower_one(tmp_path: Path) -> None:
    path = write(tmp_path, doc(source={"kubernetes": {"kubeconfig": "/k", "context": "prod"}}))
    c = configfile.load(path, {"--manifests": tmp_path}, environ={}).config
    assert c.source.manifests == tmp_path and c.source.kubernetes is None
    c = configfile.load(path, {"--in-cluster": True}, environ={}).config
    assert c.source.kubernetes is not None and c.source.kubernetes.in_cluster
    assert c.source.kubernetes.kubeconfig is None and c.source.kubernetes.context is None
    c = configfile.load(path, {"--context": "staging"}, environ={}).config  # merges into the file's
    assert c.source.kubernetes is not None and c.source.kubernetes.kubeconfig == Path("/k")
    assert c.source.kubernetes.context == "staging"
    env = {"BALANCING_SOURCE__KUBERNETES__API_SERVER": "http://127.0.0.1:8001"}
    c = configfile.load(path, {}, environ=env).config
    assert c.source.kubernetes is not None and c.source.kubernetes.api_server == "http://127.0.0.1:8001"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"healthAddr": "nonsense"}, "config.yaml: healthAddr: 'nonsense' is not HOST:PORT"),
        ({"evnets": {}}, "config.yaml: evnets: unknown field"),
        ({"events": {"sampleEvry": 1}}, "config.yaml: events.sampleEvry: unknown field"),
        ({"node_name": "x"}, "config.yaml: node_name: unknown field"),  # camelCase only in the file
        ({"maps": {"services": 0}}, "config.yaml: maps.services: "),
        ({"nodeportAddresses": ["10.0.0.0/8", "x"]}, "config.yaml: nodeportAddresses: 'x' is not a CIDR"),
        ({"events": {"ringBytes": 5000}}, "config.yaml: events.ringBytes: 5000 is not a power of two"),
        ({"logging": {"level": "verbose"}}, "config.yaml: logging.level: 'verbose' is not one of"),
        ({"resyncInterval": -1}, "config.yaml: resyncInterval: -1.0 is not a positive number"),
        ({"source": {"kubernetes": {"inCluster": True, "apiServer": "u"}}}, "config.yaml: source.kubernetes"),
    ],
)  # fmt: skip
def test_file_errors_name_the_file_and_field(tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    path = write(tmp_path, doc(**fields))
    with pytest.raises(errors.ConfigError) as exc:
        configfile.load(path, {}, environ={})
    assert str(exc.value).startswith(f"{tmp_path}/{expected}"), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("apiVersion: balancing.elf.io/v1beta1\nkind: BalancingConfiguration\n", "apiVersion: must be"),
        ("apiVersion: balancing.elf.io/v1alpha1\nkind: KubeProxyConfiguration\n", "kind: must be"),
        ("kind: BalancingConfiguration\n", "apiVersion: must be 'balancing.elf.io/v1alpha1' (got missing)"),
        ("- a\n", "not a BalancingConfiguration"),
        ("a: [\n", "line 2: not YAML"),
    ],
)
def test_the_file_must_be_a_balancing_configuration(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(errors.ConfigError, match=None) as exc:
        configfile.load(write(tmp_path, text), {}, environ={})
    assert expected in str(exc.value) and str(tmp_path) in str(exc.value)
    with pytest.raises(errors.ConfigError, match="cannot be read"):
        configfile.load(tmp_path / "missing.yaml", {}, environ={})


def test_every_problem_of_a_layer_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, doc(healthAddr="x", events={"mode": "most"}))
    with pytest.raises(errors.ConfigError) as exc:
        configfile.load(path, {}, environ={})
    text = str(exc.value)
    assert "healthAddr" in text and "events.mode" in text and "\n" not in text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"BALANCING_EVENTS__MODE": "most"}, "BALANCING_EVENTS__MODE: "),
        ({"BALANCING_EVENTS__BOGUS": "1"}, "BALANCING_EVENTS__BOGUS: unknown field"),
        ({"BALANCING_HEALTH_ADDR": "[::1"}, "BALANCING_HEALTH_ADDR: "),
        ({"BALANCING_NETNS_DIRS": "/run/netns"}, "BALANCING_NETNS_DIRS: not JSON"),
        ({"BALANCING_MAPS__SERVICES": "many"}, "BALANCING_MAPS__SERVICES: "),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        configfile.load(None, {}, environ=env)
    assert str(exc.value).startswith(expected), str(exc.value)


def test_other_balancing_variables_are_not_fields() -> None:
    """The systemd unit's BALANCING_ARGS and the like are not configuration."""
    env = {"BALANCING_ARGS": "--x", "BALANCING_KUBECONFIG_ARG": "--kubeconfig=/k", "BALANCING_NODE_NAME": "n"}
    assert configfile.load(None, {}, environ=env).config.node_name == "n"
    assert configfile.load(None, {}, environ={"BALANCING_NETNS_DIRS": '["/a"]'}).config.netns_dirs == [
        Path("/a")
    ]


def test_flag_errors_name_the_flag() -> None:
    for given, flag in (
        ({"--events": "most"}, "--events"),
        ({"--max-backends": 0}, "--max-backends"),
        ({"--api-server": "u", "--in-cluster": True}, "--api-server"),
        ({"--manifests": Path("/m"), "--api-server": "http://x"}, "--manifests"),
    ):
        with pytest.raises(errors.ConfigError) as exc:
            configfile.load(None, given, environ={})
        assert str(exc.value).startswith(f"{flag}: ") or flag in str(exc.value), str(exc.value)


def agent_cmd_kube(**fields: Any) -> Any:
    from balancing import agent

    return agent.KubeSourceConfig(**fields)


def _obj(tmp_path: Path) -> Path:
    obj = tmp_path / "balancing.o"
    obj.write_bytes(b"")
    return obj


def test_the_merged_configuration_builds_the_agent_config(tmp_path: Path) -> None:
    kubeconfig = write(tmp_path, "apiVersion: v1\nkind: Config\n", "kubeconfig")
    fields = {
        "source": {"kubernetes": {"kubeconfig": str(kubeconfig)}},
        "socketLB": {"hostNamespaceOnly": True},
    }
    path = write(tmp_path, doc(nodeName="node-1", stateAddr="", maps={"backends": 77}, **fields))
    given = {"--context": "prod", "--bpf-object": _obj(tmp_path), "--cgroup": mounts.cgroup2_root()}
    cfg = agent_cmd.build(configfile.load(path, given, environ={"BALANCING_EVENTS__MODE": "all"}))
    assert cfg.manifests is None and cfg.kube is not None
    assert (cfg.kube.kubeconfig, cfg.kube.context, cfg.kube.api_server) == (kubeconfig, "prod", None)
    assert cfg.socket_lb_host_namespace_only and cfg.state_addr is None and cfg.datapath.max_backends == 77
    assert cfg.events.mode == "all" and cfg.model.node_name == "node-1"
    assert (cfg.health_host, cfg.health_port, cfg.metrics_addr) == ("0.0.0.0", 10256, ("127.0.0.1", 10249))


@pytest.mark.parametrize(
    ("layer", "named"),
    [("file", "config.yaml: maps.sockets"), ("env", "BALANCING_MAPS__SOCKETS"), ("flag", "--max-sockets")],
)
def test_the_deprecated_socket_map_size_is_accepted_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, layer: str, named: str
) -> None:
    """maps.sockets (--max-sockets) has no effect since 0.4 (connected sockets keep their reverse translation
    in socket storage): a configuration that still sets it loads, and the agent warns, naming where it is."""
    base: dict[str, Any] = {"--node-name": "n", "--manifests": tmp_path, "--bpf-object": _obj(tmp_path)}
    base["--cgroup"] = mounts.cgroup2_root()
    file = write(tmp_path, doc(maps={"sockets": 5})) if layer == "file" else None
    environ = {"BALANCING_MAPS__SOCKETS": "5"} if layer == "env" else {}
    given = {**base, "--max-sockets": 5} if layer == "flag" else base
    loaded = configfile.load(file, given, environ=environ)
    assert loaded.config.maps.sockets == 5
    with caplog.at_level("WARNING", logger="balancing.agent"):
        cfg = agent_cmd.build(loaded)
    (record,) = [r for r in caplog.records if r.name == "balancing.agent"]
    assert record.levelname == "WARNING" and "no effect" in record.getMessage()
    assert record.getMessage().startswith(f"{tmp_path}/{named}" if layer == "file" else named)
    assert cfg.datapath == agent_cmd.build(configfile.load(None, base, environ={})).datapath  # no effect


def test_no_warning_and_no_socket_capacity_without_the_deprecated_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    given = {"--node-name": "n", "--manifests": tmp_path, "--bpf-object": _obj(tmp_path)}
    with caplog.at_level("WARNING", logger="balancing.agent"):
        cfg = agent_cmd.build(configfile.load(None, {**given, "--cgroup": mounts.cgroup2_root()}, environ={}))
    assert [r for r in caplog.records if r.name == "balancing.agent"] == []
    assert configfile.DEFAULTS.maps.sockets is None
    assert "max_sockets" not in {f.name for f in dataclasses.fields(loader.DatapathConfig)}
    assert cfg.datapath.capacity(abi.MAP_SOCK_REVERSE) is None  # socket storage: no capacity to set


def test_machine_checks_name_where_the_value_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, doc(nodeName="n", source={"manifests": str(tmp_path / "nope")}))
    given: dict[str, Any] = {"--bpf-object": _obj(tmp_path)}
    with pytest.raises(errors.ConfigError, match=r"config.yaml: source.manifests: .* is not a directory"):
        agent_cmd.build(configfile.load(path, given, environ={}))
    with pytest.raises(errors.ConfigError, match=r"^BALANCING_HOST_NETNS: "):
        env = {"BALANCING_HOST_NETNS": str(tmp_path / "nope")}
        agent_cmd.build(
            configfile.load(None, {**given, "--manifests": tmp_path, "--node-name": "n"}, environ=env)
        )
    with pytest.raises(errors.ConfigError, match=r"^--node-name: required"):
        agent_cmd.build(configfile.load(None, {"--manifests": tmp_path}, environ={}))
    with pytest.raises(errors.ConfigError, match=r"^--manifests: give exactly one source"):
        agent_cmd.build(configfile.load(None, {"--node-name": "n"}, environ={}))
    given = {
        "--node-name": "n",
        "--context": "c",
        "--bpf-object": _obj(tmp_path),
        "--cgroup": mounts.cgroup2_root(),
    }
    cfg = agent_cmd.build(configfile.load(None, given, environ={}))  # the environment's kubeconfig
    assert cfg.kube == agent_cmd_kube(context="c")


def test_agent_config_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, doc(nodeName="n", source={"manifests": str(tmp_path)}, events={"mode": "most"}))
    result = CliRunner().invoke(app, ["agent", "--config", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{path}: events.mode" in lines[0], result.output


def test_every_flag_is_a_field_and_every_field_has_a_flag() -> None:
    from typer.main import get_command

    cmd = get_command(app).commands["agent"]  # type: ignore[attr-defined]
    options = {o for p in cmd.params for o in p.opts if o.startswith("--")} - {"--config", "--help"}
    assert options == set(configfile.FLAGS)
    for path in configfile.FLAGS.values():
        configfile.camel_path(path)  # resolves
    leaves = set(configfile.FLAGS.values())
    fields = {(n,) for n in configfile.BalancingConfiguration.model_fields} - {("api_version",), ("kind",)}
    covered = {p[:1] for p in leaves}
    assert fields <= covered, fields - covered
