"""The arm64 guest seen from the host: its build, the payload put into it, one boot, the results it reports.

``scripts/build-arm64-guest.sh`` builds (or reuses from its cache) Debian's arm64 kernel and an initramfs
with Debian's arm64 userland. Each run appends a payload to that initramfs (the kernel unpacks concatenated
archives in order):

- the project's wheel, the one ``tests/kernel/test_wheel.py`` installs (``helpers.wheel``: ``uv build
  --wheel``, cached by a digest of its sources, built once for both), unpacked into the guest's
  ``/usr/local/lib/python3.11/dist-packages`` as an installer would, with the ``balancing`` console script;
  its BPF objects are the host's build, unchanged;
- its locked runtime dependencies for aarch64 (``uv export`` of uv.lock, installed with ``uv pip install
  --target --python-platform aarch64-manylinux_2_17 --only-binary :all: --require-hashes``: pydantic-core,
  watchfiles and cryptography are compiled, so their arm64 wheels come from the index), cached by the
  requirements' digest as an archive of their own;
- the shared harness (``balancing_testkit``), the runner (``tests/arm64/runner.py`` as ``/guest/runner.py``,
  started by ``/guest/main``), and a second build of the datapath for BPF ISA v3 (the swap under load).

Python is byte-compiled on the host (unchecked-hash pycs: 3.11's format is the same on every architecture),
so the emulated CPU does not compile the packages at every boot. The guest runs with no network; its console
is a file the runner's result lines are read from.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancing_testkit import topology
from helpers import wheel as built_wheel

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts/build-arm64-guest.sh"
RUNNER = Path(__file__).resolve().parent / "runner.py"
CACHE = Path(os.environ.get("BALANCING_ARM64_CACHE", ROOT / "build/cache/arm64"))
SITE = "usr/local/lib/python3.11/dist-packages"  # Debian's python3 looks here for locally installed packages
PLATFORM = "aarch64-manylinux_2_17"  # bookworm's glibc 2.36 runs manylinux2014 wheels
TOOLS = ("qemu-system-aarch64", "qemu-aarch64-static", "debootstrap", "cpio", "depmod", "uv", "make", "clang")
QEMU = [
    "qemu-system-aarch64",
    "-machine", "virt",
    "-cpu", "max,pauth-impdef=on",  # QEMU's cheap pointer authentication: boots about 4x faster under TCG
    "-smp", "2",
    "-m", "2048",
    "-display", "none",
    "-monitor", "none",
    "-no-reboot",
    "-nic", "none",  # no NIC: the guest needs no network (and -M virt's would need ipxe-qemu's ROM)
]  # fmt: skip
MARKER = re.compile(r"(BLT-ARM64-(?:START|RESULT|END)) (\{.*\})\s*$")


@dataclass(frozen=True)
class Base:
    """A built guest: the kernel, the userland initramfs, and the arm64 kernel headers."""

    directory: Path
    kernel: Path
    initrd: Path
    kernel_release: str
    headers: Path
    log: str  # the build script's progress


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def build_base(timeout: float = 1200.0) -> Base:
    """The guest from the cache, else built (minutes: debootstrap's second stage runs under qemu-user)."""
    res = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "BALANCING_ARM64_CACHE": str(CACHE)},
    )
    if res.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    out = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return Base(
        Path(out["GUEST"]),
        Path(out["KERNEL"]),
        Path(out["INITRD"]),
        out["KERNEL_RELEASE"],
        Path(out["HEADERS"]),
        res.stderr,
    )


# --- what goes into the payload -------------------------------------------------------------------------


def _replace_cached(kind: str, key: str, build: Any) -> Path:
    """``CACHE/<kind>-<key>``, made by ``build(tmpdir)`` if missing; other keys of that kind are removed."""
    target = CACHE / f"{kind}-{key}"
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=CACHE))
    try:
        build(tmp)
        for old in CACHE.glob(f"{kind}-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def wheel() -> Path:
    """The project's wheel of the current sources, the one ``tests/kernel/test_wheel.py`` installs
    (``helpers.wheel``: built once per source digest; hatch_build.py runs make bpf)."""
    return built_wheel.built()


def _compile(tree: Path, guest_path: str) -> None:
    """Byte-compile ``tree`` (installed in the guest at ``guest_path``) with this Python 3.11."""
    assert sys.version_info[:2] == (3, 11), "the pycs must be 3.11's, the guest's Python"
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
         "-d", guest_path, str(tree)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip


def runtime_deps() -> Path:
    """An archive of the wheel's locked runtime dependencies for aarch64, installed into SITE."""
    requirements = built_wheel.uv(
        "export", "--quiet", "--frozen", "--no-dev", "--no-emit-project", "--no-emit-workspace",
        "--format", "requirements-txt",
    )  # fmt: skip
    key = hashlib.sha256(f"{PLATFORM}\n{requirements}".encode()).hexdigest()[:12]

    def build(tmp: Path) -> None:
        (tmp / "requirements.txt").write_text(requirements)
        site = tmp / "root" / SITE
        built_wheel.uv(
            "pip", "install", "--quiet", "--target", str(site), "--python-platform", PLATFORM,
            "--python-version", "3.11", "--only-binary", ":all:", "--require-hashes",
            "-r", str(tmp / "requirements.txt"),
        )  # fmt: skip
        shutil.rmtree(site / "bin", ignore_errors=True)  # entry points with the host's interpreter path
        _compile(site, f"/{SITE}")
        pack(tmp / "root", tmp / "deps.cpio.gz")
        shutil.rmtree(tmp / "root")

    return _replace_cached("deps", key, build) / "deps.cpio.gz"


def variant_object(build_dir: Path) -> Path:
    """The datapath built for BPF ISA v3 by the Makefile's pattern rule (other instructions, same hooks)."""
    target = build_dir / "bpf/balancing-v3.o"
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), f"BUILD={build_dir}", str(target)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def host_objects(build_dir: Path) -> Path:
    """``make bpf`` as the wheel's build runs it, into ``build_dir``; returns the directory of the objects."""
    return _make_bpf(build_dir)


