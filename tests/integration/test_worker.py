"""The Celery worker as it is deployed: a real worker process, a real broker, real servers.

The SMTP servers run in the test's event loop; everything that blocks on Celery (a
result's ``get()``, a control broadcast) runs in a thread through ``asyncio.to_thread``,
so the loop keeps serving while the worker talks to them. The embedded broker is driven
through the ``enqueue`` command, Redis through a Celery client configured the way a web
backend would (broker URL, result backend URL, task name: nothing from this project).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from celery import Celery

from tasks.outcome import Outcome
from tests.cli import run_cli
from tests.integration.conftest import (
    START_TIMEOUT,
    RedisServer,
    WorkerFactory,
    WorkerProcess,
    running_task,
    wait_until_ready,
    worker_env,
)
from tests.servers import RawServerFactory, SmtpServerFactory

OPEN_TASK = "smtp_session.open"  # the public task name, spelled as a web backend would
BROKER_URL = "SMTP_SESSION_BROKER_URL"
#: Keeps the worker off DNS for its EHLO name (socket.getfqdn may be slow in a sandbox).
EHLO_NAME = "client.example"
#: Bound on waiting for one task's result. The slowest task below is a killed run plus a
#: re-delivered 3 s timeout; a 421 with two retries takes at most 1 s + 2 s of backoff.
RESULT_TIMEOUT = 30.0
#: Per-attempt deadline for sessions meant to hang (a silent server): short, but long
#: enough to find the running task and kill its pool process first.
HANG_TIMEOUT = 3.0

USER = "alice"
#: Random per run, so that finding it anywhere cannot be a coincidence.
PASSWORD = f"pw-{secrets.token_hex(12)}"
CREDENTIALS_REF = "tenant-42"
CREDENTIALS_ENV = {"SMTP_SESSION_SECRET_TENANT_42": f"{USER}:{PASSWORD}"}

_T = TypeVar("_T")


def plain_request(host: str, port: int, **fields: Any) -> dict[str, Any]:
    """Task kwargs for a plaintext session to host:port (plus any other fields)."""
    return {"host": host, "port": port, "security": "plain", "ehlo_name": EHLO_NAME, **fields}


async def blocking(call: Callable[[], _T]) -> _T:
    """Run a blocking Celery call in a thread while the loop serves the test's servers."""
    return await asyncio.to_thread(call)


async def outcome_of(result: Any, *, timeout: float = RESULT_TIMEOUT) -> dict[str, Any]:
    """The task's return value, read back through the result backend."""
    value = await blocking(lambda: result.get(timeout=timeout, propagate=True))
    assert isinstance(value, dict), value
    Outcome.from_dict(value)  # the Outcome schema, field by field
    return value


def retry_lines(worker: WorkerProcess, task_id: str) -> list[str]:
    """Celery's "Task name[id] retry: ..." lines for that task."""
    pattern = re.compile(rf"\[{re.escape(task_id)}\] retry\b")
    return [line for line in worker.output().splitlines() if pattern.search(line)]


@pytest.fixture
def redis_worker(
    redis_server: RedisServer, celery_client: Celery, start_worker: WorkerFactory, tmp_path: Path
) -> WorkerProcess:
    """`smtp-session worker --concurrency 2` on Redis, answering pings."""
    worker = start_worker(env=worker_env(tmp_path / "data", {BROKER_URL: redis_server.url}))
    wait_until_ready(celery_client, worker, timeout=START_TIMEOUT)
    return worker


# ----------------------------------------------------------------------------- embedded broker


async def test_embedded_broker_enqueue_wait_prints_the_outcome(
    start_worker: WorkerFactory, smtp_server_factory: SmtpServerFactory, tmp_path: Path
) -> None:
    # No broker URL: the worker and `enqueue` meet in the filesystem broker and the
    # file result backend under the shared data dir, with no server of any kind.
    data_dir = tmp_path / "data"
    env = worker_env(data_dir)
    start_worker(env=env)
    server = await smtp_server_factory(mode="plain")

    run = await run_cli(
        "enqueue",
        f"{server.host}:{server.port}",
        "--security",
        "plain",
        "--ehlo-name",
        EHLO_NAME,
        "--wait",
        "--wait-timeout",
        str(RESULT_TIMEOUT),
        "--json",
        env=env,
    )

    assert run.code == 0, run
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout
    outcome = Outcome.from_dict(json.loads(lines[0]))
    assert outcome.ok, outcome
    assert (outcome.host, outcome.port, outcome.attempts) == (server.host, server.port, 1)
    assert server.received("EHLO")
    assert server.received("QUIT")
    # The result went through the embedded file backend, not a shortcut.
    assert list((data_dir / "results").glob("celery-task-meta-*")), "no result file"


# ----------------------------------------------------------------------------- Redis


