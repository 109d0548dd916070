"""Balancing: a socket-level layer-4 load balancer for Kubernetes.

Stages, data flowing one way: ``sources`` → ``model`` → ``datapath`` → ``events`` and ``metrics``; ``agent``,
``controller`` (the policies' admission webhooks and Ready condition) and ``cli`` wire them. Beside them:
``errors`` (the exception hierarchy), ``httpserve`` (the small asyncio HTTP server the agent and the
controller share) and ``gcpause`` (the collector paused during bulk work). The direction is enforced by
import-linter contracts in ``pyproject.toml``.
"""

from importlib.metadata import version as _version

__version__ = _version("balancing")  # one version: pyproject.toml, the chart and the image follow it
