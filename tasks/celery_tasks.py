"""The thin Celery tasks over the session core (task names are public: docs/tasks.md).

The worker runs Celery's `threads` pool (see smtp_session.worker.app): each task runs in a pool
thread, which validates the request, hands the session to the process's one event loop
(tasks.background_loop) and waits for its outcome. So a process runs as many sessions at
once as it has threads, each task keeping its own id, result, latency and retries.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import dns.asyncresolver
from celery import Celery, Task, shared_task

from smtp_session.monitoring.metrics import SessionMetrics
from smtp_session.tasks.background_loop import BackgroundLoop, TaskTimeLimitExceeded
from smtp_session.tasks.contract import (
    CHECK_TARGET_TASK,
    DEFAULT_CONCURRENCY,
    OPEN_TASK,
    SWEEP_TASK,
    attempt_time_limit,
)
from smtp_session.tasks.egress import DEFAULT_MAX_PER_DESTINATION, DestinationLimit, EgressPolicy
from smtp_session.tasks.errors import InvalidRequest
from smtp_session.tasks.observe import LOG, SessionObserver, report
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.request import (
    MAX_TIMEOUT,
    SessionRequest,
    check_queue_request,
    parse_request,
)
from smtp_session.tasks.session import (
    DEFAULT_RETRY_POLICY,
    Guards,
    prepare,
    rejected,
    run_attempt,
    stopped,
)
from smtp_session.tasks.summary import SweepSummary
from smtp_session.tasks.sweep import (
    DomainCheck,
    SweepItem,
    sweep,
    time_limit,
    with_defaults,
)
from smtp_session.tasks.trust_memory import TrustMemory

# Unix time the request's first attempt began: a retry's outcome covers the whole request.
STARTED_HEADER = "smtp_session_started"
# Celery renders every result for its "succeeded in …" line, which we never write at INFO:
# a short rendering, not the whole Outcome (most of a task's CPU in bench/worker_path.py).
RESULT_REPR_SIZE = 80
_task = functools.partial(shared_task, bind=True, resultrepr_maxsize=RESULT_REPR_SIZE)

# The process's one event loop, and what it learnt about which servers need the portable
# store: both live as long as the worker process.
_loop = BackgroundLoop()
_trust_memory = TrustMemory()


# smtp_session.worker.app hangs the worker's settings and targets on the app object itself, not in
# app.conf: `celery inspect conf` would print them, broker password included.
SETTINGS_ATTRIBUTE = "smtp_session_settings"
TARGETS_ATTRIBUTE = "smtp_session_targets"


def _settings(app: Celery) -> Any:
    return getattr(app, SETTINGS_ATTRIBUTE, None)


def _request_defaults(task: Task) -> dict[str, Any]:
    settings = _settings(task.app)
    return settings.request_defaults() if settings is not None else {}


def _max_timeout(app: Celery) -> float:
    settings = _settings(app)
    return float(settings.max_timeout) if settings is not None else MAX_TIMEOUT


def _extra_ca_file(app: Celery) -> str | None:
    settings = _settings(app)
    return settings.extra_ca_file if settings is not None else None


GUARDS_ATTRIBUTE = "smtp_session_guards"
_guards_lock = threading.Lock()


def _guards(app: Celery, *, from_queue: bool) -> Guards:
    """The process's bound per destination; and, for a request from the queue (a tenant's
    input), the egress policy. Configured targets are the operator's: not restricted.

    Made once per app (on the app object), not per task: the policy parses its settings.
    """
    with _guards_lock:
        made: dict[bool, Guards] | None = getattr(app, GUARDS_ATTRIBUTE, None)
        if made is None:
            settings = _settings(app)
            per_destination = (
                settings.max_per_destination if settings is not None else None
            ) or DEFAULT_MAX_PER_DESTINATION
            egress = settings.egress_policy if settings is not None else EgressPolicy()
            limit = DestinationLimit(per_destination)
            made = {False: Guards(limit=limit), True: Guards(egress=egress, limit=limit)}
            setattr(app, GUARDS_ATTRIBUTE, made)
        return made[from_queue]


def _discovery_resolver(app: Celery) -> dns.asyncresolver.Resolver | None:
    settings = _settings(app)
    return settings.discovery_resolver() if settings is not None else None


def _sweep_concurrency(app: Celery) -> int:
    settings = _settings(app)
    return int(settings.sweep_concurrency) if settings is not None else DEFAULT_CONCURRENCY


def _targets(app: Celery) -> Mapping[str, SweepItem]:
    targets: Mapping[str, SweepItem] = getattr(app, TARGETS_ATTRIBUTE, None) or {}
    return targets


_process_metrics: list[SessionMetrics] = []
_process_metrics_lock = threading.Lock()


def process_metrics(app: Celery) -> SessionMetrics:
    """This process's metrics, made on first use from the app's configured targets.

    One per process: the metrics register in prometheus_client's process-wide registry,
    which refuses a second registration (the first tasks of many threads race here).
    """
    with _process_metrics_lock:
        if not _process_metrics:
            targets = _targets(app)
            metrics = SessionMetrics(known_targets=targets)
            metrics.declare_targets(targets)
            _process_metrics.append(metrics)
        return _process_metrics[0]


def _observers(app: Celery) -> Sequence[SessionObserver]:
    return (LOG, process_metrics(app))


def run_session_task(
    task: Task, fields: dict[str, Any], positional: tuple[Any, ...] = (), *, from_queue: bool
) -> dict[str, Any]:
    """One attempt per task run; a retryable failure with attempts left is re-scheduled.

    The retry goes back through the broker with a backoff countdown and the same task
    id, so no thread waits through the backoff and a caller polling the id sees one
    final result. A failed session is a result (`ok: false`), not a task failure.
    """
    attempt = task.request.retries + 1
    started = _started(task)
    observers = _observers(task.app)
    try:
        if positional:
            # `send_task(..., args=[...])` would otherwise be a TypeError inside Celery:
            # a task failure where a caller's bad input must be an invalid_request result.
            raise InvalidRequest(
                "request", f"fields go in kwargs, not in positional args (got {len(positional)})"
            )
        request = parse_request({**_request_defaults(task), **fields})
        if from_queue:  # checked before prepare() reads any file the request names
            check_queue_request(request)
        request, credentials = prepare(request)
        _check_timeout(request, _max_timeout(task.app))
    except InvalidRequest as exc:
        outcome = rejected(exc, fields)
    else:
        limit = attempt_time_limit(request.timeout)
        try:
            outcome = _loop.run(
                run_attempt(
                    request,
                    credentials,
                    attempt=attempt,
                    started=started,
                    trust_memory=_trust_memory,
                    extra_ca_file=_extra_ca_file(task.app),
                    guards=_guards(task.app, from_queue=from_queue),
                ),
                time_limit=limit,
            )
        except TaskTimeLimitExceeded as exc:
            outcome = stopped(request, exc, attempt=attempt, started=started)
        report(outcome, final=False, observers=observers)
        if not outcome.ok and outcome.retryable and attempt <= request.retries:
            raise task.retry(
                countdown=DEFAULT_RETRY_POLICY.after(outcome),
                max_retries=request.retries,
                headers={STARTED_HEADER: started},
                # A scheduled check's `expires` is its interval; its retries are not stale.
                expires=None,
            )
    report(outcome, final=True, observers=observers)
    return outcome.to_dict()


def _check_timeout(request: SessionRequest, max_timeout: float) -> None:
    # The longest deadline bounds how long a task can run, and so how soon Redis may hand
    # the tasks of a killed worker to another one (smtp_session.worker.app's visibility timeout).
    if request.timeout > max_timeout:
        raise InvalidRequest(
            "timeout", f"must be at most {max_timeout:g} s here (SMTP_SESSION_MAX_TIMEOUT)"
        )


def _started(task: Task) -> float:
    headers = task.request.headers or {}
    started = headers.get(STARTED_HEADER) or getattr(task.request, STARTED_HEADER, None)
    return float(started) if isinstance(started, int | float) else time.time()


def _arguments_problem(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, allowed: set[str], required: set[str]
) -> InvalidRequest | None:
    """What is wrong with a task call's arguments (a caller's input: never a TypeError)."""
    if args:
        return InvalidRequest("request", f"arguments go in kwargs, not in args (got {len(args)})")
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        return InvalidRequest(unknown[0][:64], "unknown field")
    missing = sorted(required - set(kwargs))
    if missing:
        return InvalidRequest(missing[0], "is required")
    return None


def _refused(problem: InvalidRequest) -> Outcome:
    outcome = rejected(problem, {})
    report(outcome, final=True, observers=(LOG,))
    return outcome


def _unknown_target(name: object) -> Outcome:
    problem = InvalidRequest("name", f"no target {name!r} in the targets file")
    outcome = rejected(problem, {})
    report(outcome, final=True, observers=(LOG,))
    return outcome


def _run_sweep(task: Task, items: list[SweepItem]) -> SweepSummary:
    concurrency = _sweep_concurrency(task.app)
    defaults = _request_defaults(task)
    ready = [with_defaults(item, defaults) for item in items]
    limit = sum(time_limit(item, concurrency=concurrency) for item in ready)
    return _loop.run(
        sweep(
            ready,
            concurrency=concurrency,
            observers=_observers(task.app),
            trust_memory=_trust_memory,
            extra_ca_file=_extra_ca_file(task.app),
            guards=_guards(task.app, from_queue=False),
            resolver=_discovery_resolver(task.app),
        ),
        time_limit=limit,
    )


@_task(name=OPEN_TASK)  # type: ignore[untyped-decorator]  # celery is untyped
def open_session_task(self: Task, *args: Any, **fields: Any) -> dict[str, Any]:
    """Open one session with the request fields as kwargs; returns the Outcome dict."""
    return run_session_task(self, fields, args, from_queue=True)


@_task(name=CHECK_TARGET_TASK)  # type: ignore[untyped-decorator]  # celery is untyped
def check_target_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Check one configured target (kwarg `name`); returns its Outcome dict.

    A target given as a mail domain returns its DomainOutcome dict: the verdict, and an
    Outcome per discovered server.
    """
    problem = _arguments_problem(args, kwargs, allowed={"name"}, required={"name"})
    if problem is not None:
        return _refused(problem).to_dict()
    name = kwargs["name"]
    item = _targets(self.app).get(name) if isinstance(name, str) else None
    if item is None:
        return _unknown_target(name).to_dict()
    if isinstance(item, DomainCheck):
        (verdict,) = _run_sweep(self, [item]).domains
        return verdict.to_dict()
    return run_session_task(self, _fields(item), from_queue=False)


