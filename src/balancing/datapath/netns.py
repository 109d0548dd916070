"""The cookie of a network namespace, as ``bpf_get_netns_cookie()`` reports it to the datapath.

Read with ``getsockopt(SO_NETNS_COOKIE)`` on a socket created inside the namespace; for a namespace other
than our own, a short-lived thread enters it (``setns`` affects only the calling thread) to make the socket.
The agent tells the datapath which namespace is the host's, so loopback NodePorts stay the host's alone.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from pathlib import Path

SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


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
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
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
