"""A simulated Kubernetes cluster on one kernel, for the kernel tests, the demo and the benchmarks.

Standard library only (plus the ``ip`` and ``mount`` binaries); needs root. Everything it creates carries a
prefix ``blt-<pid>-<n>`` (pid of the creating process), and is removed by :meth:`Topology.close` (also on
exceptions, and from ``atexit``); :func:`sweep_leftovers` removes what a killed process left behind.

Layout (``P`` = the prefix)::

    netns P-fabric      bridge br0; one veth port per pod/client ("p0", "c0", ...)
    netns P-<pod>       eth0 = 10.244.1.N/16 + fd00:244::1:N/64 (nodad), lo up
    netns P-<client>    eth0 = 10.244.2.N/16 + fd00:244::2:N/64 (nodad), lo up
                        pods and clients: "unreachable" routes for the VIP ranges (10.96.0.0/12,
                        fd00:96::/108), no default route -> untranslated VIP traffic fails at once
                        with EHOSTUNREACH, anything else with ENETUNREACH
    netns P-<name>      add_netns(): bare (lo up), wired by the caller (routed layouts: nodes, routers)
    cgroup2             <cgroup2 mount>/P/<node>          (node_cgroup(node))
    bpffs               /sys/fs/bpf/P/                    (bpffs is mounted on /sys/fs/bpf if needed)

Processes are put into a netns with setns() and into a cgroup by writing their pid to ``cgroup.procs``,
both in a preexec function, so they keep seeing the host's /sys (cgroups, bpffs) -- unlike ``ip netns exec``.

Example::

    with Topology() as topo:
        pods = [topo.add_pod(n) for n in ("pod-a", "pod-b")]
        client = topo.add_client("client")
        for p in pods:
            topo.start_backend(p, port=8080)
        node = topo.node_cgroup("node-a")
        res = topo.run_client(client, node, ["tcp", pods[0].ip4, "8080", "--count", "10"])
        assert res["backends"] == {"pod-a": 10}
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PREFIX_ROOT = "blt"
PREFIX_RE = re.compile(r"^blt-(\d+)-")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

HELPERS_DIR = Path(__file__).resolve().parent
BACKEND_PY = HELPERS_DIR / "backend.py"
CLIENT_PY = HELPERS_DIR / "client.py"

NETNS_DIR = Path("/run/netns")
BPFFS_MOUNT = Path("/sys/fs/bpf")
LOCK_FILE = Path("/run/lock/blt-harness.lock")
TMP_DIR = Path(tempfile.gettempdir())

DEFAULT_VIP_CIDRS: tuple[str, ...] = ("10.96.0.0/12", "fd00:96::/108")
DEFAULT_POD_CIDR4 = "10.244.0.0/16"
DEFAULT_POD_CIDR6 = "fd00:244::/64"

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class HarnessError(RuntimeError):
    """A harness operation failed; the message carries the command, exit status and output."""


class CleanupError(HarnessError):
    """Teardown could not remove everything; the message lists what is left."""


# --------------------------------------------------------------------------------------------------------
# low-level helpers


def _fmt_output(stdout: str | bytes | None, stderr: str | bytes | None, limit: int = 4000) -> str:
    parts = []
    for label, raw in (("stdout", stdout), ("stderr", stderr)):
        text = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw or "").strip()
        if text:
            if len(text) > limit:
                text = "..." + text[-limit:]
            parts.append(f"--- {label} ---\n{text}")
    return "\n".join(parts) if parts else "(no output)"


def run_cmd(
    argv: Sequence[str], *, input: str | None = None, timeout: float = 15.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion with a timeout; raise HarnessError (with its output) on failure."""
    try:
        cp = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(
            f"timed out after {timeout}s: {' '.join(argv)}\n{_fmt_output(exc.stdout, exc.stderr)}"
        ) from None
    if check and cp.returncode != 0:
        shown = f"\n--- input ---\n{input.strip()}" if input else ""
        raise HarnessError(
            f"exit {cp.returncode}: {' '.join(argv)}{shown}\n{_fmt_output(cp.stdout, cp.stderr)}"
        )
    return cp


