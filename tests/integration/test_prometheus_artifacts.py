"""The operator-facing files of deploy/: Prometheus config and rules, the Grafana dashboard.

Static checks run promtool (Debian's) and read the YAML; the queries run against a real
Prometheus on loopback (tests/prometheus.py). Until the worker's own /metrics exporter
lands, the data comes from a stand-in exporter: prometheus_client's HTTP server over a
fresh registry, fed through ``SessionMetrics`` with hand-made Outcomes.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from deploy.grafana import dashboard as dashboard_code
from smtp_session.monitoring.metrics import SessionMetrics
from smtp_session.tasks.errors import ErrorCategory, Stage
from smtp_session.tasks.outcome import CertInfo, Outcome, Timings, TlsInfo
from smtp_session.tasks.summary import domain_verdict
from tests.prometheus import (
    CONFIG,
    DASHBOARD_JSON,
    JOB,
    LOOPBACK,
    RULES,
    RULES_TEST,
    PrometheusFactory,
    Result,
    alert_subjects,
    dashboard_queries,
    has_number,
    promtool,
)

GRAFANA = Path(dashboard_code.__file__).resolve().parent
SEVERITIES = {"critical", "warning"}
SCRAPE_ALERT = "SmtpSessionMetricsAbsent"
DATA_TIMEOUT = 20.0


def _load_yaml(path: Path) -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(path.read_text(encoding="utf-8")))


def _rules(kind: str) -> list[dict[str, Any]]:
    groups = _load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if kind in rule]


# ----------------------------------------------------------------------------- promtool


def test_promtool_checks_the_config_and_the_rules_it_loads(tmp_path: Path) -> None:
    # Run from elsewhere: rule_files must resolve relative to the config file itself.
    result = promtool("check", "config", str(CONFIG), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass(tmp_path: Path) -> None:
    result = promtool("test", "rules", str(RULES_TEST), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ----------------------------------------------------------------------------- rules.yml


def test_config_scrapes_the_job_the_rules_watch() -> None:
    config = _load_yaml(CONFIG)
    assert config["rule_files"] == ["rules.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    assert job["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 9808, "refresh_interval": "30s"}
    ]
    assert job["scrape_interval"] == "15s"
    absent = next(rule for rule in _rules("alert") if rule["alert"] == SCRAPE_ALERT)
    assert f'job="{JOB}"' in absent["expr"]


def test_every_alert_has_a_severity_and_annotations_naming_its_subject() -> None:
    alerts = _rules("alert")
    assert {rule["alert"] for rule in alerts} == {
        "SmtpSessionMetricsAbsent",
        "SmtpSessionTargetDown",
        "SmtpSessionFailureRatioHigh",
        "SmtpSessionCertificateExpiringSoon",
        "SmtpSessionTrustFallback",
        "SmtpSessionNoRecentSuccess",
        "SmtpSessionServerDown",
    }
    for rule in alerts:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        # The scrape alert is about an instance (no target label); the others, a target.
        subject = "$labels.instance" if rule["alert"] == SCRAPE_ALERT else "$labels.target"
        for text in rule["annotations"].values():
            assert subject in text, (rule["alert"], text)


def test_per_target_alerts_leave_out_adhoc_except_the_trust_fallback() -> None:
    for rule in _rules("alert"):
        if rule["alert"] in {SCRAPE_ALERT, "SmtpSessionTrustFallback"}:
            assert "adhoc" not in rule["expr"], rule["alert"]
        else:
            assert 'target!="adhoc"' in rule["expr"], rule["alert"]


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in _load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in _rules("alert")}
    assert fires == names
    assert silent == names


def test_every_recording_rule_is_unit_tested() -> None:
    tested = {
        check["expr"]
        for case in _load_yaml(RULES_TEST)["tests"]
        for check in case.get("promql_expr_test", [])
    }
    assert {rule["record"] for rule in _rules("record")} <= tested


# ----------------------------------------------------------------------------- Grafana


def test_dashboard_json_is_what_the_code_generates() -> None:
    assert DASHBOARD_JSON.read_text(encoding="utf-8") == dashboard_code.render(), (
        "deploy/grafana/dashboards/smtp-session.json is stale: "
        "run `python -m deploy.grafana.dashboard`"
    )


def test_dashboard_has_the_variables_and_panels_operators_need() -> None:
    document = json.loads(dashboard_code.render())
    assert document["uid"] == "smtp-session"
    variables = {variable["name"]: variable for variable in document["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["target"]["query"] == "label_values(smtp_session_up, target)"
    queries = dashboard_queries()
    exprs = " ".join(query.expr for query in queries)
    for metric in (
        "smtp_session_up",
        "smtp_session_opens_total",
        "smtp_session_attempts_total",
        "smtp_session_tls_fallback_total",
        "smtp_session_duration_seconds_bucket",
        "smtp_session_stage_duration_seconds_bucket",
        "smtp_session_last_success_timestamp_seconds",
        "smtp_session_cert_expiry_timestamp_seconds",
        "target:smtp_session_opens_success:ratio_rate5m",
        "target:smtp_session_opens_success:ratio_rate1h",
    ):
        assert metric in exprs, metric
    raw = DASHBOARD_JSON.read_text(encoding="utf-8")
    # Every panel asks the chosen data source and filters on the chosen targets.
    assert raw.count('"uid": "${datasource}"') >= len(queries)
    assert all('target=~".*"' in query.expr for query in queries)


def test_provisioning_serves_the_generated_dashboard_from_prometheus() -> None:
    (provider,) = _load_yaml(GRAFANA / "provisioning" / "dashboards" / "smtp-session.yaml")[
        "providers"
    ]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/var/lib/grafana/dashboards")
    (source,) = _load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["isDefault"] is True
    assert source["jsonData"]["timeInterval"] == _load_yaml(CONFIG)["global"]["scrape_interval"]


# ----------------------------------------------------------------------------- real Prometheus


def test_every_rule_and_dashboard_expression_parses(
    prometheus_factory: PrometheusFactory,
) -> None:
    prometheus = prometheus_factory()
    rules = prometheus.rules()
    assert len(rules) == len(_rules("record")) + len(_rules("alert"))
    for rule in rules:
        prometheus.query(rule["query"])  # raises PrometheusError on a parse error
    for query in dashboard_queries():
        prometheus.query(query.expr)


# --- a stand-in for the worker's /metrics, with data crafted so that every alert's
# --- condition holds for exactly the target named after it.

NOW = datetime.datetime.now(datetime.UTC)
FAR_FUTURE = NOW + datetime.timedelta(days=90)
# Under SmtpSessionCertificateExpiringSoon's 14 days.
SOON = NOW + datetime.timedelta(days=7)
DOMAIN = "example.test"
TIMINGS = Timings(
    resolve=0.001,
    connect=0.002,
    banner=0.010,
    ehlo=0.001,
    starttls=0.020,
    auth=0.004,
    quit=0.001,
    total=0.040,
)


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _cert(not_after: datetime.datetime) -> CertInfo:
    return CertInfo(
        subject="CN=smtp.example.test",
        issuer="CN=Example Test CA",
        not_before=_iso(NOW - datetime.timedelta(days=30)),
        not_after=_iso(not_after),
        sans=["smtp.example.test"],
        sha256="00" * 32,
    )


def _success(
    target: str, *, trust: str = "native", fallback: bool = False, not_after: datetime.datetime
) -> Outcome:
    return Outcome(
        ok=True,
        err_message="",
        stage=Stage.DONE,
        host="smtp.example.test",
        port=587,
        security="starttls",
        target=target,
        tls=TlsInfo(
            version="TLSv1.3", trust=trust, fallback=fallback, verified=True, cert=_cert(not_after)
        ),
        authenticated=True,
        timings=TIMINGS,
        attempts=1,
        started_at=_iso(NOW),
    )


def _timeout(target: str, attempt: int) -> Outcome:
    return Outcome(
        ok=False,
        err_message="no greeting within 5 s",
        error=ErrorCategory.TIMEOUT,
        stage=Stage.BANNER,
        retryable=True,
        host="smtp.example.test",
        port=587,
        security="starttls",
        target=target,
        timings=Timings(resolve=0.001, connect=0.002, total=5.003 * attempt),
        attempts=attempt,
        started_at=_iso(NOW),
    )


def _untrusted_adhoc() -> Outcome:
    # A self-signed server someone tried out: refused by native, then by portable.
    return Outcome(
        ok=False,
        err_message=(
            "certificate verify failed: self-signed certificate (native and portable trust)"
        ),
        error=ErrorCategory.TLS_UNTRUSTED,
        stage=Stage.STARTTLS,
        host="mail.somebody.test",
        port=587,
        security="starttls",
        target=None,
        tls=TlsInfo(trust="portable", fallback=True, verified=False, cert=_cert(SOON)),
        timings=Timings(resolve=0.001, connect=0.002, banner=0.01, ehlo=0.001, total=0.05),
        attempts=1,
        started_at=_iso(NOW),
    )


@dataclass
class StandInExporter:
    address: str
    metrics: SessionMetrics

    def record(self, *attempts: Outcome) -> None:
        """One request: its attempts, the last one being the final outcome."""
        for outcome in attempts:
            self.metrics.attempt_ended(outcome)
        self.metrics.request_ended(attempts[-1])

    def check_domain(self, target: str) -> None:
        """A domain target's check: two servers, the second down; the domain up ("any")."""
        servers = [
            _success(target, not_after=FAR_FUTURE).model_copy(
                update={"host": "mx1.example.test", "domain": DOMAIN}
            ),
            _timeout(target, 1).model_copy(update={"host": "mx2.example.test", "domain": DOMAIN}),
        ]
        for server in servers:
            self.metrics.attempt_ended(server)
            self.metrics.request_ended(server)
        self.metrics.domain_ended(
            domain_verdict(
                DOMAIN,
                servers,
                discovered=True,
                require="any",
                target=target,
                started_at=_iso(NOW),
                duration_s=5.0,
            )
        )

    def run_sessions(self) -> int:
        """One request per scenario; how many (a domain check is one)."""
        self.record(_success("healthy", not_after=FAR_FUTURE))
        self.record(_success("fallback", trust="portable", fallback=True, not_after=FAR_FUTURE))
        self.record(_timeout("down", 1), _timeout("down", 2), _timeout("down", 3))
        self.record(_success("expiring", not_after=SOON))
        self.record(_success("stale", not_after=FAR_FUTURE))
        self.record(_untrusted_adhoc())
        self.check_domain("domain")
        return 7


