"""The node agent's wiring: sources in, writes out, health and state endpoints, events, policy status.

Modules: ``config`` (what the agent is told), ``lifecycle`` (``Agent``: start, run the supervised tasks,
stop), ``supervise`` (failed tasks logged, counted, restarted with backoff), ``ingest`` (source updates into
the model's store), ``programming`` (the store's changes into the maps, resyncs), ``udp_termination``
(connected UDP sockets of removed backends), ``health`` (``/healthz``, ``/livez``, ``/readyz``),
``healthcheck_ports`` (the Services' healthCheckNodePort servers), ``state`` (``GET /state`` for the tools),
``events`` (the resolution-event switch and pipeline), ``policy_status`` (this node's entry in the policies'
``status.nodes``).
May import every stage below it (metrics, events, datapath, sources, model) and no business logic of its own
lives here; the CLI and nothing else imports it.
"""

from balancing.agent.config import AgentConfig, KubeSourceConfig
from balancing.agent.events import EventsConfig
from balancing.agent.lifecycle import Agent, run

__all__ = ["Agent", "AgentConfig", "EventsConfig", "KubeSourceConfig", "run"]
