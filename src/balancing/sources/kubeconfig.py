"""Kubeconfig files: which API server, how to trust it, and how to authenticate to it, as kubectl reads them.

Our own loader (stdlib and PyYAML), decided for issue 12 against the maintained ones:

- ``kubernetes`` (the official client): its ``config`` module only configures the official client's own
  ``Configuration`` for urllib3, and brings the whole generated client and its dependencies with it;
- ``lightkube`` 1.0.1 (built on httpx2, as we are): ``KubeConfig.from_env`` takes ``KUBECONFIG`` as one path
  (no list, no merge), its exec auth accepts only ``client.authentication.k8s.io/v1alpha1`` and ``v1beta1``
  (not ``v1``), sets no ``KUBERNETES_EXEC_INFO``, ignores ``expirationTimestamp`` and an exec plugin's client
  certificate, and has no ``tls-server-name``; it brings lightkube-models, msgspec and httpx2's http2 and
  websocket extras. Wrapping it would mean rewriting most of what we need.

What is read (client-go's ``clientcmd`` semantics, as documented for kubectl):

- files: an explicit path (it must exist); else each file of ``KUBECONFIG`` (an ``os.pathsep`` list; empty
  entries, missing files and repeats skipped); else ``~/.kube/config``. Merged as kubectl merges: for each
  name in ``clusters``, ``users`` and ``contexts`` the first file that has it wins, ``current-context`` comes
  from the first file that sets it, and relative paths are relative to the file that holds them;
- the context: the one named, else ``current-context``; its ``cluster`` and (optional) ``user``;
- the cluster: ``server``, ``certificate-authority`` or ``-data``, ``insecure-skip-tls-verify``,
  ``tls-server-name``;
- the user: ``client-certificate``/``client-key`` (or ``-data``), and one of ``token``/``tokenFile``
  (``token`` only until the file could be read), ``username``/``password``, or ``exec``
  (``client.authentication.k8s.io/v1`` or ``v1beta1``); ``sources.kubecredentials`` has what they become.

Refused with a ``KubeconfigError`` naming the file, the context and the field: anything malformed, two ways
of giving one thing (a file and its ``-data``, a token and an exec plugin), and what we do not implement
(``auth-provider``, impersonation, ``proxy-url``, an exec plugin that needs a terminal).
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balancing.sources import kubecredentials as creds

__all__ = ["ClientConfig", "load", "paths_from_environment", "read"]


EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
SECTIONS = ("clusters", "users", "contexts")
UNSUPPORTED_USER = ("auth-provider", "as", "as-uid", "as-groups", "as-user-extra")


# --- reading and merging ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One named cluster, user or context, and the file it came from."""

    body: dict[str, Any]
    file: Path


@dataclass
class Merged:
    files: list[Path]
    current_context: str | None = None
    sections: dict[str, dict[str, Entry]] = field(default_factory=lambda: {s: {} for s in SECTIONS})

    def describe(self) -> str:
        return os.pathsep.join(str(f) for f in self.files)


