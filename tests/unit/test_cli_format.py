"""The CLI's pure helpers: HOST[:PORT] parsing and the human summary of an outcome."""

from __future__ import annotations

import click
import pytest

from smtp_session.tasks.errors import ErrorCategory, Stage
from smtp_session.tasks.outcome import CertInfo, Outcome, Timings, TlsInfo
from smtp_session.worker.cli import split_host_port, summary

STARTED_AT = "2026-11-26T10:00:00Z"
CERT = CertInfo(
    subject="CN=smtp.example.com",
    issuer="CN=Example CA",
    not_before="2026-01-01T00:00:00Z",
    not_after="2027-01-01T00:00:00Z",
    sans=["smtp.example.com", "mail.example.com"],
    sha256="00" * 32,
)


# ----------------------------------------------------------------------------- HOST[:PORT]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("smtp.example.com", ("smtp.example.com", None)),
        ("smtp.example.com:587", ("smtp.example.com", 587)),
        ("192.0.2.10:25", ("192.0.2.10", 25)),
        ("[::1]:2525", ("::1", 2525)),
        ("[2001:db8::1]:465", ("2001:db8::1", 465)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("2001:db8::1", ("2001:db8::1", None)),
        # Out-of-range ports parse here; the request validation names the field.
        ("smtp.example.com:0", ("smtp.example.com", 0)),
        ("smtp.example.com:70000", ("smtp.example.com", 70000)),
        ("", ("", None)),
    ],
)
def test_split_host_port(value: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "x:abc",
        "x:",
        "x:-1",
        "x: 25",
        "[::1",
        "[::1]25",
        "[::1]x:25",
        "1:2:3",
        "smtp.example.com:25:26",
        # Unicode digits that str.isdigit() accepts and int() refuses: still bad input.
        "x:\N{SUPERSCRIPT TWO}",
    ],
)
def test_split_host_port_rejects_malformed_addresses(value: str) -> None:
    with pytest.raises(click.BadParameter) as caught:
        split_host_port(value)
    assert caught.value.param_hint == "HOST[:PORT]"


# ----------------------------------------------------------------------------- summary


def test_summary_of_a_verified_authenticated_session_is_one_line() -> None:
    outcome = Outcome(
        ok=True,
        err_message="",
        stage=Stage.DONE,
        host="smtp.example.com",
        port=587,
        security="starttls",
        tls=TlsInfo(version="TLSv1.3", trust="portable", fallback=True, verified=True, cert=CERT),
        authenticated=True,
        timings=Timings(total=0.1234),
        attempts=1,
        started_at=STARTED_AT,
    )

    assert summary(outcome) == (
        "OK smtp.example.com:587: starttls, TLSv1.3 verified "
        "(portable trust, after native trust failed), authenticated, 0.123 s"
    )


def test_summary_of_a_plain_session() -> None:
    outcome = Outcome(
        ok=True,
        err_message="",
        stage=Stage.DONE,
        host="192.0.2.10",
        port=25,
        security="plain",
        timings=Timings(total=0.01),
        attempts=1,
        started_at=STARTED_AT,
    )

    text = summary(outcome)
    assert "\n" not in text
    assert text == "OK 192.0.2.10:25: plain, 0.010 s"


def test_summary_of_a_failure_names_error_stage_certificate_and_hint() -> None:
    outcome = Outcome(
        ok=False,
        err_message="certificate verify failed: unable to get local issuer certificate",
        error=ErrorCategory.TLS_UNTRUSTED,
        stage=Stage.STARTTLS,
        hint="add the issuing CA with ca_file",
        host="smtp.example.com",
        port=587,
        security="starttls",
        tls=TlsInfo(trust="portable", fallback=True, verified=False, cert=CERT),
        attempts=1,
        started_at=STARTED_AT,
    )

    lines = summary(outcome).splitlines()
    assert lines[0] == "FAILED smtp.example.com:587: tls_untrusted at starttls"
    assert lines[1] == "  certificate verify failed: unable to get local issuer certificate"
    assert lines[2] == (
        "  certificate: CN=smtp.example.com, issued by CN=Example CA, "
        "valid until 2027-01-01T00:00:00Z, names: smtp.example.com, mail.example.com"
    )
    assert lines[3] == "  hint: add the issuing CA with ca_file"
    assert len(lines) == 4


def test_summary_counts_attempts_only_when_retried() -> None:
    def failed(attempts: int) -> str:
        outcome = Outcome(
            ok=False,
            err_message="connection refused by 192.0.2.10 port 587",
            error=ErrorCategory.REFUSED,
            stage=Stage.CONNECT,
            retryable=True,
            host="smtp.example.com",
            port=587,
            attempts=attempts,
            started_at=STARTED_AT,
        )
        return summary(outcome).splitlines()[0]

    assert failed(1) == "FAILED smtp.example.com:587: refused at connect"
    assert failed(3) == "FAILED smtp.example.com:587: refused at connect, 3 attempts"


def test_summary_of_an_invalid_request_without_port() -> None:
    outcome = Outcome(
        ok=False,
        err_message="host: must not contain spaces",
        error=ErrorCategory.INVALID_REQUEST,
        stage=Stage.VALIDATE,
        host="a b",
        started_at=STARTED_AT,
    )

    assert summary(outcome).splitlines() == [
        "FAILED a b: invalid_request at validate",
        "  host: must not contain spaces",
    ]
