"""Flag values shared by the commands: parsed here once, errors naming the flag; ``fail`` reports one."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import NoReturn

import typer

from balancing import errors

_DOTTED = re.compile(r"[0-9.]+")  # looks like an IPv4 address, so must be one
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def host_port(flag: str, value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too; an empty host means every address). HOST is an IP address or a
    host name; a bare IPv6 address must be bracketed."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.ConfigError(flag, f"{value!r} is not HOST:PORT (port 0-65535)")
    if host.startswith("[") != host.endswith("]"):
        raise errors.ConfigError(flag, f"{value!r}: unbalanced brackets around the address")
    bracketed = host.startswith("[")
    host = host.strip("[]")
    if bracketed or ":" in host:
        try:
            if not bracketed or ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise errors.ConfigError(
                flag, f"{value!r}: an IPv6 address goes in brackets, [ADDR]:PORT"
            ) from None
    elif host and (not _HOSTNAME.fullmatch(host) or (_DOTTED.fullmatch(host) and not _is_ip(host))):
        raise errors.ConfigError(flag, f"{value!r}: {host!r} is not an IP address or host name")
    return host or "0.0.0.0", int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def positive_seconds(flag: str, value: float) -> float:
    """A duration in seconds: finite and above zero."""
    if not math.isfinite(value) or value <= 0:
        raise errors.ConfigError(flag, f"{value} is not a positive number of seconds")
    return value


def fail(exc: errors.BalancingError) -> NoReturn:
    """A one-line error (and a rejected BPF program's verifier log) on stderr, exit status 2."""
    typer.secho(f"error: {exc}", fg="red", err=True)
    log = getattr(exc, "log", None)
    if isinstance(exc, errors.BpfLoadError) and log:
        typer.echo(log[-4000:], err=True)
    raise typer.Exit(2)
