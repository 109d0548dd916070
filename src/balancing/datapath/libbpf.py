"""ctypes binding over the system ``libbpf.so.1``: only the calls Balancing uses, with errors as exceptions.

libbpf 1.x returns NULL or a negative errno and sets ``errno``; every wrapper here turns that into an
``OSError`` carrying the call's name, so callers translate it into ``balancing.errors`` types at their
boundary. Pointer-sized and fixed-size C types only: nothing here depends on the CPU architecture.

The library is opened on the first call into it, not at import: commands that never touch BPF
(``balancing --help``, ``monitor``, ``controller``) run where libbpf is not installed. When it is missing,
that first call raises ``errors.LibbpfMissing`` (a ``DatapathError`` naming the library and the package to
install), never a bare ``OSError``, so no caller mistakes it for a missing pin.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from collections.abc import Iterator
from typing import Any

from balancing import errors

LIBRARY = "libbpf.so.1"
PACKAGE = "libbpf 1.x (Debian/Ubuntu: libbpf1; Fedora/RHEL: libbpf)"

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_int = ctypes.c_int
c_uint = ctypes.c_uint
c_size_t = ctypes.c_size_t


@functools.cache
def _library() -> ctypes.CDLL:
    """The library, opened once on first use (a failure is not cached: installing it fixes the next call)."""
    try:
        return ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise errors.LibbpfMissing(LIBRARY, str(exc)) from exc


class _Fn:
    """One libbpf function, looked up (and its C signature set) on its first call."""

    __slots__ = ("_argtypes", "_c", "_name", "_restype")

    def __init__(self, name: str, restype: Any, *argtypes: Any) -> None:
        self._name, self._restype, self._argtypes = name, restype, list(argtypes)
        self._c: Any = None

    def __call__(self, *args: Any) -> Any:
        c = self._c
        if c is None:
            c = self._c = self._bind()
        return c(*args)

    def _bind(self) -> Any:
        try:
            fn = getattr(_library(), self._name)
        except AttributeError as exc:  # a libbpf older than the 1.x calls we need
            raise errors.LibbpfMissing(LIBRARY, f"it has no {self._name}") from exc
        fn.restype = self._restype
        fn.argtypes = self._argtypes
        return fn


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_object_open_file = _Fn("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
_object_load = _Fn("bpf_object__load", c_int, c_void_p)
_object_close = _Fn("bpf_object__close", None, c_void_p)
_object_next_program = _Fn("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
_object_next_map = _Fn("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
_program_name = _Fn("bpf_program__name", c_char_p, c_void_p)
_program_section = _Fn("bpf_program__section_name", c_char_p, c_void_p)
_program_fd = _Fn("bpf_program__fd", c_int, c_void_p)
_program_set_log_buf = _Fn("bpf_program__set_log_buf", c_int, c_void_p, c_char_p, c_size_t)
_program_attach_cgroup = _Fn("bpf_program__attach_cgroup", c_void_p, c_void_p, c_int)
_program_attach_iter = _Fn("bpf_program__attach_iter", c_void_p, c_void_p, c_void_p)
_map_name = _Fn("bpf_map__name", c_char_p, c_void_p)
_map_fd = _Fn("bpf_map__fd", c_int, c_void_p)
_map_set_max_entries = _Fn("bpf_map__set_max_entries", c_int, c_void_p, ctypes.c_uint32)
_map_max_entries = _Fn("bpf_map__max_entries", ctypes.c_uint32, c_void_p)
_map_reuse_fd = _Fn("bpf_map__reuse_fd", c_int, c_void_p, c_int)
_link_pin = _Fn("bpf_link__pin", c_int, c_void_p, c_char_p)
_link_open = _Fn("bpf_link__open", c_void_p, c_char_p)
_link_update_program = _Fn("bpf_link__update_program", c_int, c_void_p, c_void_p)
_link_fd = _Fn("bpf_link__fd", c_int, c_void_p)
_link_destroy = _Fn("bpf_link__destroy", c_int, c_void_p)
_link_detach = _Fn("bpf_link_detach", c_int, c_int)
_obj_pin = _Fn("bpf_obj_pin", c_int, c_int, c_char_p)
_obj_get = _Fn("bpf_obj_get", c_int, c_char_p)
_obj_get_info = _Fn("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32))
_map_update = _Fn("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, ctypes.c_uint64)
_map_lookup = _Fn("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_map_delete = _Fn("bpf_map_delete_elem", c_int, c_int, c_void_p)
_map_next_key = _Fn("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_map_update_batch = _Fn(
    "bpf_map_update_batch", c_int, c_int, c_void_p, c_void_p, ctypes.POINTER(ctypes.c_uint32), c_void_p
)
_map_delete_batch = _Fn(
    "bpf_map_delete_batch", c_int, c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32), c_void_p
)
_map_lookup_batch = _Fn(
    "bpf_map_lookup_batch",
    c_int,
    c_int,
    c_void_p,
    c_void_p,
    c_void_p,
    c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
    c_void_p,
)
_num_possible_cpus = _Fn("libbpf_num_possible_cpus", c_int)
_prog_get_fd_by_id = _Fn("bpf_prog_get_fd_by_id", c_int, ctypes.c_uint32)
_iter_create = _Fn("bpf_iter_create", c_int, c_int)

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RingBufferSampleFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
_ring_buffer_new = _Fn("ring_buffer__new", c_void_p, c_int, RingBufferSampleFn, c_void_p, c_void_p)
_ring_buffer_free = _Fn("ring_buffer__free", None, c_void_p)
_ring_buffer_poll = _Fn("ring_buffer__poll", c_int, c_void_p, c_int)
_ring_buffer_consume = _Fn("ring_buffer__consume", c_int, c_void_p)
_ring_buffer_epoll_fd = _Fn("ring_buffer__epoll_fd", c_int, c_void_p)


_strerror = _Fn("libbpf_strerror", c_int, c_int, c_char_p, ctypes.c_size_t)
_LIBBPF_ERRNO_BASE = 4000  # libbpf's own codes (LIBBPF_ERRNO__FORMAT and on) that os.strerror cannot name


def _error(call: str, ret: int | None = None) -> OSError:
    err = ctypes.get_errno() or (-ret if ret is not None and ret < 0 else 0) or 1
    return OSError(err, f"{call}: {_describe(err)}")


def _describe(err: int) -> str:
    if err < _LIBBPF_ERRNO_BASE:
        return os.strerror(err)
    buf = ctypes.create_string_buffer(128)
    _strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace") or f"libbpf error {err}"


def _check(call: str, ret: int) -> int:
    if ret < 0:
        raise _error(call, ret)
    return ret


def _ptr(call: str, ptr: int | None) -> int:
    if not ptr:
        raise _error(call)
    return ptr


# --- objects, programs, maps, links --------------------------------------------------------------------


def object_open(path: str) -> int:
    ctypes.set_errno(0)
    return _ptr(f"bpf_object__open_file({path})", _object_open_file(path.encode(), None))


def object_load(obj: int) -> None:
    ctypes.set_errno(0)
    _check("bpf_object__load", _object_load(obj))


def object_close(obj: int) -> None:
    _object_close(obj)


def programs(obj: int) -> Iterator[int]:
    prog = _object_next_program(obj, None)
    while prog:
        yield prog
        prog = _object_next_program(obj, prog)


def maps(obj: int) -> Iterator[int]:
    m = _object_next_map(obj, None)
    while m:
        yield m
        m = _object_next_map(obj, m)


def program_name(prog: int) -> str:
    return bytes(_program_name(prog)).decode()


def program_section(prog: int) -> str:
    return bytes(_program_section(prog)).decode()


def program_fd(prog: int) -> int:
    return _check("bpf_program__fd", _program_fd(prog))


def program_set_log_buf(prog: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    _check("bpf_program__set_log_buf", _program_set_log_buf(prog, buf, len(buf)))


def program_attach_cgroup(prog: int, cgroup_fd: int) -> int:
    ctypes.set_errno(0)
    return _ptr("bpf_program__attach_cgroup", _program_attach_cgroup(prog, cgroup_fd))


def program_attach_iter(prog: int) -> int:
    """A link for an iterator program (no target: the kernel's default, e.g. every UDP socket of the netns
    the reader is in); ``iter_create`` on its fd makes one readable instance."""
    ctypes.set_errno(0)
    return _ptr("bpf_program__attach_iter", _program_attach_iter(prog, None))


def iter_create(link_fd: int) -> int:
    """A new iterator instance (an fd to read to the end, then close); it walks the objects of the calling
    thread's network namespace as it is now."""
    ctypes.set_errno(0)
    return _check("bpf_iter_create", _iter_create(link_fd))


