"""The webhook's TLS: a provided certificate and key, or a self-signed CA and a serving certificate for the
Service's DNS names (the CA bundle is what the webhook configuration's ``caBundle`` holds). A provided pair
is followed by ``CertReloader``: a mounted Secret changes in place (cert-manager renewals, rotations).

Generated pairs are valid for ``VALIDITY_DAYS`` (one year) and are not renewed by the process that made
them: they live as long as it does (a temporary directory unless ``--cert-dir``), and a restart generates a
new pair. Every file written here (key, certificate, CA, CA bundle) is mode 0600 whatever the umask and
whatever file was there before (written to a new 0600 file in the same directory, then renamed over it), and
directories created for them are mode 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "VALIDITY_DAYS",
    "CertReloader",
    "ServingCert",
    "generate_serving_cert",
    "load_or_generate",
    "make_private_dirs",
    "server_context",
    "service_dns_names",
    "write_private",
]

log = logging.getLogger(__name__)

VALIDITY_DAYS = 365  # of a generated CA and serving certificate


@dataclass(frozen=True, slots=True)
class ServingCert:
    cert_pem: bytes  # the serving certificate
    key_pem: bytes  # its private key (PKCS#8, unencrypted)
    ca_pem: bytes  # the CA that signed it: the webhook configuration's caBundle


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for the webhook Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_serving_cert(dns_names: list[str], *, days: int = VALIDITY_DAYS) -> ServingCert:
    """A new self-signed CA and a certificate it signs for ``dns_names`` (the first is the subject)."""
    if not dns_names:
        raise ValueError("a serving certificate needs at least one DNS name")
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "balancing-controller-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ServingCert(
        cert.public_bytes(serialization.Encoding.PEM),
        _pem(key),
        ca_cert.public_bytes(serialization.Encoding.PEM),
    )


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def load_or_generate(
    cert_file: Path | None,
    key_file: Path | None,
    *,
    dns_names: list[str],
    cert_dir: Path,
    ca_bundle: Path | None = None,
) -> ssl.SSLContext:
    """A server context from ``cert_file``/``key_file`` when both are given, else from a generated CA and
    serving certificate (valid ``VALIDITY_DAYS``) written under ``cert_dir`` (``tls.crt``, ``tls.key``,
    ``ca.crt``; files 0600, created directories 0700). The CA bundle (generated, or the provided certificate
    when no CA is known) is copied to ``ca_bundle`` (0600) if given."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both a certificate and a key, or neither")
    if cert_file is not None and key_file is not None:
        context = server_context(cert_file, key_file)
        if ca_bundle is not None:
            make_private_dirs(ca_bundle.parent)
            write_private(ca_bundle, cert_file.read_bytes())
        return context
    generated = generate_serving_cert(dns_names)
    make_private_dirs(cert_dir)
    cert_path, key_path = cert_dir / "tls.crt", cert_dir / "tls.key"
    write_private(key_path, generated.key_pem)
    write_private(cert_path, generated.cert_pem)
    write_private(cert_dir / "ca.crt", generated.ca_pem)
    if ca_bundle is not None:
        make_private_dirs(ca_bundle.parent)
        write_private(ca_bundle, generated.ca_pem)
    return server_context(cert_path, key_path)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents with mode 0700, whatever the umask. Directories that
    already exist (including one another process creates meanwhile) are left as they are."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        path.chmod(0o700)  # mkdir's mode was masked by the umask


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with a file of mode 0600 holding ``data``, whatever the umask and whatever was there
    (a file with wider permissions, a symbolic link): the data goes to a new 0600 file in the same directory,
    which is then renamed over ``path``. Readers see the old file or the new one, never a part of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # mkstemp's 0600 was masked by the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class CertReloader:
    """Keeps a server context serving the current contents of its certificate and key files.

    An ``SSLContext`` keeps what it loaded, while a mounted Secret is updated in place (cert-manager renews
    the certificate; the kubelet swaps the volume's files within a minute or so). ``check()`` (``follow()``
    calls it periodically) loads a changed pair into a new context, which the original context's SNI
    callback (run on every ClientHello, with or without a server name) gives each new connection: no
    context is ever modified half-way. A pair that does not load (read between the updates of the two
    files) keeps the previous one in service and is retried at the next check."""

    def __init__(self, context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.current = context
        self._loaded: bytes | None = None  # unknown: the files may have changed since ``context`` read them
        context.sni_callback = self._select

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, context: ssl.SSLContext
    ) -> None:
        if self.current is not context:
            conn.context = self.current

    def check(self) -> bool:
        """Load the pair if the files changed since the last load; True when a new pair is in service."""
        try:
            stamp = self.cert_file.read_bytes() + b"\0" + self.key_file.read_bytes()
        except OSError as exc:
            log.warning("cannot read the serving certificate (keeping the current one): %s", exc)
            return False
        if stamp == self._loaded:
            return False
        try:
            fresh = server_context(self.cert_file, self.key_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning(
                "the serving certificate changed but does not load yet (keeping the current one): %s", exc
            )
            return False
        first = self._loaded is None
        self.current, self._loaded = fresh, stamp
        (log.debug if first else log.info)("serving the certificate from %s", self.cert_file)
        return True

    async def follow(self, interval: float = 30.0) -> None:
        """``check()`` every ``interval`` seconds, forever."""
        while True:
            await asyncio.sleep(interval)
            self.check()
