"""Worker path: sessions through a real Redis broker and a prefork worker, vs in-process.

A ``redis-server`` on a unix socket (no TCP, no persistence) is broker and result
backend; ``smtp-session worker --concurrency 2`` runs as deployed, configured through
the environment alone (``SMTP_SESSION_METRICS_PORT=0``); the client is a plain Celery
app that knows the broker URL and the task name, as a web backend would. The same
sessions (plain and STARTTLS, to an aiosmtpd server process) are also opened
in-process by ``open_session``, two at a time like the worker's two pool processes.
The two paths alternate, round by round.

Reported: tasks per second in a burst (all sent at once, results collected as they
arrive) vs sessions per second in-process, the ratio, and the queue-to-result latency
(``send_task`` until the result is in hand) p50/p99, one task at a time and in the burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import redis
from celery import Celery
from celery.result import ResultSet
from prometheus_client import CollectorRegistry

from bench.common import (
    EHLO_NAME,
    LOOPBACK,
    PROCESS_TIMEOUT,
    START_TIMEOUT,
    make_pki,
    percentile,
    print_table,
    ratio,
    server_process,
    write_result,
)
from monitoring.logging import configure_logging
from monitoring.metrics import SessionMetrics
from tasks.session import open_session

NAME = "worker_path"
OPEN_TASK = "smtp_session.open"  # the public task name, as a web backend spells it
BIN = Path(sys.executable).parent
REDIS_SERVER = "redis-server"
MODES = ("plain", "starttls")
WORKER_CONCURRENCY = 2
ROUNDS = 2
BURST = 150  # tasks per mode per round
LATENCY_SAMPLES = 40  # one at a time, per mode per round
WARMUP = 6
RESULT_TIMEOUT = 60.0
PING_TIMEOUT = 0.5
REDIS_PROBE_INTERVAL = 0.01
SESSION_TIMEOUT = 10.0


# ----------------------------------------------------------------------------- processes


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """``redis-server`` on ``folder/redis.sock``; yields the broker/backend URL."""
    socket_path = folder / "redis.sock"
    with (folder / "redis.log").open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - Debian's redis-server from PATH
            [
                REDIS_SERVER,
                *("--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"),
                *("--save", "", "--appendonly", "no", "--dir", str(folder)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_ping(socket_path, process)
            yield f"redis+socket://{socket_path}"
        finally:
            process.terminate()
            try:
                process.wait(PROCESS_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(PROCESS_TIMEOUT)


def _wait_for_ping(socket_path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=PROCESS_TIMEOUT) as probe:
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if probe.ping():
                    return
            if process.poll() is not None:
                raise RuntimeError("redis-server exited at start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not up after {START_TIMEOUT} s")
            time.sleep(REDIS_PROBE_INTERVAL)  # Redis signals readiness only by answering


@contextlib.contextmanager
def worker_process(broker_url: str, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``smtp-session worker`` in its own process group, output to ``folder/worker.log``."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("SMTP_SESSION_")
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env |= {
        "SMTP_SESSION_BROKER_URL": broker_url,
        "SMTP_SESSION_DATA_DIR": str(folder / "data"),
        "SMTP_SESSION_METRICS_PORT": "0",
        "SMTP_SESSION_LOG_FORMAT": "json",
    }
    log: IO[bytes]
    with (folder / "worker.log").open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own console script
            [str(BIN / "smtp-session"), "worker", f"--concurrency={WORKER_CONCURRENCY}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pool processes die with the group
        )
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(PROCESS_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(PROCESS_TIMEOUT)


def wait_until_ready(client: Celery, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if client.control.ping(timeout=PING_TIMEOUT, limit=1):
            return
        if process.poll() is not None:
            raise RuntimeError(f"worker exited at start:\n{log.read_text()[-4000:]}")
    raise TimeoutError(f"worker not ready after {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")


# ----------------------------------------------------------------------------- measuring


def request(mode: str, port: int, ca_file: str) -> dict[str, Any]:
    return {
        "host": LOOPBACK,
        "port": port,
        "security": mode,
        "trust": "portable",
        "ca_file": ca_file,
        "ehlo_name": EHLO_NAME,
        "retries": 0,
        "timeout": SESSION_TIMEOUT,
    }


def worker_latency(client: Celery, fields: dict[str, Any], count: int) -> tuple[list[float], int]:
    """One task at a time: seconds from send_task to the result in hand; and failures."""
    latencies: list[float] = []
    failed = 0
    for _ in range(count):
        started = time.perf_counter()
        outcome = client.send_task(OPEN_TASK, kwargs=fields).get(timeout=RESULT_TIMEOUT)
        latencies.append(time.perf_counter() - started)
        failed += not outcome["ok"]
    return latencies, failed


def worker_burst(
    client: Celery, fields: dict[str, Any], count: int
) -> tuple[float, list[float], int]:
    """All sent at once; (wall seconds, per-task latencies, failures), as results arrive."""
    sent: dict[str, float] = {}
    done: dict[str, float] = {}
    failed = 0
    started = time.perf_counter()
    results = []
    for _ in range(count):
        result = client.send_task(OPEN_TASK, kwargs=fields)
        sent[result.id] = time.perf_counter()
        results.append(result)

    def arrived(task_id: str, value: Any) -> None:
        nonlocal failed
        done[task_id] = time.perf_counter()
        failed += not value["ok"]

    ResultSet(results, app=client).join_native(timeout=RESULT_TIMEOUT, callback=arrived)
    wall = max(done.values()) - started
    return wall, [done[task_id] - sent[task_id] for task_id in sent], failed


async def in_process(
    fields: dict[str, Any], count: int, concurrency: int, metrics: SessionMetrics
) -> tuple[float, list[float], int]:
    """`count` sessions, `concurrency` at a time: (wall seconds, per-session seconds, failures)."""
    remaining = itertools.count()
    latencies: list[float] = []
    failed = 0

    async def one_at_a_time() -> None:
        nonlocal failed
        while next(remaining) < count:
            started = time.perf_counter()
            outcome = await open_session(dict(fields), metrics=metrics)
            latencies.append(time.perf_counter() - started)
            failed += not outcome.ok

    started = time.perf_counter()
    await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failed


def measure(client: Celery, ports: dict[str, list[int]], ca_file: str) -> list[dict[str, Any]]:
    metrics = SessionMetrics(registry=CollectorRegistry())
    cases = []
    for mode in MODES:
        fields = request(mode, ports[mode][0], ca_file)
        worker_latency(client, fields, WARMUP)
        asyncio.run(in_process(fields, WARMUP, 1, metrics))
        tally: dict[str, Any] = {
            key: [] for key in ("w_lat", "w_burst_lat", "p_lat", "p_burst_lat")
        } | {"w_wall": 0.0, "p_wall": 0.0, "w_failed": 0, "p_failed": 0}
        for number in range(ROUNDS):
            # Alternate which path goes first, so drift falls on both alike.
            for path in ("worker", "process") if number % 2 == 0 else ("process", "worker"):
                if path == "worker":
                    latencies, failed = worker_latency(client, fields, LATENCY_SAMPLES)
                    wall, burst, failed_burst = worker_burst(client, fields, BURST)
                    tally["w_lat"] += latencies
                    tally["w_burst_lat"] += burst
                    tally["w_wall"] += wall
                    tally["w_failed"] += failed + failed_burst
                else:
                    _, latencies, failed = asyncio.run(
                        in_process(fields, LATENCY_SAMPLES, 1, metrics)
                    )
                    wall, burst, failed_burst = asyncio.run(
                        in_process(fields, BURST, WORKER_CONCURRENCY, metrics)
                    )
                    tally["p_lat"] += latencies
                    tally["p_burst_lat"] += burst
                    tally["p_wall"] += wall
                    tally["p_failed"] += failed + failed_burst
        total = BURST * ROUNDS
        worker_rate = total / tally["w_wall"]
        process_rate = total / tally["p_wall"]
        cases.append(
            {
                "mode": mode,
                "tasks": total,
                "worker_tasks_per_s": round(worker_rate, 1),
                "in_process_sessions_per_s": round(process_rate, 1),
                "ratio_worker_to_in_process": round(ratio(worker_rate, process_rate), 3),
                "worker_latency_ms": _quantiles(tally["w_lat"]),
                "worker_burst_latency_ms": _quantiles(tally["w_burst_lat"]),
                "in_process_latency_ms": _quantiles(tally["p_lat"]),
                "in_process_burst_latency_ms": _quantiles(tally["p_burst_lat"]),
                "worker_failed": tally["w_failed"],
                "in_process_failed": tally["p_failed"],
            }
        )
        print(f"  {mode} done", flush=True)
    return cases


def _quantiles(seconds: list[float]) -> dict[str, float]:
    return {
        "p50": round(1000 * percentile(seconds, 0.50), 2),
        "p99": round(1000 * percentile(seconds, 0.99), 2),
        "samples": len(seconds),
    }


def report(cases: list[dict[str, Any]]) -> None:
    print_table(
        f"Redis + prefork worker (--concurrency {WORKER_CONCURRENCY}) vs in-process "
        f"open_session ({WORKER_CONCURRENCY} at a time), {ROUNDS} alternating rounds",
        [
            "mode",
            "worker tasks/s",
            "in-process /s",
            "worker/in-process",
            "latency p50 ms",
            "latency p99 ms",
            "in-process p50 ms",
            "in-process p99 ms",
            "burst p50 ms",
            "burst p99 ms",
            "failed",
        ],
        [
            [
                case["mode"],
                case["worker_tasks_per_s"],
                case["in_process_sessions_per_s"],
                case["ratio_worker_to_in_process"],
                case["worker_latency_ms"]["p50"],
                case["worker_latency_ms"]["p99"],
                case["in_process_latency_ms"]["p50"],
                case["in_process_latency_ms"]["p99"],
                case["worker_burst_latency_ms"]["p50"],
                case["worker_burst_latency_ms"]["p99"],
                case["worker_failed"] + case["in_process_failed"],
            ]
            for case in cases
        ],
    )
    print(
        "\nlatency: send_task -> result.get, one task at a time; burst: all "
        f"{BURST} sent at once, each from send to arrival (queueing included)"
    )


def main() -> None:
    if shutil.which(REDIS_SERVER) is None:
        # Not a test: a benchmark that cannot run says so and leaves a record of why.
        reason = f"{REDIS_SERVER} not on PATH (Debian: apt-get install redis-server)"
        print(f"SKIPPED: {reason}")
        write_result(NAME, {"skipped": reason})
        return
    with (
        tempfile.TemporaryDirectory(prefix="bench-worker-") as name,
        open(os.devnull, "w") as sink,
    ):
        folder = Path(name)
        pki = make_pki(folder)
        configure_logging("json", level=logging.INFO, stream=sink)
        args = ["--plain", "1", "--starttls", "1", "--chain", str(pki.server_chain)]
        with (
            server_process(args, folder / "server.log") as server,
            redis_server(folder) as url,
            worker_process(url, folder) as worker,
        ):
            client = Celery("bench-client", broker=url, backend=url)
            try:
                wait_until_ready(client, worker, folder / "worker.log")
                print(f"worker {worker.pid} ready on {url}")
                cases = measure(client, server.ports, str(pki.ca_file))
            finally:
                client.close()
    report(cases)
    write_result(
        NAME,
        {
            "worker_concurrency": WORKER_CONCURRENCY,
            "rounds": ROUNDS,
            "burst": BURST,
            "latency_samples": LATENCY_SAMPLES,
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
