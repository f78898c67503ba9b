"""`smtp-session enqueue` when the broker or the workers are not there: bounded, one line.

A newcomer's first `enqueue` often meets no broker (a wrong URL, Redis not started) or no
worker (started on another data dir): it must end within its own bounds, say which
broker in one line with the password masked, and exit 3 (no outcome) rather than 1 (the
session failed).
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

from celery import Celery

from tests.cli import cli_env, finish_cli, run_cli, start_cli
from tests.integration.conftest import (
    START_TIMEOUT,
    RedisServer,
    WorkerFactory,
    wait_until_ready,
    worker_env,
)
from tests.servers import RawServerFactory

EXIT_NO_OUTCOME = 3
EXIT_INTERRUPTED = 130
#: When `--wait` says whether a worker answers, with the default --wait-timeout.
NOTICE_AFTER = 5.0
BROKER_URL = "SMTP_SESSION_BROKER_URL"
#: A password that must never be printed.
PASSWORD = "hunter2-not-for-stderr"
#: Interpreter start-up and imports, on a busy machine: far below the 20 s it used to take.
START_UP = 5.0
TASK_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


async def test_unreachable_broker_is_one_line_within_the_broker_timeout_and_exit_3(
    refused_port: tuple[str, int], tmp_path: Path
) -> None:
    host, port = refused_port
    env = cli_env(tmp_path, {BROKER_URL: f"redis://:{PASSWORD}@{host}:{port}/0"})

    run = await run_cli("enqueue", "smtp.example.com", "--broker-timeout", "1", env=env)

    assert run.code == EXIT_NO_OUTCOME, run
    assert run.stdout == "", run  # no task id: nothing was sent
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(
        f"smtp-session: cannot reach the broker redis://:**@{host}:{port}/0 (--broker-timeout 1 s)"
    ), lines[0]
    assert "refused" in lines[0].lower(), lines[0]
    assert PASSWORD not in run.stderr
    # It kept trying for its second, and stopped there.
    assert 1.0 <= run.elapsed < 1.0 + START_UP, run.elapsed


async def test_unreachable_broker_with_wait_is_the_same_line(
    refused_port: tuple[str, int], tmp_path: Path
) -> None:
    host, port = refused_port
    env = cli_env(tmp_path, {BROKER_URL: f"redis://{host}:{port}/0"})

    run = await run_cli(
        "enqueue", "smtp.example.com", "--wait", "--broker-timeout", "0.5", "--json", env=env
    )

    assert run.code == EXIT_NO_OUTCOME, run
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert "cannot reach the broker" in run.stderr


async def test_a_redis_that_went_down_is_the_same_line_within_the_broker_timeout(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.stop()  # it ran, and is gone: its socket file too
    env = cli_env(tmp_path, {BROKER_URL: redis_server.url})

    run = await run_cli("enqueue", "smtp.example.com", "--wait", "--broker-timeout", "1", env=env)

    assert run.code == EXIT_NO_OUTCOME, run
    assert run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"smtp-session: cannot reach the broker {redis_server.url} "), line
    assert 1.0 <= run.elapsed < 1.0 + START_UP, run.elapsed


async def test_wait_without_a_worker_says_so_and_ends_at_the_wait_timeout(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The task lands in Redis's queue, where no worker looks.
    env = cli_env(tmp_path, {BROKER_URL: redis_server.url})

    run = await run_cli(
        "enqueue", "smtp.example.com", "--wait", "--wait-timeout", "2", "--json", env=env
    )

    assert run.code == EXIT_NO_OUTCOME, run
    assert run.stdout == "", run
    notice, timeout = run.stderr.splitlines()
    # Half the wait, since the wait is shorter than twice the usual 5 s.
    assert notice == (
        "smtp-session: no outcome yet after 1 s; no worker answers on the broker "
        f"{redis_server.url}: start `smtp-session worker` with the same SMTP_SESSION_BROKER_URL"
    )
    assert re.fullmatch(
        rf"smtp-session: no outcome for task {TASK_ID} after 2 s \(--wait-timeout\); "
        "the task is not cancelled",
        timeout,
    ), timeout
    assert 2.0 <= run.elapsed < 2.0 + START_UP, run.elapsed


async def test_wait_with_a_busy_worker_says_the_task_is_queued_or_running(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    # The worker's environment, loopback allowed; `enqueue` with it meets the same broker.
    env = worker_env(tmp_path / "data", {BROKER_URL: redis_server.url})
    worker = start_worker(env=env)
    await asyncio.to_thread(wait_until_ready, celery_client, worker, timeout=START_TIMEOUT)
    silent = await raw_server_factory("silent")

    run = await run_cli(
        "enqueue",
        f"{silent.host}:{silent.port}",
        "--timeout",
        "30",
        "--retries",
        "0",
        "--security",
        "plain",
        "--wait",
        "--wait-timeout",
        "3",
        env=env,
    )

    assert run.code == EXIT_NO_OUTCOME, run
    assert run.stdout == "", run
    assert len(run.stderr.splitlines()) == 2, run.stderr
    notice, timeout = run.stderr.splitlines()
    assert re.fullmatch(
        rf"smtp-session: no outcome yet after 1\.5 s; 1 worker answers on the broker "
        rf"{re.escape(redis_server.url)}: task {TASK_ID} is still queued or running",
        notice,
    ), notice
    assert "after 3 s (--wait-timeout)" in timeout, timeout
    await silent.wait_connections(1, timeout=START_TIMEOUT)  # the worker is on it, as said


async def test_ctrl_c_while_waiting_says_interrupted_and_exits_130(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, {BROKER_URL: redis_server.url})
    started = asyncio.get_running_loop().time()
    process = await start_cli("enqueue", "smtp.example.com", "--wait", env=env)
    assert process.stderr is not None
    # Waiting for sure: the default --wait-timeout (120 s) has it say so after 5 s.
    notice = await asyncio.wait_for(process.stderr.readline(), NOTICE_AFTER + START_UP)
    assert b"no outcome yet after 5 s; no worker answers" in notice, notice
    process.send_signal(signal.SIGINT)
    run = await finish_cli(process, started=started)

    assert run.code == EXIT_INTERRUPTED, run
    assert run.stderr == "smtp-session: interrupted\n", run
    assert run.stdout == ""
