"""The controller's generated TLS files: 0600 files and 0700 directories whatever the umask or what was there
before, and certificates valid for one year at most."""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from balancing.controller import tls

FILES = ("tls.crt", "tls.key", "ca.crt")


@pytest.fixture(params=[0o000, 0o077, 0o022], ids=["umask-000", "umask-077", "umask-022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def generate(cert_dir: Path, ca_bundle: Path | None = None) -> None:
    tls.load_or_generate(None, None, dns_names=["svc.ns.svc"], cert_dir=cert_dir, ca_bundle=ca_bundle)


def test_generated_files_are_0600_and_created_directories_0700(tmp_path: Path, umask: int) -> None:
    cert_dir = tmp_path / "a" / "b"
    bundle = tmp_path / "bundle" / "ca.pem"
    generate(cert_dir, bundle)
    assert {name: mode(cert_dir / name) for name in FILES} == dict.fromkeys(FILES, 0o600)
    assert mode(bundle) == 0o600
    assert [mode(d) for d in (tmp_path / "a", cert_dir, bundle.parent)] == [0o700] * 3
    assert sorted(p.name for p in cert_dir.iterdir()) == sorted(FILES)  # no temporary file left


def test_existing_files_with_wider_modes_are_replaced_by_0600_ones(tmp_path: Path, umask: int) -> None:
    tmp_path.chmod(0o755)
    for name in FILES:
        (tmp_path / name).write_text("old")
        (tmp_path / name).chmod(0o644)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("old")
    bundle.chmod(0o666)
    generate(tmp_path, bundle)
    assert {name: mode(tmp_path / name) for name in FILES} == dict.fromkeys(FILES, 0o600)
    assert mode(bundle) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "tls.key").read_bytes()
    assert mode(tmp_path) == 0o755  # an existing directory is not ours to change


def test_a_symlink_in_place_of_the_key_is_replaced_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not a key")
    elsewhere.chmod(0o644)
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    (cert_dir / "tls.key").symlink_to(elsewhere)
    generate(cert_dir)
    assert elsewhere.read_text() == "not a key"
    assert mode(elsewhere) == 0o644
    assert not (cert_dir / "tls.key").is_symlink()
    assert mode(cert_dir / "tls.key") == 0o600


def test_a_provided_certificate_is_copied_to_the_bundle_as_0600(tmp_path: Path, umask: int) -> None:
    generated = tls.generate_serving_cert(["svc.ns.svc"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(generated.cert_pem)
    key.write_bytes(generated.key_pem)
    bundle = tmp_path / "out" / "bundle.pem"
    tls.load_or_generate(cert, key, dns_names=[], cert_dir=tmp_path / "unused", ca_bundle=bundle)
    assert bundle.read_bytes() == generated.cert_pem
    assert (mode(bundle), mode(bundle.parent)) == (0o600, 0o700)
    assert not (tmp_path / "unused").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "tls.key"
    target.write_text("old")

    def full_disk(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tls.write_private(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tls.key"]


def test_generated_certificates_live_one_year_at_most() -> None:
    generated = tls.generate_serving_cert(["svc.ns.svc"])
    for pem in (generated.cert_pem, generated.ca_pem):
        cert = x509.load_pem_x509_certificate(pem)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert datetime.timedelta(days=364) < lifetime <= datetime.timedelta(days=366)
    assert tls.VALIDITY_DAYS == 365
