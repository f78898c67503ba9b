"""The Celery tasks run in this process (Celery's eager mode) against loopback servers.

The worker tests run the same tasks in a real worker subprocess; these reach the task
code in-process, where a failing assertion points at the line, and cover its branches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from celery import Celery, signals

from smtp_session.tasks import celery_tasks  # registers the tasks on every app
from smtp_session.tasks.contract import CHECK_TARGET_TASK, OPEN_TASK, SWEEP_TASK
from smtp_session.tasks.request import parse_request
from smtp_session.tasks.session import MAX_BACKOFF
from smtp_session.worker.settings import Settings
from tests.servers import LOOPBACK, RawServerFactory, SmtpServerFactory

EHLO_NAME = "client.example"
MAX_TIMEOUT = 30
SHORT_LIMIT = 0.3


@pytest.fixture
def eager_app() -> Iterator[Celery]:
    """An app whose tasks run inline, with worker-like settings and no broker."""
    app = Celery("eager", set_as_current=True)
    # Not propagating lets apply() run a retry inline, as a worker would run it later.
    app.conf.update(task_always_eager=True, task_eager_propagates=False)
    # The test servers listen on loopback, which the operator allows here.
    app.smtp_session_settings = Settings(
        retries=0, timeout=5.0, allow_networks="127.0.0.0/8", allow_ports="1-65535"
    )
    app.smtp_session_targets = {}
    yield app
    app.close()


async def run(app: Celery, task_name: str, **kwargs: Any) -> dict[str, Any]:
    # The task blocks on the worker's own event loop, so it runs in a thread while this
    # loop serves; it is looked up here because Celery's "current app" is per thread.
    task = app.tasks[task_name]
    outcome = await asyncio.to_thread(lambda: task.apply(kwargs=kwargs).get())
    assert isinstance(outcome, dict)
    return outcome


async def test_open_applies_settings_defaults_under_the_request(
    eager_app: Celery, smtp_server_factory: SmtpServerFactory
) -> None:
    server = await smtp_server_factory(mode="plain")
    outcome = await run(
        eager_app,
        OPEN_TASK,
        host=LOOPBACK,
        port=server.port,
        security="plain",
        ehlo_name=EHLO_NAME,
    )
    assert outcome["ok"]
    assert outcome["attempts"] == 1


async def test_open_retries_a_421_through_celery(
    eager_app: Celery, raw_server_factory: RawServerFactory
) -> None:
    server = await raw_server_factory("banner_421")
    outcome = await run(
        eager_app, OPEN_TASK, host=LOOPBACK, port=server.port, security="plain", retries=1
    )
    assert (outcome["error"], outcome["attempts"]) == ("smtp_transient", 2)
    assert server.connections_accepted == 2


async def test_a_timeout_above_the_workers_maximum_is_an_invalid_request(
    eager_app: Celery,
) -> None:
    outcome = await run(eager_app, OPEN_TASK, host=LOOPBACK, timeout=MAX_TIMEOUT + 1)
    assert outcome["error"] == "invalid_request"
    assert outcome["err_message"] == "timeout: must be at most 30 s here (SMTP_SESSION_MAX_TIMEOUT)"


async def test_a_task_past_its_time_limit_is_an_internal_outcome(
    eager_app: Celery, raw_server_factory: RawServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A limit below the session's own deadlines: what only a bug would reach.
    monkeypatch.setattr(celery_tasks, "attempt_time_limit", lambda timeout: SHORT_LIMIT)
    server = await raw_server_factory("silent")
    with structlog.testing.capture_logs() as events:
        outcome = await run(
            eager_app, OPEN_TASK, host=LOOPBACK, port=server.port, security="plain", retries=0
        )
    assert (outcome["ok"], outcome["error"], outcome["retryable"]) == (False, "internal", False)
    assert outcome["err_message"] == "internal error: the task ran past its time limit of 0.3 s"
    assert outcome["timings"]["total"] < Settings().timeout  # not the session's 5 s deadline
    assert [event["event"] for event in events][:1] == ["session.internal_error"]
    await server.wait_idle()  # the cancelled session closed its connection


async def test_open_rejects_bad_kwargs_as_a_result(eager_app: Celery) -> None:
    outcome = await run(eager_app, OPEN_TASK, host="x", port="25")
    assert (outcome["error"], outcome["err_message"]) == (
        "invalid_request",
        "port: input should be a valid integer",
    )


async def test_check_target_and_sweep_by_name(
    eager_app: Celery, smtp_server_factory: SmtpServerFactory
) -> None:
    server = await smtp_server_factory(mode="plain")
    eager_app.smtp_session_targets = {
        "mx": parse_request(
            {
                "host": LOOPBACK,
                "port": server.port,
                "security": "plain",
                "ehlo_name": EHLO_NAME,
                "target": "mx",
            }
        )
    }
    outcome = await run(eager_app, CHECK_TARGET_TASK, name="mx")
    assert (outcome["ok"], outcome["target"]) == (True, "mx")
    missing = await run(eager_app, CHECK_TARGET_TASK, name="other")
    assert missing["error"] == "invalid_request"
    summary = await run(eager_app, SWEEP_TASK)
    assert (summary["total"], summary["ok"]) == (1, 1)
    summary = await run(eager_app, SWEEP_TASK, names=["mx", "other"])
    assert (summary["total"], summary["ok"], summary["failed"]) == (2, 1, 1)


@pytest.mark.parametrize(
    ("task_name", "kwargs", "message"),
    [
        (CHECK_TARGET_TASK, {}, "name: is required"),
        (CHECK_TARGET_TASK, {"name": "x", "host": "evil"}, "host: unknown field"),
        (SWEEP_TASK, {"targets": ["x"]}, "targets: unknown field"),
    ],
)
async def test_wrong_kwargs_of_every_task_are_an_invalid_request(
    eager_app: Celery, task_name: str, kwargs: dict[str, Any], message: str
) -> None:
    outcome = await run(eager_app, task_name, **kwargs)
    found = outcome["outcomes"][0] if "outcomes" in outcome else outcome
    assert (found["error"], found["err_message"]) == ("invalid_request", message)


async def test_a_rate_limited_retry_waits_the_long_backoff(
    eager_app: Celery,
    smtp_server_factory: SmtpServerFactory,
    ca_pem_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The task's retry countdown follows open_session's policy: a rate limit's reply
    (tasks.provider_replies) is retried after the long backoff, never the quick one."""
    too_many = "454 4.7.0 Too many login attempts, please try again later. - gsmtp"
    server = await smtp_server_factory(auth={"alice": "pw"}, replies={"AUTH": too_many})
    monkeypatch.setenv("SMTP_SESSION_SECRET_ALICE", "alice:pw")
    countdowns: list[float] = []

    def on_retry(reason: Any = None, **_: Any) -> None:
        countdowns.append(reason.when)

    signals.task_retry.connect(on_retry, weak=False)
    try:
        outcome = await run(
            eager_app,
            OPEN_TASK,
            host=LOOPBACK,
            port=server.port,
            ca_pem=Path(ca_pem_path).read_text(),
            credentials="alice",
            retries=1,
            ehlo_name=EHLO_NAME,
        )
    finally:
        signals.task_retry.disconnect(on_retry)
    assert (outcome["error"], outcome["attempts"]) == ("smtp_transient", 2)
    assert len(countdowns) == 1
    assert MAX_BACKOFF / 2 <= countdowns[0] <= MAX_BACKOFF  # the first retry, not 0.5-1 s
