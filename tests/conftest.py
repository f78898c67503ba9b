"""Fixtures shared by every test: trustme certificates, loopback servers, Prometheus.

Certificates are made in memory once per test session; only the CA certificate is
written to disk, into a pytest temporary directory, for tests that need a ``ca_file``.
Servers bind 127.0.0.1 port 0 in the test's own event loop and are stopped, with every
connection and task they started, when the test ends.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from smtp_session.tasks.trust import forget_contexts
from tests.dns_server import DnsServer
from tests.prometheus import PrometheusFactory
from tests.servers import (
    EXPIRED_NOT_AFTER,
    EXPIRED_NOT_BEFORE,
    LOOPBACK,
    LOOPBACK_IDENTITIES,
    SERVER_HOSTNAME,
    WRONG_HOST,
    RawServerFactory,
    SmtpServer,
    SmtpServerFactory,
)

# ----------------------------------------------------------------------------- certificates


@pytest.fixture(autouse=True)
def fresh_tls_contexts() -> Iterator[None]:
    """Each test starts with no cached TLS context.

    truststore loads the system store (SSL_CERT_FILE here) into the cached native
    context at every handshake, so a test that points SSL_CERT_FILE at the test CA
    would otherwise make every later test's native trust accept it.
    """
    yield
    forget_contexts()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """The test CA: tests trust it (``ca_pem_path``, ``client_ssl_context(ca)``)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem_path(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a PEM file holding the ``ca`` certificate, for ``ca_file``."""
    path = tmp_path_factory.mktemp("trust") / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return str(path)


@pytest.fixture(scope="session")
def good_cert(ca: trustme.CA) -> trustme.LeafCert:
    """A valid certificate for localhost and 127.0.0.1, issued by ``ca``."""
    return ca.issue_cert(*LOOPBACK_IDENTITIES, common_name=SERVER_HOSTNAME)


@pytest.fixture(scope="session")
def expired_cert(ca: trustme.CA) -> trustme.LeafCert:
    """A certificate for localhost and 127.0.0.1 by ``ca`` that expired on 2024-01-01."""
    return ca.issue_cert(
        *LOOPBACK_IDENTITIES,
        common_name=SERVER_HOSTNAME,
        not_before=EXPIRED_NOT_BEFORE,
        not_after=EXPIRED_NOT_AFTER,
    )


@pytest.fixture(scope="session")
def wrong_host_cert(ca: trustme.CA) -> trustme.LeafCert:
    """A valid certificate by ``ca`` for other.example only."""
    return ca.issue_cert(WRONG_HOST, common_name=WRONG_HOST)


@pytest.fixture(scope="session")
def unknown_ca_cert() -> trustme.LeafCert:
    """A valid certificate for localhost and 127.0.0.1 from a CA no test trusts."""
    return trustme.CA().issue_cert(*LOOPBACK_IDENTITIES, common_name=SERVER_HOSTNAME)


# ----------------------------------------------------------------------------- servers


@pytest.fixture
async def smtp_server_factory(good_cert: trustme.LeafCert) -> AsyncIterator[SmtpServerFactory]:
    """``await smtp_server_factory(mode=..., cert=..., auth=...)`` starts an SmtpServer."""
    factory = SmtpServerFactory(good_cert)
    yield factory
    await factory.aclose()


@pytest.fixture
async def smtp_server(smtp_server_factory: SmtpServerFactory) -> SmtpServer:
    """A started STARTTLS server (STARTTLS required) with ``good_cert`` and no AUTH."""
    return await smtp_server_factory()


@pytest.fixture
async def raw_server_factory(good_cert: trustme.LeafCert) -> AsyncIterator[RawServerFactory]:
    """``await raw_server_factory("banner_421")`` starts a RawServer with that fault."""
    factory = RawServerFactory(good_cert)
    yield factory
    await factory.aclose()


@pytest.fixture
def refused_port() -> Iterator[tuple[str, int]]:
    """``(host, port)`` on loopback where connecting is refused (bound, never listening)."""
    # Holding the bound socket keeps the port ours for the whole test, and without
    # listen() Linux answers a SYN with RST: ECONNREFUSED.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield LOOPBACK, int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- Prometheus


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """``prometheus_factory(targets=[...])`` starts a Prometheus; all stop after the test."""
    factory = PrometheusFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
async def dns_servers() -> AsyncIterator[list[DnsServer]]:
    """Servers started by :func:`serve` in this test, closed at teardown."""
    servers: list[DnsServer] = []
    yield servers
    for server in servers:
        server.close()
