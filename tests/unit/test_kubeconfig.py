"""Kubeconfig files (``sources.kubeconfig``) and the credentials they give (``sources.kubecredentials``):
contexts, ``KUBECONFIG`` merging, CA and client certificates as files or data against a real TLS server,
token files that rotate, exec credential plugins (a Python script as the plugin, counting its runs), a 401
answered with fresh credentials, and one error per malformed input naming its file, context and field."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from balancing.errors import SourceError
from balancing.sources import kubeconfig, kubecredentials
from balancing.sources.kube import KubeConnection, KubeSource, Timing
from balancing_testkit.fakeapi import serving

V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"
FAST = Timing(resync=3600, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)


def config(
    contexts: dict[str, tuple[str, str | None]],
    clusters: dict[str, dict[str, Any]],
    users: dict[str, dict[str, Any]] | None = None,
    current: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "contexts": [
            {"name": n, "context": {"cluster": c, **({"user": u} if u else {})}}
            for n, (c, u) in contexts.items()
        ],
        "clusters": [{"name": n, "cluster": body} for n, body in clusters.items()],
        "users": [{"name": n, "user": body} for n, body in (users or {}).items()],
    }
    if current is not None:
        doc["current-context"] = current
    return doc


def write(path: Path, doc: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def one(server: str = "http://127.0.0.1:1", **user: Any) -> dict[str, Any]:
    """One context "ctx" on cluster "c" with user "u"."""
    return config({"ctx": ("c", "u")}, {"c": {"server": server}}, {"u": user}, current="ctx")


# --- contexts and KUBECONFIG --------------------------------------------------------------------------------


def test_current_context_or_the_named_one(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config",
        config(
            {"dev": ("dev", "alice"), "prod": ("prod", "bob")},
            {"dev": {"server": "http://dev:8080/"}, "prod": {"server": "http://prod:8080"}},
            {"alice": {"token": "a"}, "bob": {"token": "b"}},
            current="dev",
        ),
    )
    dev = KubeConnection.from_kubeconfig(path)
    assert (dev.base_url, dev.headers()) == ("http://dev:8080", {"Authorization": "Bearer a"})
    prod = KubeConnection.from_kubeconfig(path, "prod")
    assert (prod.base_url, prod.headers()) == ("http://prod:8080", {"Authorization": "Bearer b"})
    with pytest.raises(
        SourceError, match=r"context 'staging'.*context 'staging' not found \(known: dev, prod\)"
    ):
        KubeConnection.from_kubeconfig(path, "staging")


def test_kubeconfig_list_merges_first_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per name the first file wins; current-context comes from the first file that sets it; relative paths
    are the file's own; missing files and repeats are skipped."""
    first = write(
        tmp_path / "a" / "config",
        config({"shared": ("c1", "u1")}, {"c1": {"server": "http://first:1"}}, {"u1": {"tokenFile": "tok"}}),
    )
    (tmp_path / "a" / "tok").write_text("token-from-a\n")
    second = write(
        tmp_path / "b" / "config",
        config(
            {"shared": ("c2", None), "other": ("c2", "u2")},
            {"c1": {"server": "http://second:1"}, "c2": {"server": "http://second:2"}},
            {"u2": {"tokenFile": "tok"}},
            current="shared",
        ),
    )
    (tmp_path / "b" / "tok").write_text("token-from-b")
    third = write(tmp_path / "c" / "config", config({}, {}, current="other"))
    env = {"KUBECONFIG": os.pathsep.join(map(str, [tmp_path / "missing", first, "", second, first, third]))}
    assert kubeconfig.paths_from_environment(env) == [tmp_path / "missing", first, second, third]

    shared = KubeConnection.from_environment(environ=env)  # current-context "shared" from b, defined in a
    assert (shared.base_url, shared.headers()) == ("http://first:1", {"Authorization": "Bearer token-from-a"})
    other = KubeConnection.from_environment("other", env)
    assert (other.base_url, other.headers()) == ("http://second:2", {"Authorization": "Bearer token-from-b"})
    # KubeSource: KUBECONFIG set and no file named: the environment's kubeconfig
    monkeypatch.setenv("KUBECONFIG", env["KUBECONFIG"])
    assert KubeSource("n", timing=FAST).connection.base_url == "http://first:1"
    assert KubeSource("n", context="other", timing=FAST).connection.base_url == "http://second:2"


