"""The shipped systemd unit (``deploy/systemd/balancing-agent.service``) read as systemd reads it, so tests
run its ``ExecStart=`` line: ``Environment=`` assignments (quoted or not, ``%H`` the host name), then an
``EnvironmentFile=``'s lines overriding them, then ``$NAME`` (a word of its own: split at whitespace) and
``${NAME}`` (inside a word: not split) substituted as ``systemd.service(5)`` documents."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "balancing-agent.service"


@dataclass
class Unit:
    """The ``[Service]`` settings this module needs: the environment and the ExecStart words."""

    environment: dict[str, str]
    exec_start: list[str]  # as written: variables not substituted
    environment_files: list[str]


def read(path: Path = UNIT, host: str = "host") -> Unit:
    environment: dict[str, str] = {}
    files: list[str] = []
    exec_start: list[str] = []
    section = ""
    for line in _logical_lines(path.read_text()):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section != "Service":
            continue
        value = value.replace("%H", host).replace("%%", "%")
        if key == "Environment":
            for assignment in shlex.split(value):
                name, _, val = assignment.partition("=")
                environment[name] = val
        elif key == "EnvironmentFile":
            files.append(value)
        elif key == "ExecStart":
            exec_start = shlex.split(value)
    return Unit(environment, exec_start, files)


def _logical_lines(text: str) -> list[str]:
    """Lines with comments dropped and backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def environment_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional quotes), as ``EnvironmentFile=`` reads them."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def argv(words: list[str], env: Mapping[str, str]) -> list[str]:
    """``ExecStart`` words with ``$NAME`` (split into words; none when empty) and ``${NAME}`` substituted."""
    out: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out.extend(env.get(whole.group(1), "").split())
        else:
            out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return out