def map_name(m: int) -> str:
    return bytes(_map_name(m)).decode()


def map_fd(m: int) -> int:
    return _check("bpf_map__fd", _map_fd(m))


def map_max_entries(m: int) -> int:
    return int(_map_max_entries(m))


def map_set_max_entries(m: int, n: int) -> None:
    _check("bpf_map__set_max_entries", _map_set_max_entries(m, n))


def map_reuse_fd(m: int, fd: int) -> None:
    ctypes.set_errno(0)
    _check("bpf_map__reuse_fd", _map_reuse_fd(m, fd))


def link_pin(link: int, path: str) -> None:
    ctypes.set_errno(0)
    _check(f"bpf_link__pin({path})", _link_pin(link, path.encode()))


def link_open(path: str) -> int:
    ctypes.set_errno(0)
    return _ptr(f"bpf_link__open({path})", _link_open(path.encode()))


def link_update_program(link: int, prog: int) -> None:
    ctypes.set_errno(0)
    _check("bpf_link__update_program", _link_update_program(link, prog))


def link_fd(link: int) -> int:
    return _check("bpf_link__fd", _link_fd(link))


def link_destroy(link: int) -> None:
    """Free libbpf's handle; a pinned link stays attached (the pin holds a reference)."""
    _link_destroy(link)


