"""CA files: read without hanging, bounded, and trusted by what they hold, not their mtime."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from smtp_session.tasks.trust import MAX_CA_FILE, read_ca_file, verifying_context
from smtp_session.worker.settings import InvalidSettings, Settings


def trusts(path: Path, ca: trustme.CA) -> bool:
    """Whether a portable context for the CA file `path` trusts `ca`."""
    der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(Encoding.DER)
    return der in verifying_context("portable", str(path)).get_ca_certs(binary_form=True)


def test_a_replaced_ca_is_used_at_once_whatever_its_mtime(tmp_path: Path) -> None:
    first, second = (
        trustme.CA(organization_name="First CA"),
        trustme.CA(organization_name="Second CA"),
    )
    path = tmp_path / "ca.pem"
    first.cert_pem.write_to_path(str(path))
    stamp = os.stat(path).st_mtime_ns
    assert trusts(path, first)

    second.cert_pem.write_to_path(str(path))
    os.utime(path, ns=(stamp, stamp))  # the same mtime: a cache keyed by it would not see
    assert trusts(path, second) and not trusts(path, first)


def test_a_fifo_fails_at_once_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)  # nobody writes: a blocking open or read would wait forever
    started = time.monotonic()
    with pytest.raises(ValueError, match="is not a regular file"):
        read_ca_file(str(fifo))
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("path", ["/dev/zero", "/"])
def test_devices_and_directories_are_not_ca_files(path: str) -> None:
    with pytest.raises(ValueError, match="is not a regular file"):
        read_ca_file(path)


def test_a_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.pem"
    path.write_bytes(b"#" * (MAX_CA_FILE + 1))
    with pytest.raises(ValueError, match="is larger than 4 MiB"):
        read_ca_file(str(path))


def test_only_the_certificates_are_kept(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mail.example.test")
    path = tmp_path / "mixed.pem"
    path.write_bytes(
        leaf.private_key_pem.bytes() + "naïve comment\n".encode() + ca.cert_pem.bytes()
    )
    text = read_ca_file(str(path))
    assert "PRIVATE KEY" not in text
    assert text == ca.cert_pem.bytes().decode().strip()


def test_an_unusable_ca_file_setting_is_named(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidSettings, match=r"SMTP_SESSION_CA_FILE: .*is not a regular file"):
        Settings(ca_file=fifo).check_ca_file()
    with pytest.raises(InvalidSettings, match="No such file or directory"):
        Settings(ca_file=tmp_path / "missing.pem").check_ca_file()
    Settings(ca_file=None).check_ca_file()  # none: nothing to check
