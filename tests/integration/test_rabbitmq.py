"""The worker on a real RabbitMQ (Debian's rabbitmq-server, started by the tests).

Results go to the worker's own file backend (`enqueue` on the same data dir) or to Redis
(a web backend's Celery app: broker AMQP, backend Redis), as docs/tasks.md says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from smtp_session.tasks.outcome import Outcome
from smtp_session.worker.client import result, submit
from tests.brokers import GatedServer, assert_ran_again
from tests.cli import run_cli
from tests.integration.conftest import (
    RedisServer,
    WorkerFactory,
    ready_worker,
    worker_env,
)
from tests.rabbitmq import RabbitMQServer
from tests.servers import RawServerFactory, SmtpServerFactory

BROKER_URL = "SMTP_SESSION_BROKER_URL"
RESULT_BACKEND = "SMTP_SESSION_RESULT_BACKEND"
EHLO_NAME = "client.example"
RESULT_TIMEOUT = 60.0
#: The deadline of a session meant to hang: long enough to kill its worker mid-flight.
HANG_TIMEOUT = 3.0
#: A killed worker's messages come back when its connection drops, not after a timeout:
#: the new worker's start and one more session are all the wait.
REDELIVERED_WITHIN = 30.0
#: Sessions sent across a broker restart: two run, two wait in the worker's prefetch.
RESTART_SESSIONS = 4


def plain_fields(host: str, port: int, **fields: object) -> dict[str, object]:
    return {"host": host, "port": port, "security": "plain", "ehlo_name": EHLO_NAME, **fields}


@pytest.fixture
def web_backend(rabbitmq: RabbitMQServer, redis_server: RedisServer) -> Iterator[Celery]:
    """A web backend's Celery app: the broker is RabbitMQ, the result store Redis."""
    app = Celery("web-backend", broker=rabbitmq.url, backend=redis_server.url)
    yield app
    app.close()


async def test_enqueue_wait_on_rabbitmq_reads_the_workers_file_results(
    rabbitmq: RabbitMQServer,
    start_worker: WorkerFactory,
    smtp_server_factory: SmtpServerFactory,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    env = worker_env(data_dir, {BROKER_URL: rabbitmq.url})
    with Celery("probe", broker=rabbitmq.url) as probe:
        await ready_worker(start_worker, probe, env)
    server = await smtp_server_factory(mode="plain")

    run = await run_cli(
        *("enqueue", f"{server.host}:{server.port}", "--security", "plain"),
        *("--ehlo-name", EHLO_NAME, "--wait", "--json"),
        env=env,
    )

    assert run.code == 0, run
    assert Outcome.from_dict(run.json()).ok
    assert server.received("QUIT")
    assert list((data_dir / "results").glob("celery-task-meta-*")), "no result file"


async def test_a_sigkilled_worker_s_task_is_delivered_again_at_once(
    rabbitmq: RabbitMQServer,
    redis_server: RedisServer,
    web_backend: Celery,
    start_worker: WorkerFactory,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    env = worker_env(
        tmp_path / "data", {BROKER_URL: rabbitmq.url, RESULT_BACKEND: redis_server.url}
    )
    first = await ready_worker(start_worker, web_backend, env)
    silent = await raw_server_factory("silent_after_banner")
    task_id = submit(
        web_backend, **plain_fields(silent.host, silent.port, timeout=HANG_TIMEOUT, retries=0)
    )
    await silent.wait_connections(1, timeout=RESULT_TIMEOUT)  # mid-flight

    first.stop()  # SIGKILL to the whole worker
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await ready_worker(start_worker, web_backend, env)
    outcome = await asyncio.to_thread(result, web_backend, task_id, REDELIVERED_WITHIN)

    # RabbitMQ requeued it when the dead worker's connection dropped: the new worker ran it
    # to its end at once (the server timed it out again), no visibility timeout.
    elapsed = loop.time() - killed_at
    assert_ran_again(outcome, silent, elapsed=elapsed, within=REDELIVERED_WITHIN)


async def test_a_rabbitmq_restart_mid_run_loses_nothing(
    rabbitmq: RabbitMQServer,
    redis_server: RedisServer,
    web_backend: Celery,
    start_worker: WorkerFactory,
    gated_server: GatedServer,
    tmp_path: Path,
) -> None:
    env = worker_env(
        tmp_path / "data", {BROKER_URL: rabbitmq.url, RESULT_BACKEND: redis_server.url}
    )
    worker = await ready_worker(start_worker, web_backend, env)
    fields = plain_fields(gated_server.host, gated_server.port, timeout=30, retries=0)
    task_ids = [submit(web_backend, **fields) for _ in range(RESTART_SESSIONS)]
    await gated_server.wait_connections(2, timeout=RESULT_TIMEOUT)  # two run, two wait

    mark = worker.mark()
    rabbitmq.stop()
    await asyncio.to_thread(
        worker.wait_for_line, r"[Cc]onnection to broker lost", timeout=RESULT_TIMEOUT, start=mark
    )
    gated_server.open_gate()  # the running sessions end while the broker is away
    rabbitmq.start()

    outcomes = [
        await asyncio.to_thread(result, web_backend, task_id, RESULT_TIMEOUT)
        for task_id in task_ids
    ]
    assert all(isinstance(outcome, Outcome) and outcome.ok for outcome in outcomes), outcomes
    assert worker.running
    # At least once: the two that ran while the broker was away ran again, at most.
    assert RESTART_SESSIONS <= gated_server.connections_accepted <= RESTART_SESSIONS + 2
