"""Classification walks the exception chain and reads reply codes."""

from __future__ import annotations

import socket
import ssl

import pytest
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from smtp_session.tasks.classify import NOT_TLS_REASONS, classify
from smtp_session.tasks.errors import ErrorCategory, SessionFailure, Stage
from smtp_session.tasks.server_text import MAX_QUOTED_REPLY, quote_reply


def _cert_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    return error


def _wrapped(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


def _classify(exc: BaseException, stage: Stage = Stage.EHLO) -> tuple[ErrorCategory, str]:
    failure = classify(exc, stage, host="smtp.example.com", endpoint="192.0.2.1 port 587")
    return failure.category, failure.message


@pytest.mark.parametrize(
    ("code", "category"),
    [
        (10, ErrorCategory.TLS_EXPIRED),
        (9, ErrorCategory.TLS_EXPIRED),
        (62, ErrorCategory.TLS_HOSTNAME),
        (64, ErrorCategory.TLS_HOSTNAME),
        (20, ErrorCategory.TLS_UNTRUSTED),
        (18, ErrorCategory.TLS_UNTRUSTED),
    ],
)
def test_certificate_codes(code: int, category: ErrorCategory) -> None:
    raw = _cert_error(code, "some reason")
    assert _classify(raw, Stage.STARTTLS)[0] is category
    # Implicit TLS: the same error arrives wrapped in SMTPConnectError.
    wrapped = _wrapped(SMTPConnectError("Error connecting"), raw)
    assert _classify(wrapped, Stage.TLS)[0] is category


def test_untrusted_message_quotes_openssl() -> None:
    error = _cert_error(20, "unable to get local issuer certificate")
    assert _classify(error)[1] == (
        "certificate verify failed: unable to get local issuer certificate"
    )


def test_a_connect_error_is_not_a_tls_error_by_class_alone() -> None:
    refused = _wrapped(SMTPConnectError("Error connecting"), ConnectionRefusedError(111, "x"))
    assert _classify(refused, Stage.CONNECT) == (
        ErrorCategory.REFUSED,
        "connection refused by 192.0.2.1 port 587",
    )


@pytest.mark.parametrize(
    ("reason", "not_tls"),
    [
        *((reason, True) for reason in sorted(NOT_TLS_REASONS)),
        ("TLSV1_ALERT_PROTOCOL_VERSION", False),
        ("TLSV1_UNRECOGNIZED_NAME", False),
        ("SSLV3_ALERT_HANDSHAKE_FAILURE", False),
        ("UNSUPPORTED_PROTOCOL", False),
    ],
)
def test_a_handshake_that_read_no_tls_is_marked(reason: str, not_tls: bool) -> None:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    failure = classify(
        _wrapped(SMTPConnectError("Error connecting"), error),
        Stage.TLS,
        host="smtp.example.com",
        endpoint="192.0.2.1 port 587",
    )
    assert failure.category is ErrorCategory.TLS_HANDSHAKE
    assert failure.peer_not_tls is not_tls


def test_other_ssl_errors_are_handshake_failures() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    assert _classify(error, Stage.TLS) == (
        ErrorCategory.TLS_HANDSHAKE,
        "TLS handshake failed: wrong version number",
    )


def test_dns() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert _classify(error, Stage.RESOLVE) == (
        ErrorCategory.DNS,
        "could not resolve smtp.example.com: Name or service not known",
    )


@pytest.mark.parametrize(
    ("exc", "stage", "category", "code", "enhanced"),
    [
        (
            SMTPConnectResponseError(421, "4.3.2 Try later"),
            Stage.BANNER,
            "smtp_transient",
            421,
            "4.3.2",
        ),
        (SMTPConnectResponseError(554, "No service"), Stage.BANNER, "smtp_permanent", 554, None),
        (SMTPHeloError(502, "5.5.1 No EHLO"), Stage.EHLO, "smtp_permanent", 502, "5.5.1"),
        (
            SMTPAuthenticationError(535, "5.7.8 Bad credentials"),
            Stage.AUTH,
            "auth_failed",
            535,
            "5.7.8",
        ),
        (SMTPAuthenticationError(534, "Web login required"), Stage.AUTH, "auth_failed", 534, None),
        (
            SMTPAuthenticationError(454, "4.7.0 Temporary"),
            Stage.AUTH,
            "smtp_transient",
            454,
            "4.7.0",
        ),
        (SMTPAuthenticationError(550, "5.7.1 Relay"), Stage.AUTH, "auth_failed", 550, "5.7.1"),
        (
            SMTPResponseException(502, "Not implemented"),
            Stage.STARTTLS,
            "starttls_unavailable",
            502,
            None,
        ),
        (
            SMTPResponseException(454, "TLS not available"),
            Stage.STARTTLS,
            "smtp_transient",
            454,
            None,
        ),
        (SMTPResponseException(250, "what"), Stage.BANNER, "protocol", 250, None),
    ],
)
def test_replies(
    exc: SMTPResponseException,
    stage: Stage,
    category: str,
    code: int,
    enhanced: str | None,
) -> None:
    failure = classify(exc, stage, host="h", endpoint="e")
    assert (failure.category, failure.smtp_code, failure.smtp_enhanced) == (
        category,
        code,
        enhanced,
    )
    assert str(code) in failure.message


def test_malformed_reply_is_protocol() -> None:
    exc = SMTPResponseException(-1, "Malformed SMTP response line: HTTP/1.1 400 Bad Request")
    category, message = _classify(exc, Stage.BANNER)
    assert category is ErrorCategory.PROTOCOL
    assert "HTTP/1.1 400" in message


@pytest.mark.parametrize(
    ("stage", "category"),
    [
        (Stage.BANNER, ErrorCategory.REFUSED),
        (Stage.TLS, ErrorCategory.REFUSED),
        (Stage.EHLO, ErrorCategory.DISCONNECTED),
        (Stage.AUTH, ErrorCategory.DISCONNECTED),
    ],
)
def test_closed_before_and_after_greeting(stage: Stage, category: ErrorCategory) -> None:
    lost = _wrapped(SMTPServerDisconnected("Connection lost"), ConnectionResetError(104, "reset"))
    assert _classify(lost, stage)[0] is category


def test_disconnected_names_the_stage() -> None:
    message = _classify(SMTPServerDisconnected("Unexpected EOF received"), Stage.EHLO)[1]
    assert message == "server closed the connection during the EHLO reply"


def test_session_failure_keeps_its_category() -> None:
    failure = SessionFailure(ErrorCategory.STARTTLS_UNAVAILABLE, "no STARTTLS")
    assert _classify(failure) == (ErrorCategory.STARTTLS_UNAVAILABLE, "no STARTTLS")


def test_unknown_smtp_exception_is_protocol() -> None:
    assert _classify(SMTPException("odd"))[0] is ErrorCategory.PROTOCOL


def test_a_bug_is_internal_and_does_not_echo_its_text() -> None:
    category, message = _classify(KeyError("password=hunter2"))
    assert category is ErrorCategory.INTERNAL
    assert "hunter2" not in message
    assert "KeyError" in message


def test_quote_reply_is_one_bounded_printable_line() -> None:
    assert quote_reply("250-a\n250 b\x00") == "250-a / 250 b?"
    assert quote_reply("x" * 1000) == "x" * MAX_QUOTED_REPLY + "…"


def test_retryable_categories() -> None:
    retryable = {c.value for c in ErrorCategory if c.retryable}
    assert retryable == {
        "dns",
        "refused",
        "timeout",
        "disconnected",
        "smtp_transient",
        "oauth_unavailable",
    }


def test_the_certificate_required_alert_says_what_the_server_wants() -> None:
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    # Implicit TLS: at the greeting, wrapped; STARTTLS: at the next read, as the cause.
    for stage, exc in (
        (Stage.TLS, _wrapped(SMTPConnectError("Error connecting"), alert)),
        (Stage.EHLO, _wrapped(SMTPServerDisconnected("Connection lost"), alert)),
    ):
        assert _classify(exc, stage) == (
            ErrorCategory.TLS_HANDSHAKE,
            "TLS handshake failed: server requires a client certificate, and this client "
            "presents none (TLS alert certificate_required)",
        )
