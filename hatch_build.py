"""Hatch build hook: compile the BPF objects and ship them in the wheel as ``balancing/bpf/*.o``.

The objects are built by the Makefile's ``bpf`` target (the one place for the clang flags) into a temporary
directory, so a wheel never carries a stale ``build/`` and building writes nothing into the source tree; the
sdist carries ``bpf/`` and the Makefile, so a wheel builds from it too. Needs ``make`` and ``clang`` (plus the
libbpf headers), as ``make bpf`` does. Editable installs get no objects: ``balancing.datapath.bpfobjects``
finds a checkout's ``build/bpf/`` instead.

The objects are compiled for this machine's architecture (``__TARGET_ARCH_*``, its multiarch headers), so
the wheel is tagged ``py3-none-<platform>``, not ``any``.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

OBJECTS = ("balancing.o", "sockterm.o", "sockmigrate.o", "nodeport.o")


class BpfObjectsHook(BuildHookInterface[BuilderConfig]):
    """Runs ``make bpf BUILD=<tmp>`` before the wheel is assembled and force-includes the objects."""

    PLUGIN_NAME = "bpf-objects"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        for tool in ("make", "clang"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"building the wheel compiles the BPF objects: `{tool}` is not installed")
        self._tmp = Path(tempfile.mkdtemp(prefix="balancing-bpf-"))
        try:
            subprocess.run(["make", "-s", "-C", self.root, "bpf", f"BUILD={self._tmp}"], check=True)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        for name in OBJECTS:
            build_data["force_include"][str(self._tmp / "bpf" / name)] = f"balancing/bpf/{name}"
        build_data["pure_python"] = False
        build_data["tag"] = "py3-none-" + sysconfig.get_platform().replace("-", "_").replace(".", "_")

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
