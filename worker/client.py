"""A small client for web backends: validate, submit, read the outcome back.

Needs only Celery (and pydantic for the validation): none of the worker's session
machinery. The backend's own Celery app just has to point at the worker's broker and
result backend.

    task_id = submit(app, host="smtp.gmail.com", credentials="tenant42")
    outcome = result(app, task_id, timeout=60)
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from smtp_session.tasks.contract import OPEN_TASK
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.request import check_queue_request, parse_request
from smtp_session.tasks.summary import DomainOutcome, SweepSummary

#: What a task of ours returns: `open` and `check_target` an Outcome, `check_target` of a
#: mail-domain target a DomainOutcome, `sweep` a SweepSummary.
Result = Outcome | DomainOutcome | SweepSummary
#: Seconds between two tries to reach a result store that went away, while waiting.
RECONNECT_INTERVAL = 0.5
#: The shortest wait handed to Celery: it reads 0 as "no timeout".
MIN_WAIT = 0.05


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
    after): an Outcome for `submit`'s tasks. A result store that restarts meanwhile is
    waited for, within the same `timeout`."""
    pending = AsyncResult(task_id, app=app)
    try:
        return parse_result(wait(pending, timeout))
    finally:
        # Stop listening for the task now, as the result's own __del__ would: left to
        # interpreter shutdown, that fails on a Redis result store with a traceback.
        forget(pending)


def wait(pending: AsyncResult, timeout: float | None) -> Any:
    """`pending.get(timeout=timeout)`, through restarts of the result store.

    Celery's Redis result consumer gives up when its subscription cannot be renewed
    (`RuntimeError: Retry limit exceeded …`): the subscription is dropped and made anew
    every RECONNECT_INTERVAL until the store answers or `timeout` runs out. A result
    stored while the store was away is read back when it returns.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    lost = _store_errors(pending)
    caught: tuple[type[BaseException], ...] = (RuntimeError, *lost)
    while True:
        remaining = None if deadline is None else max(deadline - time.monotonic(), MIN_WAIT)
        try:
            return pending.get(timeout=remaining)
        except caught as exc:
            if isinstance(exc, RuntimeError) and not isinstance(exc.__cause__, lost):
                raise
            forget(pending)  # the next get() subscribes anew
            if deadline is not None and time.monotonic() + RECONNECT_INTERVAL >= deadline:
                raise CeleryTimeoutError(f"no result store for task {pending.id}") from exc
            time.sleep(RECONNECT_INTERVAL)


def forget(pending: AsyncResult) -> None:
    """Stop listening for the task's result (the store may be away: nothing to undo)."""
    with contextlib.suppress(RuntimeError, *_store_errors(pending)):
        pending.backend.remove_pending_result(pending)


def _store_errors(pending: AsyncResult) -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = getattr(pending.backend, "connection_errors", ())
    return errors


def parse_result(data: dict[str, Any]) -> Result:
    """A task's result dict as its model: a sweep summary has `total`, a domain's verdict
    `domain` and `outcomes`, anything else is an Outcome."""
    if "total" in data and "outcomes" in data:
        return SweepSummary.from_dict(data)
    if "outcomes" in data:
        return DomainOutcome.from_dict(data)
    return Outcome.from_dict(data)
