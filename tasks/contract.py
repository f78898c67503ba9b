"""The public task names and time budgets, shared by the tasks and their callers.

Light on purpose: a web backend imports this (through smtp_session.worker.client) with Celery and
pydantic only, none of the worker's session machinery.
"""

from __future__ import annotations

OPEN_TASK = "smtp_session.open"
CHECK_TARGET_TASK = "smtp_session.check_target"
SWEEP_TASK = "smtp_session.sweep"
DEFAULT_CONCURRENCY = 100  # sessions a sweep, or a worker process, keeps open at once
TIME_LIMIT_MARGIN = 5.0


def attempt_time_limit(timeout: float) -> float:
    """Seconds one attempt of `timeout` seconds may take, at most.

    One attempt may open two connections (the trust fallback has its own deadline) plus
    the report-only certificate fetch inside the second one's deadline; the margin covers
    the EHLO name's lookup. The core enforces those deadlines itself: the limit only
    stops a bug.
    """
    return 2 * timeout + TIME_LIMIT_MARGIN
