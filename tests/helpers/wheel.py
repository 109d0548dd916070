"""The project's wheel of the current sources, built once and shared by every test that installs it.

``built()`` runs ``uv build --wheel`` (hatch_build.py compiles the BPF objects into it) into
``build/wheel-test/<digest of its sources>``, so an unchanged tree reuses it and a changed one rebuilds it
(older wheels are dropped). ``uv()`` runs uv outside this venv. Used by ``tests/kernel/test_wheel.py`` (a
clean venv on the host) and ``tests/arm64/guest.py`` (the arm64 guest's payload).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "wheel-test"
SOURCES = ("src/balancing", "bpf", "Makefile", "pyproject.toml", "hatch_build.py", "README.md")


def uv(*args: str, cwd: Path = ROOT, timeout: float = 600.0) -> str:
    """Run ``uv`` (not inside this venv); its standard output, else a RuntimeError with everything it said."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    res = subprocess.run(
        ["uv", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if res.returncode != 0:
        raise RuntimeError(f"uv {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def sources_digest() -> str:
    """What the wheel is built from: every file under SOURCES (not bytecode), by path and content."""
    h = hashlib.sha256()
    for top in SOURCES:
        base = ROOT / top
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for p in files:
            if "__pycache__" in p.parts or p.suffix == ".pyc":
                continue
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def built() -> Path:
    """The wheel of the current sources: from the cache, else built (and older cached wheels dropped)."""
    target = CACHE / sources_digest()
    found = sorted(target.glob("balancing-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
    try:
        uv("build", "--wheel", "--quiet", "--out-dir", str(tmp), str(ROOT))
        for old in CACHE.iterdir():
            if old != tmp:
                shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return next(target.glob("balancing-*.whl"))