def test_default_is_home_kube_config(tmp_path: Path) -> None:
    write(tmp_path / ".kube" / "config", one("http://home:1", token="t"))
    env = {"HOME": str(tmp_path)}
    assert kubeconfig.paths_from_environment(env) == [tmp_path / ".kube" / "config"]
    assert KubeConnection.choose(context="ctx", environ=env).base_url == "http://home:1"
    with pytest.raises(SourceError, match="not in a cluster"):
        KubeConnection.choose(environ=env)  # no KUBECONFIG, no context: in-cluster
    with pytest.raises(SourceError, match="a context needs a kubeconfig"):
        KubeConnection.choose(context="ctx", in_cluster=True, environ=env)


# --- TLS: CA and client certificates as files or data, tls-server-name --------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue(
    cn: str, usage: x509.ObjectIdentifier, ca: tuple[x509.Certificate, Any] | None = None
) -> tuple[Any, Any]:
    """A certificate for ``cn`` (DNS SAN) signed by ``ca``, else a self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[0].subject if ca else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(ca[1] if ca else key, hashes.SHA256()), key


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca = issue("cluster-ca", ExtendedKeyUsageOID.SERVER_AUTH)
        self.server = issue("api.test", ExtendedKeyUsageOID.SERVER_AUTH, self.ca)
        self.client_ca = issue("client-ca", ExtendedKeyUsageOID.CLIENT_AUTH)
        self.client = issue("agent-1", ExtendedKeyUsageOID.CLIENT_AUTH, self.client_ca)
        self.files: dict[str, Path] = {}
        for name, pem in self.pems().items():
            self.files[name] = tmp / f"{name}.pem"
            self.files[name].write_bytes(pem)

    def pems(self) -> dict[str, bytes]:
        pem = serialization.Encoding.PEM
        return {
            "ca": self.ca[0].public_bytes(pem),
            "server": self.server[0].public_bytes(pem),
            "server-key": _pem_key(self.server[1]),
            "client-ca": self.client_ca[0].public_bytes(pem),
            "client": self.client[0].public_bytes(pem),
            "client-key": _pem_key(self.client[1]),
        }

    def data(self, name: str) -> str:
        return base64.b64encode(self.pems()[name]).decode()


@contextlib.asynccontextmanager
async def tls_server(pki: Pki) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS server for "api.test" on 127.0.0.1 requiring a client certificate from the client CA; it
    answers 200 with the client certificate's CN, which it also records."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.files["server"], pki.files["server-key"])
    ctx.load_verify_locations(pki.files["client-ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while (await reader.readline()).strip():
                pass
            peer = writer.get_extra_info("peercert") or {}
            cn = dict(x[0] for x in peer.get("subject", ()))["commonName"]
            seen.append(cn)
            body = json.dumps({"cn": cn}).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    finally:
        server.close()


async def get(connection: KubeConnection, path: str = "/") -> httpx.Response:
    async with httpx.AsyncClient(
        base_url=connection.base_url, verify=connection.verify, auth=connection.auth, timeout=5
    ) as client:
        return await client.get(path)


@pytest.mark.asyncio
@pytest.mark.parametrize("as_data", [False, True], ids=["files", "data"])
async def test_ca_and_client_certificate_files_or_data(tmp_path: Path, as_data: bool) -> None:
    pki = Pki(tmp_path)
    async with tls_server(pki) as (url, seen):
        if as_data:
            cluster = {"certificate-authority-data": pki.data("ca")}
            user = {"client-certificate-data": pki.data("client"), "client-key-data": pki.data("client-key")}
        else:  # relative to the kubeconfig's directory
            cluster = {"certificate-authority": "ca.pem"}
            user = {"client-certificate": "client.pem", "client-key": str(pki.files["client-key"])}
        doc = config({"ctx": ("c", "u")}, {"c": {"server": url, **cluster}}, {"u": user}, current="ctx")
        path = write(tmp_path / "config", doc)
        with pytest.raises(httpx.ConnectError, match=r"mismatch|match"):
            await get(KubeConnection.from_kubeconfig(path))  # the certificate names api.test, not 127.0.0.1

        doc["clusters"][0]["cluster"]["tls-server-name"] = "api.test"
        response = await get(KubeConnection.from_kubeconfig(write(path, doc)))
        assert response.json() == {"cn": "agent-1"} and seen == ["agent-1"]


@pytest.mark.asyncio
async def test_insecure_skip_tls_verify(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with tls_server(pki) as (url, _):
        cluster = {"server": url, "insecure-skip-tls-verify": True}
        user = {"client-certificate": "client.pem", "client-key": "client-key.pem"}
        path = write(tmp_path / "config", config({"x": ("c", "u")}, {"c": cluster}, {"u": user}, "x"))
        assert (await get(KubeConnection.from_kubeconfig(path))).json() == {"cn": "agent-1"}


# --- token files --------------------------------------------------------------------------------------------


def test_token_file_is_read_again_when_it_rotates(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("one\n")
    path = write(tmp_path / "config", one(tokenFile="token", token="fallback"))
    connection = KubeConnection.from_kubeconfig(path)
    assert connection.headers() == {"Authorization": "Bearer one"}
    replacement = tmp_path / "token.new"
    replacement.write_text("two")
    replacement.replace(tmp_path / "token")  # atomically, as the kubelet does
    assert connection.headers() == {"Authorization": "Bearer two"}
    (tmp_path / "token").unlink()
    assert connection.headers() == {"Authorization": "Bearer two"}  # the last good one, not the fallback


def test_token_falls_back_until_the_file_exists(tmp_path: Path) -> None:
    connection = KubeConnection.from_kubeconfig(write(tmp_path / "config", one(tokenFile="t", token="fb")))
    assert connection.headers() == {"Authorization": "Bearer fb"}
    (tmp_path / "t").write_text("real")
    assert connection.headers() == {"Authorization": "Bearer real"}


def test_in_cluster_token_rotates_through_the_data_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A projected service-account volume: ``token`` -> ``..data/token``, ``..data`` swapped to a new dir."""
    pki = Pki(tmp_path)
    account = tmp_path / "account"
    for version, token in (("v1", "first"), ("v2", "second")):
        (account / version).mkdir(parents=True)
        (account / version / "token").write_text(token)
        (account / version / "ca.crt").write_bytes(pki.pems()["ca"])
    (account / "..data").symlink_to("v1")
    for name in ("token", "ca.crt"):
        (account / name).symlink_to(f"..data/{name}")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    connection = KubeConnection.in_cluster(account)
    assert connection.base_url == "https://10.96.0.1:443"
    assert connection.headers() == {"Authorization": "Bearer first"}
    (account / "..data_tmp").symlink_to("v2")
    (account / "..data_tmp").replace(account / "..data")
    assert connection.headers() == {"Authorization": "Bearer second"}


