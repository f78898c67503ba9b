"""`smtp-session`: check a server now, enqueue a check, run the worker, sweep targets.

Streams: a command's result goes to stdout (one JSON document with --json); logs,
progress and warnings go to stderr. Exit codes: 0 ok, 1 session failed, 2 bad input.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from smtp_session.monitoring.logging import configure_logging
from smtp_session.tasks.contract import attempt_time_limit
from smtp_session.tasks.errors import ErrorCategory, InvalidRequest
from smtp_session.tasks.outcome import Outcome, json_schema
from smtp_session.tasks.request import parse_request
from smtp_session.tasks.session import MAX_BACKOFF, open_session, rejected
from smtp_session.tasks.sweep import SweepSummary, with_defaults
from smtp_session.tasks.sweep import sweep as run_sweep
from smtp_session.tasks.trust_memory import TrustMemory
from smtp_session.worker.embedded_beat import OPTION as BEAT_OPTION
from smtp_session.worker.settings import (
    MAX_WORKER_CONCURRENCY,
    InvalidSettings,
    Settings,
    load_settings,
)
from smtp_session.worker.targets import InvalidTargets, load_targets

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2

_F = TypeVar("_F", bound=Callable[..., Any])


def split_host_port(value: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 literal."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise click.BadParameter(f"{value!r} is not HOST[:PORT]", param_hint="HOST[:PORT]")
        port_text = rest[1:] or None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, None  # a name, or an IPv6 literal without a port
        if ":" in value:
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                raise click.BadParameter(
                    f"{value!r} is not HOST[:PORT]", param_hint="HOST[:PORT]"
                ) from None
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit()):
        raise click.BadParameter(f"port {port_text!r} is not a number", param_hint="HOST[:PORT]")
    return host, int(port_text)


def request_options(command: _F) -> _F:
    """The options that mirror the session request fields."""
    options = [
        click.argument("address", metavar="HOST[:PORT]"),
        click.option("--security", type=click.Choice(["auto", "starttls", "tls", "plain"])),
        click.option("--trust", type=click.Choice(["auto", "native", "portable"])),
        click.option("--ca-file", type=click.Path(dir_okay=False), help="Extra CA bundle (PEM)."),
        click.option("--timeout", type=float, help="Deadline for one attempt, seconds."),
        click.option("--connect-timeout", type=float, help="TCP + TLS + greeting, seconds."),
        click.option("--command-timeout", type=float, help="Each later reply, seconds."),
        click.option("--retries", type=int, help="Extra attempts for retryable errors."),
        click.option("--credentials", help="Name of a secret (never the secret itself)."),
        click.option("--ehlo-name", help="Name to send in EHLO."),
        click.option("--target", help="Target name for metrics and logs."),
        click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON."),
        click.option("-v", "--verbose", is_flag=True, help="Log every attempt to stderr."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def request_fields(address: str, options: dict[str, Any]) -> dict[str, Any]:
    """Task kwargs from the command line: only the options that were given."""
    host, port = split_host_port(address)
    fields: dict[str, Any] = {"host": host}
    if port is not None:
        fields["port"] = port
    for name, value in options.items():
        if value is not None and name not in ("as_json", "verbose"):
            fields[name] = value
    return fields


def exit_code(outcome: Outcome) -> int:
    if outcome.ok:
        return EXIT_OK
    return EXIT_INVALID if outcome.error is ErrorCategory.INVALID_REQUEST else EXIT_FAILED


def summary(outcome: Outcome) -> str:
    """One line for an ok session, a few for a failure."""
    where = f"{outcome.host}:{outcome.port}" if outcome.port else outcome.host
    tls = outcome.tls
    if outcome.ok:
        parts = [outcome.security or "", f"{outcome.timings.total or 0:.3f} s"]
        if tls is not None and tls.verified:
            fallback = ", after native trust failed" if tls.fallback else ""
            parts.insert(1, f"{tls.version} verified ({tls.trust} trust{fallback})")
        if outcome.authenticated:
            parts.insert(-1, "authenticated")
        return f"OK {where}: " + ", ".join(part for part in parts if part)
    error = outcome.error.value if outcome.error else "failed"
    attempts = f", {outcome.attempts} attempts" if outcome.attempts > 1 else ""
    lines = [f"FAILED {where}: {error} at {outcome.stage.value}{attempts}"]
    lines.append(f"  {outcome.err_message}")
    if tls is not None and tls.cert is not None:
        cert = tls.cert
        lines.append(
            f"  certificate: {cert.subject}, issued by {cert.issuer}, "
            f"valid until {cert.not_after}, names: {', '.join(cert.sans) or 'none'}"
        )
    if outcome.hint:
        lines.append(f"  hint: {outcome.hint}")
    return "\n".join(lines)


def emit(outcome: Outcome, *, as_json: bool) -> NoReturn:
    """Print an outcome to stdout and exit with its code."""
    if as_json:
        click.echo(json.dumps(outcome.to_dict()))
    else:
        click.echo(summary(outcome))
    sys.exit(exit_code(outcome))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smtp-session-worker", prog_name="smtp-session")
def main() -> None:
    """Open outbound SMTP sessions and report why they fail."""


@main.command()
def schema() -> None:
    """Print the JSON Schema of the outcome (as docs/outcome.schema.json holds it)."""
    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@request_options
def check(address: str, as_json: bool, verbose: bool, **options: Any) -> None:
    """Open one session now, in this process (no broker).

    Exit 0 when ok, 1 when the session failed, 2 for invalid input.
    """
    settings = _settings_or_exit()
    configure_logging(settings.log_format, level=logging.INFO if verbose else logging.WARNING)
    fields = {**settings.request_defaults(), **request_fields(address, options)}
    emit(asyncio.run(open_session(fields, extra_ca_file=settings.extra_ca_file)), as_json=as_json)


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except InvalidSettings as exc:
        click.echo(f"smtp-session: invalid setting {exc}", err=True)
        sys.exit(EXIT_INVALID)


@main.command()
@request_options
@click.option("--wait", is_flag=True, help="Wait for the outcome and print it like `check`.")
@click.option("--wait-timeout", type=float, help="Seconds to wait with --wait.")
def enqueue(
    address: str,
    as_json: bool,
    verbose: bool,
    wait: bool,
    wait_timeout: float | None,
    **options: Any,
) -> None:
    """Send `smtp_session.open` through the broker; print the task id, or the outcome."""
    settings = _settings_or_exit()
    configure_logging(settings.log_format, level=logging.INFO if verbose else logging.WARNING)
    fields = request_fields(address, options)
    try:
        # Validated here too, so bad input never reaches the queue; the worker checks again.
        request = parse_request({**settings.request_defaults(), **fields})
    except InvalidRequest as exc:
        emit(rejected(exc, fields), as_json=as_json)
    # Celery is imported only by the commands that talk to a broker: `check` starts fast.
    from celery.exceptions import TimeoutError as CeleryTimeoutError
    from kombu.exceptions import OperationalError

    try:
        from smtp_session.worker.app import app
    except (InvalidTargets, OSError) as exc:
        click.echo(f"smtp-session: {exc}", err=True)
        sys.exit(EXIT_INVALID)
    from smtp_session.worker.client import result, submit

    try:
        task_id = submit(app, **fields)
    except OperationalError as exc:
        click.echo(f"smtp-session: cannot reach the broker: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if not wait:
        click.echo(task_id)
        return
    budget = wait_timeout or (request.retries + 1) * (
        attempt_time_limit(request.timeout) + MAX_BACKOFF
    )
    try:
        outcome = result(app, task_id, timeout=budget)
    except CeleryTimeoutError:
        click.echo(f"smtp-session: no outcome for task {task_id} after {budget:.0f} s", err=True)
        sys.exit(EXIT_FAILED)
    emit(outcome, as_json=as_json)


@main.command()
@click.option("--beat", is_flag=True, help="Embed the beat scheduler (one per deployment).")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=MAX_WORKER_CONCURRENCY),
    help="Sessions at once (default: $SMTP_SESSION_WORKER_CONCURRENCY, 100).",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(beat: bool, concurrency: int | None, loglevel: str) -> None:
    """Run the Celery worker with the metrics exporter.

    One process runs many sessions at once on one event loop; for more cores, start
    more workers (see the README, "From one machine to many").
    """
    settings = _settings_or_exit()
    if settings.targets is not None:
        try:
            load_targets(settings.targets)
        except InvalidTargets as exc:
            click.echo(f"smtp-session: {exc}", err=True)
            sys.exit(EXIT_INVALID)
    argv = [sys.executable, "-m", "celery", "-A", "smtp_session.worker.app", "worker"]
    argv += [f"--loglevel={loglevel}", "--pool=threads"]
    argv.append(f"--concurrency={concurrency or settings.worker_concurrency}")
    if beat:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        argv += [BEAT_OPTION, f"--schedule={settings.data_dir / 'beat-schedule'}"]
    # A fresh interpreter, exactly as `celery -A smtp_session.worker.app worker` runs.
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, argv built above


def _sweep_table(summary: SweepSummary) -> Table:
    table = Table(title=None, show_lines=False)
    for column in ("target", "server", "ok", "error", "err_message", "time"):
        table.add_column(column, overflow="fold")
    for outcome in summary.outcomes:
        server = f"{outcome.host}:{outcome.port}" if outcome.port else outcome.host
        table.add_row(
            outcome.target or "",
            server,
            "yes" if outcome.ok else "NO",
            outcome.error.value if outcome.error else "",
            outcome.err_message,
            f"{outcome.timings.total:.2f} s" if outcome.timings.total is not None else "",
        )
    return table


@main.command()
@click.option(
    "--targets",
    "targets_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Targets file (default: $SMTP_SESSION_TARGETS).",
)
@click.option("--concurrency", type=click.IntRange(min=1), help="Sessions open at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep summary as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Log every attempt to stderr.")
def sweep(targets_path: Path | None, concurrency: int | None, as_json: bool, verbose: bool) -> None:
    """Check every configured target now, concurrently, in this process."""
    settings = _settings_or_exit()
    configure_logging(settings.log_format, level=logging.INFO if verbose else logging.WARNING)
    path = targets_path or settings.targets
    if path is None:
        click.echo(
            "smtp-session: no targets: pass --targets FILE or set SMTP_SESSION_TARGETS", err=True
        )
        sys.exit(EXIT_INVALID)
    try:
        targets = load_targets(path)
    except InvalidTargets as exc:
        click.echo(f"smtp-session: {exc}", err=True)
        sys.exit(EXIT_INVALID)
    defaults = settings.request_defaults()
    items = [with_defaults(target.sweep_item(), defaults) for target in targets]
    show_progress = sys.stdout.isatty() and not as_json
    with Progress(console=Console(stderr=True), transient=True, disable=not show_progress) as bar:
        task = bar.add_task("checking", total=len(items))

        def advance(_outcome: Outcome) -> None:
            bar.advance(task)

        summary = asyncio.run(
            run_sweep(
                items,
                concurrency=concurrency or settings.sweep_concurrency,
                trust_memory=TrustMemory(),
                extra_ca_file=settings.extra_ca_file,
                on_outcome=advance,
            )
        )
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(_sweep_table(summary))
        console.print(f"{summary.ok} ok, {summary.failed} failed in {summary.duration_s:.2f} s")
    sys.exit(EXIT_OK if summary.failed == 0 else EXIT_FAILED)
