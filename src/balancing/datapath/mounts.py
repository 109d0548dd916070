"""Find and prepare the file systems the datapath lives on: bpffs (pins) and the cgroup2 hierarchy.

bpffs is often not mounted at boot; ``ensure_bpffs`` mounts it at /sys/fs/bpf. The cgroup2 root is read
from the mount table (``/sys/fs/cgroup`` on pure-v2 hosts, ``/sys/fs/cgroup/unified`` on hybrid ones).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

BPFFS_ROOT = Path("/sys/fs/bpf")
_libc = ctypes.CDLL(None, use_errno=True)


def _mounts() -> list[tuple[Path, str]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((Path(parts[1].replace("\\040", " ")), parts[2]))
    return out


def fs_type_of(path: Path) -> str | None:
    """The file system type of the longest mount point containing ``path``."""
    best: tuple[int, str] | None = None
    resolved = path.resolve()
    for mnt, fstype in _mounts():
        if resolved == mnt or mnt in resolved.parents:
            depth = len(mnt.parts)
            if best is None or depth >= best[0]:
                best = (depth, fstype)
    return best[1] if best else None


def ensure_bpffs(pin_dir: Path) -> None:
    """Make sure ``pin_dir`` lies on bpffs, mounting /sys/fs/bpf when nothing is mounted there."""
    if fs_type_of(pin_dir) != "bpf":
        if pin_dir.resolve() != BPFFS_ROOT and BPFFS_ROOT not in pin_dir.resolve().parents:
            raise OSError(
                f"{pin_dir} is not on a bpf file system (mount one, or use a path under /sys/fs/bpf)"
            )
        if fs_type_of(BPFFS_ROOT) != "bpf":
            BPFFS_ROOT.mkdir(parents=True, exist_ok=True)
            if _libc.mount(b"bpf", str(BPFFS_ROOT).encode(), b"bpf", 0, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount -t bpf bpf {BPFFS_ROOT}: {os.strerror(err)}")
    pin_dir.mkdir(parents=True, exist_ok=True)


def cgroup2_root() -> Path:
    """The mount point of the cgroup v2 hierarchy."""
    for mnt, fstype in _mounts():
        if fstype == "cgroup2":
            return mnt
    raise OSError("no cgroup2 file system is mounted (the socket hooks attach only to cgroup v2)")


def cgroup_id(path: Path) -> int:
    """The cgroup id the kernel reports for a cgroup2 directory (its inode number)."""
    return os.stat(path).st_ino