def ip_batch(netns: str | None, lines: Sequence[str], timeout: float = 15.0) -> None:
    """Run `ip` commands (one per line, without the leading "ip") in one process, inside `netns`."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run_cmd(argv, input="\n".join(lines) + "\n", timeout=timeout)


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mounts() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount of this process's mount namespace."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                out.append((fields[1].replace("\\040", " "), fields[2]))
    return out


def find_cgroup2_mount() -> Path:
    """The cgroup v2 mount point (/sys/fs/cgroup/unified on hybrid hosts, /sys/fs/cgroup on pure v2)."""
    found = [Path(mp) for mp, fs in _mounts() if fs == "cgroup2"]
    if not found:
        raise HarnessError("no cgroup2 filesystem is mounted (see /proc/self/mounts)")
    for preferred in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if preferred in found:
            return preferred
    return found[0]


def ensure_bpffs() -> Path:
    """Mount bpffs on /sys/fs/bpf unless it is already; returns the mount point."""
    with _global_lock():
        if (str(BPFFS_MOUNT), "bpf") not in _mounts():
            run_cmd(["mount", "-t", "bpf", "bpf", str(BPFFS_MOUNT)])
    return BPFFS_MOUNT


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_prefix_counter = itertools.count()


def _prefix_in_use(prefix: str) -> bool:
    roots: list[Path] = [NETNS_DIR, BPFFS_MOUNT, TMP_DIR]
    with contextlib.suppress(HarnessError):
        roots.append(find_cgroup2_mount())
    for root in roots:
        with contextlib.suppress(OSError):
            for entry in os.listdir(root):
                if entry == prefix or entry.startswith(prefix + "-"):
                    return True
    return False


def new_prefix() -> str:
    """A fresh ``blt-<pid>-<n>`` prefix that no existing netns/cgroup/bpffs/tmp entry uses."""
    while True:
        prefix = f"{PREFIX_ROOT}-{os.getpid()}-{next(_prefix_counter)}"
        if not _prefix_in_use(prefix):
            return prefix


# --------------------------------------------------------------------------------------------------------
# namespaces


def netns_path(netns: str) -> Path:
    return NETNS_DIR / netns


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(netns: Host | str) -> Iterator[None]:
    """Switch the *calling thread* into the network namespace `netns` (Host or /run/netns name) and back.

    Sockets created inside keep that namespace after the block. The process's cgroup does not change.
    """
    name = netns.netns if isinstance(netns, Host) else netns
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def netns_add(name: str) -> None:
    with _global_lock():  # `ip netns add` sets up the /run/netns mount on first use: serialise it
        run_cmd(["ip", "netns", "add", name])


def netns_pids(netns: str) -> list[int]:
    cp = run_cmd(["ip", "netns", "pids", netns], check=False, timeout=10)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def kill_netns_processes(netns: str, timeout: float = 3.0) -> list[int]:
    """SIGKILL every process inside `netns` and wait until they are gone; returns the pids seen."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in netns_pids(netns) if p != os.getpid()]
        if not pids:
            return seen
        for pid in pids:
            if pid not in seen:
                seen.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise CleanupError(f"processes {pids} in netns {netns} survive SIGKILL")
        time.sleep(0.01)


def netns_delete(name: str) -> None:
    if not netns_path(name).exists():
        return
    kill_netns_processes(name)
    run_cmd(["ip", "netns", "delete", name])


# --------------------------------------------------------------------------------------------------------
# cgroups and bpffs


def _cgroup_populated(path: Path) -> bool:
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            if line.startswith("populated "):
                return line.split()[1] != "0"
    except FileNotFoundError:
        return False
    return False


def remove_cgroup_tree(path: Path, timeout: float = 3.0) -> None:
    """Kill every process in the cgroup subtree `path`, then rmdir it bottom-up."""
    if not path.exists():
        return
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while _cgroup_populated(path):
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        else:  # kernels < 5.14: SIGKILL pid by pid
            for procs in path.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        if time.monotonic() > deadline:
            raise CleanupError(f"cgroup {path} still has processes after SIGKILL")
        time.sleep(0.01)
    dirs = sorted((Path(d) for d, _, _ in os.walk(path)), key=lambda p: len(p.parts), reverse=True)
    for d in dirs:
        for attempt in itertools.count():
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:  # EBUSY shortly after the last process exited
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CleanupError(f"cannot remove cgroup {d}: {exc}") from exc
                time.sleep(0.005 * min(attempt + 1, 10))


def remove_bpffs_tree(path: Path) -> None:
    """Unlink every pinned object under `path` and remove the directories."""
    if not path.exists():
        return
    if path.resolve() == BPFFS_MOUNT or not path.resolve().is_relative_to(BPFFS_MOUNT):
        raise CleanupError(f"refusing to remove {path}: not a subdirectory of {BPFFS_MOUNT}")
    shutil.rmtree(path)


@contextlib.contextmanager
def owned_cgroup(prefix: str | None = None) -> Iterator[Path]:
    """A test-owned cgroup2 directory ``<cgroup2>/<prefix>``, removed (processes killed) on exit."""
    path = find_cgroup2_mount() / (prefix or new_prefix())
    path.mkdir()
    try:
        yield path
    finally:
        remove_cgroup_tree(path)


@contextlib.contextmanager
def owned_bpffs_dir(prefix: str | None = None) -> Iterator[Path]:
    """A test-owned bpffs directory ``/sys/fs/bpf/<prefix>``, removed recursively on exit."""
    path = ensure_bpffs() / (prefix or new_prefix())
    path.mkdir()
    try:
        yield path
    finally:
        remove_bpffs_tree(path)