# --- exec credential plugins --------------------------------------------------------------------------------

PLUGIN = textwrap.dedent(
    """\
    import datetime, json, os, pathlib, sys
    state = pathlib.Path(os.environ["STATE"])
    runs = int(state.read_text()) + 1 if state.exists() else 1
    state.write_text(str(runs))
    pathlib.Path(os.environ["STATE"] + ".info").write_text(os.environ["KUBERNETES_EXEC_INFO"])
    if os.environ.get("FAIL"):
        sys.exit(os.environ["FAIL"])
    lifetime = float(sys.argv[1])
    status = {"token": f"{sys.argv[2]}-{runs}"}
    if lifetime:
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=lifetime)
        status["expirationTimestamp"] = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    print(json.dumps({"apiVersion": os.environ["API_VERSION"], "kind": "ExecCredential", "status": status}))
    """
)


def plugin_config(tmp_path: Path, api_version: str = V1, lifetime: int = 3600, **extra: Any) -> Path:
    (tmp_path / "plugin.py").write_text(PLUGIN)
    exec_ = {
        "apiVersion": api_version,
        "command": sys.executable,
        "args": [str(tmp_path / "plugin.py"), str(lifetime), "tok"],
        "env": [
            {"name": "STATE", "value": str(tmp_path / "runs")},
            {"name": "API_VERSION", "value": api_version},
        ],
        **({"interactiveMode": "Never"} if api_version == V1 else {}),
        **extra,
    }
    return write(tmp_path / "config", one("http://127.0.0.1:1", exec=exec_))