def paths_from_environment(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The files ``KUBECONFIG`` lists (in order, once each), else ``~/.kube/config``."""
    env = os.environ if environ is None else environ
    listed = [Path(p) for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        return list(dict.fromkeys(listed))
    home = env.get("HOME") or str(Path.home())
    return [Path(home) / ".kube" / "config"]


def read(paths: list[Path], *, explicit: bool) -> Merged:
    """Merge ``paths`` as kubectl does; a missing file is an error only when ``explicit``."""
    merged = Merged([])
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            if explicit:
                raise creds.KubeconfigError(str(path), "", "", "no such file") from None
            continue
        except OSError as exc:
            raise creds.KubeconfigError(str(path), "", "", f"cannot read: {exc.strerror or exc}") from None
        merged.files.append(path)
        _merge(merged, path, _parse(path, text))
    if not merged.files:
        raise creds.KubeconfigError(os.pathsep.join(map(str, paths)), "", "", "none of these files exists")
    return merged


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise creds.KubeconfigError(str(path), "", "", f"not YAML: {exc}") from None
    if doc is None:
        return {}  # an empty file is an empty config, as for kubectl
    if not isinstance(doc, dict):
        raise creds.KubeconfigError(str(path), "", "", f"not a mapping (a {type(doc).__name__})")
    return doc


def _merge(merged: Merged, path: Path, doc: dict[str, Any]) -> None:
    current = doc.get("current-context")
    if current is not None and not isinstance(current, str):
        raise creds.KubeconfigError(str(path), "", "current-context", "not a string")
    if current and merged.current_context is None:
        merged.current_context = current
    for section in SECTIONS:
        entries = doc.get(section) or []
        if not isinstance(entries, list):
            raise creds.KubeconfigError(str(path), "", section, "not a list")
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name:
                raise creds.KubeconfigError(str(path), "", f"{section}[{i}].name", "missing or not a string")
            body = entry.get(section[:-1])
            if body is None:
                body = {}
            if not isinstance(body, dict):
                raise creds.KubeconfigError(
                    str(path), "", f"{section}[{name}].{section[:-1]}", "not a mapping"
                )
            merged.sections[section].setdefault(name, Entry(body, path))


# --- one entry's fields -------------------------------------------------------------------------------


@dataclass
class Fields:
    """The fields of one entry, read with errors naming the file, context and field."""

    entry: Entry
    where: str  # "clusters[prod]"
    context: str

    def fail(self, key: str, message: str) -> creds.KubeconfigError:
        return creds.KubeconfigError(str(self.entry.file), self.context, self.field(key), message)

    def field(self, key: str) -> str:
        return f"{self.where}.{key}" if key else self.where

    def has(self, key: str) -> bool:
        return self.entry.body.get(key) not in (None, "", [], {})

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.entry.body.get(key)
        if value is None or value == "":
            if required:
                raise self.fail(key, "missing")
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"not a string (a {type(value).__name__})")
        return value

    def flag(self, key: str) -> bool:
        value = self.entry.body.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, "not true or false")
        return value

    def path(self, key: str) -> Path | None:
        value = self.text(key)
        return None if value is None else self.entry.file.parent / Path(value).expanduser()

    def file_or_data(self, key: str) -> bytes | None:
        """``key`` (a file) or ``key-data`` (base64), never both."""
        data, path = self.text(f"{key}-data"), self.path(key)
        if data is not None and path is not None:
            raise self.fail(f"{key}-data", f"give {key} or {key}-data, not both")
        if data is not None:
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise self.fail(f"{key}-data", "not base64") from None
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self.fail(key, f"cannot read {path}: {exc.strerror or exc}") from None


# --- the client configuration ---------------------------------------------------------------------------


@dataclass
class ClientConfig:
    """What a client needs: the server, its TLS context (or True for plain HTTP), the credentials."""

    server: str
    verify: ssl.SSLContext | bool
    credentials: creds.Credentials
    context: str
    files: list[Path]


def load(
    path: Path | str | None = None,
    context: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> ClientConfig:
    """The client configuration of ``context`` (else the current one) of ``path``, or of the files the
    environment names (``KUBECONFIG``, else ``~/.kube/config``)."""
    merged = (
        read([Path(path)], explicit=True)
        if path is not None
        else read(paths_from_environment(environ), explicit=False)
    )
    name = context or merged.current_context
    if not name:
        raise creds.KubeconfigError(merged.describe(), "", "current-context", "not set; name a context")
    ctx = _named(merged, "contexts", name, name, merged.describe(), "" if context else "current-context")
    cluster_name = ctx.text("cluster", required=True)
    user_name = ctx.text("user")
    assert cluster_name is not None
    cluster = _named(merged, "clusters", cluster_name, name, str(ctx.entry.file), f"{ctx.where}.cluster")
    user = None
    if user_name is not None:
        user = _named(merged, "users", user_name, name, str(ctx.entry.file), f"{ctx.where}.user")
    server = cluster.text("server", required=True)
    assert server is not None
    if not server.startswith(("https://", "http://")):
        raise cluster.fail("server", f"{server!r} is not an http(s) URL")
    if cluster.has("proxy-url"):
        raise cluster.fail("proxy-url", "not supported")
    verify = _tls(cluster, user) if server.startswith("https://") else True
    credentials = _credentials(user, cluster, verify) if user is not None else creds.Credentials()
    return ClientConfig(server.rstrip("/"), verify, credentials, name, merged.files)


def _named(merged: Merged, section: str, name: str, context: str, file: str, field: str) -> Fields:
    entry = merged.sections[section].get(name)
    if entry is None:
        known = ", ".join(sorted(merged.sections[section])) or "none"
        raise creds.KubeconfigError(
            file, context, field, f"{section[:-1]} {name!r} not found (known: {known})"
        )
    return Fields(entry, f"{section}[{name}]", context)


class _NamedServerContext(ssl.SSLContext):
    """A client context that checks (and sends as SNI) ``server_name`` whatever host the URL names: the
    cluster's ``tls-server-name``."""

    server_name: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        name = self.server_name or server_hostname
        return super().wrap_bio(incoming, outgoing, server_side, name, session)

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
            if len(args) >= 4:  # server_hostname given by position
                args = (*args[:3], self.server_name, *args[4:])
        return super().wrap_socket(sock, *args, **kwargs)


def _tls(cluster: Fields, user: Fields | None) -> ssl.SSLContext:
    ca = cluster.file_or_data("certificate-authority")
    insecure = cluster.flag("insecure-skip-tls-verify")
    if insecure and ca is not None:
        raise cluster.fail("insecure-skip-tls-verify", "conflicts with certificate-authority: trust one way")
    ctx = _NamedServerContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.server_name = cluster.text("tls-server-name")
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca is not None:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise cluster.fail("certificate-authority", f"no PEM certificate in it ({exc})") from None
    else:
        ctx.load_default_certs()
    if user is not None:
        cert, key = user.file_or_data("client-certificate"), user.file_or_data("client-key")
        if (cert is None) != (key is None):
            raise user.fail("client-key" if key is None else "client-certificate", "needs its pair")
        if cert is not None and key is not None:
            try:
                creds.load_cert_chain(ctx, cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise user.fail("client-certificate", f"cannot use the certificate and key: {exc}") from None
    return ctx


def _credentials(user: Fields, cluster: Fields, verify: ssl.SSLContext | bool) -> creds.Credentials:
    for key in UNSUPPORTED_USER:
        if user.has(key):
            raise user.fail(key, "not supported (use an exec credential plugin)")
    token, token_file, basic = user.text("token"), user.path("tokenFile"), user.has("username")
    ways = [
        w
        for w, given in (("token", token or token_file), ("username", basic), ("exec", user.has("exec")))
        if given
    ]
    if len(ways) > 1:
        raise user.fail(
            ways[1], f"give one of token/tokenFile, username/password, exec (got {', '.join(ways)})"
        )
    if token_file is not None:
        return creds.TokenFile(token_file, token)
    if token is not None:
        return creds.Token(token)
    if basic:
        return creds.Basic(user.text("username") or "", user.text("password") or "")
    if user.has("exec"):
        return _exec(user, cluster, verify)
    return creds.Credentials()


def _exec(user: Fields, cluster: Fields, verify: ssl.SSLContext | bool) -> creds.ExecPlugin:
    spec = user.entry.body["exec"]
    if not isinstance(spec, dict):
        raise user.fail("exec", "not a mapping")
    exe = Fields(Entry(spec, user.entry.file), f"{user.where}.exec", user.context)
    api_version = exe.text("apiVersion", required=True)
    if api_version not in EXEC_API_VERSIONS:
        raise exe.fail("apiVersion", f"{api_version!r} not supported (use {' or '.join(EXEC_API_VERSIONS)})")
    mode = exe.text("interactiveMode") or ("" if api_version.endswith("/v1") else "IfAvailable")
    if mode not in ("Never", "IfAvailable", "Always"):
        raise exe.fail("interactiveMode", "missing or not Never, IfAvailable or Always")
    if mode == "Always":
        raise exe.fail("interactiveMode", "Always needs a terminal; Balancing runs the plugin without one")
    command = exe.text("command", required=True)
    assert command is not None
    if os.sep in command and not os.path.isabs(command):
        command = str(user.entry.file.parent / command)  # relative to the kubeconfig, as for kubectl
    args = spec.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise exe.fail("args", "not a list of strings")
    env: dict[str, str] = {}
    for i, item in enumerate(spec.get("env") or []):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("value"), str)
        ):
            raise exe.fail(f"env[{i}]", "not a {name, value} pair of strings")
        env[item["name"]] = item["value"]
    provide = exe.flag("provideClusterInfo")
    on_certificate = _cert_loader(verify) if isinstance(verify, ssl.SSLContext) else None
    return creds.ExecPlugin(
        [command, *args],
        env,
        api_version,
        _cluster_info(cluster, verify) if provide else None,
        (str(user.entry.file), user.context, exe.where),
        exe.text("installHint") or "",
        on_certificate,
    )


def _cert_loader(ctx: ssl.SSLContext) -> Callable[[bytes, bytes], None]:
    """Load an exec plugin's client certificate into ``ctx`` (new connections present it)."""

    def load(cert: bytes, key: bytes) -> None:
        creds.load_cert_chain(ctx, cert, key)

    return load


def _cluster_info(cluster: Fields, verify: ssl.SSLContext | bool) -> dict[str, Any]:
    """``spec.cluster`` of ``KUBERNETES_EXEC_INFO``: the fields client-go passes, CA as base64 data."""
    info: dict[str, Any] = {"server": cluster.text("server")}
    if name := cluster.text("tls-server-name"):
        info["tls-server-name"] = name
    if cluster.flag("insecure-skip-tls-verify"):
        info["insecure-skip-tls-verify"] = True
    if (ca := cluster.file_or_data("certificate-authority")) is not None:
        info["certificate-authority-data"] = base64.b64encode(ca).decode()
    extensions = cluster.entry.body.get("extensions") or []
    for ext in extensions if isinstance(extensions, list) else []:
        if isinstance(ext, dict) and ext.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = ext.get("extension")
    return info
