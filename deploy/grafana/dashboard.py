"""The Grafana dashboard of smtp-session-worker, as typed code (grafana-foundation-sdk).

The JSON Grafana loads, ``dashboards/smtp-session.json`` beside this file, is generated
from this module and checked in; a test fails when the two drift apart. After a change,
run from the repository root::

    python -m deploy.grafana.dashboard        # or: python deploy/grafana/dashboard.py

Every query runs in the tests against a real Prometheus (no Grafana server can be
installed on the build machines), with ``$target`` and ``$__rate_interval`` filled in.
Metric names and labels: docs/metrics.md; recorded series: deploy/prometheus/rules.yml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig
from grafana_foundation_sdk.builders.common import VizLegendOptions as Legend
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

UID = "smtp-session"
TITLE = "SMTP sessions"
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "smtp-session.json"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every panel filters on the `target` variable; "All" is the regex .* (adhoc included).
SELECTED = 'target=~"$target"'
# Thresholds of the alerts in rules.yml, drawn on the matching panels.
CERT_WARNING_DAYS = 14.0
CERT_CRITICAL_DAYS = 7.0
NO_SUCCESS_SECONDS = 1800.0
FAILURE_RATIO = 0.2

# Sessions are rare (one per target and minute): per-minute rates read better than per-second.
PER_MINUTE_UNIT = "cpm"


def _query(expr: str, legend: str, ref_id: str, *, instant: bool = False) -> Dataquery:
    query = Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(DATASOURCE)
    return query.instant() if instant else query.range()


def _thresholds(base: str, *steps: tuple[float, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps(
            [Threshold(value=None, color=base)]
            + [Threshold(value, color) for value, color in steps]
        )
    )


def _legend() -> Legend:
    return (
        Legend()
        .display_mode(LegendDisplayMode.TABLE)
        .placement(LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )


def _timeseries(title: str, description: str, unit: str, *, span: int = 12) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(span)
        .legend(_legend())
    )


def _per_minute(expr: str) -> str:
    return f"{expr} * 60"


def _up_down(
    title: str, description: str, expr: str, legend: str, span: int
) -> statetimeline.Panel:
    """A state timeline of a 1/0 series, drawn as up (green) and down (red)."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .height(8)
        .span(span)
        .with_target(_query(expr, legend, "A"))
        .mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text="down", color="red", index=0),
                        "1": ValueMappingResult(text="up", color="green", index=1),
                    }
                )
            ]
        )
        .thresholds(_thresholds("red", (1.0, "green")))
    )


def up_panel() -> statetimeline.Panel:
    """Up/down per target over time: the last final outcome of each target."""
    return _up_down(
        "Up / down per target",
        "smtp_session_up: 1 when the target's last final outcome (after retries) was ok; "
        "for a domain target, its verdict. With several workers, up when any worker last "
        "saw it ok.",
        f"max by (target) (smtp_session_up{{{SELECTED}}})",
        "{{target}}",
        18,
    )


def servers_panel() -> statetimeline.Panel:
    """Up/down per discovered server of the domain targets: which server is the bad one."""
    return _up_down(
        "Servers of domain targets",
        "smtp_session_server_up: each server discovered for a domain target (SRV, MX), "
        "1 when its last session was ok. A domain with require = any stays up while one "
        "of its servers is down: this shows which.",
        f"max by (target, server) (smtp_session_server_up{{{SELECTED}}})",
        "{{target}} {{server}}",
        24,
    )


def down_count_panel() -> stat.Panel:
    """How many of the selected targets are down now."""
    return (
        stat.Panel()
        .title("Targets down")
        .description("Selected targets whose last final outcome was a failure.")
        .datasource(DATASOURCE)
        .height(8)
        .span(6)
        .with_target(
            _query(
                f"count(max by (target) (smtp_session_up{{{SELECTED}}}) == 0) or vector(0)",
                "down",
                "A",
                instant=True,
            )
        )
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.NONE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(_thresholds("green", (1.0, "red")))
    )


