"""A real Kubernetes control plane for the cluster tests: etcd, kube-apiserver and the Service controllers.

The processes are the Go fixture ``tests/cluster`` (one binary, ``build/cluster/cluster``, built by
``make cluster``, which this module runs so that make alone decides whether anything is stale):

- ``cluster pki`` writes a CA, the API server's serving certificate, an admin client certificate (group
  ``system:masters``), the service-account signing key and ``admin.kubeconfig``;
- ``cluster etcd``, ``cluster apiserver`` and ``cluster controllers`` run as three processes, so that
  :meth:`ControlPlane.restart_apiserver` restarts the API server alone over the same etcd data, as an
  upgrade or a crash of the API server would;
- ``cluster compact`` compacts etcd at its current revision (:meth:`ControlPlane.compact`).

Everything listens on 127.0.0.1 (free ports chosen at start) and lives in one temporary directory that
:meth:`ControlPlane.stop` removes with the processes (each in its own process group). ``kubectl`` and ``helm``
come from ``helpers.k8stools``. Users of it: ``tests/cluster/conftest.py`` (the session fixture ``kube`` and a
namespace per test).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from helpers import k8stools

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build/cluster/cluster"
START_TIMEOUT = 120.0


def build() -> Path:
    """The fixture binary, (re)built by ``make cluster`` only when its sources changed."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "cluster"], check=True, timeout=3600)
    return BINARY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class _Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    _out: IO[bytes] | None = None

    def start(self) -> None:
        self._out = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.popen = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def tail(self, limit: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


@dataclass
class ControlPlane:
    """One running control plane. ``kubectl(...)`` runs as the admin; ``server`` is its URL."""

    dir: Path
    port: int = field(default_factory=free_port)
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    procs: dict[str, _Proc] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        binary = str(BINARY)
        subprocess.run(
            [binary, "pki", "--dir", str(self.dir), "--apiserver-port", str(self.port)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        d, peer = str(self.dir), str(self.etcd_peer_port)
        self.procs = {
            "etcd": _Proc(
                "etcd",
                [binary, "etcd", "--dir", d, "--client-port", str(self.etcd_port), "--peer-port", peer],
                self.dir / "etcd.log",
            ),
            "apiserver": _Proc(
                "apiserver",
                [binary, "apiserver", "--dir", d, "--port", str(self.port), "--etcd", self.etcd_url],
                self.dir / "apiserver.log",
            ),
            "controllers": _Proc(
                "controllers", [binary, "controllers", "--dir", d], self.dir / "controllers.log"
            ),
        }
        self.procs["etcd"].start()
        self.procs["apiserver"].start()
        self.wait_ready()
        self.procs["controllers"].start()
        self.wait_for(lambda: self.exists("serviceaccount", "default", namespace="default"), "the default SA")

    def stop(self) -> None:
        for name in ("controllers", "apiserver", "etcd"):
            if name in self.procs:
                self.procs[name].stop()

    def restart_apiserver(self, down: float = 0.0) -> None:
        """Stop the API server (SIGTERM, as an upgrade would), stay down ``down`` seconds, start it again on
        the same port over the same etcd, and wait until it is ready."""
        self.procs["apiserver"].stop()
        time.sleep(down)
        self.procs["apiserver"].start()
        self.wait_ready()

    def compact(self) -> int:
        """Compact etcd at its current revision; returns that revision."""
        out = subprocess.run(
            [str(BINARY), "compact", "--etcd", self.etcd_url], check=True, capture_output=True, timeout=30
        ).stdout
        return int(out.decode().strip())

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        self.wait_for(lambda: self._get_raw("/readyz") == "ok", "the API server's /readyz", timeout)

    def wait_for(self, ok: Any, what: str, timeout: float = START_TIMEOUT) -> None:
        """Poll ``ok()`` until truthy (a process of the cluster dying, or ``timeout``, raises)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self.procs.values() if p.popen is not None and not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited while waiting for {what}:\n{dead[0].tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError, subprocess.SubprocessError):
                if ok():
                    return
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout:.0f}s for {what}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{p.tail()}" for p in self.procs.values())

    # --- talking to it -------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.dir / "admin.crt"), str(self.dir / "admin.key"))
        return ctx

    def _get_raw(self, path: str) -> str:
        with urllib.request.urlopen(self.server + path, context=self.ssl_context(), timeout=5) as r:
            body: bytes = r.read()
            return body.decode()

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """One admin request; the decoded JSON answer (``urllib.error.HTTPError`` on >= 400)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as r:
            return json.loads(r.read() or b"null")

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl --kubeconfig admin.kubeconfig ARGS``; ``check`` raises with stderr on failure."""
        argv = [str(k8stools.kubectl()), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=120, check=False)
        if check and res.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({res.returncode}):\n{res.stderr}{res.stdout}"
            )
        return res

    def apply(self, docs: Sequence[dict[str, Any]] | str, *args: str) -> None:
        """Server-side apply of manifest docs (or YAML text) as the admin."""
        text = docs if isinstance(docs, str) else "\n---\n".join(json.dumps(d) for d in docs)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", *args, input=text)

    def patch_status(
        self, kind: str, name: str, status: dict[str, Any], namespace: str | None = None
    ) -> None:
        """A merge patch of ``status`` on the status subresource, as the admin (a kubelet's pod status, a
        departed agent's entry)."""
        ns = ["-n", namespace] if namespace else []
        patch = json.dumps({"status": status})
        self.kubectl("patch", kind, name, *ns, "--subresource=status", "--type=merge", "-p", patch)

    def exists(self, kind: str, name: str, namespace: str | None = None) -> bool:
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("get", kind, name, *ns, "-o", "name", check=False).returncode == 0

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        ns = ["-n", namespace] if namespace else []
        out: dict[str, Any] = json.loads(self.kubectl("get", kind, name, *ns, "-o", "json").stdout)
        return out

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        self.wait_for(
            lambda: self.exists("serviceaccount", "default", namespace=name), f"SA default in {name}"
        )
        return name

    def token(self, account: str, namespace: str, duration: str = "2h") -> str:
        """A bound service-account token (TokenRequest), as a kubelet would project it into the pod."""
        res = self.kubectl("create", "token", account, "-n", namespace, "--duration", duration)
        return res.stdout.strip()

    def kubeconfig_for(self, token: str, path: Path) -> Path:
        """A kubeconfig at ``path`` that authenticates with ``token`` (a pod's ServiceAccount)."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "test", "cluster": {"server": self.server, "certificate-authority": str(self.ca)}}
            ],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "sa"}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return path


@contextlib.contextmanager
def running() -> Iterator[ControlPlane]:
    """A started cluster in a fresh temporary directory, stopped and removed afterwards, even on failure."""
    build()
    tmp = Path(tempfile.mkdtemp(prefix="bl-cluster-"))
    cluster = ControlPlane(tmp)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
