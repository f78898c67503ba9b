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

from smtp_session.tasks.contract import OPEN_TASK
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.request import check_queue_request, parse_request
from smtp_session.tasks.summary import DomainOutcome, SweepSummary

#: What a task of ours returns: `open` and `check_target` an Outcome, `check_target` of a
#: mail-domain target a DomainOutcome, `sweep` a SweepSummary.
Result = Outcome | DomainOutcome | SweepSummary


def submit(app: Celery, **fields: Any) -> str:
    """Enqueue `smtp_session.open`; returns the task id.

    The request is validated here first with the worker's own rules, so bad input raises
    InvalidRequest (naming the field) before anything is enqueued. Credentials go as a
    reference name; the worker resolves the secret.
    """
    check_queue_request(parse_request(fields))
    # No time limits in the message: the worker bounds each task by the request's timeout.
    sent = app.send_task(OPEN_TASK, kwargs=fields)
    return str(sent.id)


def result(app: Celery, task_id: str, timeout: float | None = None) -> Result:
    """Wait up to `timeout` seconds for the task's final result (celery's TimeoutError
    after): an Outcome for `submit`'s tasks."""
    data = AsyncResult(task_id, app=app).get(timeout=timeout)
    return parse_result(data)


def parse_result(data: dict[str, Any]) -> Result:
    """A task's result dict as its model: a sweep summary has `total`, a domain's verdict
    `domain` and `outcomes`, anything else is an Outcome."""
    if "total" in data and "outcomes" in data:
        return SweepSummary.from_dict(data)
    if "outcomes" in data:
        return DomainOutcome.from_dict(data)
    return Outcome.from_dict(data)
