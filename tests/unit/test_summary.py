"""A mail domain's verdict from its servers' outcomes, and every result read back."""

from __future__ import annotations

import pytest

from smtp_session.tasks.errors import ErrorCategory, Stage
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.summary import DomainOutcome, Require, SweepSummary, domain_verdict
from smtp_session.worker.client import parse_result

DOMAIN = "example.test"
STARTED_AT = "2026-11-26T10:00:00Z"


def server(host: str, error: ErrorCategory | None = None) -> Outcome:
    return Outcome(
        ok=error is None,
        err_message="" if error is None else f"{error.value} at {host}",
        error=error,
        stage=Stage.DONE if error is None else Stage.BANNER,
        host=host,
        port=25,
        target="dom",
        domain=DOMAIN,
        started_at=STARTED_AT,
    )


def verdict(outcomes: list[Outcome], require: Require, *, discovered: bool = True) -> DomainOutcome:
    return domain_verdict(
        DOMAIN,
        outcomes,
        discovered=discovered,
        require=require,
        target="dom",
        started_at=STARTED_AT,
        duration_s=1.5,
    )


GOOD = server("mx1.example.test")
SILENT = server("mx2.example.test", ErrorCategory.TIMEOUT)
BUSY = server("mx3.example.test", ErrorCategory.SMTP_TRANSIENT)


@pytest.mark.parametrize(
    ("outcomes", "require", "ok", "error", "message"),
    [
        ([GOOD, SILENT, BUSY], "any", True, None, ""),
        (
            [GOOD, SILENT, BUSY],
            "all",
            False,
            ErrorCategory.TIMEOUT,
            f"2 of 3 servers of {DOMAIN} failed; mx2.example.test:25: timeout at mx2.example.test",
        ),
        (
            [BUSY, SILENT],
            "any",
            False,
            ErrorCategory.SMTP_TRANSIENT,
            f"2 of 2 servers of {DOMAIN} failed; mx3.example.test:25: "
            "smtp_transient at mx3.example.test",
        ),
        ([GOOD], "all", True, None, ""),
    ],
)
def test_the_verdict_follows_require_and_names_the_first_failed_server(
    outcomes: list[Outcome],
    require: Require,
    ok: bool,
    error: ErrorCategory | None,
    message: str,
) -> None:
    result = verdict(outcomes, require)
    assert (result.ok, result.error, result.err_message) == (ok, error, message)
    assert (result.servers, result.servers_ok) == (len(outcomes), sum(o.ok for o in outcomes))


def test_a_failed_discovery_is_down_whatever_require_says() -> None:
    failure = Outcome(
        ok=False,
        err_message=f"{DOMAIN} accepts no mail (null MX, RFC 7505)",
        error=ErrorCategory.DNS,
        stage=Stage.RESOLVE,
        host=DOMAIN,
        domain=DOMAIN,
        started_at=STARTED_AT,
    )
    for require in ("any", "all"):
        result = verdict([failure], require, discovered=False)
        assert (result.ok, result.error, result.servers, result.servers_ok) == (
            False,
            ErrorCategory.DNS,
            0,
            0,
        )
        assert result.err_message == failure.err_message


def test_every_result_shape_is_read_back_by_the_client() -> None:
    domain = verdict([GOOD, SILENT], "any")
    summary = SweepSummary(
        total=3, ok=2, failed=1, duration_s=2.0, outcomes=[*domain.outcomes, BUSY], domains=[domain]
    )
    assert parse_result(GOOD.to_dict()) == GOOD
    assert parse_result(domain.to_dict()) == domain
    read = parse_result(summary.to_dict())
    assert isinstance(read, SweepSummary)
    assert read.outcomes == summary.outcomes
    # In a sweep a domain's outcomes are listed once, in `outcomes`, not in `domains`.
    assert read.domains == [domain.model_copy(update={"outcomes": []})]
    # A newer worker's extra fields are dropped, not refused.
    newer = {**domain.to_dict(), "quorum": 2}
    newer["outcomes"][0]["novel"] = True
    assert parse_result(newer) == domain


def test_a_sweep_is_ok_when_every_target_is_up() -> None:
    up = verdict([GOOD, SILENT], "any")
    down = verdict([GOOD, SILENT], "all")

    def summary(outcomes: list[Outcome], domains: list[DomainOutcome]) -> SweepSummary:
        ok = sum(o.ok for o in outcomes)
        return SweepSummary(
            total=len(outcomes),
            ok=ok,
            failed=len(outcomes) - ok,
            duration_s=1.0,
            outcomes=outcomes,
            domains=domains,
        )

    host = GOOD.model_copy(update={"domain": None})
    failed_host = BUSY.model_copy(update={"domain": None})
    assert summary([*up.outcomes, host], [up]).targets_ok  # a degraded domain is up
    assert not summary([*down.outcomes, host], [down]).targets_ok
    assert not summary([*up.outcomes, failed_host], [up]).targets_ok
