"""The public task names and per-message options, shared by the tasks and their callers.

Light on purpose: a web backend imports this (through worker.client) with Celery and
pydantic only, none of the worker's session machinery.
"""

from __future__ import annotations

OPEN_TASK = "smtp_session.open"
CHECK_TARGET_TASK = "smtp_session.check_target"
SWEEP_TASK = "smtp_session.sweep"
TIME_LIMIT_MARGIN = 30.0
DEFAULT_CONCURRENCY = 100  # sessions a sweep keeps open at once


def time_limits(timeout: float) -> tuple[float, float]:
    """(soft, hard) seconds for one task run: one attempt of `timeout` seconds.

    One attempt may open two connections (the trust fallback has its own deadline)
    plus the report-only certificate fetch inside the second one's deadline.
    The core enforces those deadlines itself; the limits only stop a bug.
    """
    soft = 2 * timeout + TIME_LIMIT_MARGIN
    return soft, soft + TIME_LIMIT_MARGIN
