"""One worker per data dir: a lock on a file in it, held for the life of the worker.

A second worker on the same data dir would share the embedded broker's queue and beat's
schedule, and its embedded beat would double every check. The operating system releases
the lock when the process ends, however it ends (SIGKILL included): no stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from smtp_session.tasks.errors import SessionWorkerError

LOCK_NAME = "worker.lock"

# The open lock file of this process: closing it would release the lock.
_held: list[IO[str]] = []


class DataDirInUse(SessionWorkerError):
    """Another worker runs on this data dir."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        who = f"pid {holder}" if holder.isdigit() else "another process"
        super().__init__(
            f"another worker ({who}) runs on {data_dir}: stop it, or give this one a data "
            "dir of its own (SMTP_SESSION_DATA_DIR)"
        )
        self.data_dir = data_dir
        self.holder = holder


def claim(data_dir: Path) -> None:
    """Hold the data dir's lock until this process ends; raises DataDirInUse if taken."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / LOCK_NAME).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(32).strip()
        handle.close()
        raise DataDirInUse(data_dir, holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held.append(handle)
