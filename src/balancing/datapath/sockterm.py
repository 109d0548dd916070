"""Destroy connected UDP sockets whose backend left their frontend: kube-proxy's UDP conntrack cleanup.

A connected UDP socket keeps the backend the datapath gave it at ``connect()``. After a write removes backends
from UDP frontends (``writer.WriteStats.udp_backends_removed``), ``SocketTerminator.terminate`` puts each
(frontend, backend) pair in the doomed map (``bl_doom_v1``) and, in every distinct network namespace where
the datapath's sockets can be, reads the ``iter/udp`` program of ``bpf/sockterm.c`` once: it destroys
(``bpf_sock_destroy()``, Linux >= 6.5) the sockets whose reverse state in ``bl_sks_v1`` names a doomed pair,
and the application's next receive fails with ECONNABORTED (a send with EDESTADDRREQ: the socket is
disconnected), so it reconnects and is translated anew.
The doomed map is emptied again after every run, also when it fails.

The namespaces (``discover_namespaces``): those of the processes in the attached cgroup subtree (the only
sockets the datapath translates), through ``/proc/<pid>/ns/net``, exact when the agent shares the host's PID
namespace; and the namespace files that ``ip netns`` and container runtimes keep in ``NETNS_DIRS``
(``/run/netns``: each pod sandbox's ``cni-<uuid>``), which need no PIDs. An agent in its own PID namespace
(the chart's ``hostPID: false``) sees every other process of the cgroup as pid 0: it says so once and relies
on the directories.

The object is loaded once, reusing the datapath's pinned ``bl_sks_v1``; its doomed map is its own, never
pinned, so two agents on one node (a surge rollout) cannot clear each other's pairs. Where that fails (an
old kernel, no object, no datapath loaded) the terminator says so in ``available`` and ``reason`` and
``terminate`` does nothing: it never raises at agent start. Namespaces are entered with ``netns.enter`` in
one short-lived thread (``read_iterators``, as ``netns.cookie_of`` does; the iterator walks the sockets of
the namespace of the thread that creates it); ``sockmigrate`` reuses it and ``discover_namespaces``.
Neighbours: ``libbpf`` (calls), ``netns`` (setns), ``abi`` (doomed keys, output records), ``writer`` (what
was removed), ``loader`` (the datapath whose pins this reuses), ``sockmigrate`` (shares the namespace walk).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from balancing.datapath import abi, libbpf, netns
from balancing.model.desired import Backend, FrontendKey, Protocol

log = logging.getLogger(__name__)

PROGRAM = "bl_sockterm_udp"
OBJECT = "sockterm.o"  # built next to the datapath's balancing.o (make bpf)
# Where ip netns (/run/netns) and container runtimes (containerd, CRI-O: /var/run/netns, cni-<uuid>) keep a
# bind mount of each network namespace they create: found without seeing the processes in them.
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")
# Read the iterator in chunks well below its seq_file buffer (8 pages): a record that would overflow the
# buffer is discarded and its socket shown to the program again, which then finds it already disconnected.
READ_SIZE = 4096
LOG_BUF_SIZE = 1 << 18
_GONE = (errno.ENOENT, errno.ESRCH)  # a process that exited between listing and looking


@dataclass
class TerminationReport:
    """What one ``terminate`` did."""

    pairs: int = 0  # doomed (frontend, backend) pairs
    namespaces: int = 0  # distinct network namespaces whose UDP sockets were iterated
    destroyed: int = 0  # sockets destroyed
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""  # why nothing was done although pairs were doomed (terminator unavailable)
    hidden_processes: int = 0  # processes of the cgroup in a PID namespace the agent does not see into

    def summary(self) -> str:
        text = (
            f"{self.pairs} removed UDP backend pairs: {self.destroyed} connected sockets destroyed in "
            f"{self.namespaces} network namespaces ({self.seconds * 1000:.1f} ms)"
        )
        if self.hidden_processes:
            text += f", {self.hidden_processes} processes out of the agent's sight (PID namespace)"
        if self.errors:
            text += f", {len(self.errors)} errors (first: {self.errors[0]})"
        return text


def doomed_keys(removed: Mapping[FrontendKey, Iterable[Backend]]) -> list[bytes]:
    """The doomed-map keys of the UDP pairs in ``removed`` (other protocols are never terminated)."""
    keys = {
        abi.pack_doom_key(front.ip, front.port, b.ip, b.port, Protocol.UDP)
        for front, backends in removed.items()
        if front.protocol is Protocol.UDP
        for b in backends
    }
    return sorted(keys)


@dataclass
class Namespaces:
    """The network namespaces one discovery opened, {nsfs inode: fd}, and what its pid scan saw.

    An open fd keeps its namespace alive while it is visited, whatever its processes do; ``close`` releases
    them all.
    """

    fds: dict[int, int] = field(default_factory=dict)
    processes: int = 0  # cgroup.procs entries in the subtree
    hidden: int = 0  # ... listed as pid 0: in a PID namespace this process does not see into
    foreign_proc: bool = False  # /proc is not this process's PID namespace's: its pids mean nothing here
    from_pids: int = 0  # namespaces found through /proc/<pid>/ns/net
    from_dirs: int = 0  # namespaces found only through a netns directory

    @property
    def pids_hidden(self) -> bool:
        """Whether the pid scan cannot be complete: processes of the cgroup are invisible to this one."""
        return self.hidden > 0 or (self.foreign_proc and self.processes > 0)

    def add(self, fd: int) -> bool:
        """Keep ``fd`` (an open network namespace) unless its namespace is already kept; False: closed."""
        try:
            inode = os.fstat(fd).st_ino
        except OSError:
            os.close(fd)
            raise
        if inode in self.fds:
            os.close(fd)
            return False
        self.fds[inode] = fd
        return True

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def discover_namespaces(cgroup: Path, netns_dirs: Iterable[Path], errors: list[str]) -> Namespaces:
    """Open every distinct network namespace a socket the datapath translated can be in.

    First those of the processes in the ``cgroup`` subtree (``cgroup.procs`` → ``/proc/<pid>/ns/net``): exact,
    when this process sees their pids. Then the namespace files kept in ``netns_dirs`` (the bind mounts that
    ``ip netns`` and container runtimes keep in ``/run/netns``): found whatever PID namespace this process
    is in, but also namespaces with no process in the cgroup (visiting those costs a pass, destroys nothing:
    only sockets the datapath translated are candidates). When the pid scan saw processes it cannot see into
    (``Namespaces.pids_hidden``), this process's own namespace is added as well (theirs may be it: the host's,
    for a host-network agent). Deduplicated by namespace inode. Processes, cgroups and namespace files that
    vanish meanwhile are skipped silently; anything else is added to ``errors``.
    """
    found = Namespaces()
    try:
        _scan_cgroup(cgroup, found, errors)
        if found.pids_hidden:
            with contextlib.suppress(OSError):
                if found.add(os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)):
                    found.from_pids += 1
        _scan_netns_dirs(netns_dirs, found, errors)
    except BaseException:
        found.close()
        raise
    return found


def _proc_is_ours() -> bool:
    """Whether /proc shows this process's PID namespace (its "self" is our pid)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _scan_cgroup(cgroup: Path, found: Namespaces, errors: list[str]) -> None:
    seen_links: set[str] = set()
    failed: dict[int, tuple[int, str]] = {}  # errno → (count, first path): one error per cause, not per pid
    found.foreign_proc = not _proc_is_ours()
    for directory, _dirs, _files in os.walk(cgroup):
        try:
            pids = (Path(directory) / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            continue  # the cgroup was removed meanwhile
        except OSError as exc:
            errors.append(f"{directory}/cgroup.procs: {exc}")
            continue
        found.processes += len(pids)
        for pid in pids:
            if pid == "0":  # the kernel lists processes outside our PID namespace as 0
                found.hidden += 1
                continue
            if found.foreign_proc:
                continue
            path = f"/proc/{pid}/ns/net"
            try:
                link = os.readlink(path)  # "net:[<inode>]": cheap deduplication before any open()
                if link in seen_links:
                    continue
                seen_links.add(link)
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _GONE:  # a process that exited meanwhile is no error
                    count, first = failed.get(exc.errno or 0, (0, f"{path}: {exc.strerror}"))
                    failed[exc.errno or 0] = (count + 1, first)
                continue
            # fstat: the namespace actually opened (the pid may have been reused)
            if found.add(fd):
                found.from_pids += 1
    for count, first in failed.values():
        errors.append(first if count == 1 else f"{first} (and {count - 1} more processes)")


def _scan_netns_dirs(netns_dirs: Iterable[Path], found: Namespaces, errors: list[str]) -> None:
    try:  # nsfs is one superblock: every namespace file is on it
        nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    except OSError:
        nsfs_dev = -1  # unknown: open everything, the type check below still applies
    seen_dirs: set[tuple[int, int]] = set()
    for directory in netns_dirs:
        try:
            st = os.stat(directory)
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue  # no namespace was ever created there (or the directory is not mounted in)
        except OSError as exc:
            errors.append(f"{directory}: {exc.strerror}")
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue  # /var/run/netns is /run/netns
        seen_dirs.add((st.st_dev, st.st_ino))
        for name in names:
            path = directory / name
            try:
                st = os.stat(path)
                if nsfs_dev >= 0:
                    if st.st_dev != nsfs_dev:
                        continue  # not a mounted namespace: a directory, or a file left after its unmount
                    if st.st_ino in found.fds:
                        continue  # visited anyway (a process of the cgroup is in it)
                elif not stat.S_ISREG(st.st_mode):
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _GONE:
                    errors.append(f"{path}: {exc.strerror}")
                continue
            if not netns.is_netns(fd):  # another kind (ip netns keeps only net ones; a runtime may not)
                os.close(fd)
            elif found.add(fd):
                found.from_dirs += 1


def _chunks(keys: list[bytes], size: int) -> Iterator[list[bytes]]:
    for i in range(0, len(keys), size):
        yield keys[i : i + size]


class SocketTerminator:
    """The socket-termination iterator of one agent (its datapath's ``bpffs`` pins and attach ``cgroup``)."""

    def __init__(
        self,
        bpffs: Path,
        cgroup: Path,
        obj: Path,
        *,
        time_budget: float = 2.0,
        netns_dirs: Iterable[Path] = NETNS_DIRS,
    ) -> None:
        self.bpffs, self.cgroup, self.obj = bpffs, cgroup, obj
        self.time_budget = time_budget  # seconds per terminate(); namespaces left then are reported
        self.netns_dirs = tuple(netns_dirs)  # namespace files searched besides the cgroup's processes
        self._warned_hidden = False
        self.available = False
        self.reason = ""
        self._obj: int | None = None
        self._link: int | None = None
        self._doom_fd = -1
        self._capacity = 0
        self._lock = threading.Lock()
        try:
            self._load()
        except Exception as exc:  # whatever it is, the agent runs on without the feature
            self.close()
            self.reason = str(exc) or type(exc).__name__
            log.warning("socket termination of connected UDP sockets is unavailable: %s", self.reason)
        else:
            self.available = True

    def __enter__(self) -> SocketTerminator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- loading -------------------------------------------------------------------------------------------

    def _load(self) -> None:
        map_dir = self.bpffs / "maps"
        if not self.obj.is_file():
            raise OSError(errno.ENOENT, f"{self.obj} not found (built by `make bpf`)")
        if not KERNEL_BTF.exists():
            raise OSError(errno.ENOTSUP, f"the kernel has no BTF ({KERNEL_BTF}): iterators need it")
        if not (map_dir / abi.MAP_SOCK_REVERSE).exists():
            raise OSError(errno.ENOENT, f"no datapath pinned under {map_dir} (load it first)")
        if not self.cgroup.is_dir():
            raise OSError(errno.ENOENT, f"cgroup {self.cgroup} not found")
        obj = libbpf.object_open(str(self.obj))
        self._obj = obj
        reused: list[int] = []
        try:
            for m in libbpf.maps(obj):
                name = libbpf.map_name(m)
                if name == abi.MAP_DOOMED:
                    continue  # this terminator's own, created at load and never pinned
                fd = libbpf.obj_get(str(map_dir / name))
                reused.append(fd)
                libbpf.map_reuse_fd(m, fd)
            prog = next((p for p in libbpf.programs(obj) if libbpf.program_name(p) == PROGRAM), None)
            if prog is None:
                raise OSError(errno.ENOENT, f"{self.obj} has no program {PROGRAM}")
            log_buf = ctypes.create_string_buffer(LOG_BUF_SIZE)
            libbpf.program_set_log_buf(prog, log_buf)
            try:
                libbpf.object_load(obj)
            except OSError as exc:
                verifier = log_buf.value.decode(errors="replace").strip().splitlines()[-3:]
                raise OSError(
                    exc.errno,
                    f"cannot load {self.obj} on Linux {platform.release()} (socket termination needs "
                    f"the bpf_sock_destroy kfunc, Linux >= 6.5): {exc.strerror}"
                    + (f"; verifier: {' / '.join(verifier)}" if verifier else ""),
                ) from exc
        finally:
            for fd in reused:
                os.close(fd)
        doom = next(m for m in libbpf.maps(obj) if libbpf.map_name(m) == abi.MAP_DOOMED)
        self._doom_fd = libbpf.map_fd(doom)
        info = libbpf.MapInfo()
        libbpf.obj_get_info(self._doom_fd, info)
        self._capacity = int(info.max_entries)
        self._link = libbpf.program_attach_iter(prog)

    def close(self) -> None:
        """Release the program, link and map fds (the doomed map goes with them)."""
        if self._link is not None:
            libbpf.link_destroy(self._link)
            self._link = None
        if self._obj is not None:
            libbpf.object_close(self._obj)
            self._obj = None
        self._doom_fd = -1
        self.available = False

    # --- terminating ---------------------------------------------------------------------------------------

    def terminate(self, removed: Mapping[FrontendKey, Iterable[Backend]]) -> TerminationReport:
        """Destroy the connected UDP sockets translated to a backend that has left their frontend.

        ``removed``: frontend → backends it no longer has (``WriteStats.udp_backends_removed``); TCP and SCTP
        frontends are ignored. Nothing doomed: returns at once, visiting nothing.
        """
        keys = doomed_keys(removed)
        report = TerminationReport(pairs=len(keys))
        if not keys:
            return report
        if not self.available:
            report.skipped = self.reason or "closed"
            log.debug(
                "not terminating sockets of %d removed UDP backend pairs: %s", len(keys), report.skipped
            )
            return report
        start = time.monotonic()
        with self._lock:
            namespaces = Namespaces()
            try:
                namespaces = discover_namespaces(self.cgroup, self.netns_dirs, report.errors)
                report.hidden_processes = namespaces.hidden
                self._warn_if_hidden(namespaces)
                for chunk in _chunks(keys, self._capacity):
                    self._run(chunk, namespaces.fds, report, start + self.time_budget)
            except Exception as exc:  # the caller's write loop goes on; the report says what happened
                log.debug("socket termination failed", exc_info=True)
                report.errors.append(f"socket termination failed: {exc}")
            finally:
                namespaces.close()
        report.seconds = time.monotonic() - start
        level = logging.WARNING if report.errors else logging.INFO
        log.log(level, "socket termination: %s", report.summary())
        return report

    def _warn_if_hidden(self, found: Namespaces) -> None:
        """Say once that the cgroup's processes are out of sight (the agent in its own PID namespace: the
        chart's hostPID: false), so the namespaces come from the netns directories only."""
        if not found.pids_hidden or self._warned_hidden:
            return
        self._warned_hidden = True
        why = (
            f"{found.hidden} of its {found.processes} processes are in a PID namespace it does not see into"
            if found.hidden
            else "/proc is not its PID namespace's"
        )
        dirs = ", ".join(map(str, self.netns_dirs)) or "none configured"
        log.warning(
            "socket termination: the agent cannot see the processes of its cgroup %s (%s, e.g. its own "
            "PID namespace): relying on the netns directories (%s: %d more network namespaces found there) "
            "and its own network namespace; a socket in a namespace none of them holds is not terminated. "
            "Run the agent with hostPID or mount the host's /run/netns (--netns-dir).",
            self.cgroup,
            why,
            dirs,
            found.from_dirs,
        )

    def _run(
        self, keys: list[bytes], namespaces: dict[int, int], report: TerminationReport, deadline: float
    ) -> None:
        """One iterator pass over every namespace with ``keys`` doomed; the doomed map is empty afterwards."""
        try:
            self._clear()  # in case clearing after an earlier run failed
            libbpf.map_update_batch(self._doom_fd, b"".join(keys), abi.DOOM_VALUE * len(keys), len(keys))
            self._visit(namespaces, report, deadline)
        finally:
            self._clear()

    def _visit(self, namespaces: dict[int, int], report: TerminationReport, deadline: float) -> None:
        """Read the iterator to the end in each namespace (``read_iterators``) and count what it destroyed."""
        assert self._link is not None
        outputs = read_iterators(
            namespaces, [libbpf.link_fd(self._link)], report.errors, deadline=deadline, name="sockterm"
        )
        report.namespaces = max(report.namespaces, len(outputs))
        for inode, (out,) in outputs.items():
            for cookie, svc_id, err in abi.unpack_term_recs(out):
                if err == 0:
                    report.destroyed += 1
                    log.debug("destroyed UDP socket %d of frontend %d in netns %d", cookie, svc_id, inode)
                else:
                    report.errors.append(f"socket {cookie} (frontend {svc_id}): {os.strerror(-err)}")

    def _clear(self) -> None:
        """Empty the doomed map (every key, including any a crashed run left)."""
        keys = libbpf.map_keys(self._doom_fd, abi.DOOM_KEY.size)
        if not keys:
            return
        try:
            libbpf.map_delete_batch(self._doom_fd, b"".join(keys), len(keys))
        except OSError:
            for key in keys:
                libbpf.map_delete(self._doom_fd, key)


def read_iterators(
    namespaces: Mapping[int, int],
    link_fds: Sequence[int],
    errors: list[str],
    *,
    deadline: float | None = None,
    name: str = "netns-iter",
) -> dict[int, list[bytes]]:
    """Read each iterator link of ``link_fds`` to the end in each network namespace of ``namespaces``
    ({nsfs inode: open fd}, as ``Namespaces.fds``): {inode: the outputs, in ``link_fds``' order} of the
    namespaces visited.

    One short-lived thread named ``name`` enters them one after another (setns moves only that thread; an
    iterator walks the sockets of the namespace of the thread that creates it). A namespace that cannot be
    entered or read is added to ``errors`` and skipped; past ``deadline`` (``time.monotonic()``) the
    namespaces left are too. Anything else raised in the thread is raised here. Shared with ``sockmigrate``.
    """
    outputs: dict[int, list[bytes]] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            for done, (inode, ns_fd) in enumerate(namespaces.items()):
                if deadline is not None and time.monotonic() > deadline:
                    errors.append(
                        f"time budget spent: {len(namespaces) - done} network namespaces not visited"
                    )
                    return
                try:
                    netns.enter(ns_fd)
                    outputs[inode] = [_read_iterator(fd) for fd in link_fds]
                except OSError as exc:
                    errors.append(f"network namespace {inode}: {exc}")
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=work, name=name)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outputs


def _read_iterator(link_fd: int) -> bytes:
    fd = libbpf.iter_create(link_fd)
    try:
        parts = []
        while chunk := os.read(fd, READ_SIZE):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)
