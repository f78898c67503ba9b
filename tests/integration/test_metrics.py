"""Metrics recorded from real sessions, read back from a fresh registry."""

from __future__ import annotations

import calendar

import trustme
from prometheus_client import CollectorRegistry

from smtp_session.monitoring.metrics import SessionMetrics
from smtp_session.tasks.egress import EgressPolicy
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.session import UNGUARDED, Guards, RetryPolicy, open_session
from tests.servers import LOOPBACK, RawServerFactory, SmtpServerFactory, leaf_certificate

FAST_RETRY = RetryPolicy(base=0.01, cap=0.02)


class Recorder:
    def __init__(self, *, known_targets: set[str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.metrics = SessionMetrics(self.registry, known_targets=known_targets)

    async def run(
        self,
        port: int,
        *,
        extra_ca_file: str | None = None,
        guards: Guards = UNGUARDED,
        **fields: object,
    ) -> Outcome:
        return await open_session(
            {"host": LOOPBACK, "port": port, **fields},
            retry_policy=FAST_RETRY,
            observers=[self.metrics],
            extra_ca_file=extra_ca_file,
            guards=guards,
        )

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"smtp_session_{name}", labels)


async def test_success_counts_once_per_attempt_and_outcome(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    recorder = Recorder(known_targets={"mx1"})
    await recorder.run(server.port, security="plain", target="mx1")
    assert recorder.value("opens_total", target="mx1", result="success", error="") == 1
    assert (
        recorder.value("attempts_total", target="mx1", result="success", error="", trust="none")
        == 1
    )
    assert recorder.value("up", target="mx1") == 1
    last_success = recorder.value("last_success_timestamp_seconds", target="mx1")
    assert last_success is not None and last_success > 0
    assert recorder.value("stage_duration_seconds_count", target="mx1", stage="ehlo") == 1
    assert recorder.value("duration_seconds_count", target="mx1", result="success") == 1


async def test_retries_count_attempts_not_outcomes(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("banner_421")
    recorder = Recorder()
    await recorder.run(server.port, security="plain", retries=2)
    failure = {"target": "adhoc", "result": "failure", "error": "smtp_transient"}
    assert recorder.value("attempts_total", **failure, trust="none") == 3
    assert recorder.value("opens_total", **failure) == 1
    assert recorder.value("up", target="adhoc") == 0


async def test_unknown_target_names_are_adhoc(smtp_server_factory: SmtpServerFactory) -> None:
    server = await smtp_server_factory(mode="plain")
    recorder = Recorder(known_targets={"mx1"})
    await recorder.run(server.port, security="plain", target="made-up-by-a-web-backend")
    assert recorder.value("opens_total", target="adhoc", result="success", error="") == 1
    exposed = {
        sample.labels.get("target")
        for family in recorder.registry.collect()
        for sample in family.samples
    }
    assert exposed == {"adhoc"}


async def test_fallback_and_certificate_expiry(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str, good_cert: trustme.LeafCert
) -> None:
    server = await smtp_server_factory(mode="starttls")
    recorder = Recorder(known_targets={"sub"})
    await recorder.run(server.port, extra_ca_file=ca_pem_path, target="sub")
    assert recorder.value("tls_fallback_total", target="sub", result="success") == 1
    assert (
        recorder.value("attempts_total", target="sub", result="success", error="", trust="portable")
        == 1
    )
    not_after = leaf_certificate(good_cert).not_valid_after_utc
    expected = calendar.timegm(not_after.timetuple())
    assert recorder.value("cert_expiry_timestamp_seconds", target="sub") == expected


async def test_invalid_request_counts_but_leaves_up_alone(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    recorder = Recorder(known_targets={"mx1"})
    await recorder.run(server.port, security="plain", target="mx1")
    await recorder.run(server.port, security="plain", target="mx1", timeout=-1)
    assert (
        recorder.value("opens_total", target="mx1", result="failure", error="invalid_request") == 1
    )
    assert recorder.value("up", target="mx1") == 1


async def test_a_blocked_request_counts_but_leaves_up_alone(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    recorder = Recorder(known_targets={"mx1"})
    await recorder.run(server.port, security="plain", target="mx1")
    from_queue = Guards(egress=EgressPolicy(ports=frozenset({server.port})))
    await recorder.run(server.port, security="plain", target="mx1", guards=from_queue)
    assert recorder.value("opens_total", target="mx1", result="failure", error="blocked") == 1
    assert recorder.value("up", target="mx1") == 1
    assert server.connections_accepted == 1  # the blocked one never connected
