"""A real Prometheus (Debian's ``/usr/bin/prometheus``) on loopback, for the integration tests.

:func:`start_prometheus` runs one with the project's own ``deploy/prometheus/prometheus.yml``
rewritten for tests: every interval 1 s, the ``smtp-session`` job pointed at the given
``host:port`` targets, ``rules.yml`` loaded from ``deploy/prometheus``. It listens on
``127.0.0.1`` port 0; the bound port is read from its log, and the process is stopped
when the ``with`` block ends. :class:`Prometheus` queries it over the HTTP API.

Typical use, in a test::

    with start_prometheus(tmp_path, targets=[f"127.0.0.1:{port}"]) as prometheus:
        prometheus.wait_for("smtp_session_up", timeout=10)
        assert prometheus.query('smtp_session_up{target="mx1"}')[0]["value"][1] == "1"
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY_PROMETHEUS = REPO / "deploy" / "prometheus"
CONFIG = DEPLOY_PROMETHEUS / "prometheus.yml"
RULES = DEPLOY_PROMETHEUS / "rules.yml"
RULES_TEST = DEPLOY_PROMETHEUS / "rules.test.yml"
PROMETHEUS_BINARY = "/usr/bin/prometheus"
PROMTOOL_BINARY = "/usr/bin/promtool"

JOB = "smtp-session"
LOOPBACK = "127.0.0.1"
TEST_INTERVAL = "1s"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 5.0
# Between two looks at the HTTP API while waiting for data: Prometheus tells nobody when
# it has scraped or evaluated, so there is no event to wait on, only its API to poll.
POLL_INTERVAL = 0.1

_LISTENING = re.compile(r'msg="Listening on" address=(?P<address>\S+)')
_READY = 'msg="Server is ready to receive web requests."'

Result = dict[str, Any]  # one element of the API's data.result


class PrometheusError(Exception):
    """Prometheus refused a request (a PromQL parse error, a bad parameter...)."""

    def __init__(self, error_type: str, message: str, *, expr: str | None = None) -> None:
        super().__init__(f"{error_type}: {message}" + (f" in {expr!r}" if expr else ""))
        self.error_type = error_type
        self.message = message
        self.expr = expr


def values(results: Sequence[Result]) -> list[float]:
    """The sample values of an instant query's results (NaN kept as NaN)."""
    return [float(result["value"][1]) for result in results]


def has_number(results: Sequence[Result]) -> bool:
    """True when at least one sample is a number (not NaN): real data, not 0/0."""
    return any(not math.isnan(value) for value in values(results))


def alert_subjects(alerts: Sequence[Result]) -> dict[str, set[str]]:
    """``ALERTS`` series (pending and firing) as {alertname: {subject}}: `target server`,
    `target`, or else `instance`."""
    subjects: dict[str, set[str]] = {}
    for result in alerts:
        labels = result["metric"]
        subject = labels.get("target") or labels["instance"]
        if "server" in labels:
            subject = f"{subject} {labels['server']}"
        subjects.setdefault(labels["alertname"], set()).add(subject)
    return subjects


def config_for_tests(
    targets: Sequence[str], *, rule_files: Sequence[Path] = (RULES,), source: Path = CONFIG
) -> dict[str, Any]:
    """``deploy/prometheus/prometheus.yml`` with test intervals, `targets`, absolute rule paths."""
    config = cast(dict[str, Any], yaml.safe_load(source.read_text(encoding="utf-8")))
    config["global"] = {
        **config.get("global", {}),
        "scrape_interval": TEST_INTERVAL,
        "scrape_timeout": TEST_INTERVAL,
        "evaluation_interval": TEST_INTERVAL,
    }
    config["rule_files"] = [str(path) for path in rule_files]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1, f"{source} has no single scrape job {JOB!r}"
    for job in config["scrape_configs"]:
        job["scrape_interval"] = TEST_INTERVAL
        job["scrape_timeout"] = TEST_INTERVAL
    jobs[0].pop("dns_sd_configs", None)  # the compose service name means nothing here
    jobs[0]["static_configs"] = [{"targets": list(targets)}]
    return config


