"""Workers on each broker, for bench/embedded_broker.py and bench/chaos.py.

A :class:`Setup` says how a worker and a client meet on one broker: the worker's command
line and environment, the client's Celery settings. Workers are the tests' own
``WorkerProcess`` (a process group of its own, its output kept line by line, killed
whole by SIGKILL), brokers the tests' ``RedisServer`` and ``RabbitMQServer``: the same
real servers on loopback, restartable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from bench.common import LOOPBACK, REPO, START_TIMEOUT
from smtp_session.worker import embedded_broker
from tests.integration.conftest import WorkerProcess

OPEN_TASK = "smtp_session.open"
BIN = Path(sys.executable).parent
#: The worker's log line once it consumes (Celery's own).
READY_LINE = r"celery@\S+ ready\."
#: Characters of a worker's output shown when it does not start.
LOG_TAIL = 3000
#: Seconds between two looks at results that have not all arrived.
POLL_INTERVAL = 0.05


@dataclass
class Setup:
    """One broker as a worker and a client see it."""

    name: str
    folder: Path
    worker_env: dict[str, str]
    client_conf: dict[str, Any]
    argv: list[str] = field(default_factory=lambda: [str(BIN / "smtp-session"), "worker"])
    runs: int = 0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)  # the workers' logs go there

    def client(self) -> Celery:
        return Celery(f"bench-{self.name}", **self.client_conf)

    def start_worker(self, concurrency: int) -> WorkerProcess:
        """A worker on this broker, returned once it consumes."""
        self.runs += 1
        argv = [*self.argv, f"--concurrency={concurrency}"]
        worker = WorkerProcess(argv, self.worker_env, self.folder / f"worker-{self.runs}.log")
        try:
            worker.wait_for_line(READY_LINE, timeout=START_TIMEOUT)
        except TimeoutError:
            worker.stop()
            tail = worker.output()[-LOG_TAIL:]
            raise RuntimeError(f"{self.name} worker not ready:\n{tail}") from None
        return worker


def base_env(data_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's settings from the environment alone: loopback servers allowed, no
    bound per destination (the servers stand for many), /metrics off."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SMTP_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = str(REPO)  # `celery -A bench.…` finds the bench package
    return env | {
        "SMTP_SESSION_DATA_DIR": str(data_dir),
        "SMTP_SESSION_METRICS_PORT": "0",
        "SMTP_SESSION_ALLOW_NETWORKS": f"{LOOPBACK}/32",
        "SMTP_SESSION_ALLOW_PORTS": "1024-65535",
        "SMTP_SESSION_MAX_PER_DESTINATION": "10000",
        **(extra or {}),
    }


def embedded_setup(folder: Path) -> Setup:
    """The default: the worker's embedded Valkey in its data dir."""
    data_dir = folder / "data"
    url = embedded_broker.url(data_dir)
    return Setup("embedded", folder, base_env(data_dir), {"broker": url, "backend": url})


def redis_setup(folder: Path, url: str) -> Setup:
    env = base_env(folder / "data", {"SMTP_SESSION_BROKER_URL": url})
    return Setup("redis", folder, env, {"broker": url, "backend": url})


def file_results(data_dir: Path) -> str:
    """The worker's own file result backend, as settings.py names it."""
    return f"file://{(data_dir / 'results').resolve()}"


def amqp_setup(folder: Path, url: str) -> Setup:
    data_dir = folder / "data"
    env = base_env(data_dir, {"SMTP_SESSION_BROKER_URL": url})
    return Setup("rabbitmq", folder, env, {"broker": url, "backend": file_results(data_dir)})


def send(client: Celery, requests: Sequence[dict[str, Any]]) -> list[AsyncResult]:
    return [client.send_task(OPEN_TASK, kwargs=fields) for fields in requests]


def collect(
    results: Sequence[AsyncResult], *, timeout: float, since: float | None = None
) -> dict[str, float]:
    """Seconds from `since` (now by default) at which each result arrived, by task id;
    those missing after `timeout` are left out. Polls: every backend answers a poll."""
    started = time.monotonic() if since is None else since
    deadline = time.monotonic() + timeout
    waiting = {result.id: result for result in results}
    arrived: dict[str, float] = {}
    while waiting and time.monotonic() < deadline:
        for task_id, result in list(waiting.items()):
            if result.ready():
                arrived[task_id] = time.monotonic() - started
                del waiting[task_id]
        time.sleep(POLL_INTERVAL)
    return arrived


def runs_by_task(logs: Sequence[Path]) -> Counter[str]:
    """How many sessions ran for each task id, from the workers' `session.attempt` lines."""
    runs: Counter[str] = Counter()
    for line in _lines(logs):
        if '"session.attempt"' in line:
            runs[json.loads(line).get("task_id")] += 1
    return runs


def _lines(logs: Sequence[Path]) -> Iterator[str]:
    for log in logs:
        if log.exists():
            yield from (line for line in log.read_text().splitlines() if line.startswith("{"))
