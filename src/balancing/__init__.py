"""Balancing: a socket-level layer-4 load balancer for Kubernetes.

Stages, data flowing one way: ``sources`` → ``model`` → ``datapath`` → ``events`` and ``metrics``; ``agent``,
``controller`` (the policies' admission webhooks and Ready condition) and ``cli`` wire them. Beside them:
``errors`` (the exception hierarchy) and ``httpserve`` (the small asyncio HTTP server the agent and the
controller share). The direction is enforced by import-linter contracts in ``pyproject.toml``.
"""

__version__ = "0.1.0"
