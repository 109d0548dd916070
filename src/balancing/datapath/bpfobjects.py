"""Where the compiled BPF objects are, with no flag or environment variable needed.

An installed wheel carries them as package data (``balancing/bpf/balancing.o``, ``sockterm.o``,
``sockmigrate.o`` and ``nodeport.o``, built by the wheel's build hook); a source checkout has them in
``build/bpf/`` after ``make bpf``. The package data comes first, so an installed ``balancing`` never picks up
a checkout's objects. Another object is the agent's to choose (``--bpf-object``, ``bpfObject``,
``BALANCING_BPF_OBJECT``), not this module's. ``sockterm.o``, ``sockmigrate.o`` and ``nodeport.o`` always sit
beside the datapath object (the agent and the loader look for them there).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from balancing import errors

DATAPATH = "balancing.o"
SOCKTERM = "sockterm.o"
SOCKMIGRATE = "sockmigrate.o"
NODEPORT = "nodeport.o"


def package_dir() -> Path | None:
    """The installed package's ``balancing/bpf`` directory, or None when the package is not on a file
    system (a zip import: libbpf needs a real path)."""
    here = importlib.resources.files("balancing") / "bpf"
    return here if isinstance(here, Path) else None


def checkout_dir() -> Path | None:
    """``build/bpf`` of the source checkout this module runs from, or None when it is installed."""
    root = Path(__file__).resolve().parents[3]
    return root / "build" / "bpf" if (root / "bpf" / "balancing.c").is_file() else None


def find(name: str) -> Path:
    """The compiled object ``name`` (e.g. ``balancing.o``): the package data's copy, else the checkout's.

    Raises ``BpfObjectError`` saying where it looked when neither has it.
    """
    places = [d for d in (package_dir(), checkout_dir()) if d is not None]
    for d in places:
        if (d / name).is_file():
            return d / name
    looked = " nor ".join(str(d) for d in places) or "nowhere (the package is not on a file system)"
    hint = " (run `make bpf`)" if checkout_dir() is not None else " (reinstall the wheel)"
    raise errors.BpfObjectError(name, f"not found in {looked}{hint}")


def default_object() -> Path:
    """The datapath object the agent loads unless told another: :func:`find` of ``balancing.o``."""
    return find(DATAPATH)


def sockterm_object(datapath: Path | None = None) -> Path:
    """The socket-termination object beside ``datapath`` (default: :func:`default_object`)."""
    return (datapath or default_object()).with_name(SOCKTERM)


def sockmigrate_object(datapath: Path | None = None) -> Path:
    """The upgrade-from-0.3 migration object beside ``datapath`` (default: :func:`default_object`)."""
    return (datapath or default_object()).with_name(SOCKMIGRATE)


def nodeport_object(datapath: Path | None = None) -> Path:
    """The north-south object beside ``datapath`` (default: :func:`default_object`)."""
    return (datapath or default_object()).with_name(NODEPORT)