def _rmtree_tmp(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


PGROUPS_FILE = "pgroups"  # in a Topology's workdir: "<pgid> <starttime>" of every spawned session leader


def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22


def kill_recorded_groups(workdir: Path) -> None:
    """SIGKILL the process groups a (dead) Topology recorded, including members outside its netns/cgroups.

    A pgid cannot be reused while any member of the group lives, so: leader alive with the recorded start
    time -> ours; leader gone -> whoever still carries the pgid is ours; leader pid alive with another
    start time -> the pid was reused, so nothing of ours is left.
    """
    try:
        lines = (workdir / PGROUPS_FILE).read_text().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            pgid, start = (int(x) for x in line.split())
        except ValueError:
            continue
        now = _starttime(pgid)
        if now is not None and now != start:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------
# leftovers


@dataclass(frozen=True)
class Leftover:
    kind: str  # "netns" | "cgroup" | "bpffs" | "tmp"
    name: str
    pid: int
    path: Path


def list_leftovers(pids: Callable[[int], bool] | None = None) -> list[Leftover]:
    """Every netns/cgroup/bpffs/tmp entry named ``blt-<pid>-...`` (optionally only where pids(pid))."""
    found: list[Leftover] = []
    roots: list[tuple[str, Path]] = [("netns", NETNS_DIR), ("bpffs", BPFFS_MOUNT), ("tmp", TMP_DIR)]
    with contextlib.suppress(HarnessError):
        roots.append(("cgroup", find_cgroup2_mount()))
    for kind, root in roots:
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for entry in entries:
            m = PREFIX_RE.match(entry)
            if not m:
                continue
            pid = int(m.group(1))
            if pids is None or pids(pid):
                found.append(Leftover(kind, entry, pid, root / entry))
    return found


def sweep_leftovers(*, own: bool = False, everything: bool = False) -> list[Leftover]:
    """Remove leftovers of dead processes (plus this process's with own=True, or all with everything=True).

    Entries of other *live* processes are left alone, so concurrent test sessions do not disturb each other.
    Returns what was removed; raises CleanupError listing what could not be removed.
    """

    def wanted(pid: int) -> bool:
        return everything or (own and pid == os.getpid()) or (pid != os.getpid() and not pid_alive(pid))

    leftovers = list_leftovers(wanted)
    order = {"cgroup": 0, "bpffs": 1, "netns": 2, "tmp": 3}  # kill processes via cgroup first
    failures: list[str] = []
    for lo in leftovers:
        if lo.kind == "tmp":
            kill_recorded_groups(lo.path)
    for lo in sorted(leftovers, key=lambda x: (order[x.kind], x.name)):
        try:
            if lo.kind == "cgroup":
                remove_cgroup_tree(lo.path)
            elif lo.kind == "bpffs":
                remove_bpffs_tree(lo.path)
            elif lo.kind == "netns":
                netns_delete(lo.name)
            else:
                _rmtree_tmp(lo.path)
        except (OSError, HarnessError) as exc:
            failures.append(f"{lo.kind} {lo.path}: {exc}")
    if failures:
        raise CleanupError("could not sweep leftovers:\n" + "\n".join(failures))
    return leftovers


# --------------------------------------------------------------------------------------------------------
# processes


class _Preexec:
    """preexec_fn: join a cgroup (pid -> cgroup.procs) and a netns (setns) before exec.

    The fds are opened by the parent (O_CLOEXEC), so the child only does write() and setns().
    """

    def __init__(self, cgroup_procs_fd: int | None, netns_fd: int | None, new_session: bool) -> None:
        self.cgroup_procs_fd = cgroup_procs_fd
        self.netns_fd = netns_fd
        self.new_session = new_session

    def __call__(self) -> None:
        if self.cgroup_procs_fd is not None:
            os.write(self.cgroup_procs_fd, str(os.getpid()).encode())
        if self.netns_fd is not None:
            _setns(self.netns_fd)
        if self.new_session:
            os.setsid()


@dataclass
class ProcResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Host:
    """A pod or client: a network namespace with one interface (eth0) on the fabric bridge."""

    name: str
    netns: str
    ip4: str
    ip6: str
    node: str | None = None
    fabric_port: str = ""

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)

    def ip(self, family: int | str) -> str:
        """ip4 for 4, ip6 for 6, ::ffff:ip4 for "mapped"."""
        if str(family) == "4":
            return self.ip4
        if str(family) == "6":
            return self.ip6
        if family == "mapped":
            return f"::ffff:{self.ip4}"
        raise ValueError(f"family must be 4, 6 or 'mapped', not {family!r}")


