"""The Celery internals that worker/signals.py replaces, pinned to the installed Celery.

No Celery signal or setting routes the startup banner and the shutdown notices (printed
from its signal handlers) to the logs: `--quiet` only drops the banner, and
`worker_shutting_down` comes after the warm-shutdown line, with no signal at all for the
others ("Hitting Ctrl+C again ..."). So signals.py replaces the two functions that print
them, `celery.apps.worker.safe_say` and `Worker.emit_banner`. A Celery that renames them,
calls them differently or stops looking them up where they are replaced fails here, not
silently in a deployment. What a real worker writes is tested in test_observability.py.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sized
from types import CodeType
from typing import Any

from celery.apps import worker as celery_worker
from celery.worker import state as worker_state

from smtp_session.worker import signals


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def names_called(function: Callable[..., Any]) -> set[str]:
    """The global and attribute names `function` and the functions nested in it use."""
    codes: list[CodeType] = [function.__code__]
    names: set[str] = set()
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(const for const in code.co_consts if isinstance(const, CodeType))
    return names


def test_safe_say_takes_a_message_and_a_stream_and_so_does_ours() -> None:
    assert parameters(celery_worker.safe_say) == ["msg", "f"]
    # Celery passes the message alone, or with sys.__stdout__.
    inspect.signature(signals._say).bind("worker: Warm shutdown (MainProcess)")
    inspect.signature(signals._say).bind("worker: Warm shutdown (MainProcess)", sys.__stdout__)


def test_the_shutdown_notices_look_safe_say_up_in_its_module() -> None:
    # Replacing the module's attribute reaches only the callers that read it at each call.
    assert "safe_say" in names_called(celery_worker._shutdown_handler)  # "Warm shutdown"
    assert "safe_say" in names_called(celery_worker.on_SIGINT)  # "Hitting Ctrl+C again"


def test_the_banner_is_the_method_emit_banner_and_ours_takes_its_place() -> None:
    assert "emit_banner" in names_called(celery_worker.Worker.on_start)
    assert parameters(celery_worker.Worker.emit_banner) == ["self"]
    assert parameters(signals._banner_as_log) == ["self"]
    assert parameters(celery_worker.Worker.startup_info) == ["self", "artlines"]


def test_the_requests_in_flight_are_celerys_active_requests() -> None:
    # The warm-shutdown notice counts them (signals._say).
    assert isinstance(worker_state.active_requests, Sized)
