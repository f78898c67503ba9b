"""What an operator sees of a real worker: its JSON log lines, its /metrics, a real Prometheus.

Every worker here is ``smtp-session worker --concurrency 4`` as a subprocess on a real
Redis (a unix socket), with ``SMTP_SESSION_METRICS_LISTEN=127.0.0.1:0`` and JSON logs; the
port it got is read from its own ``metrics.listening`` log event. The worker's stdout and
stderr arrive merged, line by line, through :class:`WorkerProcess`.

The SMTP servers run in the test's event loop; whatever blocks (a Celery result, waiting
for a worker line, a scrape, a Prometheus query) runs in a thread through
``asyncio.to_thread``, so that the loop keeps serving the worker's sessions meanwhile.
The last four tests are in-process: the shapes of the log events (``capture_logs``) and
the per-task log context bound by the ``task_prerun`` receiver.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime
import json
import os
import select
import signal
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
import trustme
from celery import Celery
from celery import signals as celery_signals
from celery.result import AsyncResult
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from smtp_session.tasks.errors import Stage
from smtp_session.tasks.observe import LOG, report
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.session import open_session
from smtp_session.worker import signals as worker_signals
from smtp_session.worker.client import parse_result
from tests.dns_server import DnsServer, serve
from tests.integration.conftest import (
    APP,
    BIN,
    PING_TIMEOUT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    RedisServer,
    WorkerFactory,
    WorkerProcess,
    worker_env,
)
from tests.integration.test_worker import encoded_forms
from tests.prometheus import (
    PrometheusFactory,
    Result,
    alert_subjects,
    dashboard_queries,
    has_number,
)
from tests.servers import (
    LOOPBACK,
    LOOPBACK_IDENTITIES,
    SERVER_HOSTNAME,
    RawServerFactory,
    SmtpServer,
    SmtpServerFactory,
    leaf_certificate,
)

OPEN_TASK = "smtp_session.open"  # the public task names, spelled as a web backend would
CHECK_TARGET_TASK = "smtp_session.check_target"
CONCURRENCY = 4
#: Keeps the worker off DNS for its EHLO name (socket.getfqdn may be slow in a sandbox).
EHLO_NAME = "client.example"
#: Bound on waiting for the results of one batch of tasks. The slowest is a 421 retried
#: through Celery once (a backoff of at most 1 s) or twice (at most 1 s + 2 s).
RESULT_TIMEOUT = 30.0
#: Bound on Prometheus seeing a new value: a 1 s scrape, then a 1 s rule evaluation.
PROMETHEUS_TIMEOUT = 20.0
SESSIONS = 50

#: The fields docs/logs.md promises on `session.attempt` and `session.result`.
SESSION_FIELDS = frozenset(
    {"ok", "err_message", "error", "stage", "host", "port", "target", "attempt", "trust"}
    | {"fallback", "duration_s"}
)
TASK_FIELDS = frozenset({"task_id", "task_name"})

_T = TypeVar("_T")


# ----------------------------------------------------------------------------- the worker


@dataclass
class ObservedWorker:
    """A started worker, and where its /metrics listens."""

    process: WorkerProcess
    data_dir: Path
    metrics_address: str  # host:port, as a Prometheus scrape target

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics"

    def scrape(self) -> str:
        """GET /metrics once: the exposition text."""
        with urllib.request.urlopen(self.metrics_url, timeout=STOP_TIMEOUT) as response:  # noqa: S310 (our loopback URL)
            body: bytes = response.read()
        return body.decode("utf-8")

    def events(self) -> list[dict[str, Any]]:
        """Every output line so far, parsed (each must be one JSON object)."""
        return [json_object(line) for line in self.process.output().splitlines()]

    async def shut_down(self) -> None:
        """SIGTERM to the main process (as systemd or Docker send it), then wait for exit.

        The warm shutdown must end with exit status 0; afterwards every line the worker
        wrote has been read.
        """
        os.kill(self.process.pid, signal.SIGTERM)
        code, status = await asyncio.to_thread(wait_for_exit, self.process.pid, STOP_TIMEOUT)
        assert (code, status) == (os.CLD_EXITED, 0), (code, status, self.process.output())
        # Reaps the main process, kills any pool process left over (there should be
        # none) and joins the output reader: the output is complete.
        self.process.stop()


Launcher = Callable[..., Awaitable[ObservedWorker]]


@pytest.fixture
def launch_worker(
    redis_server: RedisServer, start_worker: WorkerFactory, tmp_path: Path
) -> Launcher:
    """``await launch_worker(env={...})``: a worker whose /metrics listens; its address known."""

    async def launch(
        *, env: Mapping[str, str] | None = None, data_dir: Path | None = None
    ) -> ObservedWorker:
        data = data_dir if data_dir is not None else tmp_path / "data"
        settings = {
            "SMTP_SESSION_BROKER_URL": redis_server.url,
            "SMTP_SESSION_METRICS_LISTEN": f"{LOOPBACK}:0",
            "SMTP_SESSION_LOG_FORMAT": "json",
        }
        process = start_worker(
            env=worker_env(data, {**settings, **(env or {})}), concurrency=CONCURRENCY
        )
        line = await asyncio.to_thread(
            process.wait_for_line, r"metrics\.listening", timeout=START_TIMEOUT
        )
        event = json_object(line)
        assert event["event"] == "metrics.listening", line
        assert event["address"] == LOOPBACK
        assert isinstance(event["port"], int) and event["port"] > 0, event
        return ObservedWorker(process, data, f"{LOOPBACK}:{event['port']}")

    return launch


def wait_for_exit(pid: int, timeout: float) -> tuple[int, int]:
    """(si_code, si_status) once child `pid` has exited, without reaping it.

    A pidfd becomes readable when the process exits: that is the event waited on. WNOWAIT
    leaves the zombie to its Popen, which reaps it as usual.
    """
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise TimeoutError(f"process {pid} still running after {timeout} s")
        info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOWAIT)
        assert info is not None
        return info.si_code, info.si_status
    finally:
        os.close(fd)


def pool_processes(worker: WorkerProcess) -> list[int]:
    """The worker's child processes (none: its sessions run in threads of one process)."""
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def json_object(line: str) -> dict[str, Any]:
    """`line` parsed as the one JSON object it must be (AssertionError naming it otherwise)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise AssertionError(f"not a JSON line ({error}): {line!r}") from None
    assert isinstance(value, dict), f"not a JSON object: {line!r}"
    return value


# ----------------------------------------------------------------------------- Celery


async def blocking(call: Callable[[], _T]) -> _T:
    """Run a blocking call in a thread while the loop serves the test's servers."""
    return await asyncio.to_thread(call)