def runs(tmp_path: Path) -> int:
    return int((tmp_path / "runs").read_text()) if (tmp_path / "runs").exists() else 0


@pytest.mark.parametrize("api_version", [V1, V1BETA1])
def test_exec_token_is_cached_until_it_expires(tmp_path: Path, api_version: str) -> None:
    connection = KubeConnection.from_kubeconfig(plugin_config(tmp_path, api_version, provideClusterInfo=True))
    assert runs(tmp_path) == 0  # not run before a request needs it
    assert connection.headers() == {"Authorization": "Bearer tok-1"}
    assert connection.headers() == {"Authorization": "Bearer tok-1"}
    assert runs(tmp_path) == 1
    info = json.loads((tmp_path / "runs.info").read_text())
    assert info == {
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "spec": {"interactive": False, "cluster": {"server": "http://127.0.0.1:1"}},
    }
    plugin = connection.credentials
    assert isinstance(plugin, kubecredentials.ExecPlugin)
    plugin.clock = lambda: datetime.datetime.now(datetime.UTC).timestamp() + 3601  # an hour later
    assert connection.headers() == {"Authorization": "Bearer tok-2"}
    assert runs(tmp_path) == 2


@contextlib.asynccontextmanager
async def guarded(accepted: set[str]) -> AsyncIterator[tuple[str, list[str]]]:
    """A tiny API server answering 200 to the ``accepted`` bearer tokens, 401 otherwise; records tokens."""
    tokens: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token = ""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := (await reader.readline()).decode().strip():
                name, _, value = line.partition(":")
                if name.lower() == "authorization":
                    token = value.strip().removeprefix("Bearer ")
            tokens.append(token)
            status = "200 OK" if token in accepted else "401 Unauthorized"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", tokens
    finally:
        server.close()


@pytest.mark.asyncio
async def test_exec_runs_again_after_a_401(tmp_path: Path) -> None:
    accepted = {"tok-1"}
    async with guarded(accepted) as (url, tokens):
        doc = yaml.safe_load(plugin_config(tmp_path, lifetime=0).read_text())  # no expiry: until a 401
        doc["clusters"][0]["cluster"]["server"] = url
        connection = KubeConnection.from_kubeconfig(write(tmp_path / "config", doc))
        assert (await get(connection)).status_code == 200
        assert (await get(connection)).status_code == 200
        accepted.clear()
        accepted.add("tok-2")  # the server no longer takes tok-1 (revoked)
        assert (await get(connection)).status_code == 200
        assert tokens == ["tok-1", "tok-1", "tok-1", "tok-2"] and runs(tmp_path) == 2
        accepted.clear()  # nothing works: one fresh try, then the 401 is the answer
        assert (await get(connection)).status_code == 401
        assert tokens[4:] == ["tok-2", "tok-3"] and runs(tmp_path) == 3


