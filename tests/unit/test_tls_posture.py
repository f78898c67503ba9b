"""The certificate's key and signature algorithm described, legacy TLS named: no network.

Certificates are made in memory with cryptography (tests/certificates.py); the sessions
against real servers are in tests/integration/test_tls_posture.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from smtp_session.tasks.classify import LEGACY_TLS_HINT, LEGACY_TLS_MESSAGE, classify
from smtp_session.tasks.errors import ErrorCategory, Stage
from smtp_session.tasks.trust import describe_certificate, describe_chain
from tests.certificates import (
    BASIC_CONSTRAINTS_OID,
    ED25519_OID,
    SUBJECT_ALT_NAME_OID,
    UNKNOWN_OID,
    parsed,
    patched,
    server_cert,
    version_4,
)

# ----------------------------------------------------------------------------- the certificate


KeyMaker = Callable[[], CertificateIssuerPrivateKeyTypes]


@pytest.mark.parametrize(
    ("make_key", "expected"),
    [
        (
            lambda: rsa.generate_private_key(65537, 3072),
            ("RSA", 3072, None, "sha256WithRSAEncryption"),
        ),
        (
            lambda: ec.generate_private_key(ec.SECP384R1()),
            ("EC", 384, "secp384r1", "ecdsa-with-SHA256"),
        ),
        (ed25519.Ed25519PrivateKey.generate, ("Ed25519", None, None, "ed25519")),
        (ed448.Ed448PrivateKey.generate, ("Ed448", None, None, "ed448")),
        (lambda: dsa.generate_private_key(2048), ("DSA", 2048, None, "dsa-with-sha256")),
    ],
    ids=["rsa", "ec", "ed25519", "ed448", "dsa"],
)
def test_the_key_and_signature_algorithm_are_described(
    make_key: KeyMaker, expected: tuple[str, int | None, str | None, str]
) -> None:
    [certificate] = parsed(*server_cert(key=make_key()).cert_chain_pems)
    described = describe_certificate(certificate.public_bytes(Encoding.DER))
    assert described is not None
    assert (
        described.key_type,
        described.key_bits,
        described.key_curve,
        described.signature_algorithm,
    ) == expected


def test_algorithms_cryptography_does_not_know_are_left_out_or_dotted() -> None:
    [certificate] = parsed(*server_cert(key=ed25519.Ed25519PrivateKey.generate()).cert_chain_pems)
    # Ed25519's OID names the key and the signature algorithm: both unknown now.
    der = patched(certificate, ED25519_OID, UNKNOWN_OID)
    described = describe_certificate(der)
    assert described is not None
    assert (described.key_type, described.key_bits, described.signature_algorithm) == (
        None,
        None,
        "1.3.101.114",
    )


def test_certificates_cryptography_will_not_read_are_not_described() -> None:
    assert describe_certificate(version_4(trustme.CA().cert_pem)) is None
    # Its basicConstraints made a second subjectAltName: it loads, its extensions do not.
    [certificate] = parsed(*server_cert().cert_chain_pems)
    der = patched(certificate, BASIC_CONSTRAINTS_OID, SUBJECT_ALT_NAME_OID)
    assert describe_certificate(der) is None
    assert describe_chain([x509.load_der_x509_certificate(der)]) is None
    assert describe_chain([]) is None


# ----------------------------------------------------------------------------- legacy TLS


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        # The server's alert to a ClientHello with nothing older than TLS 1.2.
        ("TLSV1_ALERT_PROTOCOL_VERSION", "tlsv1 alert protocol version"),
        # A server that answers with a TLS 1.0/1.1 ServerHello all the same.
        ("UNSUPPORTED_PROTOCOL", "unsupported protocol"),
    ],
)
def test_a_server_with_only_old_tls_is_named_so(reason: str, text: str) -> None:
    error = ssl.SSLError(1, f"[SSL: {reason}] {text}")
    error.reason = reason
    failure = classify(error, Stage.TLS, host="smtp.example.com", endpoint="192.0.2.1 port 465")
    assert (failure.category, failure.message, failure.hint) == (
        ErrorCategory.TLS_HANDSHAKE,
        f"{LEGACY_TLS_MESSAGE} ({text})",
        LEGACY_TLS_HINT,
    )
