"""Refused chains told apart, against real servers on loopback.

A self-signed certificate, a chain ending in a root nobody trusts, an incomplete chain, an
untrusted intermediate: each from the chain the server presented, read on the report-only
connection (docs/errors.md#refused-chains).
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trustme
from cryptography import x509

from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.session import open_session
from smtp_session.tasks.trust import MAX_CHAIN, fetch_unverified_chain
from tests.certificates import parsed, presenting, server_cert, version_4
from tests.servers import (
    LOOPBACK,
    LOOPBACK_IDENTITIES,
    SERVER_HOSTNAME,
    WAIT_TIMEOUT,
    LegacyTlsServer,
    RawBehaviour,
    RawServerFactory,
    SmtpServerFactory,
    TlsMode,
)

CA_ISSUERS_URL = "http://pki.example/intermediate.der"
BOTH = " (native and portable trust)"
USER, PASSWORD = "alice", "correct horse battery"


async def session(port: int, *, extra_ca_file: str | None = None, **fields: Any) -> Outcome:
    """A session to LOOPBACK:port; `extra_ca_file` is the operator's SMTP_SESSION_CA_FILE."""
    return await open_session(
        {"host": LOOPBACK, "port": port, **fields},
        environ={"SMTP_SESSION_SECRET_GOOD": f"{USER}:{PASSWORD}"},
        extra_ca_file=extra_ca_file,
    )


def subject(pem: trustme.Blob) -> str:
    return parsed(pem)[0].subject.rfc4514_string()


# ----------------------------------------------------------------------------- chains


@pytest.fixture(scope="module")
def self_signed() -> trustme.LeafCert:
    return server_cert()


@pytest.fixture(scope="module")
def untrusted_root() -> tuple[trustme.LeafCert, trustme.CA]:
    """A chain sent whole, up to and with its root, which nobody trusts."""
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert(*LOOPBACK_IDENTITIES, common_name=SERVER_HOSTNAME)
    return presenting(leaf, *leaf.cert_chain_pems[1:], root.cert_pem), root


@pytest.fixture(scope="module")
def incomplete(ca: trustme.CA) -> tuple[trustme.LeafCert, trustme.CA]:
    """A certificate from an intermediate of the trusted test CA, sent without it."""
    intermediate = ca.create_child_ca()
    return server_cert(intermediate, ca_issuers=[CA_ISSUERS_URL]), intermediate


@pytest.fixture(scope="module")
def untrusted_intermediate() -> trustme.LeafCert:
    """A certificate sent with its intermediate, whose root nobody trusts (nor is sent)."""
    intermediate = trustme.CA().create_child_ca()
    return intermediate.issue_cert(*LOOPBACK_IDENTITIES, common_name=SERVER_HOSTNAME)


async def test_a_self_signed_certificate_is_named_as_such(
    smtp_server_factory: SmtpServerFactory, self_signed: trustme.LeafCert
) -> None:
    server = await smtp_server_factory(cert=self_signed, auth={USER: PASSWORD})
    outcome = await session(server.port, credentials="good")
    assert (outcome.error, outcome.stage) == ("tls_untrusted", "starttls")
    assert outcome.err_message == (
        'certificate verify failed: the server\'s certificate "CN=localhost" is self-signed: '
        f"no CA issued it{BOTH}"
    )
    assert outcome.hint == (
        "give the server a certificate from a CA, or trust this one itself: add it with ca_file"
    )
    assert outcome.tls is not None and outcome.tls.cert is not None
    chain = outcome.tls.cert.chain
    assert chain is not None
    assert [(entry.subject, entry.issuer) for entry in chain] == [("CN=localhost", "CN=localhost")]
    assert chain[0].sha256 == outcome.tls.cert.sha256
    # Two verified tries and the report-only read of the chain: no AUTH on any of them.
    assert server.connections_accepted == 3
    assert not server.received("AUTH")


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_a_chain_ending_in_an_untrusted_root_names_the_root(
    smtp_server_factory: SmtpServerFactory,
    untrusted_root: tuple[trustme.LeafCert, trustme.CA],
    mode: TlsMode,
) -> None:
    cert, root = untrusted_root
    server = await smtp_server_factory(mode=mode, cert=cert)
    outcome = await session(server.port, security=mode)
    assert outcome.error == "tls_untrusted"
    root_name = subject(root.cert_pem)
    assert outcome.err_message == (
        f'certificate verify failed: the chain ends in the self-signed root "{root_name}", '
        f"which no trust store holds{BOTH}"
    )
    assert outcome.hint == (
        f'if "{root_name}" is your organisation\'s CA, add it with ca_file; otherwise the '
        "server needs a certificate from a CA that clients trust"
    )
    assert outcome.tls is not None and outcome.tls.cert is not None
    chain = outcome.tls.cert.chain
    assert chain is not None
    # In the server's order, each the issuer of the one before.
    assert [entry.subject for entry in chain] == [subject(pem) for pem in cert.cert_chain_pems]
    assert [entry.issuer for entry in chain[:-1]] == [entry.subject for entry in chain[1:]]