@dataclass(frozen=True)
class Pod(Host):
    pass


@dataclass(frozen=True)
class Client(Host):
    pass


NetnsArg = Host | str | None
CgroupArg = Path | str | None


@dataclass
class _Tracked:
    proc: subprocess.Popen[bytes]
    argv: list[str]
    stdout_path: Path | None
    stderr_path: Path | None
    label: str
    own_group: bool = False  # started with setsid(): signal the whole process group


_live_topologies: weakref.WeakSet[Topology] = weakref.WeakSet()


@atexit.register
def _close_live_topologies() -> None:
    for topo in list(_live_topologies):
        with contextlib.suppress(Exception):
            topo.close()


def exit_on_signals(signums: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """For scripts (demo, benchmarks): turn these signals into SystemExit so `with Topology()` unwinds.

    (Python's default action for SIGTERM kills the process without running finalizers or atexit.)
    """

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in signums:
        signal.signal(signum, handler)


@dataclass(eq=False)
class Topology:
    """A simulated cluster; use as a context manager (``with Topology() as topo:``)."""

    prefix: str = field(default_factory=new_prefix)
    vip_cidrs: Sequence[str] = DEFAULT_VIP_CIDRS
    pod_cidr4: str = DEFAULT_POD_CIDR4
    pod_cidr6: str = DEFAULT_POD_CIDR6
    python: str = sys.executable

    pods: dict[str, Pod] = field(default_factory=dict, init=False)
    clients: dict[str, Client] = field(default_factory=dict, init=False)
    backends: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    setup_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix + "-") or len(self.prefix) > 40:
            raise ValueError(f"prefix must look like 'blt-<pid>-<something>' (got {self.prefix!r})")
        self._net4 = ipaddress.IPv4Network(self.pod_cidr4)
        self._net6 = ipaddress.IPv6Network(self.pod_cidr6)
        self._netns: list[str] = []
        self._procs: list[_Tracked] = []
        self._cgroup_root: Path | None = None
        self._bpffs: Path | None = None
        self._workdir: Path | None = None
        self._entered = False
        self._closed = False
        self._seq = itertools.count()

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def fabric(self) -> str:
        """Name of the netns holding the bridge br0."""
        return f"{self.prefix}-fabric"

    def __enter__(self) -> Topology:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Topology:
        if self._entered:
            return self
        self._entered = True
        _live_topologies.add(self)
        t0 = time.perf_counter()
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-logs-", dir=TMP_DIR))
            self._cgroup_root = find_cgroup2_mount() / self.prefix
            self._cgroup_root.mkdir()
            self._bpffs = ensure_bpffs() / self.prefix
            self._bpffs.mkdir()
            self._add_netns(self.fabric)
            ip_batch(
                self.fabric,
                [
                    "link set lo up",
                    "link add br0 type bridge forward_delay 0 stp_state 0 mcast_snooping 0",
                    "link set br0 up",
                ],
            )
        except BaseException:
            self.close()
            raise
        self.setup_seconds += time.perf_counter() - t0
        return self

    def close(self) -> None:
        """Stop processes, unpin bpffs, remove cgroups, delete namespaces. Idempotent; runs every step."""
        if self._closed or not self._entered:
            self._closed = True
            return
        self._closed = True
        _live_topologies.discard(self)
        failures: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except (OSError, HarnessError, subprocess.SubprocessError) as exc:
                failures.append(f"{what}: {exc}")

        for tracked in reversed(self._procs):
            step(f"stop {tracked.label}", lambda t=tracked: self._terminate(t, timeout=2.0))  # type: ignore[misc]
        if self._cgroup_root is not None:
            step("kill cgroup processes", lambda: self._kill_cgroup(self._cgroup_root))
        for ns in self._netns:
            step(f"kill processes in {ns}", lambda ns=ns: kill_netns_processes(ns))  # type: ignore[misc]
        for tracked in self._procs:  # reap what the kills above ended
            step(f"reap {tracked.label}", lambda t=tracked: self._terminate(t, timeout=1.0))  # type: ignore[misc]
        if self._bpffs is not None:
            step(f"remove {self._bpffs}", lambda: remove_bpffs_tree(self._bpffs))  # type: ignore[arg-type]
        if self._cgroup_root is not None:
            step(f"remove {self._cgroup_root}", lambda: remove_cgroup_tree(self._cgroup_root))  # type: ignore[arg-type]
        for ns in reversed(self._netns):
            step(f"delete netns {ns}", lambda ns=ns: netns_delete(ns))  # type: ignore[misc]
        if self._workdir is not None:
            _rmtree_tmp(self._workdir)
        if failures:
            raise CleanupError(f"teardown of {self.prefix} incomplete:\n" + "\n".join(failures))

    def _kill_cgroup(self, root: Path | None) -> None:
        if root is None or not root.exists():
            return
        deadline = time.monotonic() + 3.0
        while _cgroup_populated(root):
            with contextlib.suppress(OSError):
                (root / "cgroup.kill").write_text("1")
            if time.monotonic() > deadline:
                raise CleanupError(f"processes survive in {root}")
            time.sleep(0.01)

    def _check_open(self) -> None:
        if not self._entered or self._closed:
            raise HarnessError("Topology is not open (use `with Topology() as topo:`)")

    # -- namespaces ----------------------------------------------------------------------------------

    def _add_netns(self, name: str) -> None:
        netns_add(name)
        self._netns.append(name)

    def _add_host(
        self, cls: type[Host], name: str, node: str | None, index_base: int, port_letter: str
    ) -> Host:
        self._check_open()
        if not NAME_RE.match(name):
            raise ValueError(f"bad name {name!r}: use [a-z0-9-], at most 32 characters")
        if name in self.pods or name in self.clients or name == "fabric":
            raise ValueError(f"name {name!r} already used in this topology")
        t0 = time.perf_counter()
        group = self.pods if cls is Pod else self.clients
        index = len(group) + 1
        if index > 250:
            raise HarnessError("at most 250 pods/clients per kind")
        ip4 = self._net4[index_base * 256 + index]
        ip6 = self._net6[index_base * 0x10000 + index]
        netns = f"{self.prefix}-{name}"
        port = f"{port_letter}{index}"
        self._add_netns(netns)
        ip_batch(
            self.fabric,
            [
                f"link add {port} type veth peer name eth0 netns {netns}",
                f"link set {port} master br0 up",
            ],
        )
        lines = [
            "link set lo up",
            "link set eth0 up",
            f"addr add {ip4}/{self._net4.prefixlen} dev eth0",
            f"addr add {ip6}/{self._net6.prefixlen} dev eth0 nodad",
        ]
        lines += [f"route add unreachable {cidr}" for cidr in self.vip_cidrs]
        ip_batch(netns, lines)
        host = cls(name=name, netns=netns, ip4=str(ip4), ip6=str(ip6), node=node, fabric_port=port)
        if node is not None:
            self.node_cgroup(node)
        group[name] = host  # type: ignore[assignment]
        self.setup_seconds += time.perf_counter() - t0
        return host

    def add_pod(self, name: str, node: str | None = None) -> Pod:
        """A pod netns on the fabric: 10.244.1.N and fd00:244::1:N. `node`: cgroup its backends run in."""
        pod = self._add_host(Pod, name, node, 1, "p")
        assert isinstance(pod, Pod)
        return pod

    def add_client(self, name: str = "client", node: str | None = None) -> Client:
        """A client netns on the fabric: 10.244.2.N and fd00:244::2:N.

        `node`: the cgroup run_client/spawn_client use when given cgroup=None.
        """
        client = self._add_host(Client, name, node, 2, "c")
        assert isinstance(client, Client)
        return client

    def add_netns(self, name: str) -> str:
        """A bare network namespace ``<prefix>-<name>`` with only lo up, for layouts the helpers above do not
        build (routers, nodes, hosts on links of their own); wire it with ``ip_batch``. Deleted at teardown
        like every other namespace of the topology (its veths and netfilter rules go with it). Returns its
        name."""
        self._check_open()
        if not NAME_RE.match(name):
            raise ValueError(f"bad name {name!r}: use [a-z0-9-], at most 32 characters")
        netns = f"{self.prefix}-{name}"
        if netns in self._netns or name in self.pods or name in self.clients:
            raise ValueError(f"name {name!r} already used in this topology")
        t0 = time.perf_counter()
        self._add_netns(netns)
        ip_batch(netns, ["link set lo up"])
        self.setup_seconds += time.perf_counter() - t0
        return netns

    def hosts(self) -> list[Host]:
        return [*self.pods.values(), *self.clients.values()]

    def sysctl(self, host: NetnsArg, key: str, value: str | int) -> None:
        """Set a (per-netns) sysctl such as net.ipv4.ip_local_port_range inside `host`'s netns."""
        path = Path("/proc/sys") / key.replace(".", "/")
        ns = self._netns_name(host)
        if ns is None:
            raise ValueError("refusing to change a sysctl of the host network namespace")
        with in_netns(ns):
            path.write_text(f"{value}\n")

    def dump(self) -> str:
        """`ip addr`/`ip route` of every namespace, for failure messages."""
        out = []
        for ns in self._netns:
            for what in (["-br", "addr"], ["route"], ["-6", "route"]):
                cp = run_cmd(["ip", "-n", ns, *what], check=False, timeout=5)
                out.append(f"## {ns}: ip {' '.join(what)}\n{cp.stdout}{cp.stderr}")
        return "\n".join(out)

    def diagnostics(self) -> str:
        """Every spawned process (status, command, stderr tail) and the namespaces' addresses/routes."""
        lines = [f"==== harness diagnostics for {self.prefix}"]
        for t in self._procs:
            _out, err = self.logs(t.proc)
            lines.append(f"-- {t.label} pid {t.proc.pid} rc {t.proc.poll()}: {' '.join(t.argv)}")
            if err.strip():
                lines.append("   stderr: " + err.strip()[-2000:].replace("\n", "\n   "))
        try:
            lines.append(self.dump())
        except HarnessError as exc:
            lines.append(f"(ip dump failed: {exc})")
        return "\n".join(lines)

    # -- cgroups and bpffs ---------------------------------------------------------------------------

    @property
    def cgroup_root(self) -> Path:
        """The topology's parent cgroup (a child of the cgroup2 root); node cgroups live below."""
        self._check_open()
        assert self._cgroup_root is not None
        return self._cgroup_root

    def node_cgroup(self, name: str) -> Path:
        """The cgroup2 directory of node `name` (created on first use)."""
        if not NAME_RE.match(name):
            raise ValueError(f"bad node name {name!r}")
        path = self.cgroup_root / name
        path.mkdir(exist_ok=True)
        return path

    @property
    def bpffs(self) -> Path:
        """The topology's bpffs directory (/sys/fs/bpf/<prefix>); removed recursively at teardown."""
        self._check_open()
        assert self._bpffs is not None
        return self._bpffs

    @property
    def workdir(self) -> Path:
        """Scratch directory (process logs); removed at teardown."""
        self._check_open()
        assert self._workdir is not None
        return self._workdir

    # -- processes -----------------------------------------------------------------------------------

    def _netns_name(self, netns: NetnsArg) -> str | None:
        if netns is None:
            return None
        return netns.netns if isinstance(netns, Host) else netns

    def _cgroup_path(self, cgroup: CgroupArg) -> Path | None:
        if cgroup is None:
            return None
        if isinstance(cgroup, str) and "/" not in cgroup:
            return self.node_cgroup(cgroup)
        return Path(cgroup)

    def _popen(
        self,
        argv: Sequence[str],
        netns: NetnsArg,
        cgroup: CgroupArg,
        stdout: int | IO[Any],
        stderr: int | IO[Any],
        env: Mapping[str, str] | None,
        stdin: int | IO[Any] = subprocess.DEVNULL,
        cwd: str | Path | None = None,
        new_session: bool = False,
    ) -> subprocess.Popen[bytes]:
        ns = self._netns_name(netns)
        cg = self._cgroup_path(cgroup)
        ns_fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC) if ns is not None else None
        try:
            cg_fd = os.open(cg / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) if cg is not None else None
        except BaseException:
            if ns_fd is not None:
                os.close(ns_fd)
            raise
        try:
            return subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=None if env is None else dict(env),
                cwd=cwd,
                preexec_fn=_Preexec(cg_fd, ns_fd, new_session),  # noqa: PLW1509 (only write+setns)
            )
        finally:
            for fd in (ns_fd, cg_fd):
                if fd is not None:
                    os.close(fd)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        netns: NetnsArg = None,
        cgroup: CgroupArg = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        ready: str | None = None,
        ready_timeout: float = 10.0,
        label: str | None = None,
        new_session: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process (stopped and reaped at teardown); stdout/stderr go to log files.

        netns: a Host, a netns name, or None (this process's netns). cgroup: a Path, a node name
        (see node_cgroup), or None (stay in this process's cgroup). ready: wait until a stdout line
        equals this text (e.g. "READY"), raising HarnessError with the output if the process exits first.
        new_session: run it in its own session/process group, so that stop() and teardown signal its
        children too (those left in the group after it exits get SIGKILL).
        """
        self._check_open()
        n = next(self._seq)
        label = label or f"{Path(argv[0]).name}#{n}"
        out_path = self.workdir / f"{n:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}.out"
        err_path = out_path.with_suffix(".err")
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = self._popen(argv, netns, cgroup, out_f, err_f, env, cwd=cwd, new_session=new_session)
        tracked = _Tracked(proc, list(argv), out_path, err_path, label, own_group=new_session)
        if new_session:  # so that a sweep after a crash finds its process group
            with open(self.workdir / PGROUPS_FILE, "a") as f:
                f.write(f"{proc.pid} {_starttime(proc.pid) or 0}\n")
        self._procs.append(tracked)
        if ready is not None:
            self._wait_ready(tracked, ready, ready_timeout)
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], ready: str = "READY", timeout: float = 10.0) -> None:
        """Wait until a spawned process prints the line `ready` (HarnessError with its output otherwise)."""
        self._wait_ready(self._find(proc), ready, timeout)

    def _find(self, proc: subprocess.Popen[bytes]) -> _Tracked:
        for t in self._procs:
            if t.proc is proc:
                return t
        raise HarnessError(f"process {proc.pid} was not started by this topology")

    def _wait_ready(self, tracked: _Tracked, ready: str, timeout: float) -> None:
        assert tracked.stdout_path is not None
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            with contextlib.suppress(FileNotFoundError):
                if ready in tracked.stdout_path.read_text(errors="replace").splitlines():
                    return
            rc = tracked.proc.poll()
            if rc is not None:
                out, err = self.logs(tracked.proc)
                raise HarnessError(
                    f"{tracked.label} exited with {rc} before printing {ready!r}: "
                    f"{' '.join(tracked.argv)}\n{_fmt_output(out, err)}"
                )
            if time.monotonic() > deadline:
                out, err = self.logs(tracked.proc)
                self._terminate(tracked, timeout=1.0)
                raise HarnessError(
                    f"{tracked.label} did not print {ready!r} within {timeout}s: "
                    f"{' '.join(tracked.argv)}\n{_fmt_output(out, err)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def logs(self, proc: subprocess.Popen[bytes]) -> tuple[str, str]:
        """(stdout, stderr) a spawned process has written so far."""
        t = self._find(proc)
        texts = []
        for p in (t.stdout_path, t.stderr_path):
            try:
                texts.append(p.read_text(errors="replace") if p else "")
            except FileNotFoundError:
                texts.append("")
        return texts[0], texts[1]

    def _terminate(self, tracked: _Tracked, timeout: float, sig: int = signal.SIGTERM) -> int:
        proc = tracked.proc

        def signal_it(signum: int) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if tracked.own_group:
                    os.killpg(proc.pid, signum)
                else:
                    proc.send_signal(signum)

        if proc.poll() is None:
            signal_it(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                signal_it(signal.SIGKILL)
                proc.wait(timeout=5.0)
        if tracked.own_group:  # children it left behind in its process group
            signal_it(signal.SIGKILL)
        return proc.returncode

    def stop(
        self, proc: subprocess.Popen[bytes], timeout: float = 5.0, sig: int = signal.SIGTERM
    ) -> ProcResult:
        """Send `sig` (then SIGKILL after `timeout`), reap, and return exit status and full output."""
        tracked = self._find(proc)
        rc = self._terminate(tracked, timeout, sig)
        out, err = self.logs(proc)
        return ProcResult(rc, out, err)

    def run(
        self,
        argv: Sequence[str],
        *,
        netns: NetnsArg = None,
        cgroup: CgroupArg = None,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ProcResult:
        """Run a command to completion inside netns/cgroup; HarnessError with its output on failure."""
        self._check_open()
        proc = self._popen(
            argv,
            netns,
            cgroup,
            subprocess.PIPE,
            subprocess.PIPE,
            env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            new_session=True,
        )
        try:
            out_b, err_b = proc.communicate(input.encode() if input is not None else None, timeout=timeout)
        except BaseException as exc:  # timeout or KeyboardInterrupt: kill it and its children, then reap
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                out_b, err_b = proc.communicate(timeout=5.0)
            except subprocess.TimeoutExpired:  # something else holds the pipes open
                out_b, err_b = b"", b"(output lost: pipes held open by another process)"
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
                proc.wait(timeout=5.0)
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            raise HarnessError(
                f"timed out after {timeout}s: {' '.join(argv)}\n{_fmt_output(out_b, err_b)}"
            ) from None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # leftover children of its group
                os.killpg(proc.pid, signal.SIGKILL)
        res = ProcResult(proc.returncode, out_b.decode(errors="replace"), err_b.decode(errors="replace"))
        if check and res.returncode != 0:
            raise HarnessError(
                f"exit {res.returncode}: {' '.join(argv)}\n{_fmt_output(res.stdout, res.stderr)}"
            )
        return res

    # -- backend and client helpers ------------------------------------------------------------------

    def start_backend(
        self,
        pod: Pod | Host,
        name: str | None = None,
        port: int | Sequence[int] = 8080,
        udp_port: int | Sequence[int] | None = None,
        *,
        extra_args: Sequence[str] = (),
        cgroup: CgroupArg = None,
        timeout: float = 10.0,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Run backend.py in the pod's netns (and in `cgroup`, default: the pod's node cgroup, if any).

        Replies carry `name` (default: the pod's name); `topo.backends[name]` is the process.
        Waits for READY unless wait=False (then call wait_ready); returns the Popen.
        """
        name = name or pod.name
        ports = [port] if isinstance(port, int) else list(port)
        argv = [self.python, str(BACKEND_PY), "--name", name]
        for p in ports:
            argv += ["--port", str(p)]
        if udp_port is not None:
            for p in [udp_port] if isinstance(udp_port, int) else list(udp_port):
                argv += ["--udp-port", str(p)]
        argv += list(extra_args)
        if cgroup is None and pod.node is not None:
            cgroup = pod.node
        proc = self.spawn(
            argv,
            netns=pod,
            cgroup=cgroup,
            ready="READY" if wait else None,
            ready_timeout=timeout,
            label=f"backend-{name}",
        )
        self.backends[name] = proc
        return proc

    def start_backends(
        self, pods: Sequence[Pod | Host], port: int | Sequence[int] = 8080, *, timeout: float = 10.0
    ) -> list[subprocess.Popen[bytes]]:
        """start_backend for several pods at once (started in parallel; all READY on return)."""
        procs = [self.start_backend(p, port=port, wait=False) for p in pods]
        for proc in procs:
            self.wait_ready(proc, "READY", timeout)
        return procs

    def client_argv(self, args: Sequence[str]) -> list[str]:
        return [self.python, str(CLIENT_PY), *[str(a) for a in args]]

    def _default_cgroup(self, host: NetnsArg, cgroup: CgroupArg) -> CgroupArg:
        if cgroup is None and isinstance(host, Host) and host.node is not None:
            return host.node
        return cgroup

    def run_client(
        self,
        client: NetnsArg,
        cgroup: CgroupArg,
        args: Sequence[str | float],
        *,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Run client.py to completion inside `client`'s netns (None: this netns) and `cgroup`.

        `cgroup` None means the client's node cgroup if it has one, else this process's cgroup.
        Returns the parsed JSON; HarnessError (with stderr) if it fails or prints no JSON.
        """
        argv = self.client_argv([str(a) for a in args])
        res = self.run(argv, netns=client, cgroup=self._default_cgroup(client, cgroup), timeout=timeout)
        return parse_client_json(argv, res)

    def spawn_client(
        self, client: NetnsArg, cgroup: CgroupArg, args: Sequence[str | float], *, ready_timeout: float = 10.0
    ) -> subprocess.Popen[bytes]:
        """Start client.py (typically `loop` mode) in the background; waits for its READY line."""
        argv = self.client_argv([str(a) for a in args])
        return self.spawn(
            argv,
            netns=client,
            cgroup=self._default_cgroup(client, cgroup),
            ready="READY",
            ready_timeout=ready_timeout,
            label=f"client-{args[0]}",
        )

    def finish_client(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> dict[str, Any]:
        """SIGTERM a spawned client (loop mode prints its totals then), reap it, return the parsed JSON."""
        tracked = self._find(proc)
        res = self.stop(proc, timeout=timeout)
        return parse_client_json(tracked.argv, res)


def parse_client_json(argv: Sequence[str], res: ProcResult) -> dict[str, Any]:
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        raise HarnessError(
            f"client failed (exit {res.returncode}): {' '.join(argv)}\n{_fmt_output(res.stdout, res.stderr)}"
        )
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise HarnessError(
            f"client printed no JSON: {' '.join(argv)}\n{_fmt_output(res.stdout, res.stderr)}"
        ) from None
    if not isinstance(data, dict):
        raise HarnessError(f"client JSON is not an object: {lines[-1]}")
    return data


# --------------------------------------------------------------------------------------------------------
# a ready-made small cluster


@dataclass
class Cluster:
    topo: Topology
    pods: list[Pod]
    client: Client
    node: str
    port: int

    @property
    def cgroup(self) -> Path:
        return self.topo.node_cgroup(self.node)


def build_cluster(
    topo: Topology,
    n_pods: int = 3,
    *,
    port: int = 8080,
    node: str = "node-a",
    client: str = "client",
    pod_names: Sequence[str] | None = None,
) -> Cluster:
    """`n_pods` pods (pod-a, pod-b, ...) each running backend.py on TCP+UDP `port`, and one client whose
    processes run (by default) in the cgroup of `node`."""
    names = list(pod_names) if pod_names else [f"pod-{chr(ord('a') + i)}" for i in range(n_pods)]
    pods = [topo.add_pod(n) for n in names]
    cl = topo.add_client(client, node=node)
    topo.start_backends(pods, port=port)
    return Cluster(topo, pods, cl, node, port)


def _main(argv: Sequence[str]) -> int:
    """python -m balancing_testkit.topology {list|sweep|sweep-all}: inspect or remove harness leftovers."""
    cmd = argv[0] if argv else "list"
    if cmd == "list":
        for lo in list_leftovers():
            state = "alive" if pid_alive(lo.pid) else "dead"
            print(f"{lo.kind:6} {lo.path}  (pid {lo.pid} {state})")
        return 0
    if cmd in ("sweep", "sweep-all"):
        for lo in sweep_leftovers(everything=cmd == "sweep-all"):
            print(f"removed {lo.kind} {lo.path}")
        return 0
    print(_main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