def arm64_objects(base: Base, build_dir: Path) -> Path:
    """``make bpf`` for arm64: ``__TARGET_ARCH_arm64`` and the arm64 kernel headers (``asm/``) of the guest's
    linux-libc-dev instead of the host's (the Makefile adds ``-I/usr/include/$(MULTIARCH)``)."""
    return _make_bpf(build_dir, "ARCH=arm64", f"MULTIARCH=../..{base.headers.resolve()}/aarch64-linux-gnu")


def _make_bpf(build_dir: Path, *overrides: str) -> Path:
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "bpf", f"BUILD={build_dir}", *overrides],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return build_dir / "bpf"


def _install_wheel(whl: Path, root: Path) -> None:
    """Unpack ``whl`` into the guest's site-packages and write its console scripts, as an installer does."""
    site = root / SITE
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
        (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(entry_points).decode()
    section = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    for line in section.strip().splitlines():
        name, _, target = (part.strip() for part in line.partition("="))
        module, _, func = target.partition(":")
        script = root / "usr/local/bin" / name
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(
            f"#!/usr/bin/python3\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        script.chmod(0o755)


def payload(work: Path) -> Path:
    """The per-run archive: wheel, harness, runner, variant object. Returns its path."""
    root = work / "payload"
    _install_wheel(wheel(), root)
    shutil.copytree(
        ROOT / "testkit/balancing_testkit",
        root / SITE / "balancing_testkit",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    _compile(root / SITE, f"/{SITE}")
    guest = root / "guest"
    (guest / "objects").mkdir(parents=True)
    shutil.copy(variant_object(work / "build"), guest / "objects/balancing-v3.o")
    shutil.copy(RUNNER, guest / "runner.py")
    main = guest / "main"
    main.write_text("#!/bin/sh\ncd /tmp\nexec python3 -u /guest/runner.py\n")
    main.chmod(0o755)
    out = work / "payload.cpio.gz"
    pack(root, out)
    return out


def pack(tree: Path, out: Path) -> None:
    """``tree`` as a gzipped newc cpio archive (every entry owned by root, parents before children)."""
    names = []
    for dirpath, dirs, files in os.walk(tree):
        dirs.sort()
        rel = Path(dirpath).relative_to(tree)
        if rel != Path("."):
            names.append(str(rel))
        names.extend(str(rel / f) for f in sorted(files))
    res = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        input="\n".join(names).encode() + b"\n",
        cwd=tree,
        capture_output=True,
        check=True,
        timeout=300,
    )
    out.write_bytes(gzip.compress(res.stdout, compresslevel=1))


def workdir() -> tempfile.TemporaryDirectory[str]:
    """A scratch directory for one run, named as the harness names its own: if this process dies, the next
    session's leftover sweep removes it and kills the qemu recorded in it."""
    return tempfile.TemporaryDirectory(prefix=f"blt-{os.getpid()}-arm64-")


# --- one boot -------------------------------------------------------------------------------------------


@dataclass
class GuestRun:
    """What one boot reported: the START and END records, each case's result, the console text."""

    console: str
    seconds: float
    returncode: int | None  # None: killed at the timeout
    start: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    garbled: list[str] = field(default_factory=list)  # marker lines whose JSON did not parse

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def parse(console: str, seconds: float, returncode: int | None) -> GuestRun:
    run = GuestRun(console, seconds, returncode)
    for line in console.splitlines():
        m = MARKER.search(line)
        if not m:
            continue
        try:
            record = json.loads(m.group(2))
        except ValueError:
            run.garbled.append(line)
            continue
        if m.group(1) == "BLT-ARM64-START":
            run.start = record
        elif m.group(1) == "BLT-ARM64-END":
            run.end = record
        else:
            run.results[record["case"]] = record
    return run


def _record_group(work: Path, pid: int) -> None:
    """Note qemu's process group in ``work`` as a Topology notes its processes', so that the harness's sweep
    kills it if this process dies first (``work`` is named ``blt-<pid>-...``, as the sweep expects)."""
    start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22: start time
    with open(work / topology.PGROUPS_FILE, "a") as f:
        f.write(f"{pid} {start}\n")


def boot(base: Base, archives: list[Path], work: Path, timeout: float = 300.0) -> GuestRun:
    """Boot the guest on the base initramfs plus ``archives``; the runner's results from its console.
    ``work``: a scratch directory named ``blt-<pid>-...`` in the temporary directory (see ``workdir``)."""
    initrd = work / "initrd.img"
    with open(initrd, "wb") as out:
        for part in [base.initrd, *archives]:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    console = work / "console.log"
    argv = [
        *QEMU,
        "-serial", f"file:{console}",
        "-kernel", str(base.kernel),
        "-initrd", str(initrd),
        "-append", "console=ttyAMA0 rdinit=/init panic=-1 quiet",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _record_group(work, proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        returncode = None
    seconds = time.monotonic() - t0
    text = console.read_text(errors="replace") if console.exists() else ""
    if output:
        text += "\n--- qemu ---\n" + output.decode(errors="replace")
    return parse(text.replace("\r", ""), seconds, returncode)