async def test_an_incomplete_chain_names_the_missing_intermediate_and_where_it_is(
    smtp_server_factory: SmtpServerFactory,
    incomplete: tuple[trustme.LeafCert, trustme.CA],
    ca_pem_path: str,
) -> None:
    cert, intermediate = incomplete
    server = await smtp_server_factory(cert=cert)
    outcome = await session(server.port, ca_file=ca_pem_path)  # the root is trusted
    assert outcome.error == "tls_untrusted"
    missing = subject(intermediate.cert_pem)
    assert outcome.err_message == (
        f'certificate verify failed: incomplete chain: the server did not send "{missing}", '
        f"the issuer of its certificate (caIssuers {CA_ISSUERS_URL}), and no trust store "
        f"holds it{BOTH}"
    )
    assert outcome.hint == (
        "fix the server's chain: it must send the intermediate certificate(s) after its own "
        f'(a full-chain file); if "{missing}" is your organisation\'s root CA, add it with '
        "ca_file instead"
    )
    assert outcome.tls is not None and outcome.tls.cert is not None
    assert outcome.tls.cert.chain is not None
    assert len(outcome.tls.cert.chain) == 1


async def test_an_untrusted_intermediate_names_it_and_its_issuer(
    smtp_server_factory: SmtpServerFactory, untrusted_intermediate: trustme.LeafCert
) -> None:
    server = await smtp_server_factory(mode="tls", cert=untrusted_intermediate)
    outcome = await session(server.port, security="tls", trust="native")
    intermediate_pem = untrusted_intermediate.cert_chain_pems[1]
    name, issuer = subject(intermediate_pem), parsed(intermediate_pem)[0].issuer.rfc4514_string()
    assert (outcome.error, outcome.stage) == ("tls_untrusted", "tls")
    assert outcome.err_message == (
        f'certificate verify failed: the chain ends in the intermediate "{name}", whose '
        f'issuer "{issuer}" no trust store holds'
    )
    # trust=native alone cannot take a ca_file: the hint says what can.
    assert outcome.hint == (
        f'if "{issuer}" is your organisation\'s root CA, add it with ca_file and trust=auto; '
        "otherwise fix the server's chain: its intermediate leads to no root that clients trust"
    )


async def test_a_chain_that_a_trusted_ca_signed_keeps_the_verifiers_reason(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str
) -> None:
    # The operator's CA file trusts the test CA, but the request asked for the system's
    # store only: the chain is complete, so nothing is said about it.
    server = await smtp_server_factory()
    outcome = await session(server.port, trust="native", extra_ca_file=ca_pem_path)
    assert outcome.error == "tls_untrusted"
    assert outcome.err_message == (
        "certificate verify failed: unable to get local issuer certificate"
    )
    assert outcome.hint == "try trust=auto, or trust=portable with the issuing CA in ca_file"


