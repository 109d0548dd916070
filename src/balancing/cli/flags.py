"""Flag values shared by the commands: parsed here once, errors naming the flag."""

from __future__ import annotations

from balancing import errors


def host_port(flag: str, value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too; an empty host means every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.ConfigError(flag, f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
