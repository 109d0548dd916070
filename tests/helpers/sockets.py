"""Sockets held open by long-lived client processes, and a stand-in for /run/netns: for the socket
termination tests (``tests/kernel/test_sockterm.py``, ``tests/kernel/test_capabilities.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from balancing_testkit.topology import Cluster, netns_path
from helpers.support import wait_until

# One socket held for the process's life. argv: udp|tcp HOST PORT. Prints a JSON line per step, READY after
# the first: {"step", "connect"?, "hello"? (tcp: the backend's line), "send"?, "recv"? (errno names),
# "reply"? (the first word of the answer: the backend's name, or tcp's echo)}.
HOLDER = textwrap.dedent("""
    import errno, json, signal, socket, sys
    proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    target = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    sock.settimeout(1.0)

    def name(exc):
        return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__

    def step(what, connect):
        out = {"step": what}
        if connect:
            try:
                sock.connect(target)
                if proto == "tcp":
                    out["hello"] = sock.recv(256).decode().split()[0]
            except OSError as exc:
                out["connect"] = name(exc)
        try:
            sock.send(b"ping\\n")
        except OSError as exc:
            out["send"] = name(exc)
        try:
            data = sock.recv(256)
            out["reply"] = data.decode().split()[0] if data else "EOF"
        except OSError as exc:
            out["recv"] = name(exc)
        print(json.dumps(out), flush=True)

    signals = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    step("connect", True)
    print("READY", flush=True)
    while (sig := signal.sigwait(signals)) != signal.SIGTERM:
        step("again" if sig == signal.SIGUSR1 else "reconnect", sig == signal.SIGUSR2)
""")


class Holder:
    """A HOLDER process in the cluster's client namespace and node cgroup."""

    def __init__(self, cluster: Cluster, proto: str, host: str, port: int) -> None:
        self.topo = cluster.topo
        self.proc = cluster.topo.spawn(
            [sys.executable, "-c", HOLDER, proto, host, str(port)],
            netns=cluster.client,
            cgroup=cluster.cgroup,
            ready="READY",
            label=f"holder-{proto}-{host}",
        )

    def steps(self) -> list[dict[str, Any]]:
        out, _ = self.topo.logs(self.proc)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    @property
    def first(self) -> dict[str, Any]:
        return self.steps()[0]

    def step(self, sig: int = signal.SIGUSR1) -> dict[str, Any]:
        before = len(self.steps())
        os.kill(self.proc.pid, sig)
        wait_until(lambda: len(self.steps()) > before, 5.0, "the holder's next step")
        return self.steps()[-1]

    def again(self) -> dict[str, Any]:
        """One more exchange on the same socket."""
        return self.step(signal.SIGUSR1)

    def reconnect(self) -> dict[str, Any]:
        """connect() the same socket again, then exchange."""
        return self.step(signal.SIGUSR2)


class NetnsDir:
    """A test-owned stand-in for /run/netns: bind mounts of the topology's namespace files, as ``ip netns``
    and container runtimes keep them (each a mount of the namespace's nsfs file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir()
        self._mounts: list[Path] = []

    def add(self, netns: str, name: str | None = None) -> Path:
        target = self.path / (name or netns)
        target.touch()
        subprocess.run(["mount", "--bind", str(netns_path(netns)), str(target)], check=True, timeout=10)
        self._mounts.append(target)
        return target

    def close(self) -> None:
        failed = []
        for target in reversed(self._mounts):
            done = subprocess.run(["umount", str(target)], check=False, capture_output=True, timeout=10)
            if done.returncode != 0:  # busy: detach it now, the kernel drops it when it is free
                lazy = ["umount", "--lazy", str(target)]
                done = subprocess.run(lazy, check=False, capture_output=True, timeout=10)
            if done.returncode != 0:
                failed.append(f"{target}: {done.stderr.decode().strip()}")
        self._mounts.clear()
        assert not failed, failed