@dataclass
class Prometheus:
    """A running Prometheus: its API address and its log so far."""

    url: str
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)

    # --------------------------------------------------------------------- HTTP API

    def api(self, path: str, params: Mapping[str, str | Sequence[str]] | None = None) -> Any:
        """GET /api/v1/`path`; the `data` of a success, else PrometheusError."""
        query = urllib.parse.urlencode(params or {}, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:  # noqa: S310 (our loopback URL)
                body = json.load(response)
        except urllib.error.HTTPError as error:
            # 400 bad_data (parse errors), 422 execution errors: the body says which.
            body = json.load(error)
            raise PrometheusError(body["errorType"], body["error"]) from None
        return body["data"]

    def query(self, expr: str, *, at: float | None = None) -> list[Result]:
        """Instant query: the result vector (a scalar comes back as one unlabeled sample)."""
        params = {"query": expr} | ({"time": str(at)} if at is not None else {})
        try:
            data = self.api("query", params)
        except PrometheusError as error:
            raise PrometheusError(error.error_type, error.message, expr=expr) from None
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] != "vector":
            raise PrometheusError("unexpected", f"result type {data['resultType']}", expr=expr)
        return cast(list[Result], data["result"])

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Result]], bool] = bool,
        *,
        timeout: float = 10.0,
    ) -> list[Result]:
        """Query `expr` until `predicate(results)` holds (default: any result); the results.

        Polls the API: nothing announces that a scrape or a rule evaluation happened.
        """
        deadline = time.monotonic() + timeout
        while True:
            results = self.query(expr)
            if predicate(results):
                return results
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expr!r} did not reach the condition within {timeout} s; last: {results}"
                )
            self.check_running()
            time.sleep(POLL_INTERVAL)  # bounded polling, see POLL_INTERVAL

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's label_values(`match`, `label`) lists."""
        return cast(list[str], self.api(f"label/{label}/values", {"match[]": [match]}))

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, as /api/v1/rules reports it (query, health, lastError...)."""
        groups = self.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets and their health."""
        return cast(list[dict[str, Any]], self.api("targets")["activeTargets"])

    # --------------------------------------------------------------------- process

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {self.process.returncode}:\n{self.tail()}"
            )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log[-lines:])


def _read_log(stream: Any, lines: queue.Queue[str | None], log: list[str]) -> None:
    # Drains the pipe for the process's whole life (a full pipe would block Prometheus)
    # and hands every line to whoever waits on the queue; None marks the end.
    for line in stream:
        log.append(line.rstrip("\n"))
        lines.put(line)
    lines.put(None)


def _wait_for_line(
    lines: queue.Queue[str | None], matches: Callable[[str], bool], *, deadline: float
) -> str:
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("prometheus did not log the expected line in time") from None
        if line is None:
            raise EOFError("prometheus exited before logging the expected line")
        if matches(line):
            return line


@contextlib.contextmanager
def start_prometheus(
    directory: Path,
    *,
    targets: Sequence[str] = (),
    rule_files: Sequence[Path] = (RULES,),
) -> Iterator[Prometheus]:
    """Run Prometheus with config, data and log under `directory`; stop it on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "prometheus.yml"
    # JSON is YAML: no emitter quirks in what Prometheus reads.
    config_path.write_text(json.dumps(config_for_tests(targets, rule_files=rule_files), indent=2))
    process = subprocess.Popen(
        [
            PROMETHEUS_BINARY,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={LOOPBACK}:0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []
    reader = threading.Thread(
        target=_read_log, args=(process.stderr, lines, log), name="prometheus-log", daemon=True
    )
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        try:
            # Both lines, in whichever order Prometheus writes them (it varies).
            seen: list[str] = []

            def both_seen(line: str) -> bool:
                seen.append(line)
                ready = any(_READY in one for one in seen)
                return ready and any(_LISTENING.search(one) for one in seen)

            _wait_for_line(lines, both_seen, deadline=deadline)
            listening = next(line for line in seen if _LISTENING.search(line))
        except (TimeoutError, EOFError) as error:
            raise AssertionError(f"{error}:\n" + "\n".join(log[-30:])) from None
        match = _LISTENING.search(listening)
        assert match is not None
        yield Prometheus(url=f"http://{match['address']}", process=process, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        reader.join(timeout=STOP_TIMEOUT)
        process.stderr.close()


class PrometheusFactory:
    """Starts Prometheus servers in subfolders of one directory; `close()` stops them all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stack = contextlib.ExitStack()
        self._count = 0

    def __call__(
        self, *, targets: Sequence[str] = (), rule_files: Sequence[Path] = (RULES,)
    ) -> Prometheus:
        self._count += 1
        return self._stack.enter_context(
            start_prometheus(
                self.directory / f"prometheus-{self._count}",
                targets=targets,
                rule_files=rule_files,
            )
        )

    def close(self) -> None:
        self._stack.close()


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; the completed process (the caller checks returncode and output)."""
    return subprocess.run(
        [PROMTOOL_BINARY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


# ------------------------------------------------------------------------- the dashboard

DASHBOARD_JSON = REPO / "deploy" / "grafana" / "dashboards" / "smtp-session.json"
# What Grafana would put in place of the dashboard's variables: every target, and a rate
# window of several 1 s scrapes.
GRAFANA_TEST_VARIABLES = {"$__rate_interval": "1m", "$target": ".*"}


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str  # as Grafana sends it, variables substituted

    def __str__(self) -> str:
        return f"{self.panel!r} {self.ref_id}: {self.expr}"


def dashboard_queries(path: Path = DASHBOARD_JSON) -> list[PanelQuery]:
    """Every PromQL query of every panel (rows' nested panels included), ready to run."""
    document = json.loads(path.read_text(encoding="utf-8"))
    panels: list[dict[str, Any]] = []
    for panel in document["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    queries = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            # Longest names first: $target must not eat the start of a $target_x.
            for name in sorted(GRAFANA_TEST_VARIABLES, key=len, reverse=True):
                expr = expr.replace(name, GRAFANA_TEST_VARIABLES[name])
            assert "$" not in expr, f"unknown variable in {panel['title']!r}: {target['expr']}"
            queries.append(PanelQuery(panel["title"], target["refId"], expr))
    return queries
