"""The default, embedded broker: a Valkey server the worker runs in its data dir.

No broker URL anywhere: the worker and `enqueue` meet through the data dir alone, and the
broker keeps what Redis keeps: a task a killed worker was running comes back when a
worker starts again on the same data dir, at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import kombu.pools
import pytest
from celery import Celery

from smtp_session.tasks.outcome import Outcome
from smtp_session.worker import embedded_broker
from smtp_session.worker.client import result, submit
from tests.brokers import assert_ran_again
from tests.cli import run_cli
from tests.integration.conftest import START_TIMEOUT, WorkerFactory, ready_worker, worker_env
from tests.servers import RawServerFactory, SmtpServerFactory

EHLO_NAME = "client.example"
RESULT_TIMEOUT = 30.0
HANG_TIMEOUT = 3.0
#: The new worker's start and one more session: far below any visibility timeout (240 s).
REDELIVERED_WITHIN = 30.0
EXIT_NO_OUTCOME = 3
#: The worker's line once its broker answers: before it, there is no broker to ping on.
BROKER_UP = r'"event":"worker\.embedded_broker"'


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def client(data_dir: Path) -> Iterator[Celery]:
    """A Celery app on the data dir's embedded broker and result store."""
    url = embedded_broker.url(data_dir)
    app = Celery("embedded-client", broker=url, backend=url)
    yield app
    app.close()


async def test_enqueue_wait_meets_the_worker_through_the_data_dir(
    start_worker: WorkerFactory,
    client: Celery,
    smtp_server_factory: SmtpServerFactory,
    data_dir: Path,
) -> None:
    env = worker_env(data_dir)
    await ready_worker(start_worker, client, env, after=BROKER_UP)
    server = await smtp_server_factory(mode="plain")

    run = await run_cli(
        *("enqueue", f"{server.host}:{server.port}", "--security", "plain"),
        *("--ehlo-name", EHLO_NAME, "--wait", "--json"),
        env=env,
    )

    assert run.code == 0, run
    outcome = Outcome.from_dict(run.json())
    assert outcome.ok, outcome
    assert server.received("QUIT")
    # Through the server in the data dir, which keeps an append-only file there.
    assert embedded_broker.socket_path(data_dir).is_socket()
    assert list(embedded_broker.folder(data_dir).glob("appendonly*")), "no append-only file"


@pytest.mark.parametrize("whole", [True, False], ids=["whole worker", "main process only"])
async def test_a_worker_killed_mid_task_gets_the_task_again_when_it_restarts(
    start_worker: WorkerFactory,
    client: Celery,
    raw_server_factory: RawServerFactory,
    data_dir: Path,
    whole: bool,
) -> None:
    # Killed whole, the worker takes its broker along; killed alone, it leaves its broker
    # running, which the next worker shuts down before it starts its own.
    env = worker_env(data_dir)
    first = await ready_worker(start_worker, client, env, after=BROKER_UP)
    silent = await raw_server_factory("silent_after_banner")
    fields = {"host": silent.host, "port": silent.port, "security": "plain"}
    task_id = submit(client, **fields, ehlo_name=EHLO_NAME, timeout=HANG_TIMEOUT, retries=0)
    await silent.wait_connections(1, timeout=RESULT_TIMEOUT)  # mid-flight

    if whole:
        first.stop()  # SIGKILL to the worker's whole process group, its broker included
    else:
        os.kill(first.pid, signal.SIGKILL)
        await asyncio.to_thread(first.wait_exit, timeout=START_TIMEOUT)
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    # The connections this process pooled for the broker's URL (kombu's pools are per URL,
    # not per app) die with the broker: a new client, on new pools.
    kombu.pools.reset()  # type: ignore[no-untyped-call]  # kombu is untyped
    url = embedded_broker.url(data_dir)
    with Celery("after-restart", broker=url, backend=url) as fresh:
        await ready_worker(start_worker, fresh, env, after=BROKER_UP)
        outcome = await asyncio.to_thread(result, fresh, task_id, REDELIVERED_WITHIN)

    # The message was still in the broker's unacked set on disk; the new worker put it back
    # in the queue at start and ran it (the server timed it out again).
    elapsed = loop.time() - killed_at
    assert_ran_again(outcome, silent, elapsed=elapsed, within=REDELIVERED_WITHIN)


async def test_enqueue_without_a_worker_says_to_start_one_and_exits_3(data_dir: Path) -> None:
    env = worker_env(data_dir)

    run = await run_cli("enqueue", "smtp.example.com", "--broker-timeout", "1", env=env)

    assert run.code == EXIT_NO_OUTCOME, run
    assert run.stdout == ""
    assert run.stderr == (
        f"smtp-session: cannot reach the embedded broker in {data_dir} (--broker-timeout 1 s): "
        "no worker runs there; start `smtp-session worker` with the same "
        "SMTP_SESSION_DATA_DIR\n"
    ), run.stderr
    assert run.elapsed < START_TIMEOUT
