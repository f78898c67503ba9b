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
from celery.result import AsyncResult

from smtp_session.tasks.outcome import Outcome
from smtp_session.worker.app import RESTORE_INTERVAL, redelivery_timeout
from smtp_session.worker.settings import Settings
from tests.cli import run_cli
from tests.integration.conftest import (
    START_TIMEOUT,
    RedisServer,
    WorkerFactory,
    WorkerProcess,
    child_processes,
    ready_worker,
    running_task,
    wait_until_ready,
    worker_env,
)
from tests.servers import HELD_SESSION_SECONDS, RawServerFactory, SmtpServerFactory

OPEN_TASK = "smtp_session.open"  # the public task name, spelled as a web backend would
BROKER_URL = "SMTP_SESSION_BROKER_URL"
MAX_TIMEOUT = "SMTP_SESSION_MAX_TIMEOUT"
TIMEOUT = "SMTP_SESSION_TIMEOUT"
#: Sessions sent at once to a server that holds each for HELD_SESSION_SECONDS.
HELD_SESSIONS = 50
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


def session_events(
    worker: WorkerProcess, task_id: str, name: str = "session.attempt"
) -> list[dict[str, Any]]:
    """The worker's `name` events (a session.attempt or .result) for that task, in order.

    Waits for the task's `session.result` line first: the worker writes it just before it
    stores the result, and the test's reader thread may not have copied it yet.
    """
    worker.wait_for_line(
        rf'(?=.*"event":"session\.result")(?=.*"{re.escape(task_id)}")', timeout=RESULT_TIMEOUT
    )
    events = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    return [
        event for event in events if event.get("event") == name and event.get("task_id") == task_id
    ]


@pytest.fixture
def redis_worker(
    redis_server: RedisServer, celery_client: Celery, start_worker: WorkerFactory, tmp_path: Path
) -> WorkerProcess:
    """`smtp-session worker --concurrency 2` on Redis, answering pings."""
    worker = start_worker(env=worker_env(tmp_path / "data", {BROKER_URL: redis_server.url}))
    wait_until_ready(celery_client, worker, timeout=START_TIMEOUT)
    return worker


# ----------------------------------------------------------------------------- embedded broker


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
    # Each retry was a new delivery of the same task id (three attempts logged under it),
    # and a caller polling that id finds one final result and nothing else.
    attempts = session_events(redis_worker, result.id)
    assert [event["attempt"] for event in attempts] == [1, 2, 3], redis_worker.output()
    assert result.state == "SUCCESS"
    with redis_server.client() as client:
        assert client.keys("celery-task-meta-*") == [f"celery-task-meta-{result.id}".encode()]


def send_opens(client: Celery, count: int, **fields: Any) -> list[AsyncResult]:
    return [client.send_task(OPEN_TASK, kwargs=fields) for _ in range(count)]