def link_detach(fd: int) -> None:
    ctypes.set_errno(0)
    _check("bpf_link_detach", _link_detach(fd))


def obj_pin(fd: int, path: str) -> None:
    ctypes.set_errno(0)
    _check(f"bpf_obj_pin({path})", _obj_pin(fd, path.encode()))


def obj_get(path: str) -> int:
    ctypes.set_errno(0)
    return _check(f"bpf_obj_get({path})", _obj_get(path.encode()))


def obj_get_info(fd: int, info: ctypes.Structure) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ctypes.set_errno(0)
    _check("bpf_obj_get_info_by_fd", _obj_get_info(fd, ctypes.byref(info), ctypes.byref(size)))


def prog_get_fd_by_id(prog_id: int) -> int:
    ctypes.set_errno(0)
    return _check("bpf_prog_get_fd_by_id", _prog_get_fd_by_id(prog_id))


class MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info`` (the kernel accepts a shorter buffer)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class ProgInfo(ctypes.Structure):
    """The head of ``struct bpf_prog_info``."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


class LinkInfo(ctypes.Structure):
    """``struct bpf_link_info`` up to the cgroup member of its union."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("attach_type", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


# --- ring buffers --------------------------------------------------------------------------------------


def ring_buffer_new(map_fd: int, sample: Any) -> int:
    """A ring buffer reader of ``map_fd`` calling ``sample`` (a ``RingBufferSampleFn``, which the caller keeps
    alive until ``ring_buffer_free``) for each record."""
    ctypes.set_errno(0)
    return _ptr("ring_buffer__new", _ring_buffer_new(map_fd, sample, None, None))


def ring_buffer_free(rb: int) -> None:
    _ring_buffer_free(rb)


