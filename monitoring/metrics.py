"""Prometheus metrics of SMTP sessions (prefix smtp_session_, blackbox_exporter conventions).

Every metric takes its registry as a parameter. A worker is one process (its sessions
share one event loop), so one registry holds every session's values and /metrics serves it.
"""

from __future__ import annotations

import calendar
import functools
import time
from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from smtp_session.tasks.outcome import Outcome

ADHOC_TARGET = "adhoc"
#: Outcomes of requests refused before any I/O: bad input, or the egress policy.
REFUSED_BEFORE_ANY_IO = frozenset({"invalid_request", "blocked"})
NAMESPACE = "smtp_session"
# Sessions range from a loopback millisecond to a 10 s deadline times three attempts.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STAGES = ("resolve", "connect", "tls", "banner", "ehlo", "starttls", "auth", "quit")


_M = TypeVar("_M", Counter, Gauge, Histogram)


class _Children(Generic[_M]):
    """A labelled metric's children by label values, each looked up once.

    `labels()` checks and copies its arguments under a lock each time, which costs more than
    the update itself; the label sets here are few (known targets times categories).
    """

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def _result(outcome: Outcome) -> str:
    return "success" if outcome.ok else "failure"


@functools.lru_cache(maxsize=1024)
def _timestamp(iso_utc: str) -> float:
    return float(calendar.timegm(time.strptime(iso_utc, "%Y-%m-%dT%H:%M:%SZ")))


class SessionMetrics:
    """The metrics of docs/metrics.md: a SessionObserver recording Outcomes."""

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        known_targets: Iterable[str] | None = None,
    ) -> None:
        """`known_targets`: target names allowed as label values (None: any name).

        A worker passes its configured targets, so a web backend sending arbitrary
        `target` values cannot grow the label set: unknown names count as `adhoc`.
        """
        self.known_targets = frozenset(known_targets) if known_targets is not None else None
        self.attempts = Counter(
            "attempts_total",
            "Session attempts, each one connection (plus its trust fallback).",
            ["target", "result", "error", "trust"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.opens = Counter(
            "opens_total",
            "Final session outcomes, after retries.",
            ["target", "result", "error"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.tls_fallback = Counter(
            "tls_fallback_total",
            "Attempts that retried the handshake in portable trust after native refused it.",
            ["target", "result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.duration = Histogram(
            "duration_seconds",
            "Whole request duration, retries and backoff included.",
            ["target", "result"],
            namespace=NAMESPACE,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "stage_duration_seconds",
            "Time spent per session stage, per attempt.",
            ["target", "stage"],
            namespace=NAMESPACE,
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.up = Gauge(
            "up",
            "1 if the last final outcome for the target was ok, else 0.",
            ["target"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.last_success = Gauge(
            "last_success_timestamp_seconds",
            "Unix time of the last ok outcome.",
            ["target"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.cert_expiry = Gauge(
            "cert_expiry_timestamp_seconds",
            "notAfter of the certificate the server last presented, as Unix time.",
            ["target"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self._attempts = _Children(self.attempts)
        self._opens = _Children(self.opens)
        self._tls_fallback = _Children(self.tls_fallback)
        self._duration = _Children(self.duration)
        self._stage_duration = _Children(self.stage_duration)
        self._up = _Children(self.up)
        self._last_success = _Children(self.last_success)
        self._cert_expiry = _Children(self.cert_expiry)

    def declare_targets(self, targets: Iterable[str]) -> None:
        """Export zeros for configured targets, so rate() and increase() see their first event."""
        for target in targets:
            for result in ("success", "failure"):
                self.tls_fallback.labels(target, result)
            self.opens.labels(target, "success", "")

    def target_label(self, outcome: Outcome) -> str:
        target = outcome.target
        if target is None or (self.known_targets is not None and target not in self.known_targets):
            return ADHOC_TARGET
        return target

    def attempt_ended(self, outcome: Outcome) -> None:
        """One attempt ended (its Outcome carries the attempt's timings and trust)."""
        target = self.target_label(outcome)
        trust = outcome.tls.trust if outcome.tls and outcome.tls.trust else "none"
        error = outcome.error.value if outcome.error else ""
        self._attempts(target, _result(outcome), error, trust).inc()
        if outcome.tls is not None and outcome.tls.fallback:
            self._tls_fallback(target, _result(outcome)).inc()
        timings = outcome.timings
        for stage in STAGES:
            seconds = getattr(timings, stage)
            if seconds is not None:
                self._stage_duration(target, stage).observe(seconds)

    def request_ended(self, outcome: Outcome) -> None:
        """The final outcome of a request, after its retries."""
        target = self.target_label(outcome)
        error = outcome.error.value if outcome.error else ""
        self._opens(target, _result(outcome), error).inc()
        if outcome.timings.total is not None:
            self._duration(target, _result(outcome)).observe(outcome.timings.total)
        if outcome.error is not None and outcome.error.value in REFUSED_BEFORE_ANY_IO:
            return  # says nothing about the server: leave up/expiry as they were
        self._up(target).set(1 if outcome.ok else 0)
        if outcome.ok:
            self._last_success(target).set(time.time())
        cert = outcome.tls.cert if outcome.tls else None
        if cert is not None:
            self._cert_expiry(target).set(_timestamp(cert.not_after))
