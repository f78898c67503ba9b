"""The CLI's pure helpers: HOST[:PORT], the human summary of an outcome, the sweep table."""

from __future__ import annotations

import io

import click
import pytest
from rich.console import Console

from smtp_session.tasks.errors import ErrorCategory, Stage
from smtp_session.tasks.outcome import CertInfo, Outcome, Timings, TlsInfo, join_host_port
from smtp_session.tasks.summary import SweepSummary, domain_verdict
from smtp_session.worker.cli import (
    CERTIFICATE_ERRORS,
    print_sweep,
    split_host_port,
    summary,
)

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


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("smtp.example.com", 587, "smtp.example.com:587"),
        ("192.0.2.10", 25, "192.0.2.10:25"),
        ("::1", 25, "[::1]:25"),
        ("2001:db8::1", 465, "[2001:db8::1]:465"),
        ("smtp.example.com", None, "smtp.example.com"),
        ("::1", None, "::1"),
    ],
)
def test_join_host_port_writes_what_split_host_port_reads(
    host: str, port: int | None, text: str
) -> None:
    assert join_host_port(host, port) == text
    assert split_host_port(text) == (host, port)


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


def refused(host: str = "smtp.example.com", port: int = 587, *, attempts: int = 1) -> Outcome:
    return Outcome(
        ok=False,
        err_message=f"connection refused by {host} port {port}",
        error=ErrorCategory.REFUSED,
        stage=Stage.CONNECT,
        retryable=True,
        host=host,
        port=port,
        attempts=attempts,
        started_at=STARTED_AT,
    )


def test_summary_counts_attempts_only_when_retried() -> None:
    def failed(attempts: int) -> str:
        return summary(refused(attempts=attempts)).splitlines()[0]

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


def test_summary_brackets_an_ipv6_address() -> None:
    assert summary(refused("::1", 25)).splitlines()[0] == "FAILED [::1]:25: refused at connect"


def failure_with_certificate(error: ErrorCategory) -> Outcome:
    return Outcome(
        ok=False,
        err_message=f"a failure of category {error.value}",
        error=error,
        stage=Stage.AUTH,
        host="smtp.example.com",
        port=587,
        security="starttls",
        tls=TlsInfo(version="TLSv1.3", trust="native", verified=True, cert=CERT),
        attempts=1,
        started_at=STARTED_AT,
    )


def test_certificate_errors_are_the_tls_categories() -> None:
    assert {error.value for error in CERTIFICATE_ERRORS} == {
        "tls_untrusted",
        "tls_expired",
        "tls_hostname",
        "tls_handshake",
    }


@pytest.mark.parametrize("error", sorted(CERTIFICATE_ERRORS))
def test_summary_shows_the_certificate_of_a_certificate_failure(error: ErrorCategory) -> None:
    assert "  certificate: CN=smtp.example.com" in summary(failure_with_certificate(error))


@pytest.mark.parametrize("error", sorted(set(ErrorCategory) - CERTIFICATE_ERRORS))
def test_summary_leaves_the_certificate_out_of_other_failures(error: ErrorCategory) -> None:
    # An auth failure after a verified handshake has a certificate; it explains nothing.
    text = summary(failure_with_certificate(error))
    assert "certificate" not in text, text
    assert text.splitlines()[1] == f"  a failure of category {error.value}"


# ----------------------------------------------------------------------------- sweep table

LONG_MESSAGE = (
    "certificate verify failed: unable to get local issuer certificate "
    "[ssl: the chain leads to no trusted root] (native and portable trust)"
)


def sweep_of(*targets: tuple[str, str, int]) -> SweepSummary:
    """A sweep whose first target succeeded, the second was untrusted, the rest refused."""
    outcomes = []
    for index, (target, host, port) in enumerate(targets):
        ok = index == 0
        error = None if ok else ErrorCategory.TLS_UNTRUSTED if index == 1 else ErrorCategory.REFUSED
        message = "" if ok else LONG_MESSAGE if index == 1 else f"connection refused by {host}"
        outcomes.append(
            Outcome(
                ok=ok,
                err_message=message,
                error=error,
                stage=Stage.DONE if ok else Stage.CONNECT,
                host=host,
                port=port,
                target=target,
                timings=Timings(total=0.41),
                attempts=1,
                started_at=STARTED_AT,
            )
        )
    failed = len(outcomes) - 1
    return SweepSummary(
        total=len(outcomes), ok=1, failed=failed, duration_s=0.42, outcomes=outcomes
    )


