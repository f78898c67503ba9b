"""The probe's verdict on a port's first bytes, and the ClientHello it sends."""

from __future__ import annotations

import pytest

from smtp_session.tasks.probe import (
    MAX_PROBE_BYTES,
    PortEvidence,
    Speaks,
    client_hello,
    judge,
)
from smtp_session.tasks.server_text import MAX_QUOTED_REPLY

TLS = PortEvidence(Speaks.TLS)


@pytest.mark.parametrize(
    ("first", "evidence"),
    [
        pytest.param(b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03", TLS, id="server-hello"),
        pytest.param(b"\x15\x03\x01\x00\x02\x02\x46", TLS, id="alert-protocol-version"),
        pytest.param(b"\x15\x03", TLS, id="record-header-start"),
        pytest.param(
            b"220 mx.example ESMTP\r\n",
            PortEvidence(Speaks.SMTP, "220 mx.example ESMTP"),
            id="greeting",
        ),
        pytest.param(
            b"220-mx.example ESMTP\r\n220 more\r\n",
            PortEvidence(Speaks.SMTP, "220-mx.example ESMTP"),
            id="first-line-of-several",
        ),
        pytest.param(b"220-mx", PortEvidence(Speaks.SMTP, "220-mx"), id="line-cut-short"),
        pytest.param(
            b"554 5.3.2 No SMTP service here\r\n",
            PortEvidence(Speaks.SMTP, "554 5.3.2 No SMTP service here"),
            id="refusal",
        ),
        pytest.param(
            b"220 \x1b[2Jx\r\n", PortEvidence(Speaks.SMTP, "220 ?[2Jx"), id="control-characters"
        ),
        pytest.param(b"HTTP/1.1 400 Bad Request\r\n", None, id="http"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", None, id="ssh"),
        pytest.param(b"\x16\x02\x00", None, id="not-tls-1.x"),
        pytest.param(b"220\r\n", None, id="code-alone"),
        pytest.param(b"", None, id="nothing"),
    ],
)
def test_what_the_first_bytes_show(first: bytes, evidence: PortEvidence | None) -> None:
    assert judge(first) == evidence


def test_a_long_greeting_is_quoted_bounded() -> None:
    evidence = judge(b"220 " + b"x" * (MAX_PROBE_BYTES - 4))
    assert evidence is not None
    assert len(evidence.line) == MAX_QUOTED_REPLY + 1  # cut, with its ellipsis


def test_the_client_hello_is_a_handshake_record_naming_the_server() -> None:
    hello = client_hello("mx.example")
    assert hello[:2] == b"\x16\x03"
    assert hello[5] == 1  # HandshakeType client_hello
    assert b"mx.example" in hello  # SNI
    assert b"192.0.2.1" not in client_hello("192.0.2.1")  # no SNI for an address
