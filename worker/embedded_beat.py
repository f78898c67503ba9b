"""`smtp-session worker --beat`: the beat scheduler as a thread of the worker process.

Celery's own `--beat` starts beat as a child process, which outlives a worker killed
without its shutdown (and then doubles every check next to the worker's successor). A
thread ends with its process, whatever way that ends.
"""

from __future__ import annotations

from typing import Any

import click
from celery import Celery, bootsteps
from celery.beat import EmbeddedService

OPTION = "--embedded-beat"


class EmbeddedBeat(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Beat in a thread of the worker, when the worker was started with --embedded-beat."""

    label = "EmbeddedBeat"
    conditional = True

    def __init__(self, worker: Any, embedded_beat: bool = False, **options: Any) -> None:
        self.enabled = embedded_beat
        super().__init__(worker, **options)

    def create(self, worker: Any) -> Any:
        return EmbeddedService(
            worker.app,
            thread=True,
            schedule_filename=worker.schedule_filename,
            scheduler_cls=worker.scheduler,
        )


def install(app: Celery) -> None:
    """Add the --embedded-beat option and its step to the app's worker."""
    app.user_options["worker"].add(
        click.Option(
            [OPTION],
            is_flag=True,
            default=False,
            help="Run beat in a thread of this worker (one beat per deployment).",
        )
    )
    app.steps["worker"].add(EmbeddedBeat)
