"""The worker's app on kombu's filesystem transport, the embedded broker before issue 16.

Only for bench/embedded_broker.py (`celery -A bench.filesystem_app worker`): the folders
of the queue under SMTP_SESSION_DATA_DIR, as the worker used to configure them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smtp_session.worker.app import create_app
from smtp_session.worker.settings import load_settings

URL = "filesystem://localhost//"


def transport_options(data_dir: Path) -> dict[str, Any]:
    """The queue's folders in the data dir (made here: kombu does not make them)."""
    queue, control = data_dir / "broker" / "queue", data_dir / "broker" / "control"
    for folder in (queue, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "control_folder": str(control),
    }


settings = load_settings()
app = create_app(settings)
app.conf.broker_transport_options = transport_options(settings.data_dir)
