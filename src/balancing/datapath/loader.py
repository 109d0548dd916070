"""Load the BPF object, reuse or pin its maps, attach or swap its programs — never detaching on the way.

Pins live under ``<bpffs>/maps/<map>`` and ``<bpffs>/links/<program>``. On start the loader reuses every
pinned map (so programmed state survives restarts), loads the new programs against them, and for each
program either updates its pinned link in place (an atomic swap; skipped when the program's tag is
unchanged) or attaches and pins a new link. Links found on another cgroup are moved make-before-break.
``cleanup`` is the only thing that detaches (the north-south TC links and clsact filters pinned beside them
too: run it in the agent's network namespace), besides the retirement of an older version's hooks and maps
once the new programs run. On the upgrade from 0.3 (its ``bl_sock_v2`` pinned) ``sockmigrate`` first moves
the connected sockets' reverse state into their storage. Neighbours: ``libbpf`` (calls), ``mounts`` (bpffs,
cgroup2), ``maps`` (opens the pinned maps for the writer), ``sockmigrate`` and ``bpfobjects`` (the upgrade's
object, beside the datapath's).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from balancing import errors
from balancing.datapath import abi, bpfobjects, libbpf, mounts, sockmigrate, sockterm, tcattach

log = logging.getLogger(__name__)

LOG_BUF_SIZE = 1 << 20


@dataclass(frozen=True)
class DatapathConfig:
    object_path: Path
    bpffs: Path
    cgroup: Path
    max_services: int = abi.DEFAULT_SVC_ENTRIES
    max_backends: int = abi.DEFAULT_BACKENDS
    max_reverse: int = abi.DEFAULT_REV_ENTRIES
    max_affinity: int = abi.DEFAULT_AFF_ENTRIES
    max_clients: int = abi.DEFAULT_CLIENT_ENTRIES
    max_qos: int = abi.DEFAULT_QOS_ENTRIES
    max_stats: int = abi.DEFAULT_STAT_ENTRIES
    event_bytes: int = abi.DEFAULT_EVENT_BYTES  # ring buffer size: a power of two, at least a page

    @property
    def map_dir(self) -> Path:
        return self.bpffs / "maps"

    @property
    def link_dir(self) -> Path:
        return self.bpffs / "links"

    def capacity(self, map_name: str) -> int | None:
        return {
            abi.MAP_SERVICES: self.max_services,
            abi.MAP_BACKENDS: self.max_backends,
            abi.MAP_REVERSE: self.max_reverse,
            abi.MAP_AFFINITY: self.max_affinity,
            abi.MAP_AFFINITY_MATCH: self.max_backends,
            abi.MAP_CLIENTS: self.max_clients,
            abi.MAP_QOS: self.max_qos,
            abi.MAP_STATS: self.max_stats,
            abi.MAP_EVENTS: self.event_bytes,
        }.get(map_name)


@dataclass
class LoadReport:
    maps_created: list[str] = field(default_factory=list)
    maps_reused: list[str] = field(default_factory=list)
    maps_retired: list[str] = field(default_factory=list)
    programs_attached: list[str] = field(default_factory=list)
    programs_swapped: list[str] = field(default_factory=list)
    programs_unchanged: list[str] = field(default_factory=list)
    programs_moved: list[str] = field(default_factory=list)
    # links of programs the object no longer has, or of north-south devices no longer configured
    programs_detached: list[str] = field(default_factory=list)
    # the upgrade from 0.3: connected sockets whose reverse state moved from bl_sock_v2 to their storage
    sockets_migrated: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{len(v) if isinstance(v, list) else v} {k.replace('_', ' ')}"
            for k, v in vars(self).items()
            if v and k != "warnings"
        ]
        return ", ".join(parts)


def _map_info(fd: int) -> libbpf.MapInfo:
    info = libbpf.MapInfo()
    libbpf.obj_get_info(fd, info)
    return info


def _prog_tag(prog_fd: int) -> bytes:
    info = libbpf.ProgInfo()
    libbpf.obj_get_info(prog_fd, info)
    return bytes(info.tag)


def _reuse_pinned_map(m: int, pin: Path, cfg: DatapathConfig, report: LoadReport) -> int | None:
    """Point the object's map at its pin, if there is one; returns the fd to close after load."""
    name = libbpf.map_name(m)
    if not pin.exists():
        return None
    fd = libbpf.obj_get(str(pin))
    info = _map_info(fd)
    wanted = cfg.capacity(name)
    if wanted is not None and info.max_entries != wanted:
        msg = (
            f"map {name} is pinned with {info.max_entries} entries, configured {wanted}: keeping the pinned "
            f"size (run `balancing cleanup` to resize)"
        )
        report.warnings.append(msg)
        libbpf.map_set_max_entries(m, info.max_entries)
    try:
        libbpf.map_reuse_fd(m, fd)
    except OSError as exc:
        os.close(fd)
        raise errors.IncompatiblePin(path=str(pin), reason=str(exc)) from exc
    report.maps_reused.append(name)
    return fd