def success_ratio_panel() -> timeseries.Panel:
    """The recorded success ratios, short and long window."""
    return (
        _timeseries(
            "Success ratio",
            "Share of final outcomes (after retries) that were ok, over 5 minutes and 1 hour "
            "(recording rules target:smtp_session_opens_success:ratio_rate5m and _rate1h). "
            f"SmtpSessionFailureRatioHigh fires when the 1-hour ratio stays under "
            f"{1 - FAILURE_RATIO:.0%} for 15 minutes.",
            "percentunit",
        )
        .min(0)
        .max(1)
        .with_target(
            _query(
                f"target:smtp_session_opens_success:ratio_rate5m{{{SELECTED}}}",
                "{{target}} 5m",
                "A",
            )
        )
        .with_target(
            _query(
                f"target:smtp_session_opens_success:ratio_rate1h{{{SELECTED}}}",
                "{{target}} 1h",
                "B",
            )
        )
    )


def errors_panel() -> timeseries.Panel:
    """Final failures stacked by error category."""
    expr = (
        f'sum by (error) (rate(smtp_session_opens_total{{{SELECTED}, result="failure"}}'
        "[$__rate_interval]))"
    )
    return (
        _timeseries(
            "Failures by error category",
            "Final failures per minute, stacked by the error category (docs/errors.md) "
            "(the message itself is in the session.result log events).",
            PER_MINUTE_UNIT,
        )
        .draw_style(GraphDrawStyle.BARS)
        .fill_opacity(80)
        .stacking(StackingConfig().mode(StackingMode.NORMAL))
        .with_target(_query(_per_minute(expr), "{{error}}", "A"))
    )


def duration_panel() -> timeseries.Panel:
    """Whole-request duration percentiles per target."""

    def quantile(q: float) -> str:
        return (
            f"histogram_quantile({q}, sum by (target, le) "
            f"(rate(smtp_session_duration_seconds_bucket{{{SELECTED}}}[$__rate_interval])))"
        )

    return (
        _timeseries(
            "Session duration",
            "Whole request, retries and backoff included (smtp_session_duration_seconds).",
            "s",
            span=8,
        )
        .with_target(_query(quantile(0.5), "{{target}} p50", "A"))
        .with_target(_query(quantile(0.95), "{{target}} p95", "B"))
    )


def retries_panel() -> timeseries.Panel:
    """Attempts against final outcomes: the gap is retries."""
    attempts = (
        f"sum by (target) (rate(smtp_session_attempts_total{{{SELECTED}}}[$__rate_interval]))"
    )
    opens = f"sum by (target) (rate(smtp_session_opens_total{{{SELECTED}}}[$__rate_interval]))"
    return (
        _timeseries(
            "Attempts and opens (retries)",
            "Attempts per minute against final outcomes per minute: attempts above opens "
            "are retries of retryable errors (dns, refused, timeout, disconnected, 4xx).",
            PER_MINUTE_UNIT,
            span=8,
        )
        .with_target(_query(_per_minute(attempts), "{{target}} attempts", "A"))
        .with_target(_query(_per_minute(opens), "{{target}} opens", "B"))
    )


def stage_latency_panel() -> timeseries.Panel:
    """p95 of each session stage across the selected targets."""
    expr = (
        "histogram_quantile(0.95, sum by (stage, le) "
        f"(rate(smtp_session_stage_duration_seconds_bucket{{{SELECTED}}}[$__rate_interval])))"
    )
    return _timeseries(
        "Latency per stage (p95)",
        "95th percentile of each stage of an attempt (resolve, connect, tls, banner, ehlo, "
        "starttls, auth, quit) across the selected targets. Per target: the recording rule "
        "target_stage:smtp_session_stage_duration_seconds:p95_rate5m.",
        "s",
        span=8,
    ).with_target(_query(expr, "{{stage}}", "A"))


def fallback_panel() -> timeseries.Panel:
    """Trust fallbacks per target and how they ended."""
    expr = (
        f"sum by (target, result) (rate(smtp_session_tls_fallback_total{{{SELECTED}}}"
        "[$__rate_interval]))"
    )
    return (
        _timeseries(
            "Trust fallbacks",
            "Attempts that native trust refused and portable trust retried. result=success: "
            "the host's trust store is missing a root that certifi has "
            "(alert SmtpSessionTrustFallback).",
            PER_MINUTE_UNIT,
        )
        .draw_style(GraphDrawStyle.BARS)
        .fill_opacity(80)
        .with_target(_query(_per_minute(expr), "{{target}} {{result}}", "A"))
    )


