"""One event loop per process, in a thread of its own, shared by every task thread.

The worker runs Celery's `threads` pool: each task runs in a pool thread, which hands its
session (a coroutine) to this loop and waits for the outcome. So one process runs as many
sessions at once as it has pool threads, and the loop, its TLS contexts, the trust memory
and the resolver caches live as long as the process, not one task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")
#: How long the hard limit waits, past the soft one, for a cancelled session to unwind.
HARD_LIMIT_GRACE = 5.0


class TaskTimeLimitExceeded(TimeoutError):
    """A coroutine outlived its task's time limit: a bug, since every stage has a deadline."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"the task ran past its time limit of {limit:g} s")
        self.limit = limit


class BackgroundLoop:
    """An asyncio loop in a daemon thread, started on first use; any thread may run on it."""

    def __init__(
        self, name: str = "smtp-session-loop", *, hard_limit_grace: float = HARD_LIMIT_GRACE
    ) -> None:
        self._name = name
        self._grace = hard_limit_grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (started now if it is not yet)."""
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(loop, ready), name=self._name, daemon=True
                )
                thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, _T], *, time_limit: float) -> _T:
        """Run `coroutine` on the loop and wait for its result, from any other thread.

        The calling thread's context variables (the task id bound for the logs) go with it.
        At `time_limit` seconds the coroutine is cancelled; if it has not unwound
        `hard_limit_grace` seconds later (the loop is stuck), the caller stops waiting
        anyway. Either way TaskTimeLimitExceeded is raised and the thread is free again.
        """
        future = asyncio.run_coroutine_threadsafe(_bounded(coroutine, time_limit), self.loop())
        try:
            return future.result(timeout=time_limit + self._grace)
        except concurrent.futures.CancelledError:
            raise TaskTimeLimitExceeded(time_limit) from None
        except TimeoutError:
            if future.done():  # raised by the coroutine (or by its limit, in _bounded)
                raise
            future.cancel()  # the loop is stuck: stop waiting for it
            raise TaskTimeLimitExceeded(time_limit) from None


async def _bounded(coroutine: Coroutine[Any, Any, _T], time_limit: float) -> _T:
    limit = asyncio.timeout(time_limit)
    try:
        async with limit:
            return await coroutine
    except TimeoutError:
        if limit.expired():  # the limit, not a TimeoutError of the coroutine's own
            raise TaskTimeLimitExceeded(time_limit) from None
        raise