def load_object(obj: int, log_bufs: dict[str, ctypes.Array[ctypes.c_char]]) -> None:
    try:
        libbpf.object_load(obj)
    except OSError as exc:
        failed = [(n, b.value.decode(errors="replace")) for n, b in log_bufs.items() if b.value]
        program, text = failed[-1] if failed else ("?", "")
        raise errors.BpfLoadError(program=program, log=f"{exc}\n{text}".strip()) from exc


def load(cfg: DatapathConfig, netns_dirs: Iterable[Path] = sockterm.NETNS_DIRS) -> LoadReport:
    """Open, load and attach; returns what was created, reused, attached or swapped.

    ``netns_dirs``: where network namespace files are kept besides those of the cgroup's processes (visited
    only on the upgrade from 0.3, as socket termination visits them).
    """
    mounts.ensure_bpffs(cfg.bpffs)
    cfg.map_dir.mkdir(parents=True, exist_ok=True)
    cfg.link_dir.mkdir(parents=True, exist_ok=True)
    report = LoadReport()
    try:
        obj = libbpf.object_open(str(cfg.object_path))
    except OSError as exc:
        raise errors.BpfObjectError(cfg.object_path, str(exc.strerror or exc).rpartition(": ")[2]) from exc
    reused_fds: list[int] = []
    try:
        for m in libbpf.maps(obj):
            name = libbpf.map_name(m)
            capacity = cfg.capacity(name)
            if capacity is not None:
                libbpf.map_set_max_entries(m, capacity)
            fd = _reuse_pinned_map(m, cfg.map_dir / name, cfg, report)
            if fd is not None:
                reused_fds.append(fd)
        log_bufs = {}
        for prog in libbpf.programs(obj):
            buf = ctypes.create_string_buffer(LOG_BUF_SIZE)
            libbpf.program_set_log_buf(prog, buf)
            log_bufs[libbpf.program_name(prog)] = buf
        load_object(obj, log_bufs)
        for m in libbpf.maps(obj):
            name = libbpf.map_name(m)
            if name not in report.maps_reused:
                libbpf.obj_pin(libbpf.map_fd(m), str(cfg.map_dir / name))
                report.maps_created.append(name)
        _attach_all(obj, cfg, report)
        _migrate_legacy_reverse(obj, cfg, netns_dirs, report)
        _retire_unused_links(obj, cfg, report)
        _retire_unused_pins(obj, cfg, report)
    finally:
        libbpf.object_close(obj)
        for fd in reused_fds:
            os.close(fd)
    for w in report.warnings:
        log.warning("%s", w)
    return report


def _migrate_legacy_reverse(
    obj: int, cfg: DatapathConfig, netns_dirs: Iterable[Path], report: LoadReport
) -> None:
    """The upgrade from 0.3: when its ``bl_sock_v2`` is pinned and the loaded object no longer declares it,
    give the connected sockets it records their reverse state in their storage (``sockmigrate``, with
    ``sockmigrate.o`` beside the datapath object). Runs between attaching the new programs and retiring 0.3's
    sock_release link and map; a failure is a warning, never a failed load."""
    declared = {libbpf.map_name(m) for m in libbpf.maps(obj)}
    if abi.MAP_LEGACY_SOCK_REVERSE in declared or not (cfg.map_dir / abi.MAP_LEGACY_SOCK_REVERSE).exists():
        return
    obj_path = bpfobjects.sockmigrate_object(cfg.object_path)
    migration = sockmigrate.migrate_legacy_reverse(cfg.map_dir, cfg.cgroup, obj_path, netns_dirs)
    report.sockets_migrated = migration.migrated
    if not migration.complete:
        report.warnings.append(
            f"upgrade from 0.3: {migration.summary()}. The connected sockets not migrated lose their reverse "
            "translation: getpeername()/recvmsg() show their backend, UDP socket termination misses them"
        )


