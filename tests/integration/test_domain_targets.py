"""Domain targets: one verdict per domain, one series per discovered server.

A domain's servers are found by a DNS server on loopback (tests.dns_server) and run on
loopback: one healthy, one that never greets (a deadline), one that answers 421. Whatever
order they finish in, the domain's verdict and each server's series say the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import dns.asyncresolver
import pytest
import structlog
from celery import Celery
from prometheus_client import CollectorRegistry

from smtp_session.monitoring.metrics import SessionMetrics
from smtp_session.tasks import celery_tasks  # noqa: F401 - registers the tasks on every app
from smtp_session.tasks.contract import CHECK_TARGET_TASK
from smtp_session.tasks.errors import ErrorCategory
from smtp_session.tasks.observe import LOG
from smtp_session.tasks.outcome import join_host_port
from smtp_session.tasks.session import RetryPolicy
from smtp_session.tasks.summary import DomainOutcome, Require, SweepSummary
from smtp_session.tasks.sweep import DomainCheck, sweep
from smtp_session.worker.client import parse_result
from smtp_session.worker.settings import Settings
from smtp_session.worker.targets import parse_targets
from tests.dns_server import DnsServer, serve
from tests.servers import RawServerFactory, SmtpServerFactory

DOMAIN = "example.test"
SRV_NAME = f"_submission._tcp.{DOMAIN}"
TARGET = "dom"
#: The silent server's cost: its greeting deadline.
TIMEOUT = 0.5
FAST_RETRY = RetryPolicy(base=0.01, cap=0.02)
FIELDS = {"security": "plain", "target": TARGET, "timeout": TIMEOUT, "retries": 0}


class Domain:
    """Three servers of DOMAIN by SRV priority: healthy first, then silent, then 421."""

    def __init__(self, dns_server: DnsServer, ports: Sequence[int]) -> None:
        self.dns_server = dns_server
        self.healthy, self.silent, self.busy = (join_host_port("localhost", p) for p in ports)

    @property
    def servers(self) -> list[str]:
        return [self.healthy, self.silent, self.busy]


@pytest.fixture
async def domain(
    dns_servers: list[DnsServer],
    smtp_server_factory: SmtpServerFactory,
    raw_server_factory: RawServerFactory,
) -> Domain:
    healthy = await smtp_server_factory(mode="plain")
    silent = await raw_server_factory("silent")
    busy = await raw_server_factory("banner_421")
    ports = [healthy.port, silent.port, busy.port]
    records = [f"{10 * rank} 0 {port} localhost." for rank, port in enumerate(ports, 1)]
    return Domain(await serve(dns_servers, {(SRV_NAME, "SRV"): records}), ports)


class Recorder:
    """The worker's metrics, in a registry of their own, for the configured TARGET."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = SessionMetrics(self.registry, known_targets={TARGET})

    async def check(
        self, resolver: dns.asyncresolver.Resolver, *, require: Require = "any", concurrency: int
    ) -> SweepSummary:
        return await sweep(
            [DomainCheck(DOMAIN, FIELDS, require)],
            concurrency=concurrency,
            observers=[LOG, self.metrics],
            retry_policy=FAST_RETRY,
            resolver=resolver,
        )

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"smtp_session_{name}", labels)

    def servers_up(self) -> dict[str, float]:
        return {
            sample.labels["server"]: sample.value
            for family in self.registry.collect()
            if family.name == "smtp_session_server_up"
            for sample in family.samples
            if sample.labels["target"] == TARGET
        }


async def test_one_bad_server_of_three_shows_which_one_every_time(domain: Domain) -> None:
    recorder = Recorder()
    # Concurrency 1 finishes the servers in discovery order, 3 in the order of their
    # deadlines: the verdict and the series must not depend on which finished last.
    for run, concurrency in enumerate((1, 3, 1, 3), start=1):
        summary = await recorder.check(domain.dns_server.resolver(), concurrency=concurrency)
        (verdict,) = summary.domains
        assert (verdict.ok, verdict.servers, verdict.servers_ok) == (True, 3, 1)
        assert (verdict.error, verdict.err_message, verdict.require) == (None, "", "any")
        assert [o.domain for o in verdict.outcomes] == [DOMAIN] * 3
        assert summary.outcomes == verdict.outcomes
        assert summary.targets_ok
        assert recorder.servers_up() == {domain.healthy: 1, domain.silent: 0, domain.busy: 0}
        assert recorder.value("up", target=TARGET) == 1
        # One final outcome per check, not one per server.
        assert recorder.value("opens_total", target=TARGET, result="success", error="") == run
        assert (
            recorder.value("opens_total", target=TARGET, result="failure", error="timeout") is None
        )
        assert recorder.value("duration_seconds_count", target=TARGET, result="success") == run
        # Every attempt to every server still counts as an attempt of the target.
        attempts = recorder.value(
            "attempts_total", target=TARGET, result="failure", error="smtp_transient", trust="none"
        )
        assert attempts == run


