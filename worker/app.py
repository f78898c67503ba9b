"""The Celery app, built from settings: `celery -A worker.app worker` finds `app` here."""

from __future__ import annotations

from monitoring.exporter import use_multiprocess_dir
from worker.settings import Settings, load_settings

# prometheus_client picks its multiprocess mode when first imported, so the directory is
# named before anything below imports it (and nothing above may import it: the test of 50
# sessions over 4 pool processes fails if one does); pool processes inherit it at fork.
_settings = load_settings()
use_multiprocess_dir(_settings.data_dir / "metrics")

from datetime import timedelta  # noqa: E402 - after the multiprocess directory is set
from typing import Any  # noqa: E402

from celery import Celery  # noqa: E402

from tasks.celery_tasks import SETTINGS_ATTRIBUTE, TARGETS_ATTRIBUTE  # noqa: E402
from tasks.contract import CHECK_TARGET_TASK, time_limits  # noqa: E402
from tasks.request import MAX_TIMEOUT  # noqa: E402
from tasks.session import MAX_BACKOFF  # noqa: E402
from worker import signals  # noqa: E402
from worker.targets import Target, load_targets  # noqa: E402

RESULT_EXPIRES = 24 * 3600
VISIBILITY_MARGIN = 60.0


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_broker:
        queue = settings.data_dir / "broker" / "queue"
        control = settings.data_dir / "broker" / "control"
        for folder in (queue, control):
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "control_folder": str(control),
        }
    _, hard = time_limits(MAX_TIMEOUT)
    # Redis re-delivers a message nobody acknowledged within visibility_timeout. With late
    # acks a message stays unacknowledged while it runs, and a retry waits in the worker
    # as an ETA message for up to MAX_BACKOFF: the timeout must outlast both, or Redis
    # would hand a running task to a second worker.
    return {"visibility_timeout": int(hard + MAX_BACKOFF + VISIBILITY_MARGIN)}


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
            "options": {"expires": target.interval},
        }
        for target in targets
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for at-least-once delivery of session checks."""
    settings = settings or load_settings()
    targets = load_targets(settings.targets) if settings.targets is not None else []
    if not settings.result_backend:
        (settings.data_dir / "results").mkdir(parents=True, exist_ok=True)
    celery = Celery("smtp_session", include=["tasks.celery_tasks"])
    soft, hard = time_limits(MAX_TIMEOUT)
    celery.conf.update(
        broker_url=settings.effective_broker_url,
        result_backend=settings.effective_result_backend,
        broker_transport_options=_transport_options(settings),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Acknowledge after the task ran, and requeue when a pool process dies mid-task
        # (SIGKILL, OOM): a lost worker process never loses the check it was running.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message per pool process: a crash strands nothing beyond what was running.
        worker_prefetch_multiplier=1,
        # Backstops for bugs only, sized so that no valid request (timeout up to
        # MAX_TIMEOUT) is cut; `enqueue` and the client send tighter per-message limits.
        task_soft_time_limit=soft,
        task_time_limit=hard,
        # A broker that is down at start or goes away later is waited for, forever.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_expires=RESULT_EXPIRES,
        task_track_started=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_pool="prefork",
        beat_schedule=beat_schedule(targets),
    )
    setattr(celery, SETTINGS_ATTRIBUTE, settings)
    setattr(celery, TARGETS_ATTRIBUTE, {target.name: target.sweep_item() for target in targets})
    signals.install(settings)
    return celery


app = create_app(_settings)
