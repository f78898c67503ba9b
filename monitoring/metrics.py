"""Prometheus metrics of SMTP sessions (prefix smtp_session_, blackbox_exporter conventions).

Every metric takes its registry as a parameter. A worker is one process (its sessions
share one event loop), so one registry holds every session's values and /metrics serves it.
"""

from __future__ import annotations

import calendar
import functools
import time
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from smtp_session.tasks.errors import Stage
from smtp_session.tasks.outcome import CertInfo, Outcome, join_host_port
from smtp_session.tasks.summary import DomainOutcome

ADHOC_TARGET = "adhoc"
#: Outcomes of requests refused before any I/O: bad input, or the egress policy.
REFUSED_BEFORE_ANY_IO = frozenset({"invalid_request", "blocked"})
NAMESPACE = "smtp_session"
# Sessions range from a loopback millisecond to a 10 s deadline times three attempts.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STAGES = tuple(stage.value for stage in Stage if stage not in (Stage.VALIDATE, Stage.DONE))


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

    def remove(self, *values: str) -> None:
        """Drop the child (its series disappears from /metrics)."""
        if self._children.pop(values, None) is not None:
            self._metric.remove(*values)


def _result(outcome: Outcome | DomainOutcome) -> str:
    return "success" if outcome.ok else "failure"


def _error(outcome: Outcome | DomainOutcome) -> str:
    return outcome.error.value if outcome.error else ""


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

        def declare(
            kind: type[_M], name: str, documentation: str, labels: list[str], **extra: Any
        ) -> _M:
            return kind(
                name, documentation, labels, namespace=NAMESPACE, registry=registry, **extra
            )

        self.attempts = declare(
            Counter,
            "attempts_total",
            "Session attempts, each one connection (plus its trust fallback).",
            ["target", "result", "error", "trust"],
        )
        self.opens = declare(
            Counter,
            "opens_total",
            "Final session outcomes, after retries.",
            ["target", "result", "error"],
        )
        self.tls_fallback = declare(
            Counter,
            "tls_fallback_total",
            "Attempts that retried the handshake in portable trust after native refused it.",
            ["target", "result"],
        )
        self.duration = declare(
            Histogram,
            "duration_seconds",
            "Whole request duration, retries and backoff included.",
            ["target", "result"],
            buckets=DURATION_BUCKETS,
        )
        self.stage_duration = declare(
            Histogram,
            "stage_duration_seconds",
            "Time spent per session stage, per attempt.",
            ["target", "stage"],
            buckets=STAGE_BUCKETS,
        )
        self.up = declare(
            Gauge,
            "up",
            "1 if the last final outcome for the target was ok, else 0.",
            ["target"],
        )
        self.last_success = declare(
            Gauge,
            "last_success_timestamp_seconds",
            "Unix time of the last ok outcome.",
            ["target"],
        )
        self.cert_expiry = declare(
            Gauge,
            "cert_expiry_timestamp_seconds",
            "notAfter of the certificate the server last presented, as Unix time "
            "(a mail domain: the earliest of its servers').",
            ["target"],
        )
        self.server_up = declare(
            Gauge,
            "server_up",
            "1 if the last check of this discovered server of a mail-domain target was ok.",
            ["target", "server"],
        )
        self.server_cert_expiry = declare(
            Gauge,
            "server_cert_expiry_timestamp_seconds",
            "notAfter of the certificate this discovered server last presented, as Unix time.",
            ["target", "server"],
        )
        self._attempts = _Children(self.attempts)
        self._opens = _Children(self.opens)
        self._tls_fallback = _Children(self.tls_fallback)
        self._duration = _Children(self.duration)
        self._stage_duration = _Children(self.stage_duration)
        self._up = _Children(self.up)
        self._last_success = _Children(self.last_success)
        self._cert_expiry = _Children(self.cert_expiry)
        self._server_up = _Children(self.server_up)
        self._server_cert_expiry = _Children(self.server_cert_expiry)
        # Per domain target, the servers its last check found: series of servers that
        # discovery no longer returns are removed, so each target has at most
        # MAX_DISCOVERED of them.
        self._servers: dict[str, set[str]] = {}

    def declare_targets(self, targets: Iterable[str]) -> None:
        """Export zeros for configured targets, so rate() and increase() see their first event."""
        for target in targets:
            for result in ("success", "failure"):
                self.tls_fallback.labels(target, result)
            self.opens.labels(target, "success", "")

    def target_label(self, outcome: Outcome | DomainOutcome) -> str:
        target = outcome.target
        if target is None or (self.known_targets is not None and target not in self.known_targets):
            return ADHOC_TARGET
        return target

    def attempt_ended(self, outcome: Outcome) -> None:
        """One attempt ended (its Outcome carries the attempt's timings and trust)."""
        target = self.target_label(outcome)
        trust = outcome.tls.trust if outcome.tls and outcome.tls.trust else "none"
        self._attempts(target, _result(outcome), _error(outcome), trust).inc()
        if outcome.tls is not None and outcome.tls.fallback:
            self._tls_fallback(target, _result(outcome)).inc()
        timings = outcome.timings
        for stage in STAGES:
            seconds = getattr(timings, stage)
            if seconds is not None:
                self._stage_duration(target, stage).observe(seconds)

    def request_ended(self, outcome: Outcome) -> None:
        """The final outcome of a request, after its retries.

        A server discovered for a mail domain has series of its own; its domain's
        verdict (domain_ended) is what counts for the target.
        """
        if outcome.domain is not None:
            self._server_ended(outcome)
            return
        cert = outcome.tls.cert if outcome.tls else None
        self._final(self.target_label(outcome), outcome, outcome.timings.total, [cert])

    def domain_ended(self, outcome: DomainOutcome) -> None:
        """A mail domain's verdict: the target's final outcome; its servers' series are
        those this check found."""
        target = self.target_label(outcome)
        certs = [server.tls.cert if server.tls else None for server in outcome.outcomes]
        self._final(target, outcome, outcome.duration_s, certs)
        found = {_server(server) for server in outcome.outcomes if server.port is not None}
        for gone in self._servers.get(target, set()) - found:
            self._server_up.remove(target, gone)
            self._server_cert_expiry.remove(target, gone)
        if target != ADHOC_TARGET:
            self._servers[target] = found

    def _server_ended(self, outcome: Outcome) -> None:
        target = self.target_label(outcome)
        if target == ADHOC_TARGET:  # unbounded: only configured domain targets
            return
        server = _server(outcome)
        self._server_up(target, server).set(1 if outcome.ok else 0)
        cert = outcome.tls.cert if outcome.tls else None
        if cert is not None:
            self._server_cert_expiry(target, server).set(_timestamp(cert.not_after))

    def _final(
        self,
        target: str,
        outcome: Outcome | DomainOutcome,
        duration: float | None,
        certs: Iterable[CertInfo | None],
    ) -> None:
        self._opens(target, _result(outcome), _error(outcome)).inc()
        if duration is not None:
            self._duration(target, _result(outcome)).observe(duration)
        if outcome.error is not None and outcome.error.value in REFUSED_BEFORE_ANY_IO:
            return  # says nothing about the server: leave up/expiry as they were
        self._up(target).set(1 if outcome.ok else 0)
        if outcome.ok:
            self._last_success(target).set(time.time())
        expiries = [_timestamp(cert.not_after) for cert in certs if cert is not None]
        if expiries:
            self._cert_expiry(target).set(min(expiries))


def _server(outcome: Outcome) -> str:
    return join_host_port(outcome.host, outcome.port)
