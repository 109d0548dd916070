"""Credentials for the API server's requests, as a kubeconfig's user gives them (``sources.kubeconfig``
builds them): none, a bearer token, a token file re-read whenever it changes (a projected service-account
token the kubelet rotates; also in-cluster), basic auth, or an exec credential plugin (``ExecCredential``
of ``client.authentication.k8s.io/v1`` or ``v1beta1``: the command run with its args, env and
``KUBERNETES_EXEC_INFO``; its token or client certificate cached until ``expirationTimestamp``, asked for
again after it or after a 401).

``Credentials.headers()`` is what each request carries; ``RetryAuth`` is the httpx side: after a 401 it
invalidates the credentials and, when asking again gives other headers, sends the request once more. An
exec plugin runs synchronously when a request needs a credential (at most once per credential's lifetime):
the callers' ``headers()`` seam (``Informer``, ``kubestatus``) is synchronous. A client certificate from a
plugin is loaded into the connection's TLS context: new connections present it.

Errors: ``errors.KubeconfigError`` (a ``SourceError``) names the file, the context and the field;
``CredentialError`` (also a ``ValueError``, which the informers retry with backoff) is a plugin that failed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx

from balancing import errors

__all__ = [
    "Basic",
    "CredentialError",
    "Credentials",
    "ExecPlugin",
    "KubeconfigError",
    "RetryAuth",
    "Token",
    "TokenFile",
    "load_cert_chain",
]

log = logging.getLogger(__name__)

EXEC_TIMEOUT = 60.0  # seconds a plugin may take
EXEC_OUTPUT_MAX = 1 << 20


KubeconfigError = errors.KubeconfigError
CredentialError = errors.CredentialError


class Credentials:
    """What each request carries (none, here). ``invalidate()`` after a 401: the next ``headers()`` asks
    anew (a token file re-read, an exec plugin run again)."""

    def headers(self) -> dict[str, str]:
        return {}

    def invalidate(self, sent: dict[str, str] | None = None) -> None:
        return None


@dataclass
class Token(Credentials):
    value: str

    def headers(self) -> dict[str, str]:
        return _bearer(self.value)


@dataclass
class Basic(Credentials):
    username: str
    password: str

    def headers(self) -> dict[str, str]:
        raw = f"{self.username}:{self.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@dataclass
class TokenFile(Credentials):
    """A bearer token read from ``path`` whenever the file changes (a new inode, size or mtime: a projected
    service-account token swapped in by the kubelet); ``fallback`` until it could be read once, the last
    good token if it later cannot be."""

    path: Path
    fallback: str | None = None
    _seen: tuple[int, int, int, int] | None = None
    _problem: str = ""

    def headers(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
            seen = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if seen != self._seen:
                token = self.path.read_text().strip()
                if token:
                    self.fallback, self._seen = token, seen
            self._problem = ""
        except OSError as exc:
            problem = f"cannot read token file {self.path}: {exc.strerror or exc}"
            if problem != self._problem:
                log.warning("%s; using the last token read", problem)
            self._problem = problem
        return _bearer(self.fallback)

    def invalidate(self, sent: dict[str, str] | None = None) -> None:
        self._seen = None


@dataclass
class ExecPlugin(Credentials):
    """An exec credential plugin: run when there is no credential, after it expired, or after a 401."""

    command: list[str]
    env: dict[str, str]
    api_version: str
    cluster: dict[str, Any] | None  # spec.cluster of KUBERNETES_EXEC_INFO (provideClusterInfo)
    where: tuple[str, str, str]  # the file, context and field errors name
    install_hint: str = ""
    on_certificate: Callable[[bytes, bytes], None] | None = None
    clock: Callable[[], float] = time.time
    _token: str | None = None
    _fetched: bool = False
    _expires: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def headers(self) -> dict[str, str]:
        """Callers run this off the event loop (the plugin may take seconds); concurrent callers wait for
        one run of the plugin instead of each starting one."""
        with self._lock:
            if not self._fetched or (self._expires is not None and self.clock() >= self._expires):
                self._refresh()
            return _bearer(self._token)

    def invalidate(self, sent: dict[str, str] | None = None) -> None:
        """After a 401: ask the plugin again, unless the credential that was refused (``sent``) was already
        replaced by a newer one (several requests refused at once run the plugin once)."""
        with self._lock:
            if sent is None or sent == _bearer(self._token):
                self._fetched = False

    def _refresh(self) -> None:
        status = self._status(self._run())
        token = status.get("token")
        cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
        if (
            not isinstance(token, str | None)
            or not isinstance(cert, str | None)
            or not isinstance(key, str | None)
        ):
            raise self._fail("status: token, clientCertificateData and clientKeyData must be strings")
        if (cert is None) != (key is None):
            raise self._fail("status: clientCertificateData and clientKeyData come together")
        if not token and cert is None:
            raise self._fail("status: neither a token nor a client certificate")
        if cert is not None and key is not None and self.on_certificate is not None:
            try:
                self.on_certificate(cert.encode(), key.encode())
            except (ssl.SSLError, OSError) as exc:
                raise self._fail(f"status: cannot use the client certificate: {exc}") from None
        self._token, self._expires = token or None, _expiry(status.get("expirationTimestamp"), self)
        self._fetched = True

    def _run(self) -> bytes:
        info: dict[str, Any] = {"spec": {"interactive": False}}
        if self.cluster is not None:
            info["spec"]["cluster"] = self.cluster
        env = {
            **os.environ,
            **self.env,
            "KUBERNETES_EXEC_INFO": json.dumps(
                {"apiVersion": self.api_version, "kind": "ExecCredential", **info}
            ),
        }
        try:
            done = subprocess.run(
                self.command,
                check=False,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=EXEC_TIMEOUT,
            )
        except FileNotFoundError:
            hint = f" ({self.install_hint.strip()})" if self.install_hint.strip() else ""
            raise self._fail(f"command {self.command[0]!r} not found{hint}") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise self._fail(f"running {self.command[0]!r}: {exc}") from None
        if done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip()[-500:]
            raise self._fail(f"{self.command[0]!r} exited with status {done.returncode}: {stderr}")
        if len(done.stdout) > EXEC_OUTPUT_MAX:
            raise self._fail(f"{self.command[0]!r} printed more than {EXEC_OUTPUT_MAX} bytes")
        return done.stdout

    def _status(self, output: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(output)
        except ValueError:
            raise self._fail("the plugin's output is not JSON") from None
        if not isinstance(doc, dict) or doc.get("kind") != "ExecCredential":
            raise self._fail("the plugin's output is not an ExecCredential")
        if doc.get("apiVersion") != self.api_version:
            raise self._fail(
                f"the plugin answered {doc.get('apiVersion')!r}, configured {self.api_version!r}"
            )
        status = doc.get("status")
        if not isinstance(status, dict):
            raise self._fail("the plugin's ExecCredential has no status")
        return status

    def _fail(self, message: str) -> CredentialError:
        return CredentialError(*self.where, message)


def _expiry(value: Any, plugin: ExecPlugin) -> float | None:
    """``expirationTimestamp`` (RFC 3339) as a time.time() value; None: until a 401."""
    if value is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise plugin._fail(f"status.expirationTimestamp {value!r} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        raise plugin._fail(f"status.expirationTimestamp {value!r} has no time zone")
    return when.timestamp()


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def load_cert_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a PEM certificate and key given as bytes (through memfds: nothing is written to disk)."""
    fds: list[int] = []
    try:
        for name, pem in (("cert", cert), ("key", key)):
            fds.append(os.memfd_create(f"balancing-client-{name}", os.MFD_CLOEXEC))
            view = memoryview(pem)
            while view:
                view = view[os.write(fds[-1], view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


# --- the httpx side ------------------------------------------------------------------------------------


class RetryAuth(httpx.Auth):
    """Sets the credentials' headers on each request; after a 401, invalidates them and, when asking again
    gives other headers (a rotated token file, a new exec credential), sends the request once more."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sent = self.credentials.headers()
        request.headers.update(sent)
        response = yield request
        if response.status_code != 401:
            return
        self.credentials.invalidate(sent)
        fresh = self.credentials.headers()
        if fresh != sent:
            request.headers.pop("Authorization", None)
            request.headers.update(fresh)
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """``auth_flow`` with the credential calls in a thread: an exec plugin never blocks the loop."""
        sent = await asyncio.to_thread(self.credentials.headers)
        request.headers.update(sent)
        response = yield request
        if response.status_code != 401:
            return
        await asyncio.to_thread(self.credentials.invalidate, sent)
        fresh = await asyncio.to_thread(self.credentials.headers)
        if fresh != sent:
            request.headers.pop("Authorization", None)
            request.headers.update(fresh)
            yield request
