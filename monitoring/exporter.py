"""The one /metrics endpoint of a worker, aggregating every prefork pool process.

prometheus_client's multiprocess mode: each process writes its values to files in
PROMETHEUS_MULTIPROC_DIR and the main process sums them when scraped. The variable must
be set before prometheus_client is first imported in the process (it picks its value
class at import), so `use_multiprocess_dir` imports nothing of prometheus_client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from http.server import HTTPServer

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_dir(default: Path) -> Path:
    """Point prometheus_client at the multiprocess directory (the environment's, else `default`)."""
    path = Path(os.environ.setdefault(MULTIPROC_VARIABLE, str(default)))
    path.mkdir(parents=True, exist_ok=True)
    return path


def wipe_multiprocess_dir(path: Path) -> None:
    """Forget the values of earlier runs: counters restart at zero with the worker.

    Only prometheus_client's own files go: the variable may point at a folder that holds
    other things too.
    """
    path.mkdir(parents=True, exist_ok=True)
    for values in path.glob("*.db"):
        values.unlink(missing_ok=True)


def mark_process_dead(pid: int) -> None:
    """Drop a finished pool process's live gauges; its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def start_exporter(address: str, port: int) -> HTTPServer:
    """Serve /metrics on address:port (0: any free port; read it from the result)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
