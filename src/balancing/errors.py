"""The project-wide error hierarchy: every error Balancing raises or reports on purpose.

::

    BalancingError
    ├── SourceError                   input could not be read
    │   ├── ObjectError               one input object is invalid (obj, field, message)
    │   │   ├── ManifestError         ... in a manifest file/document (file, document)
    │   │   └── KubeObjectError       ... as the API server served it
    │   ├── KubeconfigError           a kubeconfig is unusable (file, context, field)
    │   │   └── CredentialError       credentials could not be had for a request (an exec plugin failed)
    │   └── Gone                      the API server no longer has the version to resume from (HTTP 410)
    ├── DatapathError                 the kernel side failed
    │   ├── LibbpfMissing             libbpf.so.1 cannot be loaded (library, reason)
    │   ├── BpfObjectError            the compiled BPF object cannot be opened (path, reason)
    │   ├── BpfLoadError              a BPF program was rejected (program, verifier log)
    │   ├── MapError                  a map operation failed (map, op, errno)
    │   ├── MapFull                   a map has no room left (map, capacity)
    │   ├── FrontendWriteError        one frontend could not be programmed (frontend, map, reason)
    │   ├── IncompatiblePin           a pinned object cannot be reused (path, reason)
    │   └── DeviceError               a network device cannot be used (device, reason)
    └── ConfigError                   a command-line flag or setting is wrong (flag)

Every error carries the object, field, map or flag it concerns as attributes, and ``str()`` gives one line a
person can act on. Plain data only: no I/O, imports nothing from the project, so every layer may import it.
"""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path


class BalancingError(Exception):
    """Base of every error Balancing raises on purpose."""


# --- sources -------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with control characters escaped: what an input names (a file, an object, a key) must never
    start a new, forged line in a log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SourceError(BalancingError):
    """An input (manifest directory, API server) could not be read or holds invalid objects."""


class ObjectError(SourceError):
    """One object a source read is invalid: ``obj`` names it (``"Service default/web"``, else ``""``),
    ``field`` is the dotted field path (``"spec.ports[0].port"``, else ``""``). A source reports these in its
    updates and keeps the object's last good version; where the object came from is the subclass's."""

    def __init__(self, obj: str, field: str, message: str) -> None:
        super().__init__(obj, field, message)
        self.obj = obj
        self.field = field
        self.message = message

    def __str__(self) -> str:
        field = f"{self.field}: " if self.field else ""
        return printable(f"{self.obj or '?'}: {field}{self.message}")


class KubeObjectError(ObjectError):
    """An object as the API server served it is invalid."""

    def __str__(self) -> str:
        return f"API server object {super().__str__()}"


class KubeconfigError(SourceError):
    """A kubeconfig is unusable: ``file`` (the file, or the files merged), ``context`` (or ""), ``field``
    (``users[admin].exec.apiVersion``, or "") and what is wrong."""

    def __init__(self, file: str, context: str, field: str, message: str) -> None:
        super().__init__(file, context, field, message)
        self.file, self.context, self.field, self.message = file, context, field, message

    def __str__(self) -> str:
        where = [f"kubeconfig {self.file}"]
        where += [f"context {self.context!r}"] if self.context else []
        where += [self.field] if self.field else []
        return f"{', '.join(where)}: {self.message}"


class CredentialError(KubeconfigError, ValueError):
    """Credentials could not be had for a request (an exec plugin failed). A ``ValueError`` too: the
    informers retry those with backoff, as they do any failed request."""


class Gone(SourceError):
    """The resourceVersion to resume a watch from is too old (HTTP 410): the informer relists."""


