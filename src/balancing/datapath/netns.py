"""Network namespaces: entering one, telling one apart, and its cookie as the datapath sees it.

``enter`` is the one ``setns(CLONE_NEWNET)`` of the package: it moves only the calling thread, so callers run
it in a short-lived thread of their own (``cookie_of`` here; the socket terminator, which walks many
namespaces, in ``sockterm``). ``is_netns`` says whether an open namespace file is a network namespace.

The cookie (``bpf_get_netns_cookie()`` in the datapath) is read with ``getsockopt(SO_NETNS_COOKIE)`` on a
socket created inside the namespace. The agent tells the datapath which namespace is the host's, so
loopback NodePorts stay the host's alone.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd: its CLONE_NEW* type (linux/nsfs.h, Linux >= 4.11)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def enter(fd: int, name: object = None) -> None:
    """Move the calling thread into the network namespace open as ``fd`` (the other threads stay); ``name``
    (e.g. its path) only labels the error."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns{'' if name is None else f'({name})'}: {os.strerror(err)}")


def is_netns(fd: int) -> bool:
    """Whether ``fd`` is an open network namespace (not another kind of namespace, not another file)."""
    try:
        return bool(fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET)
    except OSError:
        return False


def own_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])


def cookie_of(path: Path) -> int:
    """The cookie of the network namespace at ``path`` (``/proc/<pid>/ns/net``, ``/run/netns/<name>``)."""
    result: list[int | BaseException] = []

    def enter_and_read() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                enter(fd, path)
            finally:
                os.close(fd)
            result.append(own_cookie())
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    worker = threading.Thread(target=enter_and_read, name="netns-cookie")
    worker.start()
    worker.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
