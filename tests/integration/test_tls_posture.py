"""The TLS posture of a server, recorded and flagged, against real servers on loopback.

The key and signature algorithm of its certificate, a server with only TLS 1.0/1.1, AUTH
offered before STARTTLS.
"""

from __future__ import annotations

from typing import Any

import pytest
import trustme
from structlog.testing import capture_logs

from smtp_session.tasks.classify import LEGACY_TLS_HINT, LEGACY_TLS_MESSAGE
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.session import open_session
from tests.servers import (
    LOOPBACK,
    LOOPBACK_IDENTITIES,
    LegacyTlsServer,
    SmtpMode,
    SmtpServerFactory,
    TlsMode,
)

USER, PASSWORD = "alice", "correct horse battery"


async def session(port: int, **fields: Any) -> Outcome:
    return await open_session({"host": LOOPBACK, "port": port, **fields})


@pytest.mark.parametrize(
    ("key_type", "expected"),
    [
        (trustme.KeyType.RSA, ("RSA", 2048, None, "sha256WithRSAEncryption")),
        (trustme.KeyType.ECDSA, ("EC", 256, "secp256r1", "ecdsa-with-SHA256")),
    ],
)
async def test_the_certificates_key_and_signature_algorithm_are_recorded(
    smtp_server_factory: SmtpServerFactory,
    key_type: trustme.KeyType,
    expected: tuple[str, int, str | None, str],
) -> None:
    issuer = trustme.CA(key_type=key_type)
    cert = issuer.issue_cert(*LOOPBACK_IDENTITIES, key_type=key_type)
    server = await smtp_server_factory(cert=cert)
    outcome = await session(server.port, ca_pem=issuer.cert_pem.bytes().decode())
    assert outcome.ok, outcome.err_message
    assert outcome.tls is not None and outcome.tls.cert is not None
    recorded = outcome.tls.cert
    assert (
        recorded.key_type,
        recorded.key_bits,
        recorded.key_curve,
        recorded.signature_algorithm,
    ) == expected
    assert recorded.chain is None  # a verified session: Python's ssl gives only the leaf


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_a_server_with_only_tls_1_0_and_1_1_is_named_so(
    good_cert: trustme.LeafCert, mode: TlsMode
) -> None:
    async with LegacyTlsServer(good_cert, mode=mode) as server:
        outcome = await session(server.port, security=mode, retries=2)
    assert (outcome.error, outcome.stage, outcome.attempts) == ("tls_handshake", mode, 1)
    assert outcome.err_message == f"{LEGACY_TLS_MESSAGE} (tlsv1 alert protocol version)"
    assert outcome.hint == LEGACY_TLS_HINT
    assert server.handshakes_refused == 1


@pytest.mark.parametrize(
    ("mode", "auth_require_tls", "flagged"),
    [("starttls", False, True), ("plain", False, True), ("starttls", True, False)],
)
async def test_auth_offered_in_plaintext_is_flagged_and_logged(
    smtp_server_factory: SmtpServerFactory,
    ca_pem_path: str,
    mode: SmtpMode,
    auth_require_tls: bool,
    flagged: bool,
) -> None:
    server = await smtp_server_factory(
        mode=mode, auth={USER: PASSWORD}, auth_require_tls=auth_require_tls
    )
    with capture_logs() as logs:
        outcome = await session(server.port, security=mode, ca_file=ca_pem_path)
    assert outcome.ok, outcome.err_message
    assert outcome.server is not None
    assert "AUTH" in outcome.server.extensions
    assert outcome.server.auth_before_tls is flagged
    warnings = [entry for entry in logs if entry["event"] == "session.auth_before_tls"]
    expected = {"host": LOOPBACK, "port": server.port, "address": LOOPBACK, "target": None}
    assert warnings == (
        [{**expected, "event": "session.auth_before_tls", "log_level": "warning"}]
        if flagged
        else []
    )
