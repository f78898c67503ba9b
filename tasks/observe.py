"""What the session core tells about its work, and to whom: observers it is given.

The core imports neither Celery nor prometheus_client. It calls `attempt_ended` after
every attempt and `request_ended` once per request, and a sweep `domain_ended` once per
check of a mail domain (after its servers' requests); the JSON log (here) and the
Prometheus metrics (monitoring.metrics) are two implementations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog

from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.summary import DomainOutcome

log = structlog.get_logger("smtp_session")


class SessionObserver(Protocol):
    """Told about every attempt and every final outcome of a session request."""

    def attempt_ended(self, outcome: Outcome) -> None:
        """One attempt ended; its Outcome carries that attempt's timings and trust."""

    def request_ended(self, outcome: Outcome) -> None:
        """The request ended, after its retries: this is its final Outcome."""

    def domain_ended(self, outcome: DomainOutcome) -> None:
        """A mail domain's check ended: its verdict (its servers' requests ended before)."""


class LogObserver:
    """`session.attempt` for every attempt, `session.result` for the final outcome."""

    def attempt_ended(self, outcome: Outcome) -> None:
        _log_outcome("session.attempt", outcome)

    def request_ended(self, outcome: Outcome) -> None:
        _log_outcome("session.result", outcome)

    def domain_ended(self, outcome: DomainOutcome) -> None:
        """`domain.result`: the verdict, and how many servers were ok."""
        log.info(
            "domain.result",
            ok=outcome.ok,
            err_message=outcome.err_message,
            error=outcome.error.value if outcome.error else None,
            domain=outcome.domain,
            target=outcome.target,
            require=outcome.require,
            servers=outcome.servers,
            servers_ok=outcome.servers_ok,
            duration_s=outcome.duration_s,
        )


def _log_outcome(event: str, outcome: Outcome) -> None:
    tls = outcome.tls
    log.info(
        event,
        ok=outcome.ok,
        err_message=outcome.err_message,
        error=outcome.error.value if outcome.error else None,
        stage=outcome.stage.value,
        host=outcome.host,
        port=outcome.port,
        target=outcome.target,
        domain=outcome.domain,
        attempt=outcome.attempts,
        trust=tls.trust if tls else None,
        fallback=tls.fallback if tls else False,
        duration_s=outcome.timings.total,
    )


LOG = LogObserver()
#: What open_session and sweep report to unless told otherwise: the log only.
DEFAULT_OBSERVERS: Sequence[SessionObserver] = (LOG,)


def report(outcome: Outcome, *, final: bool, observers: Sequence[SessionObserver]) -> None:
    """Tell every observer that an attempt (or, when `final`, the request) ended."""
    for observer in observers:
        if final:
            observer.request_ended(outcome)
        else:
            observer.attempt_ended(outcome)


def report_domain(outcome: DomainOutcome, *, observers: Sequence[SessionObserver]) -> None:
    """Tell every observer that the check of a mail domain ended."""
    for observer in observers:
        observer.domain_ended(outcome)