class ManifestError(ObjectError):
    """One manifest file, or one document in it, is invalid.

    ``document`` is 1-based (0: the whole file, e.g. unreadable); ``obj`` names the object when known
    (``"Service default/web"``, else ``""``); ``field`` is the dotted field path (``"spec.ports[0].port"``,
    else ``""``).
    """

    def __init__(self, file: Path | str, document: int, obj: str, field: str, message: str) -> None:
        super().__init__(obj, field, message)
        self.args = (file, document, obj, field, message)
        self.file = Path(file)
        self.document = document

    def __str__(self) -> str:
        where = str(self.file)
        if self.document:
            where += f" document {self.document}"
        if self.obj:
            where += f" ({self.obj})"
        field = f"{self.field}: " if self.field else ""
        return printable(f"{where}: {field}{self.message}")


# --- datapath ------------------------------------------------------------------------------------------


class DatapathError(BalancingError):
    """The kernel side (BPF programs, maps, pins, cgroup attachment) failed."""


class LibbpfMissing(DatapathError):
    """``libbpf.so.1`` (or one of the functions Balancing calls) cannot be loaded: ``library`` and why."""

    def __init__(self, library: str, reason: str) -> None:
        super().__init__(library, reason)
        self.library = library
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"cannot load {self.library} ({self.reason}): "
            "install libbpf 1.x (Debian/Ubuntu: libbpf1; Fedora/RHEL: libbpf)"
        )


class BpfObjectError(DatapathError):
    """The compiled BPF object file cannot be opened (missing, not an ELF BPF object, wrong BTF)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"BPF object {self.path} cannot be opened: {self.reason}"


class BpfLoadError(DatapathError):
    """The kernel rejected a BPF program; ``log`` is the verifier log (may be long)."""

    def __init__(self, program: str, log: str) -> None:
        super().__init__(program, log)
        self.program = program
        self.log = log

    def __str__(self) -> str:
        lines = self.log.strip().splitlines()
        tail = f": {lines[-1]}" if lines else ""
        return f"BPF program {self.program} was rejected by the kernel{tail}"


class MapError(DatapathError):
    """A BPF map operation (``op``: lookup, update, delete, create, ...) failed with ``errno``."""

    def __init__(self, map: str, op: str, errno: int) -> None:
        super().__init__(map, op, errno)
        self.map = map
        self.op = op
        self.errno = errno

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.op} on BPF map {self.map} failed: {name} ({os.strerror(self.errno)})"


class MapFull(DatapathError):
    """A BPF map has no room for another entry; raise its size or reduce the input."""

    def __init__(self, map: str, capacity: int) -> None:
        super().__init__(map, capacity)
        self.map = map
        self.capacity = capacity

    def __str__(self) -> str:
        return f"BPF map {self.map} is full ({self.capacity} entries)"


class FrontendWriteError(DatapathError):
    """One frontend could not be programmed as asked (``frontend``: its ``ip:port/PROTO``; ``map``: the map
    concerned, "" when a value cannot be encoded at all). It was left at its previous complete state, or, if
    the failure came after its master switched, at the new one with stale entries the next write deletes."""

    def __init__(self, frontend: str, map: str, reason: str) -> None:
        super().__init__(frontend, map, reason)
        self.frontend = frontend
        self.map = map
        self.reason = reason

    def __str__(self) -> str:
        return f"frontend {self.frontend} not programmed: {self.reason}"


class IncompatiblePin(DatapathError):
    """A pinned BPF object at ``path`` exists but cannot be reused (``reason``: what differs)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"pinned BPF object {self.path} cannot be reused: {self.reason}"


# --- configuration -------------------------------------------------------------------------------------


class ConfigError(BalancingError):
    """A command-line flag or configuration setting is invalid; ``flag`` names it (``"--manifests"``)."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(flag, message)
        self.flag = flag
        self.message = message

    def __str__(self) -> str:
        return f"{self.flag}: {self.message}"


# --- devices (appended after the sections above: the north-south programs attach to network devices) ------


class DeviceError(DatapathError):
    """A network device cannot be used: ``device`` names it (``"eth0"``, or ``"eth0 (ifindex 3)"``, or
    ``"ifindex 3"`` when it has no name any more) and ``reason`` says what failed."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(device, reason)
        self.device = device
        self.reason = reason

    def __str__(self) -> str:
        return printable(f"network device {self.device}: {self.reason}")
