"""The fleet side on a real worker: beat over a targets file, check_target, sweep, the client."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from celery import Celery

from smtp_session.tasks.contract import CHECK_TARGET_TASK, SWEEP_TASK
from smtp_session.tasks.errors import InvalidRequest
from smtp_session.tasks.outcome import Outcome
from smtp_session.worker.client import result, submit
from tests.integration.conftest import (
    START_TIMEOUT,
    RedisServer,
    WorkerFactory,
    WorkerProcess,
    child_processes,
    wait_until_ready,
    worker_env,
)
from tests.servers import SmtpServerFactory

RESULT_TIMEOUT = 30.0
EHLO_NAME = "client.example"
#: Beat's shortest useful interval here: both targets must come round twice in the wait.
INTERVAL = 1
BEAT_WAIT = 30.0


def targets_file(path: Path, servers: dict[str, int]) -> Path:
    lines = [
        "[defaults]",
        'security = "plain"',
        "retries = 0",
        "timeout = 5",
        f'ehlo_name = "{EHLO_NAME}"',
        f"interval = {INTERVAL}",
    ]
    for name, port in servers.items():
        lines += ["[[targets]]", f'name = "{name}"', 'host = "127.0.0.1"', f"port = {port}"]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _start(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    tmp_path: Path,
    targets: Path,
    *,
    beat: bool = False,
) -> WorkerProcess:
    env = worker_env(
        tmp_path / "data",
        {"SMTP_SESSION_BROKER_URL": redis_server.url, "SMTP_SESSION_TARGETS": str(targets)},
    )
    worker = start_worker(env=env, beat=beat)
    await asyncio.to_thread(wait_until_ready, celery_client, worker, timeout=START_TIMEOUT)
    return worker


async def test_beat_checks_every_target_on_schedule(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    smtp_server_factory: SmtpServerFactory,
    tmp_path: Path,
) -> None:
    first = await smtp_server_factory(mode="plain")
    second = await smtp_server_factory(mode="plain")
    targets = targets_file(tmp_path / "targets.toml", {"first": first.port, "second": second.port})
    await _start(start_worker, celery_client, redis_server, tmp_path, targets, beat=True)
    # Nothing is sent by the test: only beat can make these sessions, twice each.
    await first.wait_connections(2, timeout=BEAT_WAIT)
    await second.wait_connections(2, timeout=BEAT_WAIT)
    assert first.received("QUIT")
    assert second.received("QUIT")


async def test_a_second_worker_on_the_same_data_dir_refuses_and_leaves_the_first_alone(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    smtp_server_factory: SmtpServerFactory,
    tmp_path: Path,
) -> None:
    server = await smtp_server_factory(mode="plain")
    targets = targets_file(tmp_path / "targets.toml", {"only": server.port})
    first = await _start(start_worker, celery_client, redis_server, tmp_path, targets, beat=True)
    await server.wait_connections(1, timeout=BEAT_WAIT)

    second = start_worker(env=first.env, beat=True)
    code = await asyncio.to_thread(second.wait_exit, timeout=START_TIMEOUT)

    assert code == 2
    refusal = second.wait_for_line("worker.data_dir_in_use", timeout=START_TIMEOUT)
    assert f"another worker (pid {first.pid}) runs on {tmp_path / 'data'}" in refusal
    assert not [line for line in second.lines if "beat: Starting" in line]
    # The first goes on checking; its beat is a thread, not a process that could be orphaned.
    seen = server.connections_accepted
    await server.wait_connections(seen + 2, timeout=BEAT_WAIT)
    assert child_processes(first.pid) == []


async def test_celerys_own_beat_flag_is_refused(
    start_worker: WorkerFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = worker_env(tmp_path / "data", {"SMTP_SESSION_BROKER_URL": redis_server.url})
    worker = start_worker(env=env, celery_cli=True, beat=True)

    code = await asyncio.to_thread(worker.wait_exit, timeout=START_TIMEOUT)

    assert code == 2
    refusal = worker.wait_for_line("worker.beat_refused", timeout=START_TIMEOUT)
    assert "use `smtp-session worker --beat`" in refusal
    assert not [line for line in worker.lines if "beat: Starting" in line]


async def test_check_target_and_sweep(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    smtp_server_factory: SmtpServerFactory,
    tmp_path: Path,
) -> None:
    up = await smtp_server_factory(mode="plain")
    targets = targets_file(tmp_path / "targets.toml", {"up": up.port, "down": 1})
    await _start(start_worker, celery_client, redis_server, tmp_path, targets)

    checked = celery_client.send_task(CHECK_TARGET_TASK, kwargs={"name": "up"})
    outcome = await asyncio.to_thread(checked.get, timeout=RESULT_TIMEOUT)
    assert (outcome["ok"], outcome["target"], outcome["port"]) == (True, "up", up.port)

    unknown = celery_client.send_task(CHECK_TARGET_TASK, kwargs={"name": "nope"})
    outcome = await asyncio.to_thread(unknown.get, timeout=RESULT_TIMEOUT)
    assert (outcome["error"], outcome["err_message"]) == (
        "invalid_request",
        "name: no target 'nope' in the targets file",
    )

    swept = celery_client.send_task(SWEEP_TASK, kwargs={"names": ["up", "down", "nope"]})
    summary = await asyncio.to_thread(swept.get, timeout=RESULT_TIMEOUT)
    assert (summary["total"], summary["ok"], summary["failed"]) == (3, 1, 2)
    errors = {item["target"]: item["error"] for item in summary["outcomes"]}
    assert errors == {"up": None, "down": "refused", None: "invalid_request"}

    everything = celery_client.send_task(SWEEP_TASK)
    summary = await asyncio.to_thread(everything.get, timeout=RESULT_TIMEOUT)
    assert sorted(item["target"] for item in summary["outcomes"]) == ["down", "up"]


async def test_client_validates_submits_and_reads_the_outcome(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    smtp_server_factory: SmtpServerFactory,
    tmp_path: Path,
) -> None:
    server = await smtp_server_factory(mode="plain")
    targets = targets_file(tmp_path / "targets.toml", {"unused": server.port})
    await _start(start_worker, celery_client, redis_server, tmp_path, targets)
    queued_before = redis_server.client().llen("celery")

    with pytest.raises(InvalidRequest, match="port: input should be less than or equal to 65535"):
        submit(celery_client, host=server.host, port=70000)
    with pytest.raises(InvalidRequest, match="ca_file: is not accepted from the queue"):
        submit(celery_client, host=server.host, ca_file="/etc/passwd")
    assert redis_server.client().llen("celery") == queued_before  # nothing was enqueued

    task_id = submit(
        celery_client, host=server.host, port=server.port, security="plain", ehlo_name=EHLO_NAME
    )
    outcome = await asyncio.to_thread(result, celery_client, task_id, RESULT_TIMEOUT)
    assert isinstance(outcome, Outcome)
    assert outcome.ok
    assert (outcome.host, outcome.port, outcome.attempts) == (server.host, server.port, 1)


async def test_a_celery_worker_with_an_unusable_ca_file_stops_naming_it(
    start_worker: WorkerFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)  # a blocking read would hang the worker's first session, not its start
    env = worker_env(
        tmp_path / "data",
        {"SMTP_SESSION_BROKER_URL": redis_server.url, "SMTP_SESSION_CA_FILE": str(fifo)},
    )
    worker = start_worker(env=env, celery_cli=True)

    code = await asyncio.to_thread(worker.wait_exit, timeout=START_TIMEOUT)

    assert code == 2
    refusal = worker.wait_for_line("worker.invalid_setting", timeout=START_TIMEOUT)
    assert "SMTP_SESSION_CA_FILE" in refusal and "is not a regular file" in refusal
