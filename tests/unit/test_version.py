"""One version number for the package, the chart and the image.

pyproject.toml's ``[project].version`` is the version. The Helm chart's ``version`` and ``appVersion`` equal
it, the image the chart runs by default is tagged with it (``image.tag`` empty: the chart's appVersion), the
installed package reports it (``balancing.__version__`` and the package metadata), and the newest entry of
CHANGELOG.md is it. A release bumps them together.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

import balancing
from helpers import k8stools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/balancing"
SEMVER = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?")


def _project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert SEMVER.fullmatch(version), version
    return version


def _chart() -> dict[str, Any]:
    chart: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return chart


def _changelog_versions() -> list[str]:
    """The released versions of CHANGELOG.md, newest first (``## [X.Y.Z] - YYYY-MM-DD`` headings)."""
    text = (ROOT / "CHANGELOG.md").read_text()
    return re.findall(r"^## \[(\d+\.\d+\.\d+[^\]]*)\] - \d{4}-\d{2}-\d{2}$", text, re.MULTILINE)


def test_chart_version_and_app_version_are_the_package_version() -> None:
    version = _project_version()
    chart = _chart()
    assert str(chart["version"]) == version, "Chart.yaml version"
    assert str(chart["appVersion"]) == version, "Chart.yaml appVersion"


def test_the_package_reports_its_version() -> None:
    version = _project_version()
    assert balancing.__version__ == version
    assert importlib.metadata.version("balancing") == version, "reinstall the package (uv sync)"


def test_changelog_newest_entry_is_the_version() -> None:
    versions = _changelog_versions()
    assert versions, "CHANGELOG.md has no `## [X.Y.Z] - YYYY-MM-DD` entry"
    assert versions[0] == _project_version()
    assert len(versions) == len(set(versions)), "a version appears twice"


def test_default_image_tag_is_the_version() -> None:
    """What `helm template` renders with the default values: every container runs <repository>:<version>."""
    helm: Path = k8stools.helm()
    out = subprocess.run(
        [str(helm), "template", "balancing", str(CHART), "--namespace", "kube-system"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    repository = yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]
    images = set()
    for obj in yaml.safe_load_all(out):
        if obj and obj["kind"] in ("DaemonSet", "Deployment"):
            images |= {c["image"] for c in obj["spec"]["template"]["spec"]["containers"]}
    assert images == {f"{repository}:{_project_version()}"}
