"""Attach the north-south TC programs to the node's devices: pinned, swapped in place, moved before break.

One program per device and direction, its attachment found at a pin the caller chooses (by convention
``<bpffs>/links/<program>@<ifname>``, :func:`pin_name`). Two mechanisms:

- **tcx** (Linux >= 6.6): a BPF link, pinned like the socket hooks' cgroup links (``loader``). A restart
  updates the pinned link's program in place (atomic), or leaves it when the program's tag is unchanged.
- **clsact** (older kernels, or ``mode="clsact"``): a direct-action cls_bpf filter at a fixed handle and
  priority on the device's clsact qdisc, replaced atomically (``NLM_F_REPLACE``). A filter is no BPF object
  and cannot be pinned: its record (JSON: ifindex, direction, handle, priority, program, whether Balancing
  created the qdisc) is kept at the pin path as a *symlink* whose target is the JSON text, because bpffs
  holds pins, directories and symlinks but no regular files. ``detach`` and ``balancing cleanup`` find it
  where they find links.

A pin whose attachment is on another device (the device was recreated or renamed, so its ifindex changed),
direction or mechanism is moved make-before-break: the new attachment is made and pinned under a temporary
name, renamed over the pin, and only then is the old one detached. Everything acts in the calling thread's
network namespace (the agent runs inside the node's, ``nsenter --net``); ifindexes are that namespace's.

Neighbours: ``libbpf`` (the calls), ``loader`` (the cgroup links; its ``cleanup`` detaches every pin under
``links/``, and calls :func:`detach` here for ours), ``errors`` (``DeviceError``). Over 400 lines because the
clsact path needs a little rtnetlink of its own (adding the qdisc, counting what is on it), at the end.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from balancing import errors
from balancing.datapath import libbpf

Direction = Literal["ingress", "egress"]
Mechanism = Literal["tcx", "clsact"]
Mode = Literal["auto", "tcx", "clsact"]
Outcome = Literal["attached", "swapped", "unchanged", "moved"]

CLSACT_HANDLE = 0xBA1  # our cls_bpf filter's handle and priority on a clsact hook: one filter per hook
CLSACT_PRIORITY = 0xBA1
_TCX_TYPES: dict[Direction, int] = {"ingress": libbpf.BPF_TCX_INGRESS, "egress": libbpf.BPF_TCX_EGRESS}
_TC_POINTS: dict[Direction, int] = {"ingress": libbpf.BPF_TC_INGRESS, "egress": libbpf.BPF_TC_EGRESS}
_RETURN_ZERO = bytes.fromhex("b700000000000000 9500000000000000")  # r0 = 0; exit


@dataclass(frozen=True)
class AttachInfo:
    """What a pin attaches, for tools. ``ifindex`` is 0 when a tcx link's device is gone (the link is
    defunct); ``prog_id`` is 0 when a clsact record's filter is gone (it went with its device)."""

    ifindex: int
    direction: Direction
    prog_id: int
    mode: Mechanism

    @property
    def live(self) -> bool:
        """Whether the program still runs on a device."""
        return self.ifindex != 0 and self.prog_id != 0


@dataclass(frozen=True)
class ClsactRecord:
    """A clsact filter of ours, as recorded at its pin path."""

    ifindex: int
    direction: Direction
    handle: int
    priority: int
    program: str
    qdisc_created: bool  # Balancing added the clsact qdisc: it removes it again once no filter is left
    netns: int  # the inode of the network namespace the ifindex is of


def pin_name(program: str, ifname: str) -> str:
    """The pin's file name for ``program`` on device ``ifname``: ``<program>@<ifname>``, each ``.`` of the
    device's name (a VLAN's ``eth0.100``) written ``:`` (bpffs refuses dots in names: EPERM), a character no
    device name may contain."""
    if not program.isidentifier() or not ifname or any(c in ifname for c in "/:\0") or ifname in (".", ".."):
        raise ValueError(f"no pin name for program {program!r} on device {ifname!r}")
    return f"{program}@{ifname.replace('.', ':')}"


def ifindex_of(name: str) -> int:
    """The ifindex of device ``name`` in this network namespace (else a ``DeviceError`` naming it)."""
    try:
        return socket.if_nametoindex(name)
    except (OSError, ValueError) as exc:
        raise errors.DeviceError(name, "no such network device in this network namespace") from exc