#: Names as long as a real fleet's, which fit an 80-column table without err_message.
TYPICAL = (
    ("gmail-submission", "smtp.gmail.com", 587),
    ("office365-relay", "smtp.office365.com", 587),
    ("loopback-v6", "::1", 2525),
)
#: Names too long for an 80-column table even without err_message.
LONG = (
    ("gmail-submission-primary", "smtp.gmail.com", 587),
    ("internal-relay-secondary", "relay.internal.example.com", 587),
    ("loopback-v6", "::1", 2525),
)


def rendered(summary: SweepSummary, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    print_sweep(console, summary)
    lines = console.export_text().splitlines()
    assert all(len(line) <= width for line in lines), lines
    assert not any("\N{HORIZONTAL ELLIPSIS}" in line for line in lines), lines  # nothing cut
    assert lines[-1] == f"1 ok, {summary.failed} failed in 0.42 s"
    return lines


def columns(lines: list[str]) -> dict[str, str]:
    """Each table column's text, its cells joined without whitespace (folds undone)."""
    header = next(line for line in lines if line.startswith("┃"))
    names = [cell.strip() for cell in header.strip("┃").split("┃")]
    cells: dict[str, list[str]] = {name: [] for name in names}
    for line in lines:
        if line.startswith("│"):
            for name, cell in zip(names, line.strip("│").split("│"), strict=True):
                cells[name].append(cell)
    return {name: "".join("".join(parts).split()) for name, parts in cells.items()}


def squeezed(text: str) -> str:
    return "".join(text.split())


def test_sweep_on_80_columns_keeps_names_on_their_lines_and_messages_below() -> None:
    lines = rendered(sweep_of(*TYPICAL), 80)

    table = columns(lines)
    assert list(table) == ["target", "server", "ok", "error", "time"]
    for target, host, port in TYPICAL:
        server = join_host_port(host, port)
        assert any(target in line and server in line for line in lines), (target, lines)
    # Too narrow for a readable message column: each failure's message, whole, below.
    below = lines[lines.index(next(line for line in lines if line.startswith("└"))) + 1 :]
    text = " ".join(" ".join(below).split())
    assert f"office365-relay (smtp.office365.com:587): {LONG_MESSAGE}" in text, below
    assert "loopback-v6 ([::1]:2525): connection refused by ::1" in text, below
    assert "gmail-submission (" not in text  # a success has no message


def test_sweep_on_a_narrower_terminal_folds_long_names_rather_than_cutting_them() -> None:
    lines = rendered(sweep_of(*LONG), 80)

    table = columns(lines)
    for target, host, port in LONG:
        assert target in table["target"], lines
        assert join_host_port(host, port) in table["server"], lines
    assert table["error"] == "tls_untrustedrefused"
    assert squeezed(
        f"internal-relay-secondary (relay.internal.example.com:587): {LONG_MESSAGE}"
    ) in (squeezed(" ".join(lines)))


def test_sweep_on_a_wide_terminal_has_an_err_message_column_that_folds() -> None:
    lines = rendered(sweep_of(*LONG), 160)

    table = columns(lines)
    assert list(table) == ["target", "server", "ok", "error", "err_message", "time"]
    # The whole message, its "[ssl: …]" not taken for markup, folded within its column.
    assert squeezed(LONG_MESSAGE) in table["err_message"], lines
    row = next(line for line in lines if "internal-relay-secondary" in line)
    assert len(row.split("│")[5].strip()) >= 30, lines
    assert "[::1]:2525" in table["server"]
    assert lines[-2].startswith("└"), lines  # no messages below the table: they are in it


def test_sweep_says_each_domains_verdict_under_the_table() -> None:
    summary = sweep_of(("mx", "mx1.example.test", 25), ("mx", "mx2.example.test", 25))
    outcomes = [
        outcome.model_copy(update={"domain": "example.test"}) for outcome in summary.outcomes
    ]
    verdict = domain_verdict(
        "example.test",
        outcomes,
        discovered=True,
        require="any",
        target="mx",
        started_at=STARTED_AT,
        duration_s=0.42,
    )
    lines = rendered(summary.model_copy(update={"outcomes": outcomes, "domains": [verdict]}), 80)
    assert lines[-2] == "mx (example.test): up, 1 of 2 servers ok (require any)"