def ring_buffer_poll(rb: int, timeout_ms: int) -> int:
    """Wait up to ``timeout_ms`` for a wakeup, then consume; the records consumed (EINTR raises
    ``InterruptedError``)."""
    ctypes.set_errno(0)
    return _check("ring_buffer__poll", int(_ring_buffer_poll(rb, timeout_ms)))


def ring_buffer_consume(rb: int) -> int:
    """Consume every queued record without waiting; the records consumed."""
    ctypes.set_errno(0)
    return _check("ring_buffer__consume", int(_ring_buffer_consume(rb)))


def ring_buffer_epoll_fd(rb: int) -> int:
    return _check("ring_buffer__epoll_fd", int(_ring_buffer_epoll_fd(rb)))


# --- map element operations ----------------------------------------------------------------------------

BPF_ANY = 0


def map_update(fd: int, key: bytes, value: bytes) -> None:
    ctypes.set_errno(0)
    _check("bpf_map_update_elem", _map_update(fd, key, value, BPF_ANY))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    ctypes.set_errno(0)
    if _map_lookup(fd, key, buf) < 0:
        if ctypes.get_errno() == 2:
            return None
        raise _error("bpf_map_lookup_elem")
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete one key; False when it was not there."""
    ctypes.set_errno(0)
    if _map_delete(fd, key) < 0:
        if ctypes.get_errno() == 2:
            return False
        raise _error("bpf_map_delete_elem")
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (a snapshot; concurrent deletes may shorten it)."""
    keys: list[bytes] = []
    cur = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    prev: ctypes.Array[ctypes.c_char] | None = None
    while True:
        ctypes.set_errno(0)
        if _map_next_key(fd, prev, nxt) < 0:
            if ctypes.get_errno() == 2:
                return keys
            raise _error("bpf_map_get_next_key")
        keys.append(nxt.raw)
        ctypes.memmove(cur, nxt, key_size)
        prev = cur


Buffer = bytes | bytearray | memoryview


