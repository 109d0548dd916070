"""Words that must follow the code: package docstrings name their modules, cited paths and modules exist.

Each package's ``__init__`` docstring is the map of its layer (see docs of the architecture): it names every
module of the package (private ``_name`` modules may go unnamed), as ``name`` or ``name.attribute``, and
every bare ``name`` it quotes is a module or something defined in the package (so a module that was
renamed or moved away shows up here). Any docstring's dotted reference to a module of ours
(``balancing.datapath.owners``, ``events.stream``) names one that exists, and every ``tests/...`` path cited
in the sources (``src/``, ``bpf/``) exists. Read with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "balancing"
PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py"))
QUOTED = re.compile(r"``([^`]+)``|`([^`]+)`")
BARE = re.compile(r"[a-z_][a-z0-9_]*")
DOTTED = re.compile(r"[a-z_][a-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
CITED_TEST_PATH = re.compile(r"\btests/[\w./-]*\w")


def _dotted(package: Path) -> str:
    return ".".join(("balancing", *package.relative_to(PACKAGE).parts))


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""


def _quoted(text: str) -> set[str]:
    return {a or b for a, b in QUOTED.findall(text)}


def _modules(package: Path) -> set[str]:
    """The package's modules and subpackages, without ``__init__``, ``__main__`` and private ones."""
    files = {p.stem for p in package.glob("*.py")}
    subpackages = {p.parent.name for p in package.glob("*/__init__.py")}
    return {m for m in files | subpackages if not m.startswith("_")}


def _defined(package: Path) -> set[str]:
    """Names a docstring may quote bare besides modules: functions, classes and string constants."""
    names = {"balancing"}
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def _exported(package: Path) -> set[str]:
    """What ``package`` itself binds at the top of its ``__init__`` (imports, definitions, assignments)."""
    names: set[str] = set()
    for node in ast.parse((package / "__init__.py").read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _resolves(parts: list[str]) -> bool:
    """Whether ``balancing.<parts>`` names a package, a module, or a name a package's ``__init__`` binds."""
    path = PACKAGE
    for part in parts:
        if (path / part / "__init__.py").exists():
            path = path / part
            continue
        return (path / f"{part}.py").exists() or (path != PACKAGE and part in _exported(path))
    return True


@pytest.mark.parametrize("package", PACKAGES, ids=_dotted)
def test_package_docstring_names_every_module(package: Path) -> None:
    quoted = _quoted(_docstring(package / "__init__.py"))
    named = {q.split(".")[0] for q in quoted}
    missing = sorted(_modules(package) - named)
    assert missing == [], f"the docstring of {_dotted(package)} does not name these modules: {missing}"


@pytest.mark.parametrize("package", PACKAGES, ids=_dotted)
def test_package_docstring_names_no_missing_module(package: Path) -> None:
    bare = {q for q in _quoted(_docstring(package / "__init__.py")) if BARE.fullmatch(q)}
    unknown = sorted(bare - _modules(package) - _defined(package))
    assert unknown == [], f"the docstring of {_dotted(package)} quotes {unknown}: no module, nothing defined"


def test_docstrings_cite_modules_that_exist() -> None:
    """``balancing.x.y`` and ``x.y`` (``x`` one of our packages) in any docstring resolve."""
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for ref in _quoted(_docstring(path)):
            if DOTTED.fullmatch(ref) is None:
                continue
            ours = ref.startswith("balancing.")
            parts = ref.removeprefix("balancing.").split(".")
            if not ours and parts[0] not in stages:
                continue  # a name of the module itself (``control.Metrics``), not a reference to a stage
            if not _resolves(parts):
                broken.append(f"{path.relative_to(ROOT)}: {ref}")
    assert broken == []


def test_cited_test_paths_exist() -> None:
    cited = []
    for path in sorted([*(ROOT / "src").rglob("*"), *(ROOT / "bpf").rglob("*")]):
        if path.is_file() and path.suffix in (".py", ".c", ".h"):
            cited += [(path, c.rstrip(".")) for c in CITED_TEST_PATH.findall(path.read_text())]
    assert cited, "expected some sources to cite their tests"
    missing = [f"{p.relative_to(ROOT)}: {c}" for p, c in cited if not (ROOT / c).exists()]
    assert missing == []
