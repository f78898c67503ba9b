"""A Redis result store that restarts while sessions run: no result lost, no client lost.

The sessions end while Redis is away (the gated server greets only then), so their
results cannot be stored at that moment: the worker must keep them until Redis is back,
and every client waiting on them (`enqueue --wait`, `worker.client.result`, a plain
Celery `AsyncResult`) must get them within its own timeout.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from celery import Celery

from smtp_session.tasks.outcome import Outcome
from smtp_session.worker.client import result, submit
from tests.brokers import GatedServer
from tests.cli import finish_cli, start_cli
from tests.integration.conftest import (
    START_TIMEOUT,
    RedisServer,
    WorkerFactory,
    wait_until_ready,
    worker_env,
)

EHLO_NAME = "client.example"
#: Long enough for a session to wait at the gate through the whole restart.
SESSION_TIMEOUT = 30
#: Bound on each client's wait, and on the test's waits for the worker's lines.
WAIT_TIMEOUT = 60.0
#: What the worker logs each time it cannot store a result yet (Celery's own words).
STORE_RETRY_LINE = r"Failed operation _store_result"


async def test_a_redis_restart_while_sessions_run_loses_no_result_and_no_waiting_client(
    redis_server: RedisServer,
    celery_client: Celery,
    start_worker: WorkerFactory,
    gated_server: GatedServer,
    tmp_path: Path,
) -> None:
    env = worker_env(tmp_path / "data", {"SMTP_SESSION_BROKER_URL": redis_server.url})
    worker = start_worker(env=env)
    await asyncio.to_thread(wait_until_ready, celery_client, worker, timeout=START_TIMEOUT)
    address = f"{gated_server.host}:{gated_server.port}"
    fields = {
        "host": gated_server.host,
        "port": gated_server.port,
        "security": "plain",
        "ehlo_name": EHLO_NAME,
        "timeout": SESSION_TIMEOUT,
        "retries": 0,
    }
    started = asyncio.get_running_loop().time()
    cli = await start_cli(
        *("enqueue", address, "--security", "plain", "--ehlo-name", EHLO_NAME),
        *("--timeout", str(SESSION_TIMEOUT), "--retries", "0"),
        *("--wait", "--wait-timeout", str(WAIT_TIMEOUT), "--json"),
        env=env,
    )
    # A web backend whose Celery gives up reconnecting to its result store at once (its
    # default is 20 tries a second apart, longer than most restarts): client.result() waits.
    impatient = Celery(
        "impatient-web-backend",
        broker=redis_server.url,
        backend=redis_server.url,
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    task_id = submit(impatient, **fields)
    waiting = asyncio.create_task(asyncio.to_thread(result, impatient, task_id, WAIT_TIMEOUT))
    await gated_server.wait_connections(2, timeout=WAIT_TIMEOUT)  # both sessions run

    mark = worker.mark()
    redis_server.stop()
    # The worker noticed, then both sessions end and their results find no store.
    await asyncio.to_thread(
        worker.wait_for_line, r"[Cc]onnection to broker lost", timeout=WAIT_TIMEOUT, start=mark
    )
    gated_server.open_gate()
    for _ in range(2):
        mark = worker.mark()
        await asyncio.to_thread(
            worker.wait_for_line, STORE_RETRY_LINE, timeout=WAIT_TIMEOUT, start=mark
        )
    redis_server.start()

    outcome = await waiting
    run = await finish_cli(cli, started=started)
    impatient.close()

    assert outcome.ok, outcome
    assert run.code == 0, run
    assert Outcome.from_dict(run.json()).ok
    assert "Traceback" not in run.stderr and "Retry limit" not in run.stderr, run.stderr
    assert worker.running, worker.output()
    with redis_server.client() as client:
        keys = client.keys("celery-task-meta-*")
        states = [json.loads(client.get(key) or b"{}")["status"] for key in keys]
    assert states == ["SUCCESS", "SUCCESS"], states
