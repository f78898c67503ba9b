"""Celery signal wiring: JSON logging, per-task log context, and the metrics exporter.

Imported by smtp_session.worker.app, so it is active under `smtp-session worker` and under
`celery -A smtp_session.worker.app worker` alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

import structlog
from celery import signals
from celery.apps import worker as celery_worker
from celery.worker import state as worker_state

from smtp_session.monitoring.exporter import start_exporter
from smtp_session.monitoring.logging import configure_logging
from smtp_session.tasks.celery_tasks import process_metrics
from smtp_session.worker import embedded_broker
from smtp_session.worker.data_dir import DataDirInUse, claim
from smtp_session.worker.settings import InvalidSettings, Settings

log = structlog.get_logger("smtp_session.worker")
EXIT_CONFIG = 2  # as the CLI's exit code for unusable settings
_installed: dict[str, Settings] = {}
# The embedded broker this worker runs (none on Redis or RabbitMQ).
_brokers: list[Any] = []


def install(settings: Settings) -> None:
    """Give the receivers below the worker's settings (the receivers are always connected)."""
    _installed["settings"] = settings


def _current() -> Settings:
    return _installed["settings"]


def _say(message: str, file: Any = None) -> None:
    # Celery writes its shutdown notices ("worker: Warm shutdown (MainProcess)") straight to
    # the terminal from its signal handlers: here they say what the worker waits for, and
    # in JSON mode they are JSON lines too. One os.write and no logging call: a signal
    # handler must not wait for the logging lock that the code it interrupted may hold.
    text = str(message).strip()
    if "Warm shutdown" in text:
        in_flight = len(worker_state.active_requests)
        text += (
            f": finishing {in_flight} sessions in flight (a second Ctrl+C stops without "
            "waiting for them: they go back to the queue and run again)"
        )
    line = text
    if _current().log_format == "json":
        event = {
            "event": "celery.notice",
            "message": text,
            "logger": "celery.apps.worker",
            "level": "warning",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        line = json.dumps(event, separators=(",", ":"))
    stream = sys.__stderr__  # logs go to stderr, like every other line of ours
    if stream is not None:
        with contextlib.suppress(OSError, ValueError):
            os.write(stream.fileno(), (line + "\n").encode())


def _banner_as_log(self: celery_worker.Worker) -> None:
    log.info("worker.starting", hostname=self.hostname, info=self.startup_info(artlines=False))


@signals.celeryd_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
@signals.setup_logging.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Take over Celery's logging, early (celeryd_init comes before its first warnings):
    Celery's, billiard's and Python's warnings all come out in our format."""
    settings = _current()
    level = logging.getLevelName(loglevel.upper()) if isinstance(loglevel, str) else loglevel
    configure_logging(
        settings.log_format,
        level=level if isinstance(level, int) else logging.INFO,
        stream=sys.stderr,
    )
    # Celery internals (no signal or setting routes these lines), pinned to the installed
    # Celery by tests/unit/test_celery_internals.py.
    celery_worker.safe_say = _say
    if settings.log_format == "json":
        celery_worker.Worker.emit_banner = _banner_as_log


@signals.celeryd_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _claim_data_dir(options: dict[str, Any] | None = None, **_: Any) -> None:
    """Before anything starts: one worker per data dir, or this one stops here.

    Celery's own --beat is refused too: its beat is a child process that a killed worker
    leaves behind, and that holds no lock (`smtp-session worker --beat` runs it as a thread).
    """
    if (options or {}).get("beat"):
        log.critical(
            "worker.beat_refused",
            message="Celery's --beat runs beat as a process that can outlive the worker: "
            "use `smtp-session worker --beat` (or --embedded-beat)",
        )
        os._exit(EXIT_CONFIG)
    settings = _current()
    try:
        settings.check_ca_file()  # `celery -A … worker` too: a worker that runs sessions
    except InvalidSettings as exc:
        log.critical("worker.invalid_setting", variable=exc.variable, message=str(exc))
        os._exit(EXIT_CONFIG)
    data_dir = settings.data_dir
    try:
        claim(data_dir)
    except DataDirInUse as exc:
        log.critical("worker.data_dir_in_use", data_dir=str(data_dir), message=str(exc))
        os._exit(EXIT_CONFIG)
    if settings.embedded_broker:
        _start_embedded_broker(settings)


def _start_embedded_broker(settings: Settings) -> None:
    """The data dir's broker, before the consumer first connects (the lock is ours)."""
    try:
        _brokers.append(embedded_broker.start(settings.data_dir))
    except (embedded_broker.EmbeddedBrokerError, OSError) as exc:
        log.critical("worker.embedded_broker_failed", error=str(exc))
        os._exit(EXIT_CONFIG)
    log.info("worker.embedded_broker", url=embedded_broker.url(settings.data_dir))


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _stop_embedded_broker(**_: Any) -> None:
    """Stop the embedded broker once the consumer has let go (its last acks are in)."""
    while _brokers:
        _brokers.pop().stop(timeout=embedded_broker.STOP_TIMEOUT)


@signals.worker_ready.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """One /metrics endpoint for the worker process and every session it runs."""
    listen = _current().listen_address
    if listen is None:
        log.info("metrics.disabled")
        return
    app = getattr(sender, "app", None)
    if app is not None:
        # Configured targets show zeros from the start, not from their first check.
        process_metrics(app)
    address, port = listen
    try:
        server = start_exporter(address, port)
    except OSError as exc:
        # A worker nobody can scrape looks healthy and is blind: stop, and let the
        # supervisor say why (Celery would swallow an exception raised here).
        log.critical("metrics.failed", address=address, port=port, error=str(exc))
        os._exit(EXIT_CONFIG)
    log.info("metrics.listening", address=address, port=server.server_port)


@signals.task_prerun.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _bind_task_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    # Pool threads are reused: clear what the previous task bound before binding anew.
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task_name=getattr(task, "name", None))


@signals.task_postrun.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _unbind_task_context(**_: Any) -> None:
    # Lines logged between tasks (heartbeats, the pool) belong to no task.
    structlog.contextvars.clear_contextvars()