def _retire_unused_pins(obj: int, cfg: DatapathConfig, report: LoadReport) -> None:
    """Unpin maps the loaded object no longer defines (an older layout version): once every link runs the
    new programs nothing uses them, and they would otherwise linger until ``cleanup``. (``sockterm.o`` and
    ``sockmigrate.o`` pin nothing of their own: the doomed map is private to each terminator; ``nodeport.o``'s
    own maps are kept: ``northsouth.load`` runs after this one.)"""
    current = {libbpf.map_name(m) for m in libbpf.maps(obj)} | set(abi.NODEPORT_MAPS)
    for pin in sorted(cfg.map_dir.iterdir()):
        if pin.name not in current and pin.name.startswith("bl_"):
            pin.unlink()
            report.maps_retired.append(pin.name)


def _retire_unused_links(obj: int, cfg: DatapathConfig, report: LoadReport) -> None:
    """Detach the cgroup links of programs the loaded object no longer has (an older version's hooks, e.g.
    0.3's ``bl_sock_release``): they would otherwise keep running, and keep their maps alive, until
    ``cleanup``. Runs after the new programs are attached, so no hook the object still has is ever missing.
    (The north-south links pinned beside them, ``bl_ns_*@<device>``, are the north-south loader's.)"""
    current = {libbpf.program_name(prog) for prog in libbpf.programs(obj)}
    for pin in sorted(cfg.link_dir.iterdir()):
        if pin.name in current or not pin.name.startswith("bl_") or pin.name.startswith("bl_ns_"):
            continue
        tcattach.detach(pin)  # removes the pin too
        report.programs_detached.append(pin.name)


def _attach_all(obj: int, cfg: DatapathConfig, report: LoadReport) -> None:
    cg_fd = os.open(cfg.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        want_cgroup = mounts.cgroup_id(cfg.cgroup)
        for prog in libbpf.programs(obj):
            name = libbpf.program_name(prog)
            pin = cfg.link_dir / name
            if pin.exists():
                _update_link(prog, pin, cg_fd, want_cgroup, report)
            else:
                link = libbpf.program_attach_cgroup(prog, cg_fd)
                try:
                    libbpf.link_pin(link, str(pin))
                finally:
                    libbpf.link_destroy(link)
                report.programs_attached.append(name)
    finally:
        os.close(cg_fd)


def _update_link(prog: int, pin: Path, cg_fd: int, want_cgroup: int, report: LoadReport) -> None:
    name = libbpf.program_name(prog)
    link = libbpf.link_open(str(pin))
    try:
        info = libbpf.LinkInfo()
        libbpf.obj_get_info(libbpf.link_fd(link), info)
        if info.cgroup_id != want_cgroup:
            _move_link(prog, pin, cg_fd, link)
            report.programs_moved.append(name)
            return
        old_fd = libbpf.prog_get_fd_by_id(info.prog_id)
        try:
            unchanged = _prog_tag(old_fd) == _prog_tag(libbpf.program_fd(prog))
        finally:
            os.close(old_fd)
        if unchanged:
            report.programs_unchanged.append(name)
        else:
            libbpf.link_update_program(link, prog)
            report.programs_swapped.append(name)
    finally:
        libbpf.link_destroy(link)


def _move_link(prog: int, pin: Path, cg_fd: int, old_link: int) -> None:
    """Attach on the new cgroup first, then replace the pin and detach the old link."""
    new_link = libbpf.program_attach_cgroup(prog, cg_fd)
    try:
        tmp = pin.with_name(f"new:{pin.name}")  # bpffs refuses names with a dot
        libbpf.link_pin(new_link, str(tmp))
        os.replace(tmp, pin)
        libbpf.link_detach(libbpf.link_fd(old_link))
    finally:
        libbpf.link_destroy(new_link)


def cleanup(bpffs: Path) -> list[str]:
    """Detach every pinned link and unpin every map under ``bpffs``; safe to run twice."""
    done: list[str] = []
    link_dir, map_dir = bpffs / "links", bpffs / "maps"
    for pin in sorted(link_dir.iterdir()) if link_dir.is_dir() else []:
        try:
            tcattach.detach(pin)  # a link of any kind, or a clsact filter (its qdisc too if ours and empty)
        except (OSError, errors.DatapathError) as exc:
            log.warning("detaching %s: %s", pin, exc)
        pin.unlink(missing_ok=True)
        done.append(f"detached {pin.name}")
    for pin in sorted(map_dir.iterdir()) if map_dir.is_dir() else []:
        pin.unlink(missing_ok=True)
        done.append(f"unpinned {pin.name}")
    for d in (link_dir, map_dir, bpffs):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return done
