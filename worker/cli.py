"""`smtp-session`: check a server now, enqueue a check, run the worker, sweep targets.

Streams: a command's result goes to stdout (one JSON document with --json); logs,
progress and warnings go to stderr. Exit codes: see EXIT_CODES.

Start-up is part of the interface: `check` and `sweep` run in this process and are timed
by people and by scripts. This module imports only what defines the commands; each
command imports what it runs, so Celery (about half a second) only where a broker is.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import click

from smtp_session.tasks.contract import DEFAULT_CONCURRENCY
from smtp_session.tasks.errors import ErrorCategory, InvalidRequest
from smtp_session.tasks.outcome import join_host_port
from smtp_session.tasks.request import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    check_queue_request,
    parse_request,
)
from smtp_session.worker.settings import (
    ENV_PREFIX,
    MAX_WORKER_CONCURRENCY,
    InvalidSettings,
    Settings,
    load_settings,
)

if TYPE_CHECKING:
    from celery import Celery
    from rich.console import Console
    from rich.table import Table

    from smtp_session.tasks.outcome import Outcome
    from smtp_session.tasks.summary import SweepSummary
    from smtp_session.worker.targets import Target

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_NO_OUTCOME = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process Ctrl+C ended

EXIT_CODES = """\b
Exit codes:
  0    ok (every target of a sweep; enqueue without --wait: the task was sent)
  1    a session failed (a sweep: a target is down)
  2    invalid input: a request field, an option, a setting, the targets file
  3    no outcome: the broker is unreachable, or --wait timed out
  130  interrupted (Ctrl+C)"""

#: Default of `enqueue --broker-timeout`: seconds to reach the broker before giving up.
DEFAULT_BROKER_TIMEOUT = 5.0
#: Seconds between two connection attempts while the broker refuses.
BROKER_RETRY_INTERVAL = 0.5
#: Default of `enqueue --wait-timeout`.
DEFAULT_WAIT_TIMEOUT = 120.0
#: `--wait` asks whether a worker answers once the outcome is this late (or at half the
#: wait, when the wait is shorter).
WORKER_NOTICE_AFTER = 5.0
#: How long that question waits for the workers' answers.
PING_TIMEOUT = 1.0
#: Why the embedded broker cannot be reached: it lives in the worker.
_NO_WORKER = "no worker runs there; start `smtp-session worker` with the same {prefix}DATA_DIR"
#: Celery's result consumer, whose one message is misleading here (see `enqueue`).
RESULT_CONSUMER_LOGGER = "celery.backends.asynchronous"

#: The failures whose outcome's certificate explains them; other failures print none.
CERTIFICATE_ERRORS = frozenset(
    {
        ErrorCategory.TLS_UNTRUSTED,
        ErrorCategory.TLS_EXPIRED,
        ErrorCategory.TLS_HOSTNAME,
        ErrorCategory.TLS_HANDSHAKE,
    }
)
#: Below this many columns for err_message, the sweep prints the messages under the table.
MIN_MESSAGE_WIDTH = 30
#: Width of the sweep table when stdout is not a terminal and COLUMNS is not set.
PIPE_WIDTH = 200

_F = TypeVar("_F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with `code`."""
    click.echo(f"smtp-session: {message}", err=True)
    sys.exit(code)


class AddressError(click.BadParameter):
    """HOST[:PORT] that cannot be split; `field` is the request field to blame."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, param_hint="HOST[:PORT]")
        self.field = field


def split_host_port(value: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 literal."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise AddressError(f"{value!r} is not HOST[:PORT]", "host")
        port_text = rest[1:] or None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, None  # a name, or an IPv6 literal without a port
        if ":" in value:
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                raise AddressError(f"{value!r} is not HOST[:PORT]", "host") from None
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit()):
        raise AddressError(f"port {port_text!r} is not a number", "port")
    return host, int(port_text)


SECURITY_HELP = (
    "auto: implicit TLS on port 465, required STARTTLS on any other; "
    "starttls: STARTTLS required, never plaintext; tls: implicit TLS; "
    "plain: no TLS (only when asked for)."
)
TRUST_HELP = (
    "auto: the system's trust store, then certifi's bundle if that finds no trusted root; "
    "native: the system's store only; portable: certifi's bundle plus "
    f"{ENV_PREFIX}CA_FILE and --ca-file. Always verified."
)


def _pem_text(
    _context: click.Context, _parameter: click.Parameter, value: TextIO | None
) -> str | None:
    """--ca-pem FILE: the request carries the file's text, not its path."""
    return None if value is None else value.read()