@pytest.mark.asyncio
async def test_kube_source_sends_the_exec_token(tmp_path: Path) -> None:
    async with serving() as (fake, url):
        fake.put("/api/v1/nodes", {"metadata": {"name": "node-1"}})
        doc = yaml.safe_load(plugin_config(tmp_path).read_text())
        doc["clusters"][0]["cluster"]["server"] = url
        source = KubeSource("node-1", kubeconfig=write(tmp_path / "config", doc), timing=FAST)
        async with contextlib.aclosing(source.updates()) as updates:
            first = await asyncio.wait_for(anext(updates), 5)
            assert [o.metadata.name for o in first.upserts] == ["node-1"]
        assert fake.headers["authorization"] == "Bearer tok-1"
        assert runs(tmp_path) == 1


def _plugin_error(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> str:
    doc = yaml.safe_load(plugin_config(tmp_path).read_text())
    change(doc["users"][0]["user"]["exec"])
    connection = KubeConnection.from_kubeconfig(write(tmp_path / "config", doc))
    with pytest.raises(kubecredentials.CredentialError) as caught:
        connection.headers()
    assert isinstance(caught.value, ValueError)  # informers retry it with backoff
    return str(caught.value)


def test_exec_failures_name_the_plugin(tmp_path: Path) -> None:
    where = f"kubeconfig {tmp_path / 'config'}, context 'ctx', users[u].exec: "
    failed = _plugin_error(tmp_path, lambda e: e["env"].append({"name": "FAIL", "value": "no login"}))
    assert failed.startswith(where) and "exited with status 1: no login" in failed
    missing = _plugin_error(
        tmp_path, lambda e: e.update(command="no-such-plugin", installHint="apt install it")
    )
    assert missing == where + "command 'no-such-plugin' not found (apt install it)"
    version = _plugin_error(
        tmp_path, lambda e: e["env"].__setitem__(1, {"name": "API_VERSION", "value": "v9"})
    )
    assert version == where + f"the plugin answered 'v9', configured {V1!r}"
    garbage = _plugin_error(tmp_path, lambda e: e.update(command="echo", args=["{"]))
    assert garbage == where + "the plugin's output is not JSON"


# --- malformed kubeconfigs ----------------------------------------------------------------------------------


def _cluster(**fields: Any) -> dict[str, Any]:
    return config({"ctx": ("c", "u")}, {"c": {"server": "https://h:6443", **fields}}, {"u": {}}, "ctx")


def _exec(**fields: Any) -> dict[str, Any]:
    return one(exec={"apiVersion": V1, "command": "x", "interactiveMode": "Never", **fields})


MALFORMED: list[tuple[str, dict[str, Any] | str, str]] = [
    ("not-yaml", "a: [", ": not YAML"),
    ("not-a-mapping", "- 1\n", ": not a mapping \\(a list\\)"),
    (
        "no-current-context",
        config({"a": ("c", None)}, {"c": {"server": "http://h"}}),
        ", current-context: not set",
    ),
    (
        "unknown-current",
        config({}, {}, current="gone"),
        "current-context: context 'gone' not found \\(known: none\\)",
    ),
    ("contexts-not-list", {"contexts": {"a": 1}, "current-context": "a"}, ", contexts: not a list"),
    (
        "entry-without-name",
        {"clusters": [{"cluster": {}}]},
        ", clusters\\[0\\].name: missing or not a string",
    ),
    (
        "no-cluster",
        {"contexts": [{"name": "x", "context": {}}], "current-context": "x"},
        "contexts\\[x\\].cluster: missing",
    ),
    (
        "unknown-cluster",
        config({"ctx": ("nope", None)}, {"c": {"server": "http://h"}}, current="ctx"),
        "context 'ctx', contexts\\[ctx\\].cluster: cluster 'nope' not found \\(known: c\\)",
    ),
    (
        "unknown-user",
        config({"ctx": ("c", "bob")}, {"c": {"server": "http://h"}}, current="ctx"),
        "contexts\\[ctx\\].user: user 'bob' not found",
    ),
    ("no-server", config({"ctx": ("c", None)}, {"c": {}}, current="ctx"), "clusters\\[c\\].server: missing"),
    ("bad-server", one("h:6443"), "clusters\\[c\\].server: 'h:6443' is not an http\\(s\\) URL"),
    ("proxy", _cluster(**{"proxy-url": "http://proxy"}), "clusters\\[c\\].proxy-url: not supported"),
    (
        "ca-not-base64",
        _cluster(**{"certificate-authority-data": "!!"}),
        "certificate-authority-data: not base64",
    ),
    (
        "ca-both",
        _cluster(**{"certificate-authority-data": "AA==", "certificate-authority": "ca.pem"}),
        "give certificate-authority or certificate-authority-data, not both",
    ),
    (
        "ca-missing-file",
        _cluster(**{"certificate-authority": "nope.pem"}),
        "certificate-authority: cannot read .*nope.pem",
    ),
    (
        "ca-not-pem",
        _cluster(**{"certificate-authority-data": "aGVsbG8="}),
        "certificate-authority: no PEM certificate",
    ),
    (
        "insecure-with-ca",
        _cluster(**{"insecure-skip-tls-verify": True, "certificate-authority-data": "AA=="}),
        "insecure-skip-tls-verify: conflicts with certificate-authority",
    ),
    (
        "insecure-not-bool",
        _cluster(**{"insecure-skip-tls-verify": "yes"}),
        "insecure-skip-tls-verify: not true or false",
    ),
    (
        "cert-without-key",
        one("https://h", **{"client-certificate-data": "AA=="}),
        "users\\[u\\].client-key: needs its pair",
    ),
    (
        "auth-provider",
        one("http://h", **{"auth-provider": {"name": "gcp"}}),
        "users\\[u\\].auth-provider: not supported",
    ),
    ("impersonation", one(**{"as": "admin"}), "users\\[u\\].as: not supported"),
    (
        "token-and-exec",
        one(token="t", exec={"command": "x"}),
        "users\\[u\\].exec: give one of .* \\(got token, exec\\)",
    ),
    ("token-not-string", one(token=5), "users\\[u\\].token: not a string \\(a int\\)"),
    ("exec-no-version", one(exec={"command": "x"}), "users\\[u\\].exec.apiVersion: missing"),
    (
        "exec-v1alpha1",
        _exec(apiVersion="client.authentication.k8s.io/v1alpha1"),
        "exec.apiVersion: .* not supported",
    ),
    ("exec-v1-no-mode", _exec(interactiveMode=None), "exec.interactiveMode: missing or not Never"),
    ("exec-always", _exec(interactiveMode="Always"), "exec.interactiveMode: Always needs a terminal"),
    ("exec-no-command", _exec(command=None), "exec.command: missing"),
    ("exec-args", _exec(args="--flag"), "exec.args: not a list of strings"),
    ("exec-env", _exec(env=[{"name": "A"}]), "exec.env\\[0\\]: not a \\{name, value\\} pair of strings"),
]


@pytest.mark.parametrize(
    ("doc", "message"), [(d, m) for _, d, m in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_malformed_kubeconfig_names_file_context_and_field(
    tmp_path: Path, doc: dict[str, Any] | str, message: str
) -> None:
    path = write(tmp_path / "config", doc)
    with pytest.raises(
        kubecredentials.KubeconfigError, match=f"^kubeconfig {path}(, context '[a-z]+')?.*{message}"
    ):
        KubeConnection.from_kubeconfig(path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"^kubeconfig {tmp_path}/nope: no such file$"):
        KubeConnection.from_kubeconfig(tmp_path / "nope")
    env = {"KUBECONFIG": f"{tmp_path}/a{os.pathsep}{tmp_path}/b"}
    with pytest.raises(SourceError, match="none of these files exists"):
        KubeConnection.from_environment(environ=env)
