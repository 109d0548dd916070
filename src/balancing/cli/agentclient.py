"""The agent's ``GET /state`` for the operator tools: fetched once with a short timeout, then looked up.

``balancing inspect`` and ``balancing trace`` read the maps themselves and join this view for names (see
``balancing.agent.state`` for the schema). Without ``--agent``, or when the agent does not answer in time,
the tools still work on the maps alone and say that names are unavailable; ``AgentView.error`` says why.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIMEOUT = 1.5  # seconds: an operator tool must not hang on a wedged agent
POLICY_KINDS = ("LocalRedirectPolicy", "BalancingPolicy")

Json = dict[str, Any]


def state_url(agent: str) -> str:
    """``127.0.0.1:10264`` or ``http://host:port[/state]`` → the full ``/state`` URL."""
    url = agent if "://" in agent else f"http://{agent}"
    return url if url.rstrip("/").endswith("/state") else url.rstrip("/") + "/state"


def host_of(backend: str) -> str:
    """The address of ``ip:port`` or ``[ip6]:port`` as the agent's ``pods`` map keys it."""
    host = backend.rpartition(":")[0] if backend.count(":") == 1 or backend.startswith("[") else backend
    return host.strip("[]")


@dataclass
class AgentView:
    """What the agent said (``state`` is None when it was not asked or did not answer)."""

    url: str | None = None
    state: Json | None = None
    error: str | None = None
    _frontends: dict[str, Json] = field(default_factory=dict, repr=False)
    _backend_pods: dict[str, Json] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for f in self.frontends:
            self._frontends[str(f.get("frontend"))] = f
            for bp in f.get("backendPods") or ():
                self._backend_pods.setdefault(str(bp.get("backend")), bp)

    @property
    def available(self) -> bool:
        return self.state is not None

    @property
    def frontends(self) -> list[Json]:
        found = (self.state or {}).get("frontends")
        return [f for f in found if isinstance(f, dict)] if isinstance(found, list) else []

    def frontend(self, key: str) -> Json | None:
        """The model's view of ``ip:port/PROTO`` (owner, kind, reason, fallback, backendPods)."""
        return self._frontends.get(key)

    def pod(self, backend: str) -> Json | None:
        """The pod behind ``ip:port``: a policy's backend pod, else the pod holding that IP."""
        bp = self._backend_pods.get(backend)
        pods = (self.state or {}).get("pods")
        by_ip = pods.get(host_of(backend)) if isinstance(pods, dict) else None
        if bp is None and not isinstance(by_ip, dict):
            return None
        out: Json = {}
        if isinstance(by_ip, dict):
            out.update({k: by_ip.get(k) for k in ("namespace", "name", "node")})
        if bp is not None:
            out.update({k: bp.get(k) for k in ("namespace", "name")})
            out.setdefault("node", None)
        return out

    @property
    def policies(self) -> list[Json] | None:
        """Policy status, once the agent serves it under ``"policies"`` (a list, or a dict by name)."""
        found = (self.state or {}).get("policies")
        if isinstance(found, list):
            return [p for p in found if isinstance(p, dict)]
        if isinstance(found, dict):
            return [
                {"name": k, **v} if isinstance(v, dict) else {"name": k, "status": v}
                for k, v in found.items()
            ]
        return None

    def describe(self) -> Json:
        """The ``agent`` object of the tools' JSON output."""
        return {"url": self.url, "available": self.available, "error": self.error}

    def note(self) -> str | None:
        """A one-line reason when names are unavailable."""
        if self.available:
            return None
        if self.url is None:
            return (
                "names unavailable: maps only (pass --agent http://127.0.0.1:10264, the agent's "
                "--state-addr, to join the agent's view)"
            )
        return f"names unavailable: maps only (agent {self.url}: {self.error})"


def from_state(state: Json | None, url: str | None = None, error: str | None = None) -> AgentView:
    return AgentView(url, state, error)


def fetch(agent: str | None, timeout: float = DEFAULT_TIMEOUT) -> AgentView:
    """GET the agent's /state; never raises: failures come back as ``error``."""
    if not agent:
        return AgentView()
    url = state_url(agent)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = json.load(resp)
    except urllib.error.HTTPError as exc:
        return AgentView(url, None, f"HTTP {exc.code}")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return AgentView(url, None, str(reason) or type(exc).__name__)
    if not isinstance(data, dict):
        return AgentView(url, None, "the answer is not a JSON object")
    return AgentView(url, data)