def _none_when_empty(
    _context: click.Context, _parameter: click.Parameter, value: tuple[str, ...]
) -> list[str] | None:
    """A repeated option not given is not sent (the request's default applies)."""
    return list(value) if value else None


def request_options(command: _F) -> _F:
    """The options that mirror the session request fields.

    None has a value of its own: an option not given is not sent, so the request's
    defaults (and the SMTP_SESSION_* settings) apply, as `[default: …]` says.
    """
    options = [
        click.argument("address", metavar="HOST[:PORT]"),
        click.option(
            "--security",
            type=click.Choice(["auto", "starttls", "tls", "plain"]),
            help=SECURITY_HELP,
            show_default="auto",
        ),
        click.option(
            "--trust",
            type=click.Choice(["auto", "native", "portable"]),
            help=TRUST_HELP,
            show_default=f"${ENV_PREFIX}TRUST, else auto",
        ),
        click.option(
            "--ca-file",
            type=click.Path(dir_okay=False),
            help="PEM file with this server's CA, trusted from the first handshake, read "
            "where the session runs (not accepted through the queue: use --ca-pem).",
        ),
        click.option(
            "--ca-pem",
            type=click.File("r", encoding="utf-8"),
            callback=_pem_text,
            help="PEM file with this server's CA, read here and sent as text (ca_pem).",
        ),
        click.option(
            "--timeout",
            type=float,
            help="Deadline for one attempt, seconds.",
            show_default=f"${ENV_PREFIX}TIMEOUT, else {DEFAULT_TIMEOUT:g}",
        ),
        click.option(
            "--connect-timeout",
            type=float,
            help="TCP + TLS + greeting, seconds.",
            show_default="--timeout",
        ),
        click.option(
            "--command-timeout",
            type=float,
            help="Each later reply, seconds.",
            show_default="--timeout",
        ),
        click.option(
            "--retries",
            type=int,
            help="Extra attempts for retryable errors.",
            show_default=f"${ENV_PREFIX}RETRIES, else {DEFAULT_RETRIES}",
        ),
        click.option("--credentials", help="Name of a secret (never the secret itself)."),
        click.option("--ehlo-name", help="Name to send in EHLO.", show_default="this host's name"),
        click.option(
            "--tls-name",
            help="Name for SNI and certificate verification, when HOST is an IP address or "
            "a load balancer (the connection still goes to HOST).",
            show_default="HOST",
        ),
        click.option("--target", help="Target name for metrics and logs."),
        click.option(
            "--transcript",
            is_flag=True,
            default=None,
            help="Show the SMTP dialogue (AUTH payloads and secrets redacted).",
        ),
        click.option(
            "--mail-from",
            metavar="ADDRESS",
            help="Envelope probe: MAIL FROM this address after AUTH ('' for <>); needs --rcpt-to.",
        ),
        click.option(
            "--rcpt-to",
            metavar="ADDRESS",
            multiple=True,
            callback=_none_when_empty,
            help="Envelope probe: RCPT TO this address (repeat for more); then RSET, nothing sent.",
        ),
        click.option(
            "--send-test-message",
            is_flag=True,
            default=None,
            help="Send a short test message to the --rcpt-to addresses (DATA instead of RSET).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON."),
        click.option("-v", "--verbose", is_flag=True, help="Log every attempt to stderr."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def seconds_option(name: str, default: float, help_text: str) -> Callable[[_F], _F]:
    """An option of a positive number of seconds, with a default that --help shows."""
    option: Callable[[_F], _F] = click.option(
        name,
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help=help_text,
    )
    return option


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
    where = join_host_port(outcome.host, outcome.port)
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
    if outcome.error in CERTIFICATE_ERRORS and tls is not None and tls.cert is not None:
        cert = tls.cert
        lines.append(
            f"  certificate: {cert.subject}, issued by {cert.issuer}, "
            f"valid until {cert.not_after}, names: {', '.join(cert.sans) or 'none'}"
        )
    if outcome.hint:
        lines.append(f"  hint: {outcome.hint}")
    return "\n".join(lines)


def dialogue(outcome: Outcome) -> str:
    """The transcript under the summary: seconds, then `S:`, `C:` or `tls:` and the line."""
    return "\n".join(
        f"  {line.t:7.3f} {line.dir + ':':4} {line.line}" for line in outcome.transcript or []
    )


def emit(outcome: Outcome, *, as_json: bool) -> NoReturn:
    """Print an outcome to stdout and exit with its code."""
    if as_json:
        click.echo(json.dumps(outcome.to_dict()))
    else:
        click.echo(summary(outcome))
        if outcome.transcript:
            click.echo(dialogue(outcome))
    sys.exit(exit_code(outcome))


class Commands(click.Group):
    """The command group; Ctrl+C in any command is one line on stderr and exit 130."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGS_KEY] = list(args)  # the subcommand's, for its usage errors below
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # `--json` promises one JSON document on stdout: a command line the options
            # cannot parse still gets its invalid_request Outcome there (usage on stderr).
            if "--json" in ctx.meta.get(ARGS_KEY, []) and ctx.invoked_subcommand in JSON_COMMANDS:
                outcome = _usage_outcome(exc)
                if ctx.invoked_subcommand == "sweep":  # a sweep's JSON is a summary
                    from smtp_session.tasks.summary import SweepSummary

                    summary = SweepSummary(
                        total=1, ok=0, failed=1, duration_s=0, outcomes=[outcome]
                    )
                    click.echo(json.dumps(summary.to_dict()))
                else:
                    click.echo(json.dumps(outcome.to_dict()))
            raise
        except (KeyboardInterrupt, click.Abort):  # click turns Ctrl+C at a prompt into Abort
            fail("interrupted", EXIT_INTERRUPTED)


#: The commands with --json: an Outcome (a sweep: its summary), whatever the command line.
JSON_COMMANDS = frozenset({"check", "enqueue", "sweep"})
ARGS_KEY = "smtp_session.args"


def _usage_result(command: str, error: click.UsageError) -> dict[str, Any]:
    """What `command --json` prints for a command line it cannot parse."""
    outcome = _usage_outcome(error)
    if command != "sweep":
        return outcome.to_dict()
    from smtp_session.tasks.summary import SweepSummary

    return SweepSummary(total=1, ok=0, failed=1, duration_s=0, outcomes=[outcome]).to_dict()


def _usage_outcome(error: click.UsageError) -> Outcome:
    """The invalid_request Outcome of a command line that cannot be parsed."""
    from smtp_session.tasks.session import rejected

    field, problem = "request", error.format_message()
    if isinstance(error, click.NoSuchOption):
        field, problem = error.option_name, "no such option"
    elif isinstance(error, click.BadParameter) and error.param is not None:
        field = "host" if error.param.name == "address" else error.param.name or field
        problem = "is required" if isinstance(error, click.MissingParameter) else error.message
    if isinstance(error, AddressError):
        field, problem = error.field, error.message
    return rejected(InvalidRequest(field, problem.removeprefix(f"{field} ")), {})


@click.group(
    cls=Commands,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES,
)
@click.version_option(package_name="smtp-session-worker", prog_name="smtp-session")
def main() -> None:
    """Open outbound SMTP sessions and report why they fail."""


@main.command()
def schema() -> None:
    """Print the JSON Schema of the outcome (as docs/outcome.schema.json holds it)."""
    from smtp_session.tasks.outcome import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@request_options
def check(address: str, as_json: bool, verbose: bool, **options: Any) -> None:
    """Open one session now, in this process (no broker).

    Exit 0 when ok, 1 when the session failed, 2 for invalid input, 130 when interrupted.
    """
    from smtp_session.tasks.session import open_session

    settings = _settings_or_exit(verbose=verbose, runs_sessions=True)
    fields = {**settings.request_defaults(), **request_fields(address, options)}
    emit(asyncio.run(open_session(fields, extra_ca_file=settings.extra_ca_file)), as_json=as_json)


def _settings_or_exit(*, verbose: bool | None = None, runs_sessions: bool = False) -> Settings:
    """The settings (exit 2 naming the variable); logging configured unless `verbose` is None."""
    try:
        settings = load_settings()
        if runs_sessions:
            settings.check_ca_file()
    except InvalidSettings as exc:
        fail(f"invalid setting {exc}", EXIT_INVALID)
    if verbose is not None:
        from smtp_session.monitoring.logging import configure_logging

        configure_logging(settings.log_format, level=logging.INFO if verbose else logging.WARNING)
    return settings


def _load_targets_or_exit(path: Path, *, max_timeout: float | None = None) -> list[Target]:
    """The targets file's targets (within a worker's `max_timeout`), or exit 2 saying why."""
    from smtp_session.worker.targets import InvalidTargets, check_target_timeouts, load_targets

    try:
        targets = load_targets(path)
        if max_timeout is not None:
            check_target_timeouts(targets, max_timeout)
    except InvalidTargets as exc:
        fail(str(exc), EXIT_INVALID)
    return targets


@main.command()
@request_options
@click.option("--wait", is_flag=True, help="Wait for the outcome and print it like `check`.")
@seconds_option(
    "--wait-timeout",
    DEFAULT_WAIT_TIMEOUT,
    "Seconds --wait waits for the outcome before it gives up (exit 3).",
)
@seconds_option(
    "--broker-timeout",
    DEFAULT_BROKER_TIMEOUT,
    "Seconds to reach the broker, retrying, before giving up (exit 3).",
)
def enqueue(
    address: str,
    as_json: bool,
    verbose: bool,
    wait: bool,
    wait_timeout: float,
    broker_timeout: float,
    **options: Any,
) -> None:
    """Send `smtp_session.open` through the broker; print the task id, or the outcome.

    Exit 0 when sent (with --wait: when ok), 1 when the session failed, 2 for invalid
    input (nothing is sent), 3 when there is no outcome (the broker is unreachable, or
    --wait timed out), 130 when interrupted.
    """
    settings = _settings_or_exit(verbose=verbose)
    fields = request_fields(address, options)
    try:
        # Validated here too, so bad input never reaches the queue; the worker checks again.
        check_queue_request(parse_request({**settings.request_defaults(), **fields}))
    except InvalidRequest as exc:
        from smtp_session.tasks.session import rejected

        emit(rejected(exc, fields), as_json=as_json)
    from kombu.exceptions import OperationalError

    from smtp_session.worker.targets import InvalidTargets

    try:
        from smtp_session.worker.app import app
    except (InvalidTargets, OSError) as exc:  # the targets file, or the data dir
        fail(str(exc), EXIT_INVALID)
    from smtp_session.worker.client import submit

    # Celery says "Retry limit exceeded … must be restarted" each time a lost result store
    # does not answer yet; --wait waits for it all the same (worker.client.wait).
    logging.getLogger(RESULT_CONSUMER_LOGGER).setLevel(logging.CRITICAL + 1)
    broker = _broker_name(app, settings)
    try:
        _reach_broker(app, timeout=broker_timeout)
        task_id = submit(app, **fields)
        if not wait:
            click.echo(task_id)
            return
        outcome = _wait_for_outcome(app, settings, task_id, timeout=wait_timeout, broker=broker)
    except OperationalError as exc:
        # The embedded broker runs inside the worker: no worker, no broker.
        why = f"{exc}" if not settings.embedded_broker else _NO_WORKER.format(prefix=ENV_PREFIX)
        fail(
            f"cannot reach {broker} (--broker-timeout {broker_timeout:g} s): {why}", EXIT_NO_OUTCOME
        )
    emit(outcome, as_json=as_json)


def _broker_name(app: Celery, settings: Settings) -> str:
    """The broker as people know it: its URL without the password, or the embedded one."""
    if settings.embedded_broker:
        return f"the embedded broker in {settings.data_dir}"
    with app.connection_for_write() as connection:
        return f"the broker {connection.as_uri()}"  # the password masked as **


def _reach_broker(app: Celery, *, timeout: float) -> None:
    """Connect to the broker, retrying for up to `timeout` seconds (kombu's OperationalError
    after). The connection goes back to the app's pool, where the publish finds it."""
    # Each attempt's own bound, here and for any reconnection while publishing.
    app.conf.broker_connection_timeout = timeout
    with app.pool.acquire(block=True) as connection:
        connection.ensure_connection(
            max_retries=None,
            interval_start=0,
            interval_step=BROKER_RETRY_INTERVAL,
            interval_max=BROKER_RETRY_INTERVAL,
            timeout=timeout,
        )


def _wait_for_outcome(
    app: Celery, settings: Settings, task_id: str, *, timeout: float, broker: str
) -> Outcome:
    """The task's outcome within `timeout` seconds, saying on stderr when it is late
    whether any worker answers on the broker; exit 3 when none came."""
    from celery.exceptions import TimeoutError as CeleryTimeoutError
    from celery.result import AsyncResult

    from smtp_session.tasks.outcome import Outcome
    from smtp_session.worker.client import MIN_WAIT, forget, wait

    deadline = time.monotonic() + timeout
    notice_after = min(WORKER_NOTICE_AFTER, timeout / 2)
    pending = AsyncResult(task_id, app=app)
    try:
        try:
            return Outcome.from_dict(wait(pending, notice_after))
        except CeleryTimeoutError:
            pass
        click.echo(
            f"smtp-session: no outcome yet after {notice_after:g} s; "
            + _workers_state(app, settings, task_id, broker=broker),
            err=True,
        )
        try:
            return Outcome.from_dict(wait(pending, max(deadline - time.monotonic(), MIN_WAIT)))
        except CeleryTimeoutError:
            pass
    finally:
        forget(pending)
    fail(
        f"no outcome for task {task_id} after {timeout:g} s (--wait-timeout); "
        "the task is not cancelled",
        EXIT_NO_OUTCOME,
    )


def _workers_state(app: Celery, settings: Settings, task_id: str, *, broker: str) -> str:
    """Whether any worker answers a ping on the broker, and so what the task waits for."""
    replies = app.control.ping(timeout=PING_TIMEOUT) or []
    if not replies:
        setting = "DATA_DIR" if settings.embedded_broker else "BROKER_URL"
        return (
            f"no worker answers on {broker}: start `smtp-session worker` "
            f"with the same {ENV_PREFIX}{setting}"
        )
    workers = "1 worker answers" if len(replies) == 1 else f"{len(replies)} workers answer"
    return f"{workers} on {broker}: task {task_id} is still queued or running"


@main.command()
@click.option("--beat", is_flag=True, help="Embed the beat scheduler (one per deployment).")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=MAX_WORKER_CONCURRENCY),
    help="Sessions at once.",
    show_default=f"${ENV_PREFIX}WORKER_CONCURRENCY, else {DEFAULT_CONCURRENCY}",
)
@click.option("--loglevel", default="INFO", show_default=True, help="Log level.")
def worker(beat: bool, concurrency: int | None, loglevel: str) -> None:
    """Run the Celery worker with the metrics exporter.

    One process runs many sessions at once on one event loop; for more cores, start
    more workers (see the README, "From one machine to many"). Exit 2 for an invalid
    setting or targets file, a data dir another worker holds, or a /metrics port that
    cannot be bound.
    """
    settings = _settings_or_exit(runs_sessions=True)
    if settings.targets is not None:
        _load_targets_or_exit(settings.targets, max_timeout=settings.max_timeout)
    argv = [sys.executable, "-m", "celery", "-A", "smtp_session.worker.app", "worker"]
    argv += [f"--loglevel={loglevel}", "--pool=threads"]
    argv.append(f"--concurrency={concurrency or settings.worker_concurrency}")
    if beat:
        from smtp_session.worker.embedded_beat import OPTION as BEAT_OPTION

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        argv += [BEAT_OPTION, f"--schedule={settings.data_dir / 'beat-schedule'}"]
    # A fresh interpreter, exactly as `celery -A smtp_session.worker.app worker` runs.
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, argv built above


