"""Trust modes: the TLS contexts that verify a server, and reading its certificate."""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import sys
from typing import Literal

import certifi
import truststore
from aiosmtplib import SMTP, SMTPException
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from smtp_session.tasks.outcome import CertInfo
from smtp_session.tasks.resolve import connect_first, literal_address

TrustMode = Literal["native", "portable"]
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
_TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
#: What cryptography raises for a certificate, or a part of one, that it will not read
#: (OpenSSL, less strict, may have taken it in a handshake or a store).
UNREADABLE = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
# The public key types a certificate names, as `tls.cert.key_type` says them.
_KEY_TYPES: tuple[tuple[type, str], ...] = (
    (rsa.RSAPublicKey, "RSA"),
    (ec.EllipticCurvePublicKey, "EC"),
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
    (dsa.DSAPublicKey, "DSA"),
)


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_TLS_VERSION
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def _native_context() -> ssl.SSLContext:
    if sys.platform == "linux":
        # On Linux the operating system's verifier is OpenSSL with the system store, which
        # is what truststore uses there too, but truststore reloads the whole store at
        # every handshake (~20 ms of CPU each). Loaded once here, and rebuilt when the
        # store changes (see _store_version). Where OpenSSL's default paths hold no
        # certificate, truststore knows where else distributions keep them.
        context = ssl.create_default_context()
        if context.cert_store_stats()["x509_ca"] > 0:
            return context
    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _mtime(path: str | None) -> float:
    try:
        return os.stat(path).st_mtime if path else 0.0
    except OSError:
        return 0.0


def _store_version() -> tuple[str | None, str | None, float, float]:
    """Where the system store is (SSL_CERT_FILE/SSL_CERT_DIR honoured) and when it changed."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile, paths.capath, _mtime(paths.cafile), _mtime(paths.capath)


@functools.lru_cache(maxsize=64)
def _cached_context(
    mode: TrustMode, ca_files: tuple[str, ...], ca_pem: str | None, _version: object
) -> ssl.SSLContext:
    if mode == "native":
        return _harden(_native_context())
    context = ssl.create_default_context(cafile=certifi.where())
    for ca_file in ca_files:
        context.load_verify_locations(cafile=ca_file)
    if ca_pem is not None:
        context.load_verify_locations(cadata=ca_pem)  # in memory: never written to disk
    return _harden(context)


def forget_contexts() -> None:
    """Drop the cached contexts (truststore's native one keeps every store it loaded)."""
    _cached_context.cache_clear()


def verifying_context(
    mode: TrustMode, *ca_files: str | None, ca_pem: str | None = None
) -> ssl.SSLContext:
    """A context that verifies the chain and the host name, TLS 1.2 or newer.

    `native` asks the operating system's verifier; `portable` uses certifi's bundle plus
    the `ca_files` given (None ones skipped) and the certificates of `ca_pem`. Contexts are
    cached, since building one reads a whole CA bundle, and built anew when the bundles
    behind them change (mtime or path).
    """
    if mode == "native":
        return _cached_context(mode, (), None, _store_version())
    files = tuple(ca_file for ca_file in ca_files if ca_file)
    return _cached_context(mode, files, ca_pem, tuple(_mtime(ca_file) for ca_file in files))


def _names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        )
    except x509.ExtensionNotFound:
        return []
    sans = extension.value
    assert isinstance(sans, x509.SubjectAlternativeName)
    return [*sans.get_values_for_type(x509.DNSName)] + [
        str(address) for address in sans.get_values_for_type(x509.IPAddress)
    ]


def _key(certificate: x509.Certificate) -> tuple[str | None, int | None, str | None]:
    """The public key's type, size in bits and (EC) curve name."""
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):  # a key type cryptography cannot load
        return None, None, None
    kind = next((name for cls, name in _KEY_TYPES if isinstance(key, cls)), None)
    curve = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else None
    bits = getattr(key, "key_size", None)
    # Ed25519 and Ed448 keys have one size each, which their type names.
    return kind, bits if isinstance(bits, int) else None, curve


def _signature_algorithm(certificate: x509.Certificate) -> str:
    oid = certificate.signature_algorithm_oid
    # cryptography's name for the OID is OpenSSL's (sha256WithRSAEncryption); its
    # dotted form when cryptography has none.
    return oid.dotted_string if oid._name == "Unknown OID" else oid._name


def _describe(certificate: x509.Certificate) -> CertInfo:
    key_type, key_bits, key_curve = _key(certificate)
    return CertInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        not_before=certificate.not_valid_before_utc.strftime(_TIMESTAMP),
        not_after=certificate.not_valid_after_utc.strftime(_TIMESTAMP),
        sans=_names(certificate),
        sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        key_type=key_type,
        key_bits=key_bits,
        key_curve=key_curve,
        signature_algorithm=_signature_algorithm(certificate),
    )


@functools.lru_cache(maxsize=1024)
def describe_certificate(der: bytes) -> CertInfo | None:
    """The fields an operator needs to tell which certificate a server presented."""
    try:
        return _describe(x509.load_der_x509_certificate(der))
    except UNREADABLE:
        return None


def peer_certificate(smtp: SMTP) -> CertInfo | None:
    """The certificate of a live TLS connection (binary form: complete even if unverified)."""
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return describe_certificate(der) if der else None


def _report_only_context() -> ssl.SSLContext:
    # REPORT-ONLY: this context never carries a session. It completes one handshake
    # after a verification failure so that the outcome can say *which* certificate was
    # refused; the connection sends no credentials and no mail command, and is closed
    # as soon as the certificate is read.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def fetch_unverified_certificate(
    *,
    address: str,
    port: int,
    server_hostname: str,
    implicit_tls: bool,
    local_hostname: str,
    seconds: float,
) -> CertInfo | None:
    """Read a refused server certificate for the report only (see _report_only_context).

    Bounded by `seconds`, the rest of the attempt's deadline; any failure gives None.
    """
    if seconds <= 0:
        return None
    addresses = literal_address(address, port)
    if addresses is None:
        return None
    smtp: SMTP | None = None
    try:
        async with asyncio.timeout(seconds):
            loop = asyncio.get_running_loop()
            # The address the session reached, not the name again: no second lookup.
            sock = await connect_first(addresses, loop.time() + seconds, [])
            smtp = SMTP(
                hostname=server_hostname,  # for SNI: the server may pick its certificate by it
                sock=sock,
                local_hostname=local_hostname,
                use_tls=implicit_tls,
                start_tls=False,
                tls_context=_report_only_context(),
                timeout=None,
            )
            await smtp.connect()
            if not implicit_tls:
                await smtp.ehlo()
                await smtp.starttls(tls_context=_report_only_context())
            return peer_certificate(smtp)
    except (SMTPException, OSError, TimeoutError, ValueError):
        # The report is best effort: whatever stops it, the outcome already has its error.
        return None
    finally:
        if smtp is not None:
            smtp.close()
