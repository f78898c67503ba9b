"""Refused chains told apart (tasks/chain.py), from chains made in memory: no network.

Chains are made with trustme and cryptography (tests/certificates.py); the sessions
against real servers are in tests/integration/test_chains.py.
"""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

import certifi
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.utils import CryptographyDeprecationWarning

from smtp_session.tasks.chain import ChainFault, ChainProblem, diagnose
from smtp_session.tasks.errors import Stage
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.server_text import MAX_QUOTED_REPLY
from smtp_session.tasks.trust import describe_chain, portable_anchors
from tests.certificates import (
    BASIC_CONSTRAINTS_OID,
    ED25519_OID,
    KEY_USAGE_OID,
    UNKNOWN_OID,
    parsed,
    patched,
    presenting,
    server_cert,
    version_4,
)
from tests.servers import LOOPBACK_IDENTITIES, SERVER_HOSTNAME


def leaf_and_chain(cert: trustme.LeafCert) -> list[x509.Certificate]:
    return parsed(*cert.cert_chain_pems)


def quoted(certificate: x509.Certificate) -> str:
    return f'"{certificate.subject.rfc4514_string()}"'


@pytest.fixture(scope="module")
def root() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def intermediate(root: trustme.CA) -> trustme.CA:
    return root.create_child_ca()


@pytest.fixture(scope="module")
def anchored(intermediate: trustme.CA) -> trustme.LeafCert:
    """A certificate sent with its intermediate (trustme's chain stops below the root)."""
    return intermediate.issue_cert(*LOOPBACK_IDENTITIES, common_name=SERVER_HOSTNAME)


# ----------------------------------------------------------------------------- the four faults


def test_a_self_signed_certificate() -> None:
    [certificate] = leaf_and_chain(server_cert())
    problem = diagnose([certificate], [])
    assert problem == ChainProblem(ChainFault.SELF_SIGNED, '"CN=localhost"', '"CN=localhost"')
    assert problem.message == (
        'the server\'s certificate "CN=localhost" is self-signed: no CA issued it'
    )
    assert problem.hint("with ca_file") == (
        "give the server a certificate from a CA, or trust this one itself: add it with ca_file"
    )


def test_a_root_sent_with_the_chain_is_named_in_any_order(
    root: trustme.CA, anchored: trustme.LeafCert
) -> None:
    leaf, middle = leaf_and_chain(anchored)
    [root_cert] = parsed(root.cert_pem)
    # Sent root first: the chain is followed by issuer, not by position.
    problem = diagnose([leaf, root_cert, middle], [])
    assert problem is not None
    assert (problem.fault, problem.subject) == (ChainFault.UNTRUSTED_ROOT, quoted(root_cert))
    assert problem.message == (
        f"the chain ends in the self-signed root {quoted(root_cert)}, which no trust store holds"
    )


def test_an_incomplete_chain_names_the_missing_issuer_and_its_url(
    root: trustme.CA, intermediate: trustme.CA
) -> None:
    cert = server_cert(intermediate, ca_issuers=["http://pki.example/int.der"])
    problem = diagnose(leaf_and_chain(cert), parsed(root.cert_pem))  # the root is trusted
    [missing] = parsed(intermediate.cert_pem)
    assert problem == ChainProblem(
        ChainFault.INCOMPLETE, '"CN=localhost"', quoted(missing), "http://pki.example/int.der"
    )
    assert problem.message == (
        f"incomplete chain: the server did not send {quoted(missing)}, the issuer of its "
        "certificate (caIssuers http://pki.example/int.der), and no trust store holds it"
    )
    assert problem.hint("with ca_file and trust=auto") == (
        "fix the server's chain: it must send the intermediate certificate(s) after its own "
        f"(a full-chain file); if {quoted(missing)} is your organisation's root CA, add it "
        "with ca_file and trust=auto instead"
    )


def test_an_intermediate_whose_issuer_nobody_trusts(
    root: trustme.CA, anchored: trustme.LeafCert
) -> None:
    leaf, middle = leaf_and_chain(anchored)
    problem = diagnose([leaf, middle], [])
    assert problem is not None
    [root_cert] = parsed(root.cert_pem)
    assert (problem.fault, problem.subject, problem.issuer, problem.ca_issuers) == (
        ChainFault.UNTRUSTED_INTERMEDIATE,
        quoted(middle),
        quoted(root_cert),
        None,
    )
    assert problem.message == (
        f"the chain ends in the intermediate {quoted(middle)}, whose issuer "
        f"{quoted(root_cert)} no trust store holds"
    )


# ----------------------------------------------------------------------------- nothing to say


def test_a_chain_a_trusted_ca_signed_is_not_diagnosed(
    root: trustme.CA, anchored: trustme.LeafCert
) -> None:
    anchors = parsed(root.cert_pem)
    assert diagnose(leaf_and_chain(anchored), anchors) is None
    # The trusted root sent along too: still complete.
    assert (
        diagnose(
            leaf_and_chain(presenting(anchored, *anchored.cert_chain_pems[1:], root.cert_pem)),
            anchors,
        )
        is None
    )


