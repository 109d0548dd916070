"""``balancing agent``: the node agent's flags, checked here (errors name the flag), then ``agent.run``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from balancing import errors
from balancing.agent import events as agent_events
from balancing.cli import flags
from balancing.cli.inspect_common import DEFAULT_BPFFS
from balancing.datapath import abi, loader, mounts, sockterm
from balancing.events import stream
from balancing.model import config

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BpffsOpt = Annotated[Path, typer.Option("--bpffs", help="Directory on bpffs holding this agent's pins.")]


def default_object() -> Path:
    """The compiled BPF object: $BALANCING_BPF_OBJECT, the repo's build/, or the installed package's copy."""
    env = os.environ.get("BALANCING_BPF_OBJECT")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [here.parents[3] / "build/bpf/balancing.o", here.parents[1] / "bpf/balancing.o"]
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def _netns_dirs(values: list[str]) -> tuple[Path, ...]:
    """--netns-dir values (repeated, each possibly a comma list) as distinct paths, in order."""
    dirs: dict[Path, None] = {}
    for value in values:
        for item in value.split(","):
            if item.strip():
                dirs[Path(item.strip())] = None
    return tuple(dirs)


def _at_least(least: int, values: dict[str, int]) -> None:
    for flag, value in values.items():
        if value < least:
            raise errors.ConfigError(flag, f"must be at least {least}")


def _fail(exc: errors.BalancingError) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    if isinstance(exc, errors.BpfLoadError) and exc.log:
        typer.echo(exc.log[-4000:], err=True)
    raise typer.Exit(2)


def agent(
    node_name: Annotated[str, typer.Option(help="This node's name (as in Node objects and pod nodeName).")],
    manifests: Annotated[
        Path | None, typer.Option(help="Standalone mode: a directory of Kubernetes manifests (YAML/JSON).")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubernetes mode: read the API server named by this kubeconfig.")
    ] = None,
    api_server: Annotated[
        str | None, typer.Option(help="Kubernetes mode: a plain-HTTP API server URL (e.g. kubectl proxy).")
    ] = None,
    in_cluster: Annotated[
        bool, typer.Option(help="Kubernetes mode with the pod's service account (in-cluster config).")
    ] = False,
    policy_status: Annotated[
        bool,
        typer.Option(
            help="Kubernetes mode: write this node's entry (backends, ready, reason) in each policy's "
            "status.nodes (server-side apply, only on change)."
        ),
    ] = True,
    terminate_udp_sockets: Annotated[
        bool,
        typer.Option(
            help="Destroy connected UDP sockets whose backend left the frontend they connected to, so "
            "clients reconnect to a live one (kube-proxy's UDP conntrack cleanup; Linux >= 6.5)."
        ),
    ] = True,
    netns_dir: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DIR[,DIR]",
            help="Directory of network namespace files (bind mounts, as ip netns and containerd/CRI-O keep "
            "in /run/netns) where socket termination also looks for the namespaces of the cgroup's "
            "processes: the only way to find them when the agent has its own PID namespace. Repeatable, "
            "or comma-separated; empty: none. Default: /run/netns and /var/run/netns.",
        ),
    ] = None,
    cgroup: Annotated[
        Path | None, typer.Option(help="cgroup v2 directory to attach to [cgroup2 root].")
    ] = None,
    bpffs: BpffsOpt = DEFAULT_BPFFS,
    health_addr: Annotated[
        str, typer.Option(help="HOST:PORT for /healthz, /livez, /readyz.")
    ] = "0.0.0.0:10256",
    state_addr: Annotated[
        str,
        typer.Option(
            help="HOST:PORT for /state, the agent's view for `balancing inspect/trace --agent` (names of "
            "Services, policies and pods: keep it on loopback); empty: not served."
        ),
    ] = "127.0.0.1:10264",
    bpf_object: Annotated[
        Path | None, typer.Option(help="Compiled BPF object [build/bpf/balancing.o].")
    ] = None,
    max_services: Annotated[
        int, typer.Option(help="Service map entries (frontends + slots).")
    ] = abi.DEFAULT_SVC_ENTRIES,
    max_backends: Annotated[int, typer.Option(help="Backend map entries.")] = abi.DEFAULT_BACKENDS,
    max_reverse: Annotated[
        int, typer.Option(help="UDP reverse-translation LRU entries.")
    ] = abi.DEFAULT_REV_ENTRIES,
    max_sockets: Annotated[
        int, typer.Option(help="Live translated connected sockets with reverse translation.")
    ] = abi.DEFAULT_SOCK_ENTRIES,
    max_affinity: Annotated[
        int, typer.Option(help="Session-affinity records (client namespace x frontend), LRU.")
    ] = abi.DEFAULT_AFF_ENTRIES,
    nodeport_addresses: Annotated[
        str, typer.Option(help="Comma-separated CIDRs: NodePorts only on node addresses inside them [all].")
    ] = "",
    external_ips_local_only: Annotated[
        bool,
        typer.Option(help="Translate an externalIP only when it is this node's address (Cilium's choice)."),
    ] = False,
    healthcheck_address: Annotated[
        str, typer.Option(help="Address the healthCheckNodePort servers listen on.")
    ] = "0.0.0.0",
    resync_interval: Annotated[float, typer.Option(help="Seconds between full reconciling syncs.")] = 30.0,
    metrics_addr: Annotated[
        str, typer.Option(help="HOST:PORT for Prometheus metrics (kube-proxy's default); empty: no metrics.")
    ] = "127.0.0.1:10249",
    out_of_cluster: Annotated[
        bool,
        typer.Option(
            help="This host is not a Node (bare-metal mode): its clients are external clients "
            "(externalTrafficPolicy Local applies, no loopback NodePorts, policies need enableOutCluster)."
        ),
    ] = False,
    host_netns: Annotated[
        Path | None,
        typer.Option(
            help="The host's network namespace (loopback NodePorts are its alone) [the agent's own]."
        ),
    ] = None,
    events: Annotated[str, typer.Option(help="Resolution events: off, sampled or all.")] = "off",
    event_sample_every: Annotated[
        int, typer.Option(help="With --events sampled: one in N resolutions.")
    ] = 100,
    event_reverse: Annotated[bool, typer.Option(help="Also emit reverse-translation events.")] = False,
    event_bytes: Annotated[
        int, typer.Option(help="Event ring buffer size (a power of two, at least 4096).")
    ] = abi.DEFAULT_EVENT_BYTES,
    event_stdout: Annotated[bool, typer.Option(help="Write events as JSON lines to stdout.")] = False,
    event_log: Annotated[Path | None, typer.Option(help="Write events as JSON lines to this file.")] = None,
    event_log_max_bytes: Annotated[int, typer.Option(help="Rotate the event log at this size.")] = 100 << 20,
    event_log_backups: Annotated[int, typer.Option(help="Rotated event logs to keep.")] = 3,
    events_socket: Annotated[
        Path, typer.Option(help="Unix socket streaming events to `balancing monitor`.")
    ] = stream.DEFAULT_SOCKET,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the node agent: program the datapath from a manifest directory and follow its changes."""
    from balancing import agent as agent_mod

    if log_level.upper() not in LOG_LEVELS:
        typer.secho(
            f"error: --log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS).lower()}", err=True
        )
        raise typer.Exit(2)

    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        chosen = [
            f
            for f, v in (
                ("--manifests", manifests),
                ("--kubeconfig", kubeconfig),
                ("--api-server", api_server),
                ("--in-cluster", in_cluster),
            )
            if v
        ]
        if len(chosen) != 1:
            raise errors.ConfigError(
                "--manifests",
                "give exactly one source: --manifests, --kubeconfig, --api-server or --in-cluster"
                + (f" (got {', '.join(chosen)})" if chosen else ""),
            )
        if manifests is not None and not manifests.is_dir():
            raise errors.ConfigError("--manifests", f"{manifests} is not a directory")
        if kubeconfig is not None and not kubeconfig.is_file():
            raise errors.ConfigError("--kubeconfig", f"{kubeconfig} is not a file")
        obj = bpf_object or default_object()
        if not obj.is_file():
            raise errors.ConfigError("--bpf-object", f"{obj} does not exist (run `make bpf`)")
        cg = cgroup or mounts.cgroup2_root()
        if mounts.fs_type_of(cg) != "cgroup2" or not cg.is_dir():
            raise errors.ConfigError("--cgroup", f"{cg} is not a cgroup v2 directory")
        _at_least(
            1,
            {
                "--max-services": max_services,
                "--max-backends": max_backends,
                "--max-reverse": max_reverse,
                "--max-sockets": max_sockets,
                "--max-affinity": max_affinity,
                "--event-sample-every": event_sample_every,
                "--event-log-max-bytes": event_log_max_bytes,
            },
        )
        _at_least(0, {"--event-log-backups": event_log_backups})
        if not node_name.strip() or not node_name.isprintable():
            raise errors.ConfigError("--node-name", f"{node_name!r} is not a node name")
        host, port = flags.host_port("--health-addr", health_addr)
        metrics_at = flags.host_port("--metrics-addr", metrics_addr) if metrics_addr else None
        state_at = flags.host_port("--state-addr", state_addr) if state_addr else None
        flags.positive_seconds("--resync-interval", resync_interval)

        if host_netns is not None and not host_netns.exists():
            raise errors.ConfigError("--host-netns", f"{host_netns} does not exist")
        if events not in agent_events.MODES:
            raise errors.ConfigError("--events", f"{events!r} is not one of off, sampled, all")
        if event_bytes < 4096 or event_bytes & (event_bytes - 1):
            raise errors.ConfigError("--event-bytes", f"{event_bytes} is not a power of two of at least 4096")
        events_cfg = agent_events.EventsConfig(
            events,
            event_sample_every,
            event_reverse,
            event_log,
            event_stdout,
            event_log_max_bytes,
            event_log_backups,
            events_socket,
        )
        try:
            cidrs = config.parse_cidrs(nodeport_addresses.split(","))
        except ValueError as exc:
            raise errors.ConfigError("--nodeport-addresses", str(exc)) from exc
        model = config.ModelConfig(node_name, cidrs, external_ips_local_only, out_of_cluster)
        dp = loader.DatapathConfig(
            obj,
            bpffs,
            cg,
            max_services,
            max_backends,
            max_reverse,
            max_sockets,
            max_affinity,
            event_bytes=event_bytes,
        )
        cfg = agent_mod.AgentConfig(
            manifests,
            model,
            dp,
            host,
            port,
            resync_interval,
            healthcheck_address,
            metrics_addr=metrics_at,
            state_addr=state_at,
            events=events_cfg,
            host_netns=host_netns,
            kube=None if manifests is not None else agent_mod.KubeSourceConfig(kubeconfig, api_server),
            policy_status=policy_status,
            terminate_udp=terminate_udp_sockets,
            netns_dirs=_netns_dirs(netns_dir) if netns_dir else sockterm.NETNS_DIRS,
        )
        agent_mod.run(cfg)
    except errors.BalancingError as exc:
        _fail(exc)
