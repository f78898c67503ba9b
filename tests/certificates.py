"""Certificates trustme does not make, built in memory with cryptography.

A server certificate that is self-signed, has another key type or names where its
issuer is published (AIA caIssuers); a trustme certificate sent with another chain than
its own; certificates patched so that cryptography cannot read them, as OpenSSL still
does: what misconfigured or unusual servers present.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from tests.servers import LOOPBACK, SERVER_HOSTNAME

#: Validity of the certificates made here, around the time they are made.
VALIDITY = datetime.timedelta(days=30)


def parsed(*pems: trustme.Blob) -> list[x509.Certificate]:
    """The certificates of PEM blobs, in order."""
    return [x509.load_pem_x509_certificate(pem.bytes()) for pem in pems]


def server_cert(
    issuer: trustme.CA | None = None,
    *,
    ca_issuers: Sequence[str] = (),
    key: CertificateIssuerPrivateKeyTypes | None = None,
    common_name: str = SERVER_HOSTNAME,
) -> trustme.LeafCert:
    """A certificate for localhost and 127.0.0.1, alone in its chain.

    Self-signed without `issuer`; `ca_issuers`: the URLs of its AIA caIssuers entries;
    `key`: its key (a new P-256 one by default).
    """
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name, signing_key = subject, key
    if issuer is not None:
        issuer_name = parsed(issuer.cert_pem)[0].subject
        issuer_key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(), None)
        assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)  # trustme's default
        signing_key = issuer_key
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - VALIDITY)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_HOSTNAME), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
    )
    if ca_issuers:
        access = [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url)
            )
            for url in ca_issuers
        ]
        builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
    # Ed25519 and Ed448 sign without a separate digest.
    eddsa = isinstance(signing_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    certificate = builder.sign(signing_key, None if eddsa else hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return trustme.LeafCert(key_pem, certificate.public_bytes(serialization.Encoding.PEM), [])


def presenting(cert: trustme.LeafCert, *chain: trustme.Blob) -> trustme.LeafCert:
    """`cert` (its key and certificate) sent with `chain` after it instead of its own."""
    return trustme.LeafCert(
        cert.private_key_pem.bytes(),
        cert.cert_chain_pems[0].bytes(),
        [blob.bytes() for blob in chain],
    )


#: DER encodings of object identifiers, swapped in certificates by :func:`patched`.
ED25519_OID = bytes.fromhex("06032b6570")  # 1.3.101.112, a key and a signature algorithm
UNKNOWN_OID = bytes.fromhex("06032b6572")  # 1.3.101.114, no algorithm cryptography knows
BASIC_CONSTRAINTS_OID = bytes.fromhex("0603551d13")
SUBJECT_ALT_NAME_OID = bytes.fromhex("0603551d11")
KEY_USAGE_OID = bytes.fromhex("0603551d0f")
_VERSION_3, _VERSION_4 = bytes.fromhex("a003020102"), bytes.fromhex("a003020103")


def patched(certificate: x509.Certificate, old: bytes, new: bytes) -> bytes:
    """The DER of `certificate` with `old` replaced by `new`, everywhere.

    For reading only: the signature no longer matches what it signed.
    """
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert old in der
    return der.replace(old, new)


def version_4(pem: trustme.Blob) -> bytes:
    """The DER of a certificate made version 4: OpenSSL loads it, cryptography does not."""
    return patched(parsed(pem)[0], _VERSION_3, _VERSION_4)
