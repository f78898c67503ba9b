"""The thin Celery tasks over the session core (task names are public: DESIGN.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from celery import Task, shared_task

from tasks.errors import InvalidRequest
from tasks.session import RetryPolicy, log_attempt, prepare, rejected, run_attempt, utc_now

OPEN_TASK = "smtp_session.open"
RETRY_POLICY = RetryPolicy()


def _request_defaults(task: Task) -> dict[str, Any]:
    settings = getattr(task.app.conf, "smtp_session_settings", None)
    return settings.request_defaults() if settings is not None else {}


def run_session_task(
    task: Task, fields: dict[str, Any], positional: tuple[Any, ...] = ()
) -> dict[str, Any]:
    """One attempt per task run; a retryable failure with attempts left is re-scheduled.

    The retry goes back through the broker with a backoff countdown and the same task
    id, so no pool process sleeps through the backoff and a caller polling the id sees
    one final result. A failed session is a result (`ok: false`), not a task failure.
    """
    attempt = task.request.retries + 1
    structlog.contextvars.bind_contextvars(task_id=task.request.id, task_name=task.name)
    try:
        if positional:
            # `send_task(..., args=[...])` would otherwise be a TypeError inside Celery:
            # a task failure where a caller's bad input must be an invalid_request result.
            raise InvalidRequest(
                "request", f"fields go in kwargs, not in positional args (got {len(positional)})"
            )
        request, credentials = prepare({**_request_defaults(task), **fields})
    except InvalidRequest as exc:
        outcome = rejected(exc, fields)
    else:
        outcome = asyncio.run(
            run_attempt(request, credentials, attempt=attempt, started_at=_started_at(task))
        )
        log_attempt(outcome, final=False)
        if not outcome.ok and outcome.retryable and attempt <= request.retries:
            raise task.retry(
                countdown=RETRY_POLICY.delay(attempt),
                max_retries=request.retries,
                headers={"smtp_session_started_at": outcome.started_at},
            )
    log_attempt(outcome, final=True)
    return outcome.to_dict()


def _started_at(task: Task) -> str:
    headers = task.request.headers or {}
    started = headers.get("smtp_session_started_at") or getattr(
        task.request, "smtp_session_started_at", None
    )
    return started if isinstance(started, str) else utc_now()


@shared_task(name=OPEN_TASK, bind=True)  # type: ignore[untyped-decorator]  # celery is untyped
def open_session_task(self: Task, *args: Any, **fields: Any) -> dict[str, Any]:
    """Open one session with the request fields as kwargs; returns the Outcome dict."""
    return run_session_task(self, fields, args)