async def test_redis_send_task_outcome_read_back(
    redis_worker: WorkerProcess,
    celery_client: Celery,
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")

    result = celery_client.send_task(OPEN_TASK, kwargs=plain_request(server.host, server.port))
    outcome = await outcome_of(result)

    assert outcome["ok"] is True, outcome
    assert outcome["err_message"] == ""
    assert (outcome["host"], outcome["port"], outcome["attempts"]) == (server.host, server.port, 1)
    assert result.state == "SUCCESS"
    assert server.received("QUIT")


async def test_421_is_retried_through_celery_with_the_same_task_id(
    redis_server: RedisServer,
    redis_worker: WorkerProcess,
    celery_client: Celery,
    raw_server_factory: RawServerFactory,
) -> None:
    server = await raw_server_factory("banner_421")

    result = celery_client.send_task(
        OPEN_TASK, kwargs=plain_request(server.host, server.port, retries=2)
    )
    outcome = await outcome_of(result)

    assert outcome["ok"] is False
    assert outcome["error"] == "smtp_transient", outcome
    assert outcome["smtp_code"] == 421
    assert outcome["attempts"] == 3
    assert server.connections_accepted == 3
    # Each retry was a new delivery of the same task id (two "retry" log lines for it),
    # and a caller polling that id finds one final result and nothing else.
    assert len(retry_lines(redis_worker, result.id)) == 2, redis_worker.output()
    assert result.state == "SUCCESS"
    with redis_server.client() as client:
        assert client.keys("celery-task-meta-*") == [f"celery-task-meta-{result.id}".encode()]


def _parent_pid(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


async def test_pool_process_killed_mid_task_runs_it_again(
    redis_worker: WorkerProcess,
    celery_client: Celery,
    raw_server_factory: RawServerFactory,
) -> None:
    server = await raw_server_factory("silent")
    result = celery_client.send_task(
        OPEN_TASK, kwargs=plain_request(server.host, server.port, timeout=HANG_TIMEOUT, retries=0)
    )
    # Connected and waiting for a greeting that never comes: the task is mid-flight.
    await server.wait_connections(1, timeout=RESULT_TIMEOUT)
    running = await blocking(lambda: running_task(celery_client, result.id, timeout=RESULT_TIMEOUT))
    pool_pid = running["worker_pid"]
    assert _parent_pid(pool_pid) == redis_worker.pid  # a pool process, not the worker itself

    os.kill(pool_pid, signal.SIGKILL)
    outcome = await outcome_of(result)

    # Re-delivered (late ack + reject on worker lost) and run to the end by another
    # pool process: the silent server times it out again, and that outcome arrives.
    assert server.connections_accepted >= 2
    assert outcome["error"] == "timeout", outcome
    assert outcome["attempts"] == 1
    assert result.state == "SUCCESS"
    assert redis_worker.running
    assert re.search(r"WorkerLostError|SIGKILL", redis_worker.output())


async def test_redis_restart_worker_reconnects_and_the_next_task_succeeds(
    redis_server: RedisServer,
    celery_client: Celery,
    start_worker: WorkerFactory,
    smtp_server_factory: SmtpServerFactory,
    tmp_path: Path,
) -> None:
    # Started the other documented way, `celery -A worker.app worker`.
    worker = start_worker(
        env=worker_env(tmp_path / "data", {BROKER_URL: redis_server.url}), celery_cli=True
    )
    await blocking(lambda: wait_until_ready(celery_client, worker, timeout=START_TIMEOUT))
    server = await smtp_server_factory(mode="plain")
    request = plain_request(server.host, server.port)
    before = await outcome_of(celery_client.send_task(OPEN_TASK, kwargs=request))
    assert before["ok"] is True, before

    mark = worker.mark()
    redis_server.stop()
    # Restart only once the worker has noticed: otherwise this would test nothing.
    await blocking(
        lambda: worker.wait_for_line(
            r"Cannot connect to|[Cc]onnection to broker lost", timeout=RESULT_TIMEOUT, start=mark
        )
    )
    redis_server.start()

    after = await outcome_of(celery_client.send_task(OPEN_TASK, kwargs=request))

    assert after["ok"] is True, after
    assert worker.running
    assert server.connections_accepted == 2


#: What a web backend might send by mistake (args, kwargs), and the field the message names.
INVALID_CALLS: list[tuple[list[Any], dict[str, Any], str]] = [
    ([], {"host": "127.0.0.1", "bogus": 1}, "bogus"),
    ([], {"host": "127.0.0.1", "port": "x"}, "port"),
    ([], {"host": ""}, "host"),
    ([], {"host": "127.0.0.1", "retries": [1]}, "retries"),
    ([], {}, "host"),
    (["127.0.0.1", 25], {}, "request"),
    # A kwarg named "self" is not here: it collides inside Celery's own Task.__call__
    # (a TypeError before any code of ours runs), whatever the task's signature.
]


async def test_invalid_kwargs_are_an_invalid_request_result(
    redis_worker: WorkerProcess, celery_client: Celery
) -> None:
    results = [
        (celery_client.send_task(OPEN_TASK, args=args, kwargs=kwargs), field)
        for args, kwargs, field in INVALID_CALLS
    ]

    for result, field in results:
        outcome = await outcome_of(result)
        assert outcome["ok"] is False
        assert outcome["error"] == "invalid_request", outcome
        assert outcome["stage"] == "validate"
        assert outcome["err_message"].startswith(f"{field}:"), outcome
        assert outcome["retryable"] is False
        # A result, not a task failure, and never a retry loop.
        assert result.state == "SUCCESS"
        assert retry_lines(redis_worker, result.id) == []


# ----------------------------------------------------------------------------- secrets


def encoded_forms(secret: str) -> list[str]:
    """``secret`` as it reads in plain text and inside base64 at each of the 3 alignments.

    Kombu base64-encodes message bodies on Redis, so a secret in task kwargs would not
    show in plain text; these substrings would.
    """
    raw = secret.encode()
    forms = [secret]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        # Only the characters made of secret bits alone: not the prefix, not the tail.
        forms.append(encoded[-(-8 * shift // 6) : 8 * (shift + len(raw)) // 6])
    return forms


def test_encoded_forms_find_a_secret_inside_base64() -> None:
    for prefix in (b"", b"x", b"xy"):
        document = base64.b64encode(prefix + f'{{"password": "{PASSWORD}"}}'.encode()).decode()
        assert any(form in document for form in encoded_forms(PASSWORD)), prefix


async def test_only_the_credentials_reference_travels(
    redis_server: RedisServer,
    celery_client: Celery,
    start_worker: WorkerFactory,
    smtp_server_factory: SmtpServerFactory,
    raw_server_factory: RawServerFactory,
    ca_pem_path: str,
    tmp_path: Path,
) -> None:
    # The enqueueing side has the secret in its environment too (one machine): still,
    # only the reference may leave it.
    env = worker_env(tmp_path / "data", {BROKER_URL: redis_server.url, **CREDENTIALS_ENV})
    worker = start_worker(env=env)
    await blocking(lambda: wait_until_ready(celery_client, worker, timeout=START_TIMEOUT))
    smtp = await smtp_server_factory(mode="starttls", auth={USER: PASSWORD})
    transient = await raw_server_factory("banner_421")
    silent = await raw_server_factory("silent")
    tls_fields: dict[str, Any] = {
        "security": "starttls",
        "trust": "portable",
        "ca_file": ca_pem_path,
        "credentials": CREDENTIALS_REF,
        "ehlo_name": EHLO_NAME,
    }
    monitor = redis_server.monitor()
    try:
        # Authenticates: the worker resolved the reference from its own environment.
        run = await run_cli(
            "enqueue",
            f"localhost:{smtp.port}",
            *(f"--{name.replace('_', '-')}={value}" for name, value in tls_fields.items()),
            "--wait",
            "--json",
            env=env,
        )
        # Retried: the worker itself publishes the retry message, kwargs included.
        retried = celery_client.send_task(
            OPEN_TASK,
            kwargs={"host": "localhost", "port": transient.port, "retries": 1} | tls_fields,
        )
        # Hangs: long enough to ask `inspect active` what the running task holds.
        hanging = celery_client.send_task(
            OPEN_TASK,
            kwargs={"host": "localhost", "port": silent.port, "timeout": HANG_TIMEOUT, "retries": 0}
            | tls_fields,
        )
        outcomes = [await outcome_of(retried)]
        await silent.wait_connections(1, timeout=RESULT_TIMEOUT)
        running = await blocking(
            lambda: running_task(celery_client, hanging.id, timeout=RESULT_TIMEOUT)
        )
        outcomes.append(await outcome_of(hanging))
    finally:
        traffic = monitor.close()

    assert run.code == 0, run
    authenticated = json.loads(run.stdout)
    assert authenticated["ok"] is True, authenticated
    assert authenticated["authenticated"] is True
    assert [(attempt.username, attempt.success) for attempt in smtp.auth_attempts] == [(USER, True)]
    assert (outcomes[0]["error"], outcomes[0]["attempts"]) == ("smtp_transient", 2), outcomes[0]
    assert len(retry_lines(worker, retried.id)) == 1
    assert outcomes[1]["error"] == "timeout", outcomes[1]
    # `celery inspect active` shows the running task's kwargs: the reference, only.
    assert running["kwargs"]["credentials"] == CREDENTIALS_REF
    # The reference travelled (so the record is of the right traffic) ...
    assert CREDENTIALS_REF in traffic
    assert hanging.id in traffic
    # ... and the secret never did: not in messages, retries, results or control replies.
    for form in encoded_forms(PASSWORD):
        assert form not in traffic, f"secret found in Redis traffic as {form!r}"
        assert form not in repr(outcomes)
        assert form not in run.stdout + run.stderr
        assert form not in repr(running)
        assert form not in worker.output()
