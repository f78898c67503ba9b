"""A small client for web backends: validate, submit, read the outcome back.

Needs only Celery (and pydantic for the validation): none of the worker's session
machinery. The backend's own Celery app just has to point at the worker's broker and
result backend.

    task_id = submit(app, host="smtp.gmail.com", credentials="tenant42")
    outcome = result(app, task_id, timeout=60)
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult

from tasks.contract import OPEN_TASK, time_limits
from tasks.outcome import Outcome
from tasks.request import parse_request


def submit(app: Celery, **fields: Any) -> str:
    """Enqueue `smtp_session.open`; returns the task id.

    The request is validated here first with the worker's own rules, so bad input raises
    InvalidRequest (naming the field) before anything is enqueued. Credentials go as a
    reference name; the worker resolves the secret.
    """
    request = parse_request(fields)
    options: dict[str, float] = {}
    if "timeout" in fields:
        # Limits sized to this request; without a timeout the worker's own default applies,
        # and so do the worker's limits, which suit any valid timeout.
        options["soft_time_limit"], options["time_limit"] = time_limits(request.timeout)
    sent = app.send_task(OPEN_TASK, kwargs=fields, **options)
    return str(sent.id)


def result(app: Celery, task_id: str, timeout: float | None = None) -> Outcome:
    """Wait up to `timeout` seconds for the final Outcome (celery's TimeoutError after)."""
    data = AsyncResult(task_id, app=app).get(timeout=timeout)
    return Outcome.from_dict(data)
