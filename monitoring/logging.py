"""structlog configuration: one JSON object per line (or a console renderer when asked)."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["json", "console"]
BILLIARD_LOGGER = "multiprocessing"


def configure_logging(
    log_format: LogFormat = "json", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Route structlog and the standard library's logging to `stream` (stderr by default).

    Tracebacks are rendered without local variables: locals can hold secrets.
    """
    output = sys.stderr if stream is None else stream
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
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
        )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings become log records, in the same format
    # billiard (the prefork pool) logs through its own non-propagating logger, which
    # would otherwise fall through to Python's bare last-resort handler.
    pool_logger = logging.getLogger(BILLIARD_LOGGER)
    pool_logger.handlers[:] = [handler]
    pool_logger.propagate = False
