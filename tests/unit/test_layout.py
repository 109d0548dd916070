"""Repository layout rules the test runner relies on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_modules_have_unique_basenames() -> None:
    """pytest imports test modules by basename (rootdir mode): two with one name break collection."""
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []


def test_every_module_sits_in_an_import_layer() -> None:
    """The layers contract covers the whole package: no module at the root outside every layer."""
    import tomllib

    root = TESTS.parent
    contracts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    covered = {name.strip() for layer in layers for name in layer.split("|")}
    package = root / "src/balancing"
    outside = []
    for path in sorted(package.rglob("*.py")):
        parts = ("balancing", *path.relative_to(package).with_suffix("").parts)
        if parts[-1] in ("__init__", "__main__") and len(parts) == 2:
            continue  # the package itself and its entry point
        if not any(".".join(parts[:n]) in covered for n in range(2, len(parts) + 1)):
            outside.append(".".join(parts))
    assert outside == []