@functools.cache
def tcx_supported() -> bool:
    """Whether the kernel has tcx: a link for a trivial SCHED_CLS program on ifindex 0 fails with ENODEV
    where tcx exists (it looked the device up) and EINVAL where it does not. Touches no device."""
    try:
        prog_fd = libbpf.prog_load(libbpf.BPF_PROG_TYPE_SCHED_CLS, "bl_tcx_probe", _RETURN_ZERO)
    except OSError:
        return False
    try:
        os.close(libbpf.link_create(prog_fd, 0, libbpf.BPF_TCX_INGRESS))
        return True  # not reached: there is no device 0
    except OSError as exc:
        return exc.errno == errno.ENODEV
    finally:
        os.close(prog_fd)


# --- attach --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pinned:
    """What a pin holds: its ``AttachInfo`` and the link fd (tcx, open while attach runs) or the record."""

    info: AttachInfo
    link_fd: int | None
    record: ClsactRecord | None


def attach(prog_fd: int, ifindex: int, direction: Direction, pin: Path, *, mode: Mode = "auto") -> Outcome:
    """Make ``pin`` attach ``prog_fd`` on device ``ifindex`` in ``direction``, never detaching on the way.

    "attached": nothing was pinned (or the pinned filter had vanished) and now it is; "unchanged": the same
    program (same tag) already runs there; "swapped": the pinned attachment now runs ``prog_fd``, replaced
    atomically; "moved": the pin was for another device, direction or mechanism: the new attachment was made
    first, then the old one detached. ``mode="auto"`` is tcx where the kernel has it, else clsact.
    """
    want: Mechanism = ("tcx" if tcx_supported() else "clsact") if mode == "auto" else mode
    try:
        with _open_pinned(pin) as old:
            if old is None:
                _discard(_temp(pin))  # left by an attach that died between pinning it and the rename
                _attach_at(want, prog_fd, ifindex, direction, pin)
                return "attached"
            if (old.info.mode, old.info.ifindex, old.info.direction) != (want, ifindex, direction):
                _move(old, want, prog_fd, ifindex, direction, pin)
                return "moved"
            if old.info.prog_id == 0:  # a clsact record whose filter is gone (someone deleted the qdisc)
                _replace_pin(want, prog_fd, ifindex, direction, pin)
                return "attached"
            return _swap(old, prog_fd, ifindex, direction)
    except OSError as exc:
        reason = f"cannot attach {pin.name} ({want} {direction}): {exc.strerror or exc}"
        raise errors.DeviceError(_device_label(ifindex), reason) from exc


def _attach_at(want: Mechanism, prog_fd: int, ifindex: int, direction: Direction, pin: Path) -> None:
    """A new attachment, pinned (tcx) or recorded (clsact) at ``pin``, which must not exist."""
    if want == "tcx":
        link_fd = libbpf.link_create(prog_fd, ifindex, _TCX_TYPES[direction])
        try:
            libbpf.obj_pin(link_fd, str(pin))
        finally:
            os.close(link_fd)  # unpinned (the pin failed), closing it detaches it
        return
    created_now = _add_clsact(ifindex)
    try:
        libbpf.tc_attach(ifindex, _TC_POINTS[direction], prog_fd, CLSACT_HANDLE, CLSACT_PRIORITY)
    except OSError:
        if created_now:
            _remove_clsact_if_empty(ifindex)
        raise
    created = created_now or _sibling_created_qdisc(pin, ifindex)
    name = _prog_name(prog_fd)
    record = ClsactRecord(ifindex, direction, CLSACT_HANDLE, CLSACT_PRIORITY, name, created, _netns_inode())
    os.symlink(json.dumps(asdict(record), sort_keys=True), pin)


def _swap(old: _Pinned, prog_fd: int, ifindex: int, direction: Direction) -> Outcome:
    if _prog_tag_of_id(old.info.prog_id) == _prog_tag(prog_fd):
        return "unchanged"
    if old.link_fd is not None:
        libbpf.link_update(old.link_fd, prog_fd)
    else:
        libbpf.tc_attach(ifindex, _TC_POINTS[direction], prog_fd, CLSACT_HANDLE, CLSACT_PRIORITY)
    return "swapped"


def _move(old: _Pinned, want: Mechanism, prog_fd: int, ifindex: int, direction: Direction, pin: Path) -> None:
    """Make-before-break: the new attachment under a temporary name, renamed over the pin, then the old
    one detached (held open by ``old.link_fd``, or found by its record). Where old and new share a hook (a
    change of mechanism) both run for that instant, tcx first."""
    _replace_pin(want, prog_fd, ifindex, direction, pin)
    if old.link_fd is not None:
        libbpf.link_detach(old.link_fd)
    elif old.record is not None:
        _detach_filter(old.record)


