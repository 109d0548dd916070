"""``balancing controller``: the admission webhooks for the policy kinds (``balancing.controller``).

Serves ``/validate``, ``/mutate``, ``/healthz``, ``/readyz`` and ``/metrics`` over HTTPS with the given
certificate and key (re-read when the files change: a renewed Secret), or with a generated CA and serving
certificate for the Service's DNS names (the CA bundle is written to ``--ca-bundle`` for the webhook
configuration). Existing policies, for the older-wins conflict check, come from a provider the API-server
informer will feed; until then none. Following an API server, it also writes each policy's Ready condition
and removes departed Nodes' entries from the policies' ``status.nodes`` (``controller.status``; it follows
the Nodes for that; ``--no-policy-status`` turns it off). ``--max-connections`` caps the connections the
webhook server holds at once (``controller.server.MAX_CONNECTIONS``). Logging as the agent's
(``--log-level``, ``--log-format``: ``cli.logs``); a bad flag is a one-line error naming it, exit status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from balancing import controller as webhooks
from balancing import errors
from balancing.cli import flags, logs
from balancing.controller import policyindex
from balancing.controller import server as webhook_server
from balancing.controller import status as policy_status_mod
from balancing.controller.tls import CertReloader
from balancing.errors import SourceError
from balancing.model import policies
from balancing.sources import kube

__all__ = ["controller"]


def _no_policies() -> list[policies.Policy]:
    return []


async def _run(
    webhook: webhooks.Webhook,
    host: str,
    port: int,
    context: ssl.SSLContext,
    source: kube.KubeSource | None = None,
    index: policyindex.PolicyIndex | None = None,
    reloader: CertReloader | None = None,
    status: policy_status_mod.StatusController | None = None,
    max_connections: int = webhook_server.MAX_CONNECTIONS,
) -> None:
    server = await webhooks.serve(webhook, host, port, context, max_connections=max_connections)
    tasks: list[asyncio.Task[None]] = []
    if source is not None and index is not None:
        tasks.append(asyncio.create_task(index.follow(source)))
    if reloader is not None:
        tasks.append(asyncio.create_task(reloader.follow()))
    try:
        async with server:
            await server.serve_forever()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if status is not None:
            await status.close()


def controller(
    listen: Annotated[str, typer.Option(help="HOST:PORT for the HTTPS webhook server.")] = "0.0.0.0:9443",
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serving certificate (PEM); with --tls-key. [generated]")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    service_name: Annotated[
        str, typer.Option(help="The webhook Service's name (for a generated certificate).")
    ] = "balancing-controller",
    namespace: Annotated[str, typer.Option(help="The webhook Service's namespace.")] = "kube-system",
    cert_dir: Annotated[
        Path | None, typer.Option(help="Where a generated certificate is written. [a temporary directory]")
    ] = None,
    ca_bundle: Annotated[
        Path | None, typer.Option(help="Write the CA bundle (the webhook configuration's caBundle) here.")
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="Follow existing policies (conflict check) from this kubeconfig's API server."),
    ] = None,
    api_server: Annotated[
        str | None, typer.Option(help="... or from this plain-HTTP API server URL.")
    ] = None,
    in_cluster: Annotated[
        bool, typer.Option(help="... or in-cluster, with the pod's service account.")
    ] = False,
    policy_status: Annotated[
        bool,
        typer.Option(
            help="Following an API server: write each policy's Ready condition and observedGeneration "
            "(server-side apply, only on change)."
        ),
    ] = True,
    max_connections: Annotated[
        int,
        typer.Option(
            min=1,
            help="Connections the webhook server holds at once (about 280 KiB each with TLS); more are "
            "closed at once.",
        ),
    ] = webhook_server.MAX_CONNECTIONS,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json (one object per line).")] = "text",
) -> None:
    """Run the validating and mutating admission webhooks for LocalRedirectPolicy and BalancingPolicy."""
    try:
        level = logs.check_level("--log-level", log_level)
        fmt = logs.check_format("--log-format", log_format)
        host, port = flags.host_port("--listen", listen)
        if (tls_cert is None) != (tls_key is None):
            raise errors.ConfigError("--tls-cert", "give both --tls-cert and --tls-key, or neither")
        if sum(1 for v in (kubeconfig, api_server, in_cluster) if v) > 1:
            raise errors.ConfigError("--kubeconfig", "give one of --kubeconfig, --api-server, --in-cluster")
    except errors.ConfigError as exc:
        flags.fail(exc)
    logs.setup(level, fmt)
    directory = cert_dir or Path(tempfile.mkdtemp(prefix="balancing-controller-"))
    try:
        context = webhooks.load_or_generate(
            tls_cert,
            tls_key,
            dns_names=webhooks.service_dns_names(service_name, namespace),
            cert_dir=directory,
            ca_bundle=ca_bundle,
        )
    except (OSError, ValueError) as exc:
        flags.fail(errors.ConfigError("TLS", str(exc)))
    reloader = (
        CertReloader(context, tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    )
    source, index, status = None, None, None
    if kubeconfig is not None or api_server is not None or in_cluster:
        try:
            source = kube.KubeSource(
                "", api_base_url=api_server, kubeconfig=kubeconfig, in_cluster=in_cluster or None
            )
        except SourceError as exc:
            flags.fail(exc)
        index = policyindex.PolicyIndex()
        webhook = webhooks.Webhook(index.existing, ready=index.ready)
        if policy_status:
            status = policy_status_mod.StatusController(index, source.connection, registry=webhook.registry)
    else:
        logging.getLogger(__name__).warning(
            "no API server given: the conflict check sees no existing policies"
        )
        webhook = webhooks.Webhook(_no_policies)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(webhook, host, port, context, source, index, reloader, status, max_connections))