def _sweep_table(summary: SweepSummary, *, messages: bool) -> Table:
    """Target, server, ok, error, err_message (unless `messages` is false) and time.

    Nothing is cut short with an ellipsis: ok, error and time stay on one line, the names
    fold only when the terminal cannot hold them, err_message folds within its column.
    """
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("target", overflow="fold")
    table.add_column("server", overflow="fold")
    table.add_column("ok", no_wrap=True)
    table.add_column("error", no_wrap=True)
    if messages:
        table.add_column("err_message", overflow="fold", min_width=MIN_MESSAGE_WIDTH)
    table.add_column("time", no_wrap=True, justify="right")
    for outcome in summary.outcomes:
        row = [
            outcome.target or "",
            join_host_port(outcome.host, outcome.port),
            "yes" if outcome.ok else "NO",
            outcome.error.value if outcome.error else "",
        ]
        if messages:
            row.append(outcome.err_message)
        row.append(f"{outcome.timings.total:.2f} s" if outcome.timings.total is not None else "")
        table.add_row(*(Text(cell) for cell in row))  # Text: a "[" in a message is no markup
    return table


def _sweep_label(outcome: Outcome) -> str:
    server = join_host_port(outcome.host, outcome.port)
    return f"{outcome.target} ({server})" if outcome.target else server