def test_a_self_signed_certificate_that_is_trusted_is_not_diagnosed() -> None:
    cert = leaf_and_chain(server_cert())
    assert diagnose(cert, cert) is None


def test_no_certificate_is_not_diagnosed() -> None:
    assert diagnose([], []) is None


def test_an_issuer_with_the_right_name_and_another_key_is_not_the_issuer(
    intermediate: trustme.CA,
) -> None:
    # Same name, other key: a CA's renewed key, or an impostor. It signed nothing here.
    cert = leaf_and_chain(server_cert(intermediate))
    impostor = server_cert(common_name="localhost")
    problem = diagnose(cert, leaf_and_chain(impostor))
    assert problem is not None
    assert problem.fault is ChainFault.INCOMPLETE


def test_the_portable_store_is_certifis_roots_and_the_requests_cas(root: trustme.CA) -> None:
    with warnings.catch_warnings():
        # certifi holds roots with serial number 0 (Go Daddy G2): they are loaded, quietly.
        warnings.simplefilter("error")
        anchors = portable_anchors(None, ca_pem=root.cert_pem.bytes().decode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # the same, read here
        certifi_roots = x509.load_pem_x509_certificates(Path(certifi.where()).read_bytes())
    assert set(anchors) == {*certifi_roots, *parsed(root.cert_pem)}


# ----------------------------------------------------------------------------- server's words


def test_names_and_urls_are_made_printable_and_bounded(intermediate: trustme.CA) -> None:
    long_url = "http://pki.example/" + "x" * 300 + "\n.der"
    cert = server_cert(common_name="evil\nname\x1b[31m")
    [certificate] = leaf_and_chain(cert)
    problem = diagnose([certificate], [])
    assert problem is not None
    assert problem.subject == '"CN=evil / name?[31m"'
    issued = leaf_and_chain(server_cert(intermediate, ca_issuers=[long_url]))
    incomplete = diagnose(issued, [])
    assert incomplete is not None and incomplete.ca_issuers is not None
    assert incomplete.ca_issuers.isprintable()
    assert len(incomplete.ca_issuers) <= MAX_QUOTED_REPLY + 1  # the ellipsis


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        (
            ["ldap:///CN=Issuing,DC=corp", "http://pki.corp/issuing.crt"],
            "http://pki.corp/issuing.crt",
        ),
        (["ldap:///CN=Issuing,DC=corp"], "ldap:///CN=Issuing,DC=corp"),
        ([], None),
    ],
)
def test_the_http_ca_issuers_url_is_preferred(
    intermediate: trustme.CA, urls: list[str], expected: str | None
) -> None:
    # AD CS lists its LDAP location before the HTTP one.
    problem = diagnose(leaf_and_chain(server_cert(intermediate, ca_issuers=urls)), [])
    assert problem is not None
    assert problem.ca_issuers == expected


# ------------------------------------------------------------------------- cryptography's limits


def test_parts_cryptography_will_not_use_do_not_stop_the_diagnosis(
    anchored: trustme.LeafCert,
) -> None:
    leaf, middle = leaf_and_chain(anchored)
    # The intermediate's keyUsage made a second basicConstraints: its AIA cannot be read.
    broken = x509.load_der_x509_certificate(patched(middle, KEY_USAGE_OID, BASIC_CONSTRAINTS_OID))
    problem = diagnose([leaf, broken], [])
    assert problem is not None
    assert (problem.fault, problem.ca_issuers) == (ChainFault.UNTRUSTED_INTERMEDIATE, None)
    # A trusted "CN=localhost" with a key type cryptography does not know signed nothing.
    [unknown] = leaf_and_chain(server_cert(key=ed25519.Ed25519PrivateKey.generate()))
    anchor = x509.load_der_x509_certificate(patched(unknown, ED25519_OID, UNKNOWN_OID))
    problem = diagnose(leaf_and_chain(server_cert()), [anchor])
    assert problem is not None
    assert problem.fault is ChainFault.SELF_SIGNED


def test_a_store_certificate_cryptography_will_not_read_is_left_out(root: trustme.CA) -> None:
    # OpenSSL loads a version 4 certificate into a store; cryptography refuses it.
    unreadable = ssl.DER_cert_to_PEM_cert(version_4(root.cert_pem))
    anchors = portable_anchors(None, ca_pem=unreadable + root.cert_pem.bytes().decode())
    assert parsed(root.cert_pem)[0] in anchors


def test_a_chain_of_a_newer_worker_reads_back() -> None:
    [certificate] = leaf_and_chain(server_cert())
    cert = describe_chain([certificate])
    assert cert is not None
    outcome = Outcome(
        ok=False, err_message="x", stage=Stage.STARTTLS, host="h", started_at="2026-01-01T00:00:00Z"
    )
    data = outcome.to_dict()
    data["tls"] = {"cert": cert.model_dump(mode="json")}
    data["tls"]["cert"]["chain"][0]["novel"] = True  # a field this version does not know
    read = Outcome.from_dict(data)
    assert read.tls is not None and read.tls.cert == cert