@pytest.fixture
def stand_in_exporter() -> Iterator[StandInExporter]:
    """prometheus_client's /metrics over a fresh registry with SessionMetrics, on loopback."""
    registry = CollectorRegistry()
    server, thread = start_http_server(0, addr=LOOPBACK, registry=registry)
    try:
        yield StandInExporter(f"{LOOPBACK}:{server.server_port}", SessionMetrics(registry))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _total_opens(expected: int) -> Callable[[list[Result]], bool]:
    return lambda results: bool(results) and float(results[0]["value"][1]) == expected


def test_every_expression_returns_data_from_a_scraped_exporter(
    prometheus_factory: PrometheusFactory,
    stand_in_exporter: StandInExporter,
    refused_port: tuple[str, int],
) -> None:
    """Prometheus scrapes /metrics, evaluates rules.yml; every rule and panel query has data.

    The stand-in exporter is SessionMetrics in one process. The same check against a real
    worker that ran real sessions is to follow, once the worker serves /metrics.
    """
    # A second scrape target that refuses connections: up{job="smtp-session"} == 0.
    dead = f"{refused_port[0]}:{refused_port[1]}"
    prometheus = prometheus_factory(targets=[stand_in_exporter.address, dead])

    # Counters are born at their first increment, and rate()/increase() need two samples:
    # one round of sessions, a scrape, a second round, another scrape.
    sessions = stand_in_exporter.run_sessions()
    prometheus.wait_for(
        "sum(smtp_session_opens_total)", _total_opens(sessions), timeout=DATA_TIMEOUT
    )
    stand_in_exporter.run_sessions()
    # SessionMetrics stamps successes with the current time: a success an hour ago for
    # SmtpSessionNoRecentSuccess can only be set by hand.
    stand_in_exporter.metrics.last_success.labels("stale").set(time.time() - 3600)
    prometheus.wait_for(
        "sum(smtp_session_opens_total)", _total_opens(2 * sessions), timeout=DATA_TIMEOUT
    )

    # Each alert's condition holds for the one target crafted for it, nowhere else
    # (adhoc's failures, fallback and certificate included): pending for alerts with a
    # `for:`, firing for the others.
    expected = {
        "SmtpSessionMetricsAbsent": {dead},
        "SmtpSessionTargetDown": {"down"},
        "SmtpSessionFailureRatioHigh": {"down"},
        "SmtpSessionCertificateExpiringSoon": {"expiring"},
        "SmtpSessionTrustFallback": {"fallback"},
        "SmtpSessionNoRecentSuccess": {"stale"},
        "SmtpSessionServerDown": {"domain mx2.example.test:587"},
    }
    prometheus.wait_for(
        "ALERTS", lambda alerts: alert_subjects(alerts) == expected, timeout=DATA_TIMEOUT
    )

    # Every rule evaluated cleanly, and its query (an alert's condition included) has data.
    for rule in prometheus.rules():
        assert rule["health"] == "ok", rule
        assert rule.get("lastError", "") == "", rule
        results = prometheus.query(rule["query"])
        assert has_number(results), f"{rule['name']}: {rule['query']} -> {results}"

    # Every panel query returns numbers (not NaN only), with $target = All.
    for query in dashboard_queries():
        results = prometheus.query(query.expr)
        assert has_number(results), f"{query} -> {results}"

    # The target variable lists every target that has reported.
    assert set(prometheus.label_values("target", "smtp_session_up")) == {
        "healthy",
        "fallback",
        "down",
        "expiring",
        "stale",
        "adhoc",
        "domain",
    }
