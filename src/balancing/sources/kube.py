"""The Kubernetes API source: the objects in force read from an API server by list+watch.

``KubeSource(node_name, api_base_url=... | kubeconfig=... | neither for in-cluster)`` follows Services,
EndpointSlices, Nodes, LocalRedirectPolicies, BalancingPolicies, and the Pods scheduled on ``node_name``
(``fieldSelector=spec.nodeName=<node>``). ``updates()`` yields ``SourceUpdate``\\ s like the manifest source:
the first is the full initial state (every object as an upsert, plus the errors found), each later one
only a difference. Malformed objects are skipped with a ``KubeObjectError`` (a ``ManifestError`` subclass,
so it fits ``SourceUpdate.errors``) naming kind, namespace/name and field. Watch, relist, resync and
backoff rules are those of ``sources.informer.Informer``.

Auth: a kubeconfig's current context (server, CA or insecure-skip-tls-verify, bearer token / tokenFile or
client certificate and key, inline ``-data`` variants included), or in-cluster (``KUBERNETES_SERVICE_HOST``
and the service account token, re-read for every request, and CA), or a plain ``api_base_url`` (no auth,
for tests and ``kubectl proxy``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

from balancing.errors import SourceError
from balancing.model.objects import POLICY_API_VERSION
from balancing.sources.informer import Informer, KubeObjectError, Resource, Timing
from balancing.sources.manifests import SourceUpdate

__all__ = ["KubeConnection", "KubeObjectError", "KubeSource", "Timing", "resources_for"]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def resources_for(node_name: str) -> list[Resource]:
    """The collections the agent follows on ``node_name``."""
    return [
        Resource("/api/v1/services", "v1", "Service"),
        Resource("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
        Resource("/api/v1/nodes", "v1", "Node"),
        Resource(
            f"/apis/{POLICY_API_VERSION}/localredirectpolicies", POLICY_API_VERSION, "LocalRedirectPolicy"
        ),
        Resource(f"/apis/{POLICY_API_VERSION}/balancingpolicies", POLICY_API_VERSION, "BalancingPolicy"),
        Resource("/api/v1/pods", "v1", "Pod", f"spec.nodeName={node_name}"),
    ]


# --- connection ----------------------------------------------------------------------------------------


@dataclass
class KubeConnection:
    """Where the API server is and how to authenticate to it."""

    base_url: str
    verify: ssl.SSLContext | bool = True
    token: str | None = None
    token_file: Path | None = None
    _tempdir: Any = field(default=None, repr=False)  # keeps inline client cert/key files alive

    def headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as exc:
                log.warning("cannot read token file %s: %s", self.token_file, exc)
        return {"Authorization": f"Bearer {token}"} if token else {}

    @classmethod
    def plain(cls, base_url: str) -> KubeConnection:
        return cls(base_url.rstrip("/"))

    @classmethod
    def in_cluster(cls, account: Path = SERVICE_ACCOUNT) -> KubeConnection:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise SourceError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT unset; give --kubeconfig")
        host = f"[{host}]" if ":" in host else host
        context = ssl.create_default_context(cafile=str(account / "ca.crt"))
        return cls(f"https://{host}:{port}", context, token_file=account / "token")

    @classmethod
    def from_kubeconfig(cls, path: Path | str, context_name: str | None = None) -> KubeConnection:
        path = Path(path)
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SourceError(f"cannot read kubeconfig {path}: {exc}") from None
        try:
            return cls._from_config(path, config, context_name)
        except (KeyError, TypeError, ValueError, ssl.SSLError, OSError) as exc:
            raise SourceError(f"kubeconfig {path}: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_config(cls, path: Path, config: Any, context_name: str | None) -> KubeConnection:
        def named(section: str, name: str) -> dict[str, Any]:
            for entry in config.get(section) or []:
                if entry.get("name") == name:
                    value = entry.get(section[:-1]) or {}
                    assert isinstance(value, dict)
                    return value
            raise KeyError(f"{section[:-1]} {name!r} not found")

        context = named("contexts", context_name or config["current-context"])
        cluster, user = named("clusters", context["cluster"]), named("users", context.get("user", ""))
        base = path.parent

        def file(key: str, where: dict[str, Any]) -> str | None:
            value = where.get(key)
            return str(base / value) if value else None

        server = str(cluster["server"]).rstrip("/")
        verify: ssl.SSLContext | bool = True
        tempdir = None
        if server.startswith("https"):
            if cluster.get("insecure-skip-tls-verify"):
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif cluster.get("certificate-authority-data"):
                cadata = base64.b64decode(cluster["certificate-authority-data"]).decode()
                ctx = ssl.create_default_context(cadata=cadata)
            else:
                ctx = ssl.create_default_context(cafile=file("certificate-authority", cluster))
            cert, key = file("client-certificate", user), file("client-key", user)
            if user.get("client-certificate-data") and user.get("client-key-data"):
                tempdir = tempfile.TemporaryDirectory(prefix="balancing-kube-")
                cert, key = (os.path.join(tempdir.name, n) for n in ("client.crt", "client.key"))
                for name, data in ((cert, user["client-certificate-data"]), (key, user["client-key-data"])):
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        out.write(base64.b64decode(data))
            if cert and key:
                ctx.load_cert_chain(cert, key)
            verify = ctx
        token_file = file("tokenFile", user)
        return cls(
            server,
            verify,
            token=user.get("token"),
            token_file=Path(token_file) if token_file else None,
            _tempdir=tempdir,
        )


# --- the source ----------------------------------------------------------------------------------------


class KubeSource:
    """The objects in force from the API server; see the module docstring."""

    def __init__(
        self,
        node_name: str,
        *,
        api_base_url: str | None = None,
        kubeconfig: Path | str | None = None,
        connection: KubeConnection | None = None,
        timing: Timing | None = None,
    ) -> None:
        if connection is None:
            if api_base_url is not None:
                connection = KubeConnection.plain(api_base_url)
            elif kubeconfig is not None:
                connection = KubeConnection.from_kubeconfig(kubeconfig)
            else:
                connection = KubeConnection.in_cluster()
        self.node_name = node_name
        self.connection = connection
        self.timing = timing or Timing()
        self.resources = resources_for(node_name)

    async def updates(self) -> AsyncGenerator[SourceUpdate, None]:
        """The full initial state, then every non-empty difference, forever (close to stop)."""
        queue: asyncio.Queue[SourceUpdate] = asyncio.Queue()

        async def emit(update: SourceUpdate) -> None:
            await queue.put(update)

        async with httpx.AsyncClient(
            base_url=self.connection.base_url, verify=self.connection.verify, timeout=30.0
        ) as client:
            informers = [Informer(client, r, self.connection.headers, self.timing) for r in self.resources]
            initial = await asyncio.gather(*(i.list_until_done() for i in informers))
            tasks = [asyncio.create_task(i.run(emit), name=f"watch {i.resource.path}") for i in informers]
            try:
                yield SourceUpdate(
                    [o for u in initial for o in u.upserts],
                    [d for u in initial for d in u.deletes],
                    [e for u in initial for e in u.errors],
                )
                while True:
                    yield await queue.get()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