async def test_the_presented_chain_is_bounded(
    smtp_server_factory: SmtpServerFactory, self_signed: trustme.LeafCert
) -> None:
    others = [trustme.CA().cert_pem for _ in range(MAX_CHAIN + 2)]
    server = await smtp_server_factory(cert=presenting(self_signed, *others))
    outcome = await session(server.port)
    assert outcome.tls is not None and outcome.tls.cert is not None
    assert outcome.tls.cert.chain is not None
    assert len(outcome.tls.cert.chain) == MAX_CHAIN
    # The unrelated certificates are no issuer of it: still a self-signed certificate.
    assert "is self-signed" in outcome.err_message


# ----------------------------------------------------------------------------- the report-only read


async def read_chain(
    port: int, *, implicit_tls: bool, seconds: float = WAIT_TIMEOUT, address: str = LOOPBACK
) -> list[x509.Certificate]:
    return await fetch_unverified_chain(
        address=address,
        port=port,
        server_hostname=SERVER_HOSTNAME,  # a name: sent as SNI
        implicit_tls=implicit_tls,
        local_hostname="probe.example",
        seconds=seconds,
    )


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_the_report_only_read_sends_nothing_but_the_handshake(
    smtp_server_factory: SmtpServerFactory,
    untrusted_root: tuple[trustme.LeafCert, trustme.CA],
    mode: TlsMode,
) -> None:
    cert, _ = untrusted_root
    server = await smtp_server_factory(mode=mode, cert=cert)
    chain = await read_chain(server.port, implicit_tls=mode == "tls")
    assert chain == parsed(*cert.cert_chain_pems)
    assert server.verbs == (["EHLO", "STARTTLS"] if mode == "starttls" else [])
    await server.wait_idle()  # it closed the connection, after a complete handshake
    assert (server.tls_handshakes_completed, server.tls_handshake_failures) == (1, 0)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_the_report_only_read_gives_up_on_a_failed_handshake(
    good_cert: trustme.LeafCert, mode: TlsMode
) -> None:
    async with LegacyTlsServer(good_cert, mode=mode) as server:
        assert await read_chain(server.port, implicit_tls=mode == "tls") == []
    assert server.handshakes_refused == 1


async def test_the_report_only_read_gives_up_without_starttls(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    assert await read_chain(server.port, implicit_tls=False) == []
    assert server.verbs == ["EHLO", "STARTTLS"]


@pytest.mark.parametrize(
    ("behaviour", "seconds"), [("reset_on_connect", WAIT_TIMEOUT), ("silent", 0.2)]
)
async def test_the_report_only_read_gives_up_on_a_lost_or_silent_server(
    raw_server_factory: RawServerFactory, behaviour: RawBehaviour, seconds: float
) -> None:
    server = await raw_server_factory(behaviour)
    assert await read_chain(server.port, implicit_tls=True, seconds=seconds) == []
    assert server.connections_accepted == 1


@pytest.mark.parametrize(("address", "seconds"), [(LOOPBACK, 0.0), ("localhost", WAIT_TIMEOUT)])
async def test_the_report_only_read_needs_time_and_the_sessions_address(
    raw_server_factory: RawServerFactory, address: str, seconds: float
) -> None:
    server = await raw_server_factory("silent")
    assert await read_chain(server.port, implicit_tls=True, seconds=seconds, address=address) == []
    assert server.connections_accepted == 0  # no deadline left, or a name to look up again


async def test_a_certificate_cryptography_will_not_read_leaves_the_outcome_without_one(
    smtp_server_factory: SmtpServerFactory, good_cert: trustme.LeafCert
) -> None:
    # OpenSSL sends (and its verifier refuses) a version 4 certificate; cryptography
    # will not read it, so the outcome has no certificate rather than an internal error.
    unreadable = ssl.DER_cert_to_PEM_cert(version_4(good_cert.cert_chain_pems[0])).encode()
    cert = trustme.LeafCert(good_cert.private_key_pem.bytes(), unreadable, [])
    server = await smtp_server_factory(cert=cert)
    outcome = await session(server.port, trust="portable")
    assert outcome.error == "tls_untrusted"
    assert outcome.tls is not None
    assert outcome.tls.cert is None
    assert outcome.hint == "add the issuing CA with ca_file"
