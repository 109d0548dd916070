"""The product on an arm64 kernel (issue 16): the wheel, its BPF objects and its agent in an emulated guest.

The guest is Debian's bookworm arm64 kernel booted by qemu-system-aarch64 (TCG) on an initramfs holding a
Debian arm64 userland (``scripts/build-arm64-guest.sh``: minutes on a fresh machine, then cached in
``build/cache/arm64``). Each session appends the wheel of the current sources (its BPF objects built on this
host), its locked runtime dependencies for aarch64, the shared harness and ``tests/arm64/runner.py``, boots it
once, and turns each case the runner reports on the console into a test here, so a failure on arm64 fails
``make test``. The cases (``runner.CASES``) cover every socket hook and map kind: TCP, UDP unconnected and
connected with reverse translation, IPv6 and v4-mapped, ECONNREFUSED, getpeername, session affinity, a
policy redirect with a pod's cgroup, counters, events, a reload and a program swap under load with the pins
read back, and the agent (its compiled dependencies for aarch64) programming a manifest directory and
leaving the datapath translating on SIGTERM. On the host, the objects built for arm64
(``__TARGET_ARCH_arm64``, arm64 headers) are compared with the host's: the same bytes, so one object serves
both architectures.
"""

from __future__ import annotations

import filecmp
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from arm64 import guest, runner

# The first run on a machine builds the guest (debootstrap's second stage under qemu-user: minutes); later
# runs boot the cached guest and run every case in well under a minute.
pytestmark = pytest.mark.timeout(1800)

BOOT_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def base() -> guest.Base:
    missing = guest.missing_tools()
    if missing:  # not a skip: setup.sh installs them on any machine of this kind
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh (make test does)")
    t0 = time.monotonic()
    built = guest.build_base()
    print(f"arm64 guest ready in {time.monotonic() - t0:.1f}s:\n{built.log}")
    return built


@pytest.fixture(scope="module")
def run(base: guest.Base) -> Iterator[guest.GuestRun]:
    with guest.workdir() as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        archives = [guest.runtime_deps(), guest.payload(work)]
        prepared = time.monotonic() - t0
        result = guest.boot(base, archives, work, timeout=BOOT_TIMEOUT)
        print(f"payload in {prepared:.1f}s, guest ran {result.seconds:.1f}s: {result.start} {result.end}")
        yield result


def _explain(run: guest.GuestRun) -> str:
    state = "timed out" if run.returncode is None else f"qemu exited {run.returncode}"
    return f"{state} after {run.seconds:.0f}s; the console's end:\n{run.tail()}"


def test_the_guest_is_arm64_and_reports_every_case(run: guest.GuestRun) -> None:
    assert run.start is not None, f"the runner never started: {_explain(run)}"
    assert run.start["machine"] == "aarch64"
    assert run.start["kernel"].endswith("-arm64") and run.start["python"].startswith("3.11.")
    assert run.start["cases"] == runner.CASE_NAMES
    assert run.end is not None, f"the runner did not finish: {_explain(run)}"
    assert not run.garbled, run.garbled
    assert run.returncode == 0, _explain(run)


@pytest.mark.parametrize("case", runner.CASE_NAMES)
def test_on_arm64(run: guest.GuestRun, case: str) -> None:
    result = run.results.get(case)
    if result is None:
        pytest.fail(f"the guest reported nothing for {case}: {_explain(run)}")
    assert result["outcome"] == "passed", f"on arm64 ({result['seconds']}s):\n{result['message']}"
    print(f"{case} ({result['seconds']}s): {result['message']}")


def test_bpf_objects_are_the_same_bytes_for_arm64(base: guest.Base, tmp_path: Path) -> None:
    """``-D__TARGET_ARCH_x86`` and the host's ``asm/`` headers change nothing in the objects: built for arm64
    they are byte for byte the host's, so the host-built objects in the wheel are the arm64 ones too."""
    host = guest.host_objects(tmp_path / "host")
    arm64 = guest.arm64_objects(base, tmp_path / "arm64")
    names = sorted(p.name for p in host.glob("*.o"))
    assert names == sorted(p.name for p in arm64.glob("*.o")) and len(names) >= 4, names
    differ = [n for n in names if not filecmp.cmp(host / n, arm64 / n, shallow=False)]
    assert not differ, f"built for arm64, these differ from the host's: {differ}"