async def test_require_all_is_down_naming_the_first_failed_server(domain: Domain) -> None:
    recorder = Recorder()
    with structlog.testing.capture_logs() as events:
        summary = await recorder.check(domain.dns_server.resolver(), require="all", concurrency=3)
    (verdict,) = summary.domains
    assert (verdict.ok, verdict.servers, verdict.servers_ok) == (False, 3, 1)
    assert verdict.error == ErrorCategory.TIMEOUT  # the silent one: first in discovery order
    assert verdict.err_message.startswith(f"2 of 3 servers of {DOMAIN} failed; {domain.silent}: ")
    assert not summary.targets_ok
    assert recorder.value("up", target=TARGET) == 0
    assert recorder.value("opens_total", target=TARGET, result="failure", error="timeout") == 1
    results = [event for event in events if event["event"] == "domain.result"]
    assert [(e["ok"], e["servers"], e["servers_ok"], e["require"]) for e in results] == [
        (False, 3, 1, "all")
    ]
    sessions = [event for event in events if event["event"] == "session.result"]
    assert sorted(event["port"] for event in sessions) == sorted(
        o.port or 0 for o in verdict.outcomes
    )
    assert {event["domain"] for event in sessions} == {DOMAIN}


async def test_servers_discovery_no_longer_finds_lose_their_series(
    dns_servers: list[DnsServer], domain: Domain
) -> None:
    recorder = Recorder()
    await recorder.check(domain.dns_server.resolver(), concurrency=3)
    assert set(recorder.servers_up()) == set(domain.servers)

    healthy_port = int(domain.healthy.rsplit(":", 1)[1])
    fewer = await serve(dns_servers, {(SRV_NAME, "SRV"): [f"10 0 {healthy_port} localhost."]})
    await recorder.check(fewer.resolver(), concurrency=3)
    assert recorder.servers_up() == {domain.healthy: 1}

    # Discovery failed: no server was checked, none keeps a value; the domain is down.
    nowhere = await serve(dns_servers, {})
    summary = await recorder.check(nowhere.resolver(), concurrency=3)
    (verdict,) = summary.domains
    assert (verdict.ok, verdict.error, verdict.servers) == (False, ErrorCategory.DNS, 0)
    assert verdict.err_message == summary.outcomes[0].err_message
    assert recorder.servers_up() == {}
    assert recorder.value("up", target=TARGET) == 0


@pytest.fixture
def eager_app(domain: Domain, monkeypatch: pytest.MonkeyPatch) -> Iterator[Celery]:
    """An eager app whose targets file names DOMAIN; the process's resolver asks the
    loopback DNS server (dnspython's default resolver is what the worker uses)."""
    monkeypatch.setattr(dns.asyncresolver, "default_resolver", domain.dns_server.resolver())
    app = Celery("eager", set_as_current=True)
    app.conf.update(task_always_eager=True, task_eager_propagates=False)
    app.smtp_session_settings = Settings(retries=0, timeout=5.0)
    (target,) = parse_targets(
        {"targets": [{"name": TARGET, "domain": DOMAIN, **FIELDS, "require": "all"}]}
    )
    app.smtp_session_targets = {TARGET: target.sweep_item()}
    yield app
    app.close()


async def test_check_target_of_a_domain_returns_its_verdict_that_the_client_parses(
    eager_app: Celery, domain: Domain
) -> None:
    task = eager_app.tasks[CHECK_TARGET_TASK]
    data: dict[str, Any] = await asyncio.to_thread(
        lambda: task.apply(kwargs={"name": TARGET}).get()
    )
    assert (data["domain"], data["target"], data["require"], data["ok"]) == (
        DOMAIN,
        TARGET,
        "all",
        False,
    )
    verdict = parse_result(data)
    assert isinstance(verdict, DomainOutcome)
    assert [(o.host, o.port, o.ok) for o in verdict.outcomes] == [
        ("localhost", int(server.rsplit(":", 1)[1]), server == domain.healthy)
        for server in domain.servers
    ]
    assert verdict.to_dict() == data
