"""Balancing: a socket-level layer-4 load balancer for Kubernetes.

Stages, data flowing one way: ``sources`` → ``model`` → ``datapath`` → ``events``; ``agent`` and ``cli`` wire
them. The direction is enforced by import-linter contracts in ``pyproject.toml``.
"""

__version__ = "0.1.0"