def _pointer(data: Buffer) -> bytes | ctypes.Array[ctypes.c_char]:
    """What a ``c_void_p`` argument takes for ``data``, without a copy: bytes as they are, a writable buffer
    (a bytearray or a slice of one) through a ctypes array over it, which holds the buffer's export (it cannot
    be resized) until the array is dropped."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data)
    return (ctypes.c_char * view.nbytes).from_buffer(view)


def map_update_batch(fd: int, keys: Buffer, values: Buffer, count: int) -> None:
    """Update ``count`` packed keys/values in one syscall (the GIL is released for its duration)."""
    n = ctypes.c_uint32(count)
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
    key_ptr, value_ptr = _pointer(keys), _pointer(values)
    ctypes.set_errno(0)
    _check(
        "bpf_map_update_batch",
        _map_update_batch(fd, key_ptr, value_ptr, ctypes.byref(n), ctypes.byref(opts)),
    )


def map_delete_batch(fd: int, keys: bytes, count: int) -> None:
    n = ctypes.c_uint32(count)
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
    ctypes.set_errno(0)
    _check("bpf_map_delete_batch", _map_delete_batch(fd, keys, ctypes.byref(n), ctypes.byref(opts)))


@functools.cache
def possible_cpus() -> int:
    """The number of possible CPUs: per-CPU maps hold one value slot for each (not just online ones)."""
    n = int(_num_possible_cpus())
    if n <= 0:
        raise OSError(-n or errno.EINVAL, f"libbpf_num_possible_cpus: {os.strerror(-n or errno.EINVAL)}")
    return n


BATCH_BYTES = 1 << 20  # value bytes per batched lookup: bounds the buffers whatever the map or CPU count


def map_batches(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, memoryview, int]]:
    """(keys, values, count) per batched lookup of a hash map; ``value_size`` per key as the kernel fills it
    (for per-CPU maps: every possible CPU's slot). Buffers are reused: consume each batch before the next."""
    chunk = max(64, BATCH_BYTES // max(value_size, 1))
    in_batch = ctypes.create_string_buffer(max(key_size, 8))
    out_batch = ctypes.create_string_buffer(max(key_size, 8))
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
    first = True
    while True:
        n = ctypes.c_uint32(chunk)
        ctypes.set_errno(0)
        ret = _map_lookup_batch(
            fd, None if first else in_batch, out_batch, keys, values, ctypes.byref(n), ctypes.byref(opts)
        )
        err = ctypes.get_errno() if ret < 0 else 0
        if ret < 0 and err != errno.ENOENT:
            raise _error("bpf_map_lookup_batch", ret)
        if n.value:
            yield keys.raw[: n.value * key_size], memoryview(values)[: n.value * value_size], n.value
        if err == errno.ENOENT:
            return
        ctypes.memmove(in_batch, out_batch, len(out_batch))
        first = False


def map_dump(fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map through batched lookups (a snapshot; fast for large maps)."""
    out: list[tuple[bytes, bytes]] = []
    for keys, values, n in map_batches(fd, key_size, value_size):
        raw = bytes(values)
        out.extend(
            (keys[i * key_size : (i + 1) * key_size], raw[i * value_size : (i + 1) * value_size])
            for i in range(n)
        )
    return out


# --- maps made outside an object (the Maglev tables north-south swaps into bl_mglv_v1) --------------------

BPF_MAP_TYPE_ARRAY = 2
BPF_F_INNER_MAP = 1 << 12  # an inner map whose size may differ from the outer map's template


class _MapCreateOpts(ctypes.Structure):
    """``struct bpf_map_create_opts`` (libbpf 1.1): the fields up to map_ifindex."""

    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


_map_create = _Fn(
    "bpf_map_create",
    c_int,
    c_int,
    c_char_p,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.POINTER(_MapCreateOpts),
)
_map_get_fd_by_id = _Fn("bpf_map_get_fd_by_id", c_int, ctypes.c_uint32)


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0
) -> int:
    """A new map's fd (the caller closes it; the map lives while an fd, a pin or an outer map holds it)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    ctypes.set_errno(0)
    return _check(
        "bpf_map_create",
        int(_map_create(map_type, name.encode(), key_size, value_size, max_entries, ctypes.byref(opts))),
    )


def map_get_fd_by_id(map_id: int) -> int:
    ctypes.set_errno(0)
    return _check("bpf_map_get_fd_by_id", int(_map_get_fd_by_id(map_id)))


# --- TC: tcx links and clsact filters (the north-south programs on the node's devices) --------------------
# libbpf 1.1 predates tcx (Linux 6.6): its bpf_link_create passes the attach types it does not know
# (BPF_TCX_*) through to the kernel unchanged, and bpf_link_update works on any link. The clsact calls
# (bpf_tc_*) speak rtnetlink in the calling thread's network namespace. (tcattach adds the clsact qdisc
# itself: bpf_tc_hook_create prints the kernel's complaint to stderr when the qdisc is there already.)

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_TCX_INGRESS = 46  # enum bpf_attach_type (Linux >= 6.6)
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11  # enum bpf_link_type
BPF_TC_INGRESS = 1 << 0  # enum bpf_tc_attach_point
BPF_TC_EGRESS = 1 << 1
BPF_TC_F_REPLACE = 1 << 0  # enum bpf_tc_flags


class TcHook(ctypes.Structure):
    """``struct bpf_tc_hook``: a device's clsact hook (``size_t :0`` pads it to 24 bytes, as ctypes does)."""

    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_uint),
        ("parent", ctypes.c_uint32),
    ]


class TcOpts(ctypes.Structure):
    """``struct bpf_tc_opts``: one cls_bpf filter (32 bytes)."""

    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


class TcxLinkInfo(ctypes.Structure):
    """``struct bpf_link_info`` up to its union's ``tcx`` member (the union starts at offset 16)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
    ]


class ProgInfoWithName(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``name`` (``ProgInfo`` stops at the tag)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


_prog_load = _Fn("bpf_prog_load", c_int, c_int, c_char_p, c_char_p, c_void_p, c_size_t, c_void_p)
_link_create = _Fn("bpf_link_create", c_int, c_int, c_int, c_int, c_void_p)
_link_update = _Fn("bpf_link_update", c_int, c_int, c_int, c_void_p)
_tc_hook_destroy = _Fn("bpf_tc_hook_destroy", c_int, ctypes.POINTER(TcHook))
_tc_attach = _Fn("bpf_tc_attach", c_int, ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts))
_tc_detach = _Fn("bpf_tc_detach", c_int, ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts))
_tc_query = _Fn("bpf_tc_query", c_int, ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts))


def prog_load(prog_type: int, name: str, insns: bytes) -> int:
    """Load raw instructions (8 bytes each, GPL) as a program; its fd (the caller closes it). For probes."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    ctypes.set_errno(0)
    return _check(
        f"bpf_prog_load({name})",
        int(_prog_load(prog_type, name.encode(), b"GPL", buf, len(insns) // 8, None)),
    )


def link_create(prog_fd: int, target: int, attach_type: int) -> int:
    """``BPF_LINK_CREATE`` without options (tcx: ``target`` is the ifindex, appended last); the link's fd."""
    ctypes.set_errno(0)
    return _check("bpf_link_create", int(_link_create(prog_fd, target, attach_type, None)))


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program a link runs, atomically."""
    ctypes.set_errno(0)
    _check("bpf_link_update", int(_link_update(link_fd, prog_fd, None)))


def _tc_hook(ifindex: int, attach_point: int) -> TcHook:
    return TcHook(sz=ctypes.sizeof(TcHook), ifindex=ifindex, attach_point=attach_point)


def _tc_opts(handle: int, priority: int, prog_fd: int = 0, flags: int = 0) -> TcOpts:
    return TcOpts(sz=ctypes.sizeof(TcOpts), prog_fd=prog_fd, flags=flags, handle=handle, priority=priority)


def tc_hook_destroy(ifindex: int) -> None:
    """Delete the device's clsact qdisc, and with it every filter on both its hooks."""
    hook = _tc_hook(ifindex, BPF_TC_INGRESS | BPF_TC_EGRESS)
    ctypes.set_errno(0)
    _check(f"bpf_tc_hook_destroy(ifindex {ifindex})", int(_tc_hook_destroy(ctypes.byref(hook))))


def tc_attach(ifindex: int, attach_point: int, prog_fd: int, handle: int, priority: int) -> int:
    """Add or atomically replace the direct-action cls_bpf filter at ``handle``/``priority``: its prog id."""
    hook = _tc_hook(ifindex, attach_point)
    opts = _tc_opts(handle, priority, prog_fd, BPF_TC_F_REPLACE)
    ctypes.set_errno(0)
    _check(f"bpf_tc_attach(ifindex {ifindex})", int(_tc_attach(ctypes.byref(hook), ctypes.byref(opts))))
    return int(opts.prog_id)


def tc_detach(ifindex: int, attach_point: int, handle: int, priority: int) -> None:
    hook = _tc_hook(ifindex, attach_point)
    opts = _tc_opts(handle, priority)
    ctypes.set_errno(0)
    _check(f"bpf_tc_detach(ifindex {ifindex})", int(_tc_detach(ctypes.byref(hook), ctypes.byref(opts))))


def tc_query(ifindex: int, attach_point: int, handle: int, priority: int) -> int | None:
    """The prog id of the cls_bpf filter at ``handle``/``priority``; None when there is none."""
    hook = _tc_hook(ifindex, attach_point)
    opts = _tc_opts(handle, priority)
    ctypes.set_errno(0)
    ret = int(_tc_query(ctypes.byref(hook), ctypes.byref(opts)))
    if ret == -errno.ENOENT:
        return None
    _check(f"bpf_tc_query(ifindex {ifindex})", ret)
    return int(opts.prog_id)