def _replace_pin(want: Mechanism, prog_fd: int, ifindex: int, direction: Direction, pin: Path) -> None:
    """A new attachment pinned under a temporary name, then renamed over ``pin`` (atomically)."""
    tmp = _temp(pin)
    _discard(tmp)
    _attach_at(want, prog_fd, ifindex, direction, tmp)
    os.replace(tmp, pin)


def _temp(pin: Path) -> Path:
    """Where a new attachment is pinned before the rename: ``new:<name>``, never a ``pin_name`` (no program
    name holds a colon) and without a dot (bpffs refuses them)."""
    return pin.with_name(f"new:{pin.name}")


def _discard(path: Path) -> None:
    if os.path.lexists(path):
        detach(path)


# --- detach and inspect --------------------------------------------------------------------------------


def detach(pin: Path) -> None:
    """Detach what ``pin`` attaches and remove the pin; nothing to do when there is no pin. A clsact filter is
    deleted only if it still runs our program (its device may have gone, its ifindex been reused); the
    clsact qdisc goes too when Balancing created it and no filter, ours or anyone's, is left on it."""
    if not os.path.lexists(pin):
        return
    try:
        if pin.is_symlink():
            record = _read_record(pin)
            if record.netns != _netns_inode():
                where = f"network namespace {record.netns}, this thread is in {_netns_inode()}"
                raise errors.DeviceError(
                    _device_name(pin), f"its clsact filter is in {where}: detach it there"
                )
            _detach_filter(record)
        else:
            fd = libbpf.obj_get(str(pin))
            try:
                libbpf.link_detach(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise errors.DeviceError(_device_name(pin), f"cannot detach: {exc}") from exc
    pin.unlink(missing_ok=True)


def attached(pin: Path) -> AttachInfo | None:
    """What ``pin`` attaches (None: no pin), for tools."""
    with _open_pinned(pin) as pinned:
        return None if pinned is None else pinned.info


def is_record(pin: Path) -> bool:
    """Whether ``pin`` is a clsact filter's record (not a pinned link)."""
    return pin.is_symlink()


@contextlib.contextmanager
def _open_pinned(pin: Path) -> Iterator[_Pinned | None]:
    """The pin's attachment, its link fd open for the block (tcx); None when there is no pin."""
    if not os.path.lexists(pin):
        yield None
        return
    if pin.is_symlink():
        record = _read_record(pin)
        prog_id = _our_filter(record) or 0
        yield _Pinned(AttachInfo(record.ifindex, record.direction, prog_id, "clsact"), None, record)
        return
    fd = libbpf.obj_get(str(pin))
    try:
        yield _Pinned(_tcx_info(pin, fd), fd, None)
    finally:
        os.close(fd)


def _tcx_info(pin: Path, link_fd: int) -> AttachInfo:
    info = libbpf.TcxLinkInfo()
    libbpf.obj_get_info(link_fd, info)
    directions = {v: k for k, v in _TCX_TYPES.items()}
    if info.type != libbpf.BPF_LINK_TYPE_TCX or info.attach_type not in directions:
        reason = f"a link of type {info.type} (attach type {info.attach_type}), not a tcx link"
        raise errors.IncompatiblePin(pin, reason)
    return AttachInfo(int(info.ifindex), directions[info.attach_type], int(info.prog_id), "tcx")


def _read_record(pin: Path) -> ClsactRecord:
    try:
        data = json.loads(os.readlink(pin))
        record = ClsactRecord(**data)
    except (ValueError, TypeError) as exc:
        raise errors.IncompatiblePin(pin, f"not a clsact filter record: {exc}") from exc
    if record.direction not in _TC_POINTS:
        raise errors.IncompatiblePin(pin, f"not a clsact filter record: direction {record.direction!r}")
    return record


def _our_filter(record: ClsactRecord) -> int | None:
    """The prog id of the filter at the record's handle and priority if it runs the recorded program (and
    this thread is in the record's network namespace: else the ifindex is another namespace's)."""
    if record.netns != _netns_inode():
        return None
    if not _filters_on(record.ifindex, record.direction):  # (asking libbpf would make it complain)
        return None
    prog_id = libbpf.tc_query(record.ifindex, _TC_POINTS[record.direction], record.handle, record.priority)
    if prog_id is None or _prog_name_of_id(prog_id) != record.program[:15]:
        return None
    return prog_id


def _detach_filter(record: ClsactRecord) -> None:
    if _our_filter(record) is None:
        return
    libbpf.tc_detach(record.ifindex, _TC_POINTS[record.direction], record.handle, record.priority)
    if record.qdisc_created:
        _remove_clsact_if_empty(record.ifindex)


def _remove_clsact_if_empty(ifindex: int) -> None:
    if not any(_filters_on(ifindex, direction) for direction in _CLSACT_PARENTS):
        libbpf.tc_hook_destroy(ifindex)


def _sibling_created_qdisc(pin: Path, ifindex: int) -> bool:
    """Whether another record beside ``pin`` says Balancing created this device's clsact qdisc: the claim
    is shared, so whichever of our filters goes last removes the qdisc."""
    for other in pin.parent.iterdir() if pin.parent.is_dir() else []:
        if other != pin and other.is_symlink():
            with contextlib.suppress(errors.IncompatiblePin, OSError):
                record = _read_record(other)
                if record.ifindex == ifindex and record.qdisc_created:
                    return True
    return False


# --- programs and devices ------------------------------------------------------------------------------


def _prog_info(prog_fd: int) -> libbpf.ProgInfoWithName:
    info = libbpf.ProgInfoWithName()
    libbpf.obj_get_info(prog_fd, info)
    return info


def _prog_tag(prog_fd: int) -> bytes:
    return bytes(_prog_info(prog_fd).tag)


def _prog_name(prog_fd: int) -> str:
    return bytes(_prog_info(prog_fd).name).decode(errors="replace")


def _prog_tag_of_id(prog_id: int) -> bytes:
    fd = libbpf.prog_get_fd_by_id(prog_id)
    try:
        return _prog_tag(fd)
    finally:
        os.close(fd)


def _prog_name_of_id(prog_id: int) -> str | None:
    try:
        fd = libbpf.prog_get_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        return _prog_name(fd)
    finally:
        os.close(fd)


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _device_name(pin: Path) -> str:
    """The device a pin named by ``pin_name`` is for."""
    return pin.name.partition("@")[2].replace(":", ".") or pin.name


def _device_label(ifindex: int) -> str:
    try:
        return f"{socket.if_indextoname(ifindex)} (ifindex {ifindex})"
    except OSError:
        return f"ifindex {ifindex}"


# --- rtnetlink: the clsact qdisc, and what is on it ---------------------------------------------------

_RTM_NEWQDISC, _RTM_GETTFILTER = 36, 46
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE, _NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_TCMSG = struct.Struct("=BBHiIII")  # struct tcmsg: family, pad, pad, ifindex, handle, parent, info
_TCA_KIND = 1
_TC_H_CLSACT, _CLSACT_HANDLE = 0xFFFFFFF1, 0xFFFF0000
_CLSACT_PARENTS: dict[Direction, int] = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}  # TC_H_MIN_*


