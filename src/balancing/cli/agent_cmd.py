"""``balancing agent``: the agent's configuration (``--config`` file, environment, flags), then ``agent.run``.

The flags given on the command line override the environment and the file (``cli.configfile`` merges and
checks them, errors naming the flag, variable or file field); ``build`` turns the merged configuration into
the one ``AgentConfig``, checking it against the machine (the source directory, the cgroup, the BPF object).
A bad value is a one-line error and exit status 2, before anything runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from balancing import errors
from balancing.agent import events as agent_events
from balancing.cli import configfile, flags, logs
from balancing.cli.configfile import DEFAULTS
from balancing.datapath import bpfobjects, loader, mounts, northsouth, tcattach
from balancing.model import config

log = logging.getLogger("balancing.agent")
_EV, _MAPS = DEFAULTS.events, DEFAULTS.maps


def _netns_dirs(values: list[str]) -> list[Path]:
    """--netns-dir values (repeated, each possibly a comma list) as distinct paths, in order."""
    dirs: dict[Path, None] = {}
    for value in values:
        for item in value.split(","):
            if item.strip():
                dirs[Path(item.strip())] = None
    return list(dirs)


def given_flags(ctx: typer.Context) -> dict[str, Any]:
    """The flags given on the command line (flag → value in the configuration's terms)."""
    given: dict[str, Any] = {}
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if name == "config" or source is None or source.name != "COMMANDLINE":
            continue
        flag = next(o for o in param.opts if o.startswith("--"))
        value = ctx.params[name]
        if flag == "--nodeport-addresses":
            value = [c.strip() for c in value.split(",") if c.strip()]
        elif flag == "--netns-dir":
            value = _netns_dirs(value or [])
        elif flag == "--nodeport-devices":
            value = [d.strip() for d in value.split(",") if d.strip()]
        given[flag] = value
    return given


def _check_source(loaded: configfile.Loaded) -> None:
    src = loaded.config.source
    kube = src.kubernetes
    if src.manifests is None and (
        kube is None or not (kube.in_cluster or kube.kubeconfig or kube.api_server or kube.context)
    ):
        raise errors.ConfigError(
            "--manifests",
            "give exactly one source: --manifests, --kubeconfig, --api-server or --in-cluster "
            "(or source: in --config)",
        )
    if src.manifests is not None and not src.manifests.is_dir():
        raise errors.ConfigError(loaded.where("source", "manifests"), f"{src.manifests} is not a directory")
    if kube is not None and kube.kubeconfig is not None and not kube.kubeconfig.is_file():
        where = loaded.where("source", "kubernetes", "kubeconfig")
        raise errors.ConfigError(where, f"{kube.kubeconfig} is not a file")


def build(loaded: configfile.Loaded) -> Any:
    """The ``agent.AgentConfig`` of a merged configuration, checked against this machine."""
    from balancing import agent as agent_mod

    c, where = loaded.config, loaded.where
    if c.node_name is None:
        raise errors.ConfigError("--node-name", "required (or BALANCING_NODE_NAME, or nodeName in --config)")
    _check_source(loaded)
    obj = c.bpf_object or bpfobjects.default_object()  # the installed package's, else build/bpf
    if not obj.is_file():
        raise errors.ConfigError(where("bpf_object"), f"{obj} does not exist (run `make bpf`)")
    cg = c.cgroup or mounts.cgroup2_root()
    if mounts.fs_type_of(cg) != "cgroup2" or not cg.is_dir():
        raise errors.ConfigError(where("cgroup"), f"{cg} is not a cgroup v2 directory")
    if c.host_netns is not None and not c.host_netns.exists():
        raise errors.ConfigError(where("host_netns"), f"{c.host_netns} does not exist")
    health_host, health_port = flags.host_port(where("health_addr"), c.health_addr)
    ev, maps, kube = c.events, c.maps, c.source.kubernetes
    if maps.sockets is not None:
        log.warning(
            "%s: has no effect since 0.4 (each translated connected socket keeps its reverse translation in "
            "its own socket storage, which needs no size); remove it",
            where("maps", "sockets"),
        )
    north_south = _north_south(loaded, obj)
    return agent_mod.AgentConfig(
        c.source.manifests,
        config.ModelConfig(
            c.node_name,
            config.parse_cidrs(c.nodeport_addresses),
            c.external_ips_local_only,
            c.out_of_cluster,
            north_south is not None,
        ),
        loader.DatapathConfig(
            obj,
            c.bpffs,
            cg,
            maps.services,
            maps.backends,
            maps.reverse,
            maps.affinity,
            event_bytes=ev.ring_bytes,
        ),
        health_host,
        health_port,
        c.resync_interval,
        c.healthcheck_address,
        metrics_addr=flags.host_port(where("metrics_addr"), c.metrics_addr) if c.metrics_addr else None,
        state_addr=flags.host_port(where("state_addr"), c.state_addr) if c.state_addr else None,
        events=agent_events.EventsConfig(
            ev.mode,
            ev.sample_every,
            ev.reverse,
            ev.log,
            ev.stdout,
            ev.log_max_bytes,
            ev.log_backups,
            ev.socket,
        ),
        host_netns=c.host_netns,
        kube=None
        if kube is None
        else agent_mod.KubeSourceConfig(kube.kubeconfig, kube.api_server, kube.context, kube.in_cluster),
        policy_status=c.policy_status,
        terminate_udp=c.terminate_udp_sockets,
        netns_dirs=tuple(c.netns_dirs),
        socket_lb_host_namespace_only=c.socket_lb.host_namespace_only,
        north_south=north_south,
    )


def _north_south(loaded: configfile.Loaded, obj: Path) -> northsouth.NorthSouthConfig | None:
    """North-south's configuration when it is on (``enabled`` or devices given), checked; else None."""
    c, where = loaded.config, loaded.where
    ns = c.north_south
    if not ns.enabled and not ns.devices:
        return None
    if c.out_of_cluster:
        raise errors.ConfigError(
            where("north_south", "enabled"), "north-south translates for a Node: not with --out-of-cluster"
        )
    for device in ns.devices:
        try:
            tcattach.ifindex_of(device)
            if northsouth.device_addresses(device) == (None, None):
                raise errors.DeviceError(device, "has no IPv4 or global IPv6 address to translate sources to")
        except errors.DeviceError as exc:
            raise errors.ConfigError(where("north_south", "devices"), str(exc)) from exc
    nodeport = bpfobjects.nodeport_object(obj)
    if not nodeport.is_file():
        raise errors.ConfigError(where("bpf_object"), f"{nodeport} does not exist beside it (run `make bpf`)")
    return northsouth.NorthSouthConfig(
        nodeport,
        c.bpffs,
        tuple(ns.devices),
        ns.maglev_table_size,
        northsouth.parse_snat_ports(ns.snat_ports),
        ns.conntrack_entries,
        ns.attach_mode,
    )


def agent(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="A BalancingConfiguration (YAML, docs/configuration.md); BALANCING_* variables override "
            "it and flags override both.",
        ),
    ] = None,
    node_name: Annotated[
        str | None, typer.Option(help="This node's name (as in Node objects and pod nodeName). Required.")
    ] = None,
    manifests: Annotated[
        Path | None, typer.Option(help="Standalone mode: a directory of Kubernetes manifests (YAML/JSON).")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubernetes mode: read the API server named by this kubeconfig.")
    ] = None,
    context: Annotated[
        str | None,
        typer.Option(
            help="Kubernetes mode: this context of --kubeconfig, or alone of the environment's kubeconfig "
            "(KUBECONFIG, else ~/.kube/config) [the current-context]."
        ),
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
    ] = DEFAULTS.policy_status,
    terminate_udp_sockets: Annotated[
        bool,
        typer.Option(
            help="Destroy connected UDP sockets whose backend left the frontend they connected to, so "
            "clients reconnect to a live one (kube-proxy's UDP conntrack cleanup; Linux >= 6.5)."
        ),
    ] = DEFAULTS.terminate_udp_sockets,
    netns_dir: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DIR[,DIR]",
            help="Directory of network namespace files (bind mounts, as ip netns and containerd/CRI-O keep "
            "in /run/netns) where socket termination also looks for the namespaces of the cgroup's "
            "processes: the only way to find them when the agent has its own PID namespace. Repeatable, "
            "or comma-separated; empty: none. [/run/netns, /var/run/netns]",
        ),
    ] = None,
    cgroup: Annotated[
        Path | None, typer.Option(help="cgroup v2 directory to attach to [cgroup2 root].")
    ] = None,
    bpffs: Annotated[
        Path, typer.Option(help="Directory on bpffs holding this agent's pins.")
    ] = DEFAULTS.bpffs,
    health_addr: Annotated[
        str, typer.Option(help="HOST:PORT for /healthz, /livez, /readyz and /statusz.")
    ] = DEFAULTS.health_addr,
    state_addr: Annotated[
        str,
        typer.Option(
            help="HOST:PORT for /state, the agent's view for `balancing inspect/trace --agent` (names of "
            "Services, policies and pods: keep it on loopback); empty: not served."
        ),
    ] = DEFAULTS.state_addr,
    bpf_object: Annotated[
        Path | None, typer.Option(help="Compiled BPF object [build/bpf/balancing.o, else the package's].")
    ] = None,
    max_services: Annotated[
        int, typer.Option(help="Service map entries (frontends + slots).")
    ] = _MAPS.services,
    max_backends: Annotated[int, typer.Option(help="Backend map entries.")] = _MAPS.backends,
    max_reverse: Annotated[int, typer.Option(help="UDP reverse-translation LRU entries.")] = _MAPS.reverse,
    max_sockets: Annotated[
        int | None,
        typer.Option(
            help="No effect since 0.4 (connected sockets keep their reverse translation in socket storage)."
        ),
    ] = None,
    max_affinity: Annotated[
        int, typer.Option(help="Session-affinity records (client namespace x frontend), LRU.")
    ] = _MAPS.affinity,
    nodeport_addresses: Annotated[
        str, typer.Option(help="Comma-separated CIDRs: NodePorts only on node addresses inside them [all].")
    ] = "",
    external_ips_local_only: Annotated[
        bool,
        typer.Option(help="Translate an externalIP only when it is this node's address (Cilium's choice)."),
    ] = DEFAULTS.external_ips_local_only,
    healthcheck_address: Annotated[
        str, typer.Option(help="Address the healthCheckNodePort servers listen on.")
    ] = DEFAULTS.healthcheck_address,
    resync_interval: Annotated[
        float, typer.Option(help="Seconds between full reconciling syncs.")
    ] = DEFAULTS.resync_interval,
    metrics_addr: Annotated[
        str, typer.Option(help="HOST:PORT for Prometheus metrics (kube-proxy's default); empty: no metrics.")
    ] = DEFAULTS.metrics_addr,
    out_of_cluster: Annotated[
        bool,
        typer.Option(
            help="This host is not a Node (bare-metal mode): its clients are external clients "
            "(externalTrafficPolicy Local applies, no loopback NodePorts, policies need enableOutCluster)."
        ),
    ] = DEFAULTS.out_of_cluster,
    host_netns: Annotated[
        Path | None,
        typer.Option(
            help="The host's network namespace (loopback NodePorts are its alone) [the agent's own]."
        ),
    ] = None,
    socket_lb_host_namespace_only: Annotated[
        bool, typer.Option(help="Translate only the sockets of the host's network namespace.")
    ] = DEFAULTS.socket_lb.host_namespace_only,
    north_south: Annotated[
        bool,
        typer.Option(
            help="Translate NodePort, load-balancer and externalIP traffic arriving from outside the cluster "
            "(TC on --nodeport-devices; implied by that flag)."
        ),
    ] = DEFAULTS.north_south.enabled,
    nodeport_devices: Annotated[
        str,
        typer.Option(
            metavar="DEV[,DEV]",
            help="Devices north-south runs on [the devices holding this Node's InternalIP/ExternalIP].",
        ),
    ] = "",
    maglev_table_size: Annotated[
        int,
        typer.Option(help="Entries of each north-south Maglev table: a prime, at least 100 x backends."),
    ] = DEFAULTS.north_south.maglev_table_size,
    snat_ports: Annotated[
        str,
        typer.Option(
            metavar="LOW-HIGH",
            help="Source ports north-south translates to towards remote backends (keep them out of the "
            "node's ephemeral range and the NodePort range).",
        ),
    ] = DEFAULTS.north_south.snat_ports,
    max_conntrack: Annotated[
        int, typer.Option(help="North-south connection-tracking entries (two per flow), LRU.")
    ] = DEFAULTS.north_south.conntrack_entries,
    tc_attach_mode: Annotated[
        str, typer.Option(help="auto (tcx where the kernel has it, else clsact), tcx or clsact.")
    ] = DEFAULTS.north_south.attach_mode,
    events: Annotated[str, typer.Option(help="Resolution events: off, sampled or all.")] = _EV.mode,
    event_sample_every: Annotated[
        int, typer.Option(help="With --events sampled: one in N resolutions.")
    ] = _EV.sample_every,
    event_reverse: Annotated[bool, typer.Option(help="Also emit reverse-translation events.")] = _EV.reverse,
    event_bytes: Annotated[
        int, typer.Option(help="Event ring buffer size (a power of two, at least 4096).")
    ] = _EV.ring_bytes,
    event_stdout: Annotated[bool, typer.Option(help="Write events as JSON lines to stdout.")] = _EV.stdout,
    event_log: Annotated[Path | None, typer.Option(help="Write events as JSON lines to this file.")] = None,
    event_log_max_bytes: Annotated[
        int, typer.Option(help="Rotate the event log at this size.")
    ] = _EV.log_max_bytes,
    event_log_backups: Annotated[int, typer.Option(help="Rotated event logs to keep.")] = _EV.log_backups,
    events_socket: Annotated[
        Path, typer.Option(help="Unix socket streaming events to `balancing monitor`.")
    ] = _EV.socket,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = DEFAULTS.logging.level,
    log_format: Annotated[
        str, typer.Option(help="text, or json (one object per line).")
    ] = DEFAULTS.logging.format,
) -> None:
    """Run the node agent: program the datapath from a manifest directory or the Kubernetes API."""
    from balancing import agent as agent_mod

    try:
        loaded = configfile.load(config_file, given_flags(ctx))
        logs.setup(loaded.config.logging.level, loaded.config.logging.format)
        cfg = build(loaded)
        agent_mod.run(cfg)
    except errors.BalancingError as exc:
        flags.fail(exc)
