"""structlog configuration: one JSON object per line (or a console renderer when asked).

Our own events are rendered by structlog and written as they are, in one pass; the
standard library's records (Celery's, billiard's, Python's warnings) go through
structlog's ProcessorFormatter into the same format. Both write whole lines through one
lock, so lines from many threads never interleave.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, Literal, TextIO

import orjson
import structlog

LogFormat = Literal["json", "console"]
BILLIARD_LOGGER = "multiprocessing"
#: Celery's lines for every task ("received", "succeeded in …: {the whole result}"): at
#: INFO they would double the log, and `session.result` says it all. Warnings stay.
PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


def _json_line(event: Any, **options: Any) -> str:
    """One event as one JSON line: orjson (several times json's speed), json for what it
    refuses (a string that is not valid UTF-8 is written with escapes, not dropped)."""
    try:
        return orjson.dumps(event, default=options.get("default")).decode()
    except orjson.JSONEncodeError:
        return json.dumps(event, separators=(",", ":"), **options)


class LineWriter:
    """Writes whole lines to one stream, one at a time."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        # Reentrant: a line written from within a write (a finalizer that logs) must not
        # deadlock its own thread.
        self._lock = threading.RLock()

    def write(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class _EventLogger:
    """What structlog hands a rendered event to: one line, written as it is."""

    def __init__(self, writer: LineWriter, name: str) -> None:
        self._writer = writer
        self.name = name  # for structlog.stdlib.add_logger_name

    def msg(self, message: str) -> None:
        self._writer.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _LineHandler(logging.Handler):
    """A logging handler that formats a record and writes it through the LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure_logging(
    log_format: LogFormat = "json", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Route structlog and the standard library's logging to `stream` (stderr by default).

    Tracebacks are rendered without local variables: locals can hold secrets.
    """
    writer = LineWriter(sys.stderr if stream is None else stream)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
        )

    def event_logger(name: str = "smtp_session", *_: Any) -> _EventLogger:
        return _EventLogger(writer, name)

    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=event_logger,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    handler = _LineHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in PER_TASK_LOGGERS:  # still there with --loglevel=DEBUG
        logging.getLogger(name).setLevel(logging.WARNING if level > logging.DEBUG else level)
    logging.captureWarnings(True)  # Python warnings become log records, in the same format
    # billiard (Celery's process library) logs through its own non-propagating logger, which
    # would otherwise fall through to Python's bare last-resort handler.
    pool_logger = logging.getLogger(BILLIARD_LOGGER)
    pool_logger.handlers[:] = [handler]
    pool_logger.propagate = False