async def outcomes_of(results: Sequence[AsyncResult]) -> list[dict[str, Any]]:
    """Every task's result dict, read back through the result backend, in order."""

    def collect() -> list[dict[str, Any]]:
        return [result.get(timeout=RESULT_TIMEOUT, propagate=True) for result in results]

    outcomes = await blocking(collect)
    for outcome in outcomes:
        parse_result(outcome)  # the Outcome (or DomainOutcome) schema, field by field
    return outcomes


def plain_request(server: tuple[str, int], **fields: Any) -> dict[str, Any]:
    """Task kwargs for a plaintext session to (host, port)."""
    host, port = server
    return {"host": host, "port": port, "security": "plain", "ehlo_name": EHLO_NAME, **fields}


def open_task(client: Celery, **fields: Any) -> AsyncResult:
    return client.send_task(OPEN_TASK, kwargs=fields)


# ----------------------------------------------------------------------------- /metrics


def samples(exposition: str) -> list[Sample]:
    return [
        sample for family in text_string_to_metric_families(exposition) for sample in family.samples
    ]


def total(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(
        sample.value
        for sample in samples(exposition)
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def value(exposition: str, name: str, **labels: str) -> float | None:
    """The one sample named `name` with exactly `labels`, or None."""
    found = [s.value for s in samples(exposition) if s.name == name and s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


# ----------------------------------------------------------------------------- pool totals


async def test_fifty_concurrent_sessions_add_up_exactly_on_one_endpoint(
    launch_worker: Launcher, celery_client: Celery, smtp_server_factory: SmtpServerFactory
) -> None:
    server = await smtp_server_factory(mode="plain")
    worker = await launch_worker()

    results = [open_task(celery_client, **plain_request(server.address)) for _ in range(SESSIONS)]
    outcomes = await outcomes_of(results)

    assert [outcome["ok"] for outcome in outcomes] == [True] * SESSIONS, outcomes
    assert server.connections_accepted == SESSIONS
    # One process ran them all, many at once: no pool processes whose counts could be lost.
    assert pool_processes(worker.process) == []
    # Values are recorded before a task returns: one scrape, no waiting.
    exposition = await blocking(worker.scrape)

    assert total(exposition, "smtp_session_opens_total") == SESSIONS
    assert total(exposition, "smtp_session_attempts_total") == SESSIONS
    success = {"target": "adhoc", "result": "success"}
    assert value(exposition, "smtp_session_opens_total", **success, error="") == SESSIONS
    assert (
        value(exposition, "smtp_session_attempts_total", **success, error="", trust="none")
        == SESSIONS
    )
    assert value(exposition, "smtp_session_duration_seconds_count", **success) == SESSIONS
    assert (
        value(exposition, "smtp_session_stage_duration_seconds_count", target="adhoc", stage="ehlo")
        == SESSIONS
    )
    # One series per target, no per-process copies.
    assert value(exposition, "smtp_session_up", target="adhoc") == 1
    last_success = value(exposition, "smtp_session_last_success_timestamp_seconds", target="adhoc")
    assert last_success is not None and last_success > 0
    labelled_pid = [sample for sample in samples(exposition) if "pid" in sample.labels]
    assert labelled_pid == []
    assert 'pid="' not in exposition


# ----------------------------------------------------------------------------- log lines


async def test_every_line_the_worker_writes_is_one_json_object(
    launch_worker: Launcher,
    celery_client: Celery,
    smtp_server_factory: SmtpServerFactory,
    raw_server_factory: RawServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    transient = await raw_server_factory("banner_421")
    worker = await launch_worker()

    ok = open_task(celery_client, **plain_request(server.address))
    retried = open_task(celery_client, **plain_request(transient.address, retries=1))
    ok_outcome, retried_outcome = await outcomes_of([ok, retried])
    assert ok_outcome["ok"] is True, ok_outcome
    assert (retried_outcome["error"], retried_outcome["attempts"]) == ("smtp_transient", 2)

    await worker.shut_down()

    events = worker.events()  # every line, from the first to the last, parsed
    assert len(events) > 10, worker.process.output()
    for event in events:
        assert {"event", "level", "logger", "timestamp"} <= event.keys(), event

    def named(name: str) -> list[dict[str, Any]]:
        return [event for event in events if event["event"] == name]

    # The banner, as an event.
    (banner,) = named("worker.starting")
    assert f"concurrency: {CONCURRENCY} (thread)" in banner["info"], banner
    # Celery's own lines: start-up, but at INFO not one line per task ("received",
    # "succeeded in …: {the whole outcome}", "retry"): session.* events say it all.
    celery_lines = [event["event"] for event in events if event["logger"].startswith("celery")]
    assert any(line.endswith(" ready.") for line in celery_lines), celery_lines
    for task_id in (ok.id, retried.id):
        assert not [line for line in celery_lines if task_id in line], celery_lines
    # Celery's shutdown notice, which it would print bare to the terminal.
    notices = [event.get("message", "") for event in named("celery.notice")]
    assert any("Warm shutdown" in notice for notice in notices), notices
    assert any("sessions in flight (a second Ctrl+C stops without waiting" in n for n in notices)

    # session.attempt per attempt, session.result once, inside the task's context.
    sessions = [event for event in events if event["event"].startswith("session.")]
    for event in sessions:
        assert event.keys() >= SESSION_FIELDS | TASK_FIELDS, event
        assert event["task_name"] == OPEN_TASK, event

    def of_task(result: AsyncResult, name: str) -> list[dict[str, Any]]:
        return [
            event for event in sessions if event["task_id"] == result.id and event["event"] == name
        ]

    assert len(sessions) == 5, sessions  # ok: 1 attempt + 1 result; retried: 2 + 1
    (ok_attempt,) = of_task(ok, "session.attempt")
    (ok_result,) = of_task(ok, "session.result")
    for event in (ok_attempt, ok_result):
        assert event["ok"] is True
        assert event["err_message"] == ""
        assert event["error"] is None
        assert event["stage"] == "done"
        assert (event["host"], event["port"]) == server.address
        assert event["target"] is None
        assert event["attempt"] == 1
        assert (event["trust"], event["fallback"]) == (None, False)
        assert isinstance(event["duration_s"], float) and event["duration_s"] > 0
    retried_attempts = of_task(retried, "session.attempt")
    (retried_result,) = of_task(retried, "session.result")
    assert [event["attempt"] for event in retried_attempts] == [1, 2]
    for event in [*retried_attempts, retried_result]:
        assert (event["ok"], event["error"]) == (False, "smtp_transient"), event
        assert event["err_message"] == retried_outcome["err_message"]
        assert event["stage"] == retried_outcome["stage"]
    assert retried_result["attempt"] == 2


def test_the_celery_command_writes_its_banner_and_notices_as_json_to_stderr(
    redis_server: RedisServer, celery_client: Celery, tmp_path: Path
) -> None:
    # Started the other documented way, with stdout and stderr apart: the banner and the
    # warm-shutdown notice, which Celery prints bare to stdout, are JSON lines on stderr
    # (worker/signals.py replaces Celery's Worker.emit_banner and safe_say for that).
    env = worker_env(
        tmp_path / "data",
        {"SMTP_SESSION_BROKER_URL": redis_server.url, "SMTP_SESSION_LOG_FORMAT": "json"},
    )
    argv = [str(BIN / "celery"), "-A", APP, "worker", "--loglevel=INFO", "--concurrency=2"]
    pipe = subprocess.PIPE
    with subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe) as run:
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not celery_client.control.ping(timeout=PING_TIMEOUT, limit=1):
                assert run.poll() is None and time.monotonic() < deadline, "worker not ready"
            run.send_signal(signal.SIGTERM)
            stdout, stderr = run.communicate(timeout=STOP_TIMEOUT)
        finally:
            run.kill()  # nothing to do once it has exited

    assert run.returncode == 0, stderr
    assert stdout == b""
    events = [json_object(line) for line in stderr.decode().splitlines()]
    (banner,) = [event for event in events if event["event"] == "worker.starting"]
    assert "concurrency: 2 (thread)" in banner["info"], banner
    notices = [event["message"] for event in events if event["event"] == "celery.notice"]
    assert any("Warm shutdown" in notice for notice in notices), notices


def timestamp(event: Mapping[str, Any]) -> float:
    """A log event's ISO timestamp as Unix time."""
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


async def test_a_request_retried_through_celery_reports_its_whole_duration(
    launch_worker: Launcher, celery_client: Celery, raw_server_factory: RawServerFactory
) -> None:
    """docs/metrics.md: smtp_session_duration_seconds is the "whole request, retries included"."""
    transient = await raw_server_factory("banner_421")
    worker = await launch_worker()

    result = open_task(celery_client, **plain_request(transient.address, retries=1))
    (outcome,) = await outcomes_of([result])
    exposition = await blocking(worker.scrape)
    # The task logs its result before it returns it; the line is waited for all the same.
    await blocking(
        lambda: worker.process.wait_for_line(
            rf"session\.result.*{result.id}", timeout=RESULT_TIMEOUT
        )
    )

    assert (outcome["error"], outcome["attempts"]) == ("smtp_transient", 2), outcome
    task_events = [e for e in worker.events() if e.get("task_id") == result.id]
    first = next(e for e in task_events if e["event"] == "session.attempt")
    (final,) = (e for e in task_events if e["event"] == "session.result")
    # By the worker's own clock, the request ran at least from the start of its first
    # attempt (logged at its end) to its final outcome, the retry's backoff in between.
    # The log lines are written a moment after the durations are taken: allow for that.
    whole = timestamp(final) - timestamp(first) + first["duration_s"] - LOG_SLACK
    assert whole > 2 * first["duration_s"]  # the backoff is there to be counted
    failure = {"target": "adhoc", "result": "failure"}
    assert value(exposition, "smtp_session_duration_seconds_count", **failure) == 1
    observed = value(exposition, "smtp_session_duration_seconds_sum", **failure)
    assert observed is not None and observed >= whole, (observed, whole)
    # The same number in the log event and the Outcome, as open_session gives in-process.
    assert final["duration_s"] >= whole, (final, whole)
    assert outcome["timings"]["total"] >= whole, (outcome["timings"], whole)


# ----------------------------------------------------------------------------- a real Prometheus


#: Seconds between taking an outcome's duration and writing its log line, at most.
LOG_SLACK = 0.05

#: Requests per round: check_target for relay, backup and flaky, one adhoc open.
ROUND = 5
#: The mail domain target "mailhub", discovered through a DNS server of the test's own.
MAIL_DOMAIN = "hub.example.test"


def soon_expiring_cert(ca: trustme.CA) -> trustme.LeafCert:
    """Valid for loopback, but expiring within SmtpSessionCertificateExpiringSoon's 14 days."""
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue_cert(
        *LOOPBACK_IDENTITIES,
        common_name=SERVER_HOSTNAME,
        not_before=now - datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=7),
    )


def targets_toml(*, relay: int, backup: int, flaky: int) -> str:
    """Three named targets on loopback, and a mail domain (json.dumps quotes a TOML basic
    string)."""
    return f"""
[defaults]
ehlo_name = {json.dumps(EHLO_NAME)}
timeout = 5
retries = 0

[[targets]]  # native trust refuses the test CA; portable, with SMTP_SESSION_CA_FILE, verifies it
name = "relay"
host = {json.dumps(LOOPBACK)}
port = {relay}
security = "starttls"

[[targets]]  # nothing listens
name = "backup"
host = {json.dumps(LOOPBACK)}
port = {backup}
security = "plain"

[[targets]]  # 421 at every greeting, retried once through Celery
name = "flaky"
host = {json.dumps(LOOPBACK)}
port = {flaky}
security = "plain"
retries = 1

[[targets]]  # two servers by SRV (SMTP_SESSION_DNS_SERVERS): one up, one refusing
name = "mailhub"
domain = {json.dumps(MAIL_DOMAIN)}
security = "plain"
"""


async def run_round(client: Celery, adhoc: SmtpServer, *, relay_remembered: bool) -> None:
    """One request of each kind; each outcome is what its server makes it.

    The relay falls back from native to portable trust once; from then on the worker's
    trust memory starts it in portable (`relay_remembered`).
    """
    results = [
        client.send_task(CHECK_TARGET_TASK, kwargs={"name": name})
        for name in ("relay", "backup", "flaky", "mailhub")
    ]
    results.append(open_task(client, **plain_request(adhoc.address)))
    outcomes = await outcomes_of(results)
    assert len(outcomes) == ROUND
    relay, backup, flaky, mailhub, adhoc_outcome = outcomes
    # One verdict for the domain, up with one server of two (require = "any").
    assert (mailhub["ok"], mailhub["servers"], mailhub["servers_ok"]) == (True, 2, 1), mailhub
    assert relay["ok"] is True and relay["tls"]["trust"] == "portable", relay
    tls = relay["tls"]
    assert (tls["fallback"], tls["remembered"]) == (not relay_remembered, relay_remembered), tls
    assert backup["error"] == "refused", backup
    assert (flaky["error"], flaky["attempts"]) == ("smtp_transient", 2), flaky
    assert adhoc_outcome["ok"] is True, adhoc_outcome


def opens_reach(count: int) -> Callable[[list[Result]], bool]:
    return lambda results: bool(results) and float(results[0]["value"][1]) == count


#: Alerts whose expression can have no data in a test of seconds. SmtpSessionNoRecentSuccess
#: (`time() - max by (target) (smtp_session_last_success_timestamp_seconds) > 1800`) needs
#: a target whose newest success is over 30 minutes old: a real worker stamps a success
#: with the time it happened, and a target that never succeeded has no series at all.
#: Besides, no alert with a `for:` can reach "firing" here: SmtpSessionMetricsAbsent and
#: SmtpSessionTargetDown hold 5 minutes, SmtpSessionFailureRatioHigh and
#: SmtpSessionCertificateExpiringSoon 15 minutes. The last three are checked pending in
#: ALERTS; SmtpSessionMetricsAbsent by its expression's data once the worker is stopped.
#: SmtpSessionTrustFallback has no `for:` and fires.
TIME_BOUND_ALERTS = {"SmtpSessionNoRecentSuccess"}
WORKER_DOWN_ALERT = "SmtpSessionMetricsAbsent"


async def test_real_prometheus_scraping_a_real_worker_has_data_for_every_query(
    launch_worker: Launcher,
    celery_client: Celery,
    prometheus_factory: PrometheusFactory,
    smtp_server_factory: SmtpServerFactory,
    raw_server_factory: RawServerFactory,
    refused_port: tuple[str, int],
    ca: trustme.CA,
    ca_pem_path: str,
    dns_servers: list[DnsServer],
    tmp_path: Path,
) -> None:
    """Named targets of every kind plus adhoc, two rounds, then every rule and panel query.

    relay: STARTTLS, trust fallback (the test CA only in SMTP_SESSION_CA_FILE, which the
    portable store adds), a certificate that
    expires in 7 days; backup: refused; flaky: 421, retried once through Celery; adhoc:
    `smtp_session.open` to a plain server; mailhub: a mail domain whose two servers (found
    through the test's DNS server) are one up, one refused. SmtpSessionMetricsAbsent is
    checked last, by stopping the worker.
    """
    relay_cert = soon_expiring_cert(ca)
    relay = await smtp_server_factory(mode="starttls", cert=relay_cert)
    flaky = await raw_server_factory("banner_421")
    adhoc = await smtp_server_factory(mode="plain")
    hub = await smtp_server_factory(mode="plain")
    srv = [f"10 0 {hub.port} localhost.", f"20 0 {refused_port[1]} localhost."]
    dns_server = await serve(dns_servers, {(f"_submission._tcp.{MAIL_DOMAIN}", "SRV"): srv})
    targets = tmp_path / "targets.toml"
    targets.write_text(targets_toml(relay=relay.port, backup=refused_port[1], flaky=flaky.port))
    worker = await launch_worker(
        env={
            "SMTP_SESSION_TARGETS": str(targets),
            "SMTP_SESSION_CA_FILE": ca_pem_path,
            "SMTP_SESSION_DNS_SERVERS": f"{LOOPBACK}:{dns_server.port}",
        }
    )
    prometheus = prometheus_factory(targets=[worker.metrics_address])

    async def wait_for(expr: str, predicate: Callable[[list[Result]], bool] = bool) -> list[Result]:
        return await asyncio.to_thread(
            prometheus.wait_for, expr, predicate, timeout=PROMETHEUS_TIMEOUT
        )

    async def query(expr: str) -> list[Result]:
        return await asyncio.to_thread(prometheus.query, expr)

    # rate() and increase() need two samples with a change between them: a scrape of the
    # zeros the worker exports at start, a round of sessions, a scrape that saw it, a
    # second round, a scrape that saw that. The relay's one fallback is in the first.
    await wait_for('smtp_session_tls_fallback_total{target="relay"}')
    await run_round(celery_client, adhoc, relay_remembered=False)
    await wait_for("sum(smtp_session_opens_total)", opens_reach(ROUND))
    await run_round(celery_client, adhoc, relay_remembered=True)
    await wait_for("sum(smtp_session_opens_total)", opens_reach(2 * ROUND))

    # Each alert whose condition can hold within seconds holds, for its own subject only
    # (adhoc's success neither; the relay's fallback is kept there on purpose).
    expected = {
        "SmtpSessionTargetDown": {"backup", "flaky"},
        "SmtpSessionFailureRatioHigh": {"backup", "flaky"},
        "SmtpSessionCertificateExpiringSoon": {"relay"},
        "SmtpSessionTrustFallback": {"relay"},
        "SmtpSessionServerDown": {f"mailhub localhost:{refused_port[1]}"},
    }
    await wait_for("ALERTS", lambda alerts: alert_subjects(alerts) == expected)
    # Only the alert without a `for:` can fire this soon; the others are pending.
    firing = await query('ALERTS{alertstate="firing"}')
    assert alert_subjects(firing) == {"SmtpSessionTrustFallback": {"relay"}}

    rules = await blocking(prometheus.rules)
    assert {rule["type"] for rule in rules} == {"recording", "alerting"}
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule.get("lastError", "") == "", rule
        if rule["name"] in TIME_BOUND_ALERTS | {WORKER_DOWN_ALERT}:
            continue
        results = await query(rule["query"])
        assert has_number(results), f"{rule['name']}: {rule['query']} -> {results}"
    for name in TIME_BOUND_ALERTS:
        (rule,) = (rule for rule in rules if rule["name"] == name)
        assert await query(rule["query"]) == []

    for panel in dashboard_queries():
        results = await query(panel.expr)
        assert has_number(results), f"{panel} -> {results}"

    listed = await asyncio.to_thread(prometheus.label_values, "target", "smtp_session_up")
    assert set(listed) == {"relay", "backup", "flaky", "mailhub", "adhoc"}
    # The relay's certificate, as the worker read it from the handshake.
    not_after = leaf_certificate(relay_cert).not_valid_after_utc
    (expiry,) = await query('smtp_session_cert_expiry_timestamp_seconds{target="relay"}')
    assert float(expiry["value"][1]) == calendar.timegm(not_after.timetuple())

    # The worker stops: its endpoint is gone, and the alert about that has its data.
    await worker.shut_down()
    (absent,) = (rule for rule in rules if rule["name"] == WORKER_DOWN_ALERT)
    down = await wait_for(absent["query"], has_number)
    assert [result["metric"]["instance"] for result in down] == [worker.metrics_address]


async def test_configured_targets_are_exported_before_their_first_check(
    launch_worker: Launcher, refused_port: tuple[str, int], ca_pem_path: str, tmp_path: Path
) -> None:
    """SessionMetrics.declare_targets exports zeros for the configured targets "so rate() and
    increase() see their first event". A counter born at 1 has no earlier sample for
    increase() to compare with: SmtpSessionTrustFallback would miss a target's first
    fallback after each worker start. The zeros must be on /metrics before any check.
    """
    port = refused_port[1]
    targets = tmp_path / "targets.toml"
    targets.write_text(targets_toml(relay=port, backup=port, flaky=port))
    worker = await launch_worker(env={"SMTP_SESSION_TARGETS": str(targets)})

    exposition = await blocking(worker.scrape)

    for target in ("relay", "backup", "flaky"):
        for result in ("success", "failure"):
            assert (
                value(exposition, "smtp_session_tls_fallback_total", target=target, result=result)
                == 0
            ), (target, result, exposition)
        assert (
            value(exposition, "smtp_session_opens_total", target=target, result="success", error="")
            == 0
        ), (target, exposition)


# ----------------------------------------------------------------------------- secrets


SECRET_USER = "alice"
#: Letters and digits only, so no renderer escapes it; random per run, so that finding
#: it anywhere cannot be a coincidence.
SECRET_PASSWORD = f"pw{os.urandom(12).hex()}"
WRONG_PASSWORD = "not-the-secret"
CREDENTIALS_REF = "tenant-42"


def leaks(text: str) -> list[str]:
    """The password as such, or base64-encoded at any alignment (AUTH PLAIN and LOGIN
    carry it so, and so would a kombu message body): [] is the only good answer."""
    return [needle for needle in encoded_forms(SECRET_PASSWORD) if needle in text]


async def test_a_secret_given_by_reference_shows_nowhere_the_worker_writes(
    launch_worker: Launcher,
    celery_client: Celery,
    redis_server: RedisServer,
    smtp_server_factory: SmtpServerFactory,
    ca_pem_path: str,
) -> None:
    accepting = await smtp_server_factory(mode="starttls", auth={SECRET_USER: SECRET_PASSWORD})
    refusing = await smtp_server_factory(mode="starttls", auth={SECRET_USER: WRONG_PASSWORD})
    worker = await launch_worker(
        env={"SMTP_SESSION_SECRET_TENANT_42": f"{SECRET_USER}:{SECRET_PASSWORD}"}
    )

    def with_credentials(server: SmtpServer) -> AsyncResult:
        return open_task(
            celery_client,
            host=server.host,
            port=server.port,
            security="starttls",
            ca_pem=Path(ca_pem_path).read_text(),  # a tenant's CA travels as text
            credentials=CREDENTIALS_REF,
            retries=0,
            ehlo_name=EHLO_NAME,
        )

    results = [with_credentials(accepting), with_credentials(refusing)]
    authenticated, refused = await outcomes_of(results)
    exposition = await blocking(worker.scrape)
    await worker.shut_down()

    # The secret was really sent (so it could have leaked), to the right servers only.
    assert (authenticated["ok"], authenticated["authenticated"]) == (True, True), authenticated
    assert (refused["error"], refused["authenticated"]) == ("auth_failed", False), refused
    assert [(a.username, a.success) for a in accepting.auth_attempts] == [(SECRET_USER, True)]
    assert [(a.username, a.success) for a in refusing.auth_attempts] == [(SECRET_USER, False)]
    # ... and the worker logged both sessions, with the reason of the failure.
    session_results = [e for e in worker.events() if e["event"] == "session.result"]
    assert sorted(e["error"] or "" for e in session_results) == ["", "auth_failed"]
    assert "auth_failed" in exposition

    assert leaks(worker.process.output()) == []
    assert leaks(exposition) == []
    assert leaks(json.dumps([authenticated, refused])) == []
    with redis_server.client() as client:
        stored = [client.get(key) or b"" for key in client.keys("celery-task-meta-*")]
    assert len(stored) == 2
    assert leaks(b"\n".join(stored).decode("utf-8", "replace")) == []
    # Whatever the worker left in its data dir: nothing of a secret either.
    for path in (path for path in worker.data_dir.rglob("*") if path.is_file()):
        assert leaks(path.read_bytes().decode("latin-1")) == [], path


# ----------------------------------------------------------------------------- restart


async def test_restarting_the_worker_starts_the_counters_from_zero(
    launch_worker: Launcher, celery_client: Celery, smtp_server_factory: SmtpServerFactory
) -> None:
    server = await smtp_server_factory(mode="plain")
    first = await launch_worker()
    await outcomes_of([open_task(celery_client, **plain_request(server.address)) for _ in range(3)])
    assert total(await blocking(first.scrape), "smtp_session_opens_total") == 3
    # Killed, not shut down: nothing of the old worker gets a chance to tidy up.
    first.process.stop()

    second = await launch_worker(data_dir=first.data_dir)
    assert second.data_dir == first.data_dir
    before = await blocking(second.scrape)
    assert total(before, "smtp_session_opens_total") == 0
    assert total(before, "smtp_session_attempts_total") == 0
    await outcomes_of([open_task(celery_client, **plain_request(server.address))])
    after = await blocking(second.scrape)

    assert total(after, "smtp_session_opens_total") == 1
    assert total(after, "smtp_session_attempts_total") == 1
    assert server.connections_accepted == 4


# ----------------------------------------------------------------------------- in-process


@dataclass(frozen=True)
class TaskStub:
    """What the receiver reads of a Celery task (hashable, as a signal's sender must be)."""

    name: str


async def no_sleep(seconds: float) -> None:
    """The retry backoff, skipped: the attempts are what is under test."""


@pytest.fixture
def clean_contextvars() -> Iterator[None]:
    """Whatever a test binds to structlog's context stays in that test."""
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


def session_events(events: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [event for event in events if event["event"].startswith("session.")]


async def test_open_session_logs_every_attempt_and_one_result(
    raw_server_factory: RawServerFactory,
) -> None:
    server = await raw_server_factory("banner_421")

    with structlog.testing.capture_logs() as events:
        outcome = await open_session(plain_request(server.address, retries=2), sleep=no_sleep)

    assert (outcome.error, outcome.attempts) == ("smtp_transient", 3)
    logged = session_events(events)
    assert [(event["event"], event["attempt"]) for event in logged] == [
        ("session.attempt", 1),
        ("session.attempt", 2),
        ("session.attempt", 3),
        ("session.result", 3),
    ]
    for event in logged:
        assert event.keys() >= SESSION_FIELDS, event
        assert event["log_level"] == "info"
        assert (event["ok"], event["error"], event["stage"]) == (False, "smtp_transient", "banner")
        assert event["err_message"] == outcome.err_message
        assert (event["host"], event["port"], event["target"]) == (*server.address, None)
        assert (event["trust"], event["fallback"]) == (None, False)
        assert isinstance(event["duration_s"], float)
    # The final event is the whole request: its duration covers every attempt.
    assert logged[-1]["duration_s"] == outcome.timings.total
    assert logged[-1]["duration_s"] >= logged[0]["duration_s"]


async def test_a_trust_fallback_is_in_the_events(smtp_server: SmtpServer, ca_pem_path: str) -> None:
    with structlog.testing.capture_logs() as events:
        outcome = await open_session(
            {
                "host": smtp_server.host,
                "port": smtp_server.port,
                "target": "relay",
                "ehlo_name": EHLO_NAME,
            },
            extra_ca_file=ca_pem_path,  # the operator's CA: only the portable store has it
        )

    assert outcome.ok, outcome
    attempt, result = session_events(events)
    assert (attempt["event"], result["event"]) == ("session.attempt", "session.result")
    for event in (attempt, result):
        assert event.keys() >= SESSION_FIELDS, event
        assert (event["ok"], event["err_message"], event["error"]) == (True, "", None)
        assert (event["trust"], event["fallback"]) == ("portable", True)
        assert (event["target"], event["attempt"], event["stage"]) == ("relay", 1, "done")


@pytest.mark.usefixtures("clean_contextvars")
def test_task_prerun_receiver_clears_the_previous_task_and_binds_this_one() -> None:
    # What a reused pool thread still holds from its previous task.
    structlog.contextvars.bind_contextvars(task_id="previous", task_name="previous", host="x")

    worker_signals._bind_task_context(task_id="t-1", task=TaskStub(OPEN_TASK))

    assert structlog.contextvars.get_contextvars() == {"task_id": "t-1", "task_name": OPEN_TASK}
    # And the session events of that task carry them (the JSON pipeline merges the context).
    outcome = Outcome(
        ok=True,
        err_message="",
        stage=Stage.DONE,
        host=LOOPBACK,
        port=25,
        started_at="2026-01-01T00:00:00Z",
    )
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as events:
        report(outcome, final=True, observers=(LOG,))
    assert (events[0]["task_id"], events[0]["task_name"]) == ("t-1", OPEN_TASK)


@pytest.mark.usefixtures("clean_contextvars")
def test_task_prerun_signal_reaches_the_receiver() -> None:
    structlog.contextvars.bind_contextvars(task_id="previous", attempt=3)
    task = TaskStub(CHECK_TARGET_TASK)

    celery_signals.task_prerun.send(sender=task, task_id="t-2", task=task, args=(), kwargs={})

    assert structlog.contextvars.get_contextvars() == {
        "task_id": "t-2",
        "task_name": CHECK_TARGET_TASK,
    }