def _fields(request: SessionRequest) -> dict[str, Any]:
    # Only what the targets file set: settings defaults still apply beneath, as for `open`.
    return request.model_dump(exclude_unset=True)


# Acknowledged when it starts, unlike the session tasks: a sweep over a whole fleet can
# outlast Redis's redelivery timeout, which would hand it to a second worker while the
# first still runs it. A worker killed mid-sweep loses that sweep; run it again.
@_task(name=SWEEP_TASK, acks_late=False)  # type: ignore[untyped-decorator]  # celery is untyped
def sweep_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Check the named targets (kwarg `names`, default all) concurrently in this process."""
    targets = _targets(self.app)
    problem = _arguments_problem(args, kwargs, allowed={"names"}, required=set())
    names = kwargs.get("names")
    if (
        problem is None
        and names is not None
        and (not isinstance(names, list) or not all(isinstance(name, str) for name in names))
    ):
        problem = InvalidRequest("names", "must be a list of target names")
    if problem is not None:
        outcome = _refused(problem)
        return SweepSummary(total=1, ok=0, failed=1, duration_s=0.0, outcomes=[outcome]).to_dict()
    wanted = list(targets) if names is None else names
    unknown = [_unknown_target(name) for name in wanted if name not in targets]
    summary = _run_sweep(self, [targets[name] for name in wanted if name in targets])
    if not unknown:
        return summary.to_dict()
    merged = SweepSummary(
        total=summary.total + len(unknown),
        ok=summary.ok,
        failed=summary.failed + len(unknown),
        duration_s=summary.duration_s,
        outcomes=[*summary.outcomes, *unknown],
    )
    return merged.to_dict()