def trust_panel() -> timeseries.Panel:
    """Attempts by the trust mode that made the last handshake."""
    expr = f"sum by (trust) (rate(smtp_session_attempts_total{{{SELECTED}}}[$__rate_interval]))"
    return (
        _timeseries(
            "Attempts by trust mode",
            "native: the OS verifier; portable: certifi plus ca_file; none: no TLS handshake "
            "happened (plain sessions, failures before TLS).",
            PER_MINUTE_UNIT,
        )
        .stacking(StackingConfig().mode(StackingMode.NORMAL))
        .fill_opacity(30)
        .with_target(_query(_per_minute(expr), "{{trust}}", "A"))
    )


def cert_expiry_panel() -> bargauge.Panel:
    """Days left on the certificate each target presents."""
    expr = (
        f"(min by (target) (smtp_session_cert_expiry_timestamp_seconds{{{SELECTED}}}) - time())"
        " / 86400"
    )
    return (
        bargauge.Panel()
        .title("Certificate expiry (days left)")
        .description(
            "notAfter of the certificate each target last presented, verified or not. "
            f"SmtpSessionCertificateExpiringSoon fires under {CERT_WARNING_DAYS:.0f} days."
        )
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .unit("d")
        .min(0)
        .display_mode(BarGaugeDisplayMode.BASIC)
        .orientation(VizOrientation.HORIZONTAL)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(
            _thresholds("red", (CERT_CRITICAL_DAYS, "orange"), (CERT_WARNING_DAYS, "green"))
        )
        .with_target(_query(expr, "{{target}}", "A", instant=True))
    )


def last_success_panel() -> bargauge.Panel:
    """How long ago each target last had a successful session."""
    expr = f"time() - max by (target) (smtp_session_last_success_timestamp_seconds{{{SELECTED}}})"
    return (
        bargauge.Panel()
        .title("Time since last success")
        .description(
            "Since the newest successful session any worker saw. SmtpSessionNoRecentSuccess "
            f"fires above {NO_SUCCESS_SECONDS / 60:.0f} minutes."
        )
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .unit("s")
        .min(0)
        .display_mode(BarGaugeDisplayMode.BASIC)
        .orientation(VizOrientation.HORIZONTAL)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(
            _thresholds("green", (NO_SUCCESS_SECONDS / 2, "orange"), (NO_SUCCESS_SECONDS, "red"))
        )
        .with_target(_query(expr, "{{target}}", "A", instant=True))
    )


def build() -> Dashboard:
    """The whole dashboard, variables and panels."""
    datasource = DatasourceVariable("datasource").label("Data source").type("prometheus")
    target = (
        QueryVariable("target")
        .label("Target")
        .datasource(DATASOURCE)
        .query("label_values(smtp_session_up, target)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    return (
        Dashboard(TITLE)
        .uid(UID)
        .description(
            "Outbound SMTP sessions opened by smtp-session-worker: target health, success "
            "ratio, latency per stage, retries, trust fallbacks, errors, certificates."
        )
        .tags(["smtp", "smtp-session"])
        .editable()
        .refresh("1m")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(datasource)
        .with_variable(target)
        .with_row(Row("Health"))
        .with_panel(up_panel())
        .with_panel(down_count_panel())
        .with_panel(servers_panel())
        .with_panel(success_ratio_panel())
        .with_panel(errors_panel())
        .with_row(Row("Timing and retries"))
        .with_panel(stage_latency_panel())
        .with_panel(duration_panel())
        .with_panel(retries_panel())
        .with_row(Row("TLS"))
        .with_panel(fallback_panel())
        .with_panel(trust_panel())
        .with_panel(cert_expiry_panel())
        .with_panel(last_success_panel())
    )


def model() -> dashboard.Dashboard:
    """The built dashboard, its panels (rows included) numbered 1, 2, … in layout order."""
    built = build().build()
    # Grafana needs panel ids unique within the dashboard (links to one panel, "view").
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return built


def render() -> str:
    """The dashboard JSON exactly as checked in (sorted keys, 2-space indent, final newline)."""
    return JSONEncoder(sort_keys=True, indent=2).encode(model()) + "\n"


def main() -> None:
    """Write the JSON beside this module, where Grafana's provisioning reads it."""
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
