"""The upgrade from 0.3: move connected sockets' reverse state from 0.3's ``bl_sock_v2`` into their storage.

Up to 0.3 the datapath kept what a connected socket asked for (its frontend) and where it really goes in
``bl_sock_v2``, a hash keyed by socket cookie that a ``cgroup/sock_release`` hook emptied; the current
programs keep that pair in the socket's own storage (``bl_sks_v1``) and read nothing else. An agent upgraded
from 0.3 finds the old map pinned. Without this module the sockets connected through a frontend before the
upgrade would show their backend to ``getpeername()`` and ``recvmsg()`` and be missed by UDP socket
termination.

``migrate_legacy_reverse`` loads ``sockmigrate.o`` (bpf/sockmigrate.c, beside the datapath object) against
both pins and reads its ``iter/tcp`` and ``iter/udp`` programs once in every network namespace where the
datapath's sockets can be (found as socket termination finds them: ``sockterm.discover_namespaces``, read
through ``sockterm.read_iterators``). Each socket whose cookie is in ``bl_sock_v2`` gets the same pair in its
storage; one that has storage already (it connected again through a frontend since the new programs were
attached) keeps its own, newer, pair. ``loader.load`` runs it after attaching the new programs and before it
detaches 0.3's ``bl_sock_release`` and unpins ``bl_sock_v2``: a socket connecting meanwhile gets storage
from the new programs, one closing meanwhile still loses its old entry. Nothing to migrate (no pin, an empty
map) loads nothing.

It never raises: what it did and could not do is in the ``MigrationReport``. The sockets it misses keep
working, but their reverse translation is lost (getpeername() shows the backend; UDP socket termination
misses them). Neighbours: ``sockterm`` (namespaces and the reader, shared), ``libbpf`` (calls), ``percpu``
(counts the old entries in bulk), ``abi`` (map names, output records), ``loader`` (its caller).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from balancing.datapath import abi, libbpf, percpu, sockterm

log = logging.getLogger(__name__)
_LEGACY_KEY, _LEGACY_VALUE = abi.MAP_LAYOUTS[abi.MAP_LEGACY_SOCK_REVERSE]

PROGRAMS = ("bl_sockmigrate_tcp", "bl_sockmigrate_udp")  # iter/tcp, iter/udp
LOG_BUF_SIZE = 1 << 18


@dataclass
class MigrationReport:
    """What one ``migrate_legacy_reverse`` did."""

    recorded: int = 0  # entries in bl_sock_v2 when it began: 0.3's connected sockets (0: nothing was loaded)
    namespaces: int = 0  # distinct network namespaces whose TCP and UDP sockets were iterated
    migrated: int = 0  # sockets given their 0.3 pair in their storage
    kept: int = 0  # sockets that had a newer pair of their own (left alone)
    failed: int = 0  # sockets whose storage could not be made
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    iterated: bool = False  # the iterators ran (else nothing was migrated: errors say why)
    hidden_processes: int = 0  # processes of the cgroup in a PID namespace the agent does not see into

    @property
    def complete(self) -> bool:
        """Whether every socket it could reach got its state: nothing failed, no namespace was left out."""
        return not self.errors and not self.failed

    @property
    def not_found(self) -> int:
        """Entries no iterated socket had: closed meanwhile, or in a network namespace not visited."""
        if not self.iterated:
            return 0
        return max(0, self.recorded - self.migrated - self.kept - self.failed)

    def summary(self) -> str:
        if not self.iterated:
            return (
                f"the connected sockets of 0.3 ({self.recorded} recorded) were not migrated to socket "
                f"storage ({self.seconds * 1000:.1f} ms): {'; '.join(self.errors) or 'nothing to migrate'}"
            )
        text = (
            f"{self.migrated} of {self.recorded} connected sockets of 0.3 migrated to socket storage in "
            f"{self.namespaces} network namespaces ({self.seconds * 1000:.1f} ms)"
        )
        for count, what in (
            (self.kept, "had newer state of their own"),
            (self.failed, "got no storage"),
            (self.not_found, "not found"),
            (self.hidden_processes, "processes out of the agent's sight (PID namespace)"),
        ):
            if count:
                text += f", {count} {what}"
        if self.errors:
            text += f", {len(self.errors)} errors (first: {self.errors[0]})"
        return text


def migrate_legacy_reverse(
    map_dir: Path, cgroup: Path, obj: Path, netns_dirs: Iterable[Path] = sockterm.NETNS_DIRS
) -> MigrationReport:
    """Give the connected sockets recorded in ``<map_dir>/bl_sock_v2`` their pair in ``bl_sks_v1``.

    ``cgroup``: where the datapath is attached (its processes' namespaces are visited); ``obj``: the
    compiled ``sockmigrate.o``; ``netns_dirs``: where namespace files are kept besides (``/run/netns``).
    Never raises; no pin: an empty report. Leaves both pins in place (the loader retires the old one).
    """
    report = MigrationReport()
    pin = map_dir / abi.MAP_LEGACY_SOCK_REVERSE
    if not pin.exists():
        return report
    start = time.monotonic()
    try:
        _migrate(pin, cgroup, obj, tuple(netns_dirs), report)
    except Exception as exc:  # the agent starts anyway; the report says what was lost
        log.debug("migrating 0.3's reverse state failed", exc_info=True)
        report.errors.append(str(exc) or type(exc).__name__)
    report.seconds = time.monotonic() - start
    if report.recorded and report.complete:  # else the caller warns (loader: LoadReport.warnings)
        log.info("upgrade from 0.3: %s", report.summary())
    return report


def _migrate(
    pin: Path, cgroup: Path, obj_path: Path, netns_dirs: tuple[Path, ...], report: MigrationReport
) -> None:
    legacy_fd = libbpf.obj_get(str(pin))
    try:
        info = libbpf.MapInfo()
        libbpf.obj_get_info(legacy_fd, info)
        report.recorded = percpu.count(legacy_fd, _LEGACY_KEY.size, _LEGACY_VALUE.size)
        if not report.recorded:
            return
        obj = _load(obj_path, pin.parent, legacy_fd, int(info.max_entries))
    finally:
        os.close(legacy_fd)  # the loaded object holds the map now
    links: list[int] = []
    namespaces = sockterm.Namespaces()
    outputs: dict[int, list[bytes]] = {}
    try:
        links = [libbpf.program_attach_iter(prog) for prog in libbpf.programs(obj)]
        namespaces = sockterm.discover_namespaces(cgroup, netns_dirs, report.errors)
        report.hidden_processes = namespaces.hidden
        link_fds = [libbpf.link_fd(link) for link in links]
        outputs = sockterm.read_iterators(namespaces.fds, link_fds, report.errors, name="sockmigrate")
        report.iterated = True
    finally:
        namespaces.close()
        for link in links:
            libbpf.link_destroy(link)
        libbpf.object_close(obj)
    report.namespaces = len(outputs)
    _count(outputs, report)


def _load(obj_path: Path, map_dir: Path, legacy_fd: int, legacy_entries: int) -> int:
    """The loaded object, its bl_sock_v2 on ``legacy_fd`` (sized as the pin: 0.3's --max-sockets) and its
    bl_sks_v1 on the datapath's pin."""
    if not obj_path.is_file():
        raise OSError(errno.ENOENT, f"{obj_path} not found (built by `make bpf`)")
    if not sockterm.KERNEL_BTF.exists():
        raise OSError(errno.ENOTSUP, f"the kernel has no BTF ({sockterm.KERNEL_BTF}): iterators need it")
    obj = libbpf.object_open(str(obj_path))
    reused: list[int] = []
    try:
        names = [libbpf.program_name(p) for p in libbpf.programs(obj)]
        if sorted(names) != sorted(PROGRAMS):
            raise OSError(errno.ENOENT, f"{obj_path} has programs {names}, not {list(PROGRAMS)}")
        for m in libbpf.maps(obj):
            if libbpf.map_name(m) == abi.MAP_LEGACY_SOCK_REVERSE:
                libbpf.map_set_max_entries(m, legacy_entries)
                libbpf.map_reuse_fd(m, legacy_fd)
            else:  # bl_sks_v1: the datapath's
                reused.append(libbpf.obj_get(str(map_dir / libbpf.map_name(m))))
                libbpf.map_reuse_fd(m, reused[-1])
        bufs = [ctypes.create_string_buffer(LOG_BUF_SIZE) for _ in names]
        for prog, buf in zip(libbpf.programs(obj), bufs, strict=True):
            libbpf.program_set_log_buf(prog, buf)
        try:
            libbpf.object_load(obj)
        except OSError as exc:
            verifier = [line for b in bufs for line in b.value.decode(errors="replace").strip().splitlines()]
            raise OSError(
                exc.errno,
                f"cannot load {obj_path} on Linux {platform.release()}: {exc.strerror}"
                + (f"; verifier: {' / '.join(verifier[-3:])}" if verifier else ""),
            ) from exc
    except BaseException:
        libbpf.object_close(obj)
        raise
    finally:
        for fd in reused:
            os.close(fd)
    return obj


def _count(outputs: dict[int, list[bytes]], report: MigrationReport) -> None:
    """Tally the iterators' records, one per socket found (a socket shown twice counts once)."""
    results: dict[int, int] = {}
    for inode, outs in outputs.items():
        for out in outs:
            for cookie, svc_id, err in abi.unpack_term_recs(out):
                results[cookie] = err
                log.debug(
                    "socket %d of frontend %d in netns %d: %s", cookie, svc_id, inode, err or "migrated"
                )
    failures: dict[int, int] = {}
    for err in results.values():
        if err == 0:
            report.migrated += 1
        elif err == -errno.EEXIST:
            report.kept += 1
        else:
            report.failed += 1
            failures[err] = failures.get(err, 0) + 1
    for err, count in sorted(failures.items()):
        report.errors.append(f"{count} sockets got no socket storage: {os.strerror(-err)}")
