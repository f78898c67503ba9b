"""The process's one event loop, shared by the worker's task threads."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from smtp_session.tasks.background_loop import BackgroundLoop, TaskTimeLimitExceeded

#: A limit far above what the quick coroutines below need, far below a hang.
GENEROUS = 5.0
SHORT_LIMIT = 0.2
GRACE = 0.3
#: How long the "stuck" coroutine blocks the loop: well past SHORT_LIMIT + GRACE.
STUCK_FOR = 3.0

_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)


async def current_loop_and_task_id() -> tuple[asyncio.AbstractEventLoop, str | None]:
    await asyncio.sleep(0)
    return asyncio.get_running_loop(), _task_id.get()


def test_threads_share_one_loop_and_each_keeps_its_context() -> None:
    background = BackgroundLoop()
    seen: dict[str, tuple[asyncio.AbstractEventLoop, str | None]] = {}

    def task(task_id: str) -> None:
        _task_id.set(task_id)  # what task_prerun binds for the logs, in this thread only
        seen[task_id] = background.run(current_loop_and_task_id(), time_limit=GENEROUS)

    threads = [threading.Thread(target=task, args=(f"t-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS)

    assert {task_id for _, task_id in seen.values()} == set(seen) and len(seen) == 8
    assert len({id(loop) for loop, _ in seen.values()}) == 1  # one loop for them all
    assert background.loop() is next(iter(seen.values()))[0]  # and it lives on


def test_sessions_on_the_loop_overlap() -> None:
    background = BackgroundLoop()
    started = time.monotonic()
    threads = [
        threading.Thread(
            target=background.run, args=(asyncio.sleep(SHORT_LIMIT),), kwargs={"time_limit": 1}
        )
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS)
    # Twenty waits of SHORT_LIMIT at once take about one, not twenty.
    assert time.monotonic() - started < 10 * SHORT_LIMIT


def test_a_coroutine_past_its_limit_is_cancelled() -> None:
    background = BackgroundLoop()
    cancelled = threading.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(TaskTimeLimitExceeded, match=r"time limit of 0\.2 s"):
        background.run(hang(), time_limit=SHORT_LIMIT)
    assert SHORT_LIMIT <= time.monotonic() - started < STUCK_FOR
    assert cancelled.wait(GENEROUS)


def test_a_stuck_loop_frees_the_waiting_thread_after_the_grace() -> None:
    background = BackgroundLoop(hard_limit_grace=GRACE)

    async def block_the_loop() -> None:
        time.sleep(STUCK_FOR)  # a bug: a blocking call on the loop itself

    started = time.monotonic()
    with pytest.raises(TaskTimeLimitExceeded):
        background.run(block_the_loop(), time_limit=SHORT_LIMIT)
    # The thread stopped waiting at limit + grace, while the loop was still stuck.
    assert time.monotonic() - started < STUCK_FOR


def test_a_timeout_of_the_coroutines_own_is_not_taken_for_the_limit() -> None:
    background = BackgroundLoop()

    async def give_up() -> None:
        async with asyncio.timeout(0):
            await asyncio.sleep(1)

    with pytest.raises(TimeoutError) as raised:
        background.run(give_up(), time_limit=GENEROUS)
    assert not isinstance(raised.value, TaskTimeLimitExceeded)
