"""What one node agent is told to do: its sources, datapath, servers and features (``AgentConfig``).

Built by ``cli.agent_cmd`` from the merged configuration file, environment and flags (every value already
checked there, see ``cli.configfile``); read by ``agent.lifecycle`` and the parts it wires. Plain frozen
data, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from balancing.agent.events import EventsConfig
from balancing.datapath import loader, northsouth, sockterm
from balancing.model import config
from balancing.sources import kubestatus

__all__ = ["AgentConfig", "KubeSourceConfig"]


@dataclass(frozen=True)
class KubeSourceConfig:
    """Where the API server is: a kubeconfig (``context``: one of its contexts, else its current one), a
    plain URL (``kubectl proxy``), in-cluster (``in_cluster``), or ``context`` alone: that context of the
    environment's kubeconfig (``KUBECONFIG``, else ``~/.kube/config``). None of them: in-cluster."""

    kubeconfig: Path | None = None
    api_server: str | None = None
    context: str | None = None
    in_cluster: bool = False  # asked for explicitly (--in-cluster, source.kubernetes.inCluster)


@dataclass(frozen=True)
class AgentConfig:
    manifests: Path | None  # the standalone source; None: the Kubernetes API (``kube``)
    model: config.ModelConfig
    datapath: loader.DatapathConfig
    health_host: str = "127.0.0.1"
    health_port: int = 10256
    resync_interval: float = 30.0
    healthcheck_host: str = "0.0.0.0"  # where healthCheckNodePort servers listen
    cgroup_rescan_interval: float = 2.0  # seconds between scans for pod cgroups (policy client rules)
    metrics_addr: tuple[str, int] | None = ("127.0.0.1", 10249)  # None: no metrics server
    state_addr: tuple[str, int] | None = None  # ``GET /state`` for the tools; None: not served
    events: EventsConfig = field(default_factory=EventsConfig)
    host_netns: Path | None = None  # the host's network namespace; None: the agent's own
    kube: KubeSourceConfig | None = None  # the Kubernetes API source, when ``manifests`` is None
    policy_status: bool = True  # Kubernetes mode: write this node's entry in the policies' status.nodes
    terminate_udp: bool = True  # destroy connected UDP sockets whose backend left their frontend
    netns_dirs: tuple[Path, ...] = sockterm.NETNS_DIRS  # where termination also finds network namespaces
    status_timing: kubestatus.WriterTiming = field(default_factory=kubestatus.WriterTiming)
    restart_backoff: tuple[float, float] = (0.5, 30.0)  # a failed task's first and longest restart delay
    socket_lb_host_namespace_only: bool = False  # translate only the host network namespace's sockets
    north_south: northsouth.NorthSouthConfig | None = None  # TC on the node's devices; None: off