def _add_clsact(ifindex: int) -> bool:
    """Add the device's clsact qdisc: True if this created it, False if one was there (``tc qdisc add dev
    DEV clsact``; libbpf's ``bpf_tc_hook_create`` would print the kernel's complaint about the latter)."""
    kind = b"clsact\0"
    attr = struct.pack("=HH", 4 + len(kind), _TCA_KIND) + kind + b"\0" * (-len(kind) % 4)
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL
    try:
        _rtnl(_RTM_NEWQDISC, flags, ifindex, _CLSACT_HANDLE, _TC_H_CLSACT, attr)
    except FileExistsError:
        return False
    return True


def _filters_on(ifindex: int, direction: Direction) -> int:
    """How many filter messages (any owner's) a dump of the device's clsact hook gives: 0 when the hook is
    empty, the qdisc or the device is gone."""
    return _rtnl(_RTM_GETTFILTER, _NLM_F_REQUEST | _NLM_F_DUMP, ifindex, 0, _CLSACT_PARENTS[direction])


def _rtnl(kind: int, flags: int, ifindex: int, handle: int, parent: int, attrs: bytes = b"") -> int:
    """One tc request in this thread's network namespace, read to its end (the ACK, or NLMSG_DONE of a
    dump): the number of messages answered; an error answer raises the ``OSError`` for its errno."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        s.settimeout(5.0)
        body = _TCMSG.pack(socket.AF_UNSPEC, 0, 0, ifindex, handle, parent, 0) + attrs
        s.send(_NLMSG.pack(_NLMSG.size + len(body), kind, flags, 1, 0) + body)
        count = 0
        while True:
            data, offset = s.recv(1 << 16), 0
            while offset + _NLMSG.size <= len(data):
                length, reply, _, _, _ = _NLMSG.unpack_from(data, offset)
                if reply == _NLMSG_DONE:
                    return count
                if reply == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    if err:
                        raise OSError(-err, f"rtnetlink type {kind} (ifindex {ifindex}): {os.strerror(-err)}")
                    return count
                count += 1
                offset += (max(length, _NLMSG.size) + 3) & ~3
