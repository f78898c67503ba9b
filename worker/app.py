"""The Celery app, built from settings: `celery -A smtp_session.worker.app worker` finds `app` here.

One worker process runs many sessions at once: Celery's `threads` pool, whose threads
hand their sessions to one event loop per process (tasks.background_loop). Measured in
bench/worker_path.py against the prefork pool (one session per process at a time) and
against threads that each run their own loop: see the README, "Benchmarks".
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery

from smtp_session.tasks.background_loop import HARD_LIMIT_GRACE
from smtp_session.tasks.celery_tasks import SETTINGS_ATTRIBUTE, TARGETS_ATTRIBUTE
from smtp_session.tasks.contract import CHECK_TARGET_TASK, attempt_time_limit
from smtp_session.tasks.session import MAX_BACKOFF
from smtp_session.tasks.sweep import SweepItem, time_limit, with_defaults
from smtp_session.worker import embedded_beat, redis_transport, signals
from smtp_session.worker.settings import Settings, load_settings
from smtp_session.worker.targets import Target, check_target_timeouts, load_targets

# Results are read within seconds by whoever waits for them: an hour, not a day, of them
# in Redis (about 1 kB each).
RESULT_EXPIRES = 3600
#: Rounds of the longest task a message may spend in this worker unacknowledged: waiting
#: behind the one reserved ahead of it per thread (prefetch 2), behind the retries whose
#: countdown ended at once (at most one per thread: worker_eta_task_limit), and running.
UNACKED_ROUNDS = 3
VISIBILITY_MARGIN = 10.0
#: Seconds between the worker's scans for messages a killed worker left unacknowledged.
RESTORE_INTERVAL = 5
#: Longest pause, in milliseconds, between two attempts to store a result while the result
#: store is away: a result arrives within a second of the store's return.
RESULT_RETRY_MAX_MS = 1000


def longest_task(settings: Settings, items: list[SweepItem]) -> float:
    """Seconds the longest task this worker may run can take: an ad hoc request at the
    longest allowed timeout, or a configured target with its retries and discovery."""
    concurrency, defaults = settings.sweep_concurrency, settings.request_defaults()
    return max(
        [attempt_time_limit(settings.max_timeout)]
        + [time_limit(with_defaults(item, defaults), concurrency=concurrency) for item in items]
    )


def redelivery_timeout(settings: Settings, items: list[SweepItem]) -> int:
    """Redis's visibility timeout: how long a message may stay unacknowledged.

    With late acks a message stays unacknowledged while it waits in the worker and while
    its task runs, and a retry waits as an ETA message for up to MAX_BACKOFF first: the
    timeout must outlast all of it, or Redis would hand the message to a second worker
    (a task run twice). It is also how long the tasks of a worker killed as a whole wait
    before another worker gets them.
    """
    longest = UNACKED_ROUNDS * longest_task(settings, items)
    return int(longest + HARD_LIMIT_GRACE + MAX_BACKOFF + VISIBILITY_MARGIN)


def _transport_options(settings: Settings, items: list[SweepItem]) -> dict[str, Any]:
    if not settings.redis_broker:
        return {}  # a visibility timeout is Redis's alone (RabbitMQ requeues by itself)
    return {
        "visibility_timeout": redelivery_timeout(settings, items),
        # Scan for expired messages every few seconds, not kombu's default 100 s.
        "unacked_restore_interval": RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
    }


def beat_schedule(targets: list[Target]) -> dict[str, dict[str, Any]]:
    """One `smtp_session.check_target` entry per target, at the target's interval.

    A check that waited longer than one interval in the queue expires instead of
    running: after an outage the backlog drops stale checks rather than piling them up.
    """
    return {
        f"check-target:{target.name}": {
            "task": CHECK_TARGET_TASK,
            "schedule": timedelta(seconds=target.interval),
            "kwargs": {"name": target.name},
            # Nobody reads a scheduled check's result (logs and metrics have it): not stored.
            "options": {"expires": target.interval, "ignore_result": True},
        }
        for target in targets
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for at-least-once delivery of session checks."""
    settings = settings or load_settings()
    redis_transport.install()
    targets = load_targets(settings.targets) if settings.targets is not None else []
    items = [target.sweep_item() for target in targets]
    check_target_timeouts(targets, settings.max_timeout)
    if settings.effective_result_backend.startswith("file://"):
        (settings.data_dir / "results").mkdir(parents=True, exist_ok=True)
    celery = Celery("smtp_session", include=["smtp_session.tasks.celery_tasks"])
    celery.conf.update(
        broker_url=settings.effective_broker_url,
        result_backend=settings.effective_result_backend,
        broker_transport_options=_transport_options(settings, items),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Acknowledge after the task ran, and requeue what a stopping worker still held:
        # a lost worker never loses the check it was running.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Many sessions per process, each in a pool thread that waits on the shared loop.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        # Two messages per thread: the next session starts while a thread still stores the
        # previous one's result and acknowledges it (one per thread left 27 % of the threads
        # idle at 200 ms per reply: bench/worker_path.py). Unacknowledged, a reserved message
        # goes back to the queue when the worker stops or dies.
        worker_prefetch_multiplier=2,
        # Retries waiting on their countdown, held by this worker: at most one per thread,
        # so that they all fit in the redelivery timeout (UNACKED_ROUNDS).
        worker_eta_task_limit=settings.worker_concurrency,
        # Sessions running when the broker connection drops run to their end (their result
        # is stored; on Redis their acknowledgement too, once it is back; on RabbitMQ the
        # broker has already requeued them: at-least-once, docs/tasks.md).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # The threads pool enforces no time limits: the tasks bound themselves (each
        # session's deadlines, then tasks.background_loop's limit per task).
        # A broker that is down at start or goes away later is waited for, forever.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_expires=RESULT_EXPIRES,
        # A result the store cannot take now (Redis restarts) is retried until it is
        # stored, however long that takes: never turned into the FAILURE of a session that
        # ran. The message stays unacknowledged meanwhile, so a worker that dies while it
        # waits leaves the task to be delivered again.
        result_backend_always_retry=True,
        result_backend_max_sleep_between_retries_ms=RESULT_RETRY_MAX_MS,
        # One try per call below those retries (Celery's default is 20 tries a second
        # apart), so that a client waiting for a result (`enqueue --wait`) hears of a lost
        # store at once and keeps waiting within its own deadline (worker.client).
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        # No STARTED state: one write to the result store per task, the outcome (the
        # second write cost about as much CPU as the session itself, bench/worker_path.py).
        task_track_started=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        beat_schedule=beat_schedule(targets),
    )
    setattr(celery, SETTINGS_ATTRIBUTE, settings)
    setattr(celery, TARGETS_ATTRIBUTE, {target.name: target.sweep_item() for target in targets})
    embedded_beat.install(celery)
    signals.install(settings)
    return celery


app = create_app()
