"""Load the north-south object and attach it to the node's devices, never detaching on the way.

``bpf/nodeport.c`` (TC programs ``bl_ns_ingress``/``bl_ns_egress``) shares the datapath's frontend, backend,
counter, event, Maglev and source-range maps: ``load`` points those at the datapath's pins (``loader.load``
runs first and creates them), reuses or creates and pins its own (connection tracking, devices, settings,
counters), writes the settings (Maglev table size, SNAT port range) and each device's SNAT addresses, and
attaches both programs to every device through ``tcattach`` (tcx links pinned under ``<bpffs>/links`` as
``<program>@<device>``, swapped in place on upgrade; clsact filters where the kernel has no tcx). Devices no
longer configured are detached and forgotten. ``device_addresses`` finds a device's addresses (the SNAT
source towards remote backends) and ``devices_with`` the devices holding given addresses (the default
devices: those with this Node's addresses). Neighbours: ``loader`` (the socket hooks' object, the
``LoadReport`` both fill), ``tcattach``, ``libbpf``, ``abi``.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from balancing import errors
from balancing.datapath import abi, libbpf, loader, tcattach
from balancing.model.desired import IPAddress, parse_ip

log = logging.getLogger(__name__)

PROGRAMS: dict[str, tcattach.Direction] = {"bl_ns_ingress": "ingress", "bl_ns_egress": "egress"}
# Below the NodePort range (30000-32767) and Linux's default ephemeral range (32768-60999); 10,000 ports per
# (node address, backend), each held until its flow expires (bench/nodeport.py: 4,536 ran out at 30k conn/s).
DEFAULT_SNAT_PORTS = (20000, 29999)


@dataclass(frozen=True)
class NorthSouthConfig:
    """Where north-south runs: the object, the agent's bpffs, the devices and the settings."""

    object_path: Path
    bpffs: Path
    devices: tuple[str, ...]
    maglev_size: int = abi.DEFAULT_MAGLEV_SIZE
    snat_ports: tuple[int, int] = DEFAULT_SNAT_PORTS
    max_conntrack: int = abi.DEFAULT_CT_ENTRIES
    attach_mode: tcattach.Mode = (
        "auto"  # tcattach mode: "auto" (tcx where the kernel has it), "tcx", "clsact"
    )

    @property
    def map_dir(self) -> Path:
        return self.bpffs / "maps"

    @property
    def link_dir(self) -> Path:
        return self.bpffs / "links"


def device_addresses(device: str) -> tuple[IPAddress | None, IPAddress | None]:
    """The device's primary IPv4 address and first global IPv6 address (None where it has none)."""
    ifindex = tcattach.ifindex_of(device)
    v4: IPAddress | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", device.encode()[:15]))  # SIOCGIFADDR
            v4 = parse_ip(socket.inet_ntoa(raw[20:24]))
        except OSError:
            v4 = None
    return v4, _global_ipv6(ifindex)