def print_sweep(console: Console, summary: SweepSummary) -> None:
    """The sweep's table and total line, fitted to the console's width.

    err_message gets the width the other columns leave; when that is too narrow to read
    (an 80-column terminal), each failure's message is printed on its own line below.
    """
    from rich.console import Group
    from rich.measure import Measurement
    from rich.text import Text

    narrow = _sweep_table(summary, messages=False)
    natural = Measurement.get(console, console.options, narrow).maximum
    # The err_message column costs its padding and one border on top of its text.
    if console.width - natural - 3 >= MIN_MESSAGE_WIDTH:
        console.print(_sweep_table(summary, messages=True))
    else:
        failures = [
            Text(f"{_sweep_label(outcome)}: {outcome.err_message}")
            for outcome in summary.outcomes
            if not outcome.ok
        ]
        console.print(Group(narrow, *failures))
    for domain in summary.domains:
        state = "up" if domain.ok else "DOWN"
        console.print(
            Text(
                f"{domain.target or domain.domain} ({domain.domain}): {state}, "
                f"{domain.servers_ok} of {domain.servers} servers ok (require {domain.require})"
            )
        )
    console.print(f"{summary.ok} ok, {summary.failed} failed in {summary.duration_s:.2f} s")


@main.command()
@click.option(
    "--targets",
    "targets_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Targets file.",
    show_default=f"${ENV_PREFIX}TARGETS",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="Sessions open at once.",
    show_default=f"${ENV_PREFIX}SWEEP_CONCURRENCY, else {DEFAULT_CONCURRENCY}",
)
@click.option("--json", "as_json", is_flag=True, help="Print the sweep summary as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Log every attempt to stderr.")
def sweep(targets_path: Path | None, concurrency: int | None, as_json: bool, verbose: bool) -> None:
    """Check every configured target now, concurrently, in this process.

    Exit 0 when every target is up, 1 when any is down (a session failed; for a domain
    target: its verdict), 2 for an invalid targets file or setting, 130 when interrupted.
    """
    from rich.console import Console
    from rich.progress import Progress

    from smtp_session.tasks.egress import DestinationLimit
    from smtp_session.tasks.session import Guards
    from smtp_session.tasks.sweep import sweep as run_sweep
    from smtp_session.tasks.sweep import with_defaults
    from smtp_session.tasks.trust_memory import TrustMemory

    settings = _settings_or_exit(verbose=verbose, runs_sessions=True)
    path = targets_path or settings.targets
    if path is None:
        fail(f"no targets: pass --targets FILE or set {ENV_PREFIX}TARGETS", EXIT_INVALID)
    targets = _load_targets_or_exit(path)
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
                guards=Guards(limit=DestinationLimit(settings.max_per_destination)),
                on_outcome=advance,
                resolver=settings.discovery_resolver(),
            )
        )
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        # A pipe gets wide lines, unless COLUMNS says otherwise; a terminal its own width.
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        print_sweep(Console(width=PIPE_WIDTH if wide else None), summary)
    sys.exit(EXIT_OK if summary.targets_ok else EXIT_FAILED)