async def test_fifty_held_sessions_run_at_once_in_one_worker_process(
    redis_server: RedisServer,
    celery_client: Celery,
    start_worker: WorkerFactory,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    server = await raw_server_factory("held_session")
    # One server stands for many here: lift the bound per destination address (20).
    bound = {BROKER_URL: redis_server.url, "SMTP_SESSION_MAX_PER_DESTINATION": str(HELD_SESSIONS)}
    env = worker_env(tmp_path / "data", bound)
    worker = await ready_worker(start_worker, celery_client, env, concurrency=None)
    loop = asyncio.get_running_loop()
    started = loop.time()

    results = send_opens(
        celery_client, HELD_SESSIONS, **plain_request(server.host, server.port, retries=0)
    )
    outcomes = [await outcome_of(result) for result in results]

    elapsed = loop.time() - started
    assert [outcome["ok"] for outcome in outcomes] == [True] * HELD_SESSIONS, outcomes
    # One at a time, fifty sessions held 1 s each take 50 s; at once, about one hold.
    assert elapsed < HELD_SESSIONS * HELD_SESSION_SECONDS / 5, elapsed
    assert server.peak_open_connections >= HELD_SESSIONS // 2, server.peak_open_connections
    assert child_processes(worker.pid) == []  # one process did it all


async def test_a_slow_servers_task_does_not_delay_a_fast_servers_result(
    redis_worker: WorkerProcess,
    celery_client: Celery,
    raw_server_factory: RawServerFactory,
    smtp_server_factory: SmtpServerFactory,
) -> None:
    slow = await raw_server_factory("silent")
    fast = await smtp_server_factory(mode="plain")
    slow_result = celery_client.send_task(
        OPEN_TASK, kwargs=plain_request(slow.host, slow.port, timeout=HANG_TIMEOUT, retries=0)
    )
    await slow.wait_connections(1, timeout=RESULT_TIMEOUT)  # the slow session is running

    fast_outcome = await outcome_of(
        celery_client.send_task(OPEN_TASK, kwargs=plain_request(fast.host, fast.port)),
        timeout=HANG_TIMEOUT,
    )

    assert fast_outcome["ok"] is True, fast_outcome
    assert not slow_result.ready()  # still waiting for its greeting
    slow_outcome = await outcome_of(slow_result)
    assert slow_outcome["error"] == "timeout", slow_outcome


async def test_a_worker_killed_as_a_whole_gets_its_task_back_after_a_restart(
    redis_server: RedisServer,
    celery_client: Celery,
    start_worker: WorkerFactory,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    # The longest timeout this worker accepts sets how long Redis keeps a task of a dead
    # worker before handing it out again: short here, so the test waits under a minute.
    limits = {MAX_TIMEOUT: str(HANG_TIMEOUT), TIMEOUT: str(HANG_TIMEOUT)}
    env = worker_env(tmp_path / "data", {BROKER_URL: redis_server.url, **limits})
    settings = Settings(max_timeout=HANG_TIMEOUT, timeout=HANG_TIMEOUT)
    bound = redelivery_timeout(settings, []) + 2 * RESTORE_INTERVAL
    first = await ready_worker(start_worker, celery_client, env)
    server = await raw_server_factory("silent")
    result = celery_client.send_task(
        OPEN_TASK, kwargs=plain_request(server.host, server.port, timeout=HANG_TIMEOUT, retries=0)
    )
    await server.wait_connections(1, timeout=RESULT_TIMEOUT)  # mid-flight

    first.stop()  # SIGKILL to the whole worker: no chance to hand anything back
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await ready_worker(start_worker, celery_client, env)
    outcome = await outcome_of(result, timeout=bound)

    # Delivered again once Redis's visibility timeout ran out, run to its end by the
    # new worker: the silent server times it out again (probed for TLS near the end, a
    # connection of its own), and that outcome arrives.
    assert loop.time() - killed_at <= bound
    assert server.connections_accepted == 3
    assert (outcome["error"], outcome["attempts"]) == ("timeout", 1), outcome
    assert result.state == "SUCCESS"


async def test_sigterm_finishes_the_running_sessions_and_leaves_the_rest_queued(
    redis_server: RedisServer,
    celery_client: Celery,
    start_worker: WorkerFactory,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    server = await raw_server_factory("held_session")
    env = worker_env(tmp_path / "data", {BROKER_URL: redis_server.url})
    first = await ready_worker(start_worker, celery_client, env)
    results = send_opens(celery_client, 6, **plain_request(server.host, server.port, retries=0))
    await server.wait_connections(2, timeout=RESULT_TIMEOUT)  # two running, four queued

    os.kill(first.pid, signal.SIGTERM)
    await blocking(lambda: first.wait_exit(timeout=RESULT_TIMEOUT))

    # The two running sessions ran to their end before the worker left.
    assert [result.ready() for result in results].count(True) == 2
    await ready_worker(start_worker, celery_client, env)
    outcomes = [await outcome_of(result) for result in results]
    assert [outcome["ok"] for outcome in outcomes] == [True] * 6, outcomes
    assert server.connections_accepted == 6  # none lost, none run twice


async def test_redis_restart_worker_reconnects_and_the_next_task_succeeds(
    redis_server: RedisServer,
    celery_client: Celery,
    start_worker: WorkerFactory,
    smtp_server_factory: SmtpServerFactory,
    tmp_path: Path,
) -> None:
    # Started the other documented way, `celery -A smtp_session.worker.app worker`.
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

    # A new client: what is under test is the worker coming back, not the result
    # subscription of a client that lived through the restart (issue 16 is about that).
    with Celery("web-backend-after", broker=redis_server.url, backend=redis_server.url) as fresh:
        after = await outcome_of(fresh.send_task(OPEN_TASK, kwargs=request))

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
        # A result, not a task failure, and never a retry loop: no attempt, one result.
        assert result.state == "SUCCESS"
    for result, _ in results:
        assert session_events(redis_worker, result.id) == []
        assert len(session_events(redis_worker, result.id, "session.result")) == 1


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
        "ca_pem": Path(ca_pem_path).read_text(),  # a tenant's CA travels as text
        "credentials": CREDENTIALS_REF,
        "ehlo_name": EHLO_NAME,
    }
    # On the command line the CA is a file, which enqueue reads and sends as ca_pem.
    cli_fields = {**tls_fields, "ca_pem": ca_pem_path}
    monitor = redis_server.monitor()
    try:
        # Authenticates: the worker resolved the reference from its own environment.
        run = await run_cli(
            "enqueue",
            f"localhost:{smtp.port}",
            *(f"--{name.replace('_', '-')}={value}" for name, value in cli_fields.items()),
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
    assert len(session_events(worker, retried.id)) == 2
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