def _global_ipv6(ifindex: int) -> IPAddress | None:
    """The first global, settled IPv6 address of the device (/proc/net/if_inet6: address, ifindex, prefix
    length, scope, flags; scope 0 is global, flag 0x40 tentative)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or int(fields[1], 16) != ifindex or int(fields[3], 16) != 0:
            continue
        if int(fields[4], 16) & 0x40:
            continue
        return parse_ip(":".join(fields[0][i : i + 4] for i in range(0, 32, 4)))
    return None


def devices_with(addresses: Iterable[IPAddress]) -> tuple[str, ...]:
    """The devices (of this network namespace) that hold any of ``addresses``, sorted."""
    wanted = set(addresses)
    found = []
    for _, name in socket.if_nameindex():
        if name == "lo":
            continue
        try:
            if wanted.intersection(a for a in device_addresses(name) if a is not None):
                found.append(name)
        except errors.DeviceError:
            continue  # gone meanwhile
    return tuple(sorted(found))


def load(cfg: NorthSouthConfig, report: loader.LoadReport | None = None) -> loader.LoadReport:
    """Load ``nodeport.o`` against the datapath's pins, write the settings and devices, attach every device.

    Raises ``errors.DeviceError`` naming a device that does not exist or has no address for SNAT (nothing is
    attached then), ``errors.BpfLoadError`` if the kernel refuses the programs.
    """
    report = report or loader.LoadReport()
    devices = [(name, tcattach.ifindex_of(name), *device_addresses(name)) for name in cfg.devices]
    for name, _ifindex, v4, v6 in devices:
        if v4 is None and v6 is None:
            raise errors.DeviceError(name, "has no IPv4 or global IPv6 address to translate sources to")
    cfg.map_dir.mkdir(parents=True, exist_ok=True)
    cfg.link_dir.mkdir(parents=True, exist_ok=True)
    try:
        obj = libbpf.object_open(str(cfg.object_path))
    except OSError as exc:
        raise errors.BpfObjectError(cfg.object_path, str(exc.strerror or exc).rpartition(": ")[2]) from exc
    held: list[int] = []
    try:
        _prepare_maps(obj, cfg, report, held)
        log_bufs = {}
        for prog in libbpf.programs(obj):
            buf = ctypes.create_string_buffer(loader.LOG_BUF_SIZE)
            libbpf.program_set_log_buf(prog, buf)
            log_bufs[libbpf.program_name(prog)] = buf
        loader.load_object(obj, log_bufs)
        for m in libbpf.maps(obj):
            name = libbpf.map_name(m)
            if name in abi.NODEPORT_MAPS and name not in report.maps_reused:
                libbpf.obj_pin(libbpf.map_fd(m), str(cfg.map_dir / name))
                report.maps_created.append(name)
        _write_settings(obj, cfg, devices)
        _attach(obj, cfg, [(name, ifindex) for name, ifindex, _, _ in devices], report)
    finally:
        libbpf.object_close(obj)
        for fd in held:
            os.close(fd)
    return report


def _prepare_maps(obj: int, cfg: NorthSouthConfig, report: loader.LoadReport, held: list[int]) -> None:
    """Shared maps point at the datapath's pins (which must exist); our own at theirs when pinned."""
    for m in libbpf.maps(obj):
        name = libbpf.map_name(m)
        pin = cfg.map_dir / name
        if name == abi.MAP_CONNTRACK:
            libbpf.map_set_max_entries(m, cfg.max_conntrack)
        if name not in abi.NODEPORT_MAPS and not pin.exists():
            raise errors.IncompatiblePin(
                path=str(pin), reason="the datapath's map is not pinned: load the datapath first"
            )
        if not pin.exists():
            continue
        fd = libbpf.obj_get(str(pin))
        held.append(fd)
        info = libbpf.MapInfo()
        libbpf.obj_get_info(fd, info)
        libbpf.map_set_max_entries(m, info.max_entries)
        if name == abi.MAP_CONNTRACK and info.max_entries != cfg.max_conntrack:
            report.warnings.append(
                f"map {name} is pinned with {info.max_entries} entries, configured {cfg.max_conntrack}: "
                "keeping the pinned size (run `balancing cleanup` to resize)"
            )
        try:
            libbpf.map_reuse_fd(m, fd)
        except OSError as exc:
            raise errors.IncompatiblePin(path=str(pin), reason=str(exc)) from exc
        if name in abi.NODEPORT_MAPS:
            report.maps_reused.append(name)


def _map_fd(obj: int, name: str) -> int:
    for m in libbpf.maps(obj):
        if libbpf.map_name(m) == name:
            return libbpf.map_fd(m)
    raise KeyError(name)


def _write_settings(
    obj: int, cfg: NorthSouthConfig, devices: Sequence[tuple[str, int, IPAddress | None, IPAddress | None]]
) -> None:
    """The settings, then each device's SNAT addresses; devices no longer configured are forgotten."""
    low, high = cfg.snat_ports
    libbpf.map_update(
        _map_fd(obj, abi.MAP_NS_CONFIG), abi.CONFIG_KEY, abi.pack_ns_config(cfg.maglev_size, low, high)
    )
    dev_fd = _map_fd(obj, abi.MAP_NS_DEVICES)
    wanted = {abi.pack_u32(ifindex): abi.pack_nsdev(v4, v6) for _, ifindex, v4, v6 in devices}
    for key, value in wanted.items():
        libbpf.map_update(dev_fd, key, value)
    for key in libbpf.map_keys(dev_fd, 4):
        if key not in wanted:
            libbpf.map_delete(dev_fd, key)


def _attach(
    obj: int, cfg: NorthSouthConfig, devices: Sequence[tuple[str, int]], report: loader.LoadReport
) -> None:
    """Both programs on every device; then links of devices no longer configured are detached."""
    wanted: set[str] = set()
    for prog in libbpf.programs(obj):
        program = libbpf.program_name(prog)
        direction = PROGRAMS[program]
        for device, ifindex in devices:
            pin = cfg.link_dir / tcattach.pin_name(program, device)
            wanted.add(pin.name)
            outcome = tcattach.attach(libbpf.program_fd(prog), ifindex, direction, pin, mode=cfg.attach_mode)
            getattr(report, _OUTCOMES[outcome]).append(pin.name)
    for pin in sorted(cfg.link_dir.glob("bl_ns_*@*")):
        if pin.name not in wanted:
            tcattach.detach(pin)
            report.programs_detached.append(pin.name)


_OUTCOMES = {
    "attached": "programs_attached",
    "swapped": "programs_swapped",
    "unchanged": "programs_unchanged",
    "moved": "programs_moved",
}


def parse_snat_ports(text: str) -> tuple[int, int]:
    """``LOW-HIGH`` (inclusive, 1..65535); ValueError saying what is wrong."""
    low_text, sep, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port range LOW-HIGH") from None
    if not sep or not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r} is not a port range LOW-HIGH with 1 <= LOW <= HIGH <= 65535")
    return low, high
