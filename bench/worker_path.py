"""Worker path: N sessions through Redis and ``smtp-session worker`` vs the same N in-process.

The SMTP servers are raw asyncio responders (``bench.servers --slow``) in a process of
their own, on a few loopback ports, sending every reply (greeting, EHLO, QUIT) ``--delay``
seconds after what it answers: a session waits three times that delay. ``redis-server``
on a unix socket (no TCP, no persistence) is broker and result backend. Two paths take
turns, round by round, on the same ``--n`` requests:

* ``worker``: ``smtp-session worker`` as deployed, default settings (Celery's threads
  pool, 100 sessions at once on the process's one event loop), configured through the
  environment alone (/metrics on 127.0.0.1, a free port; JSON logs to a file); a plain
  Celery client sends every task ``smtp_session.open`` at once with ``send_task`` and
  collects every result;
* ``in-process``: ``tasks.sweep.sweep`` over the same requests at the same concurrency
  in this process, observed as deployed (JSON log lines to a file, metrics in a registry).

Measured at ``--delay`` (default 200 ms: waiting on the network) and at 0 ms (CPU-bound):
sessions per second and the ratio worker / in-process; the mean sessions in flight (the
sessions' own durations summed, over the wall time); CPU milliseconds per session of
every process, the worker's split by thread (its main thread: Celery's consumer; its
busiest other thread: the event loop; the rest: the pool); and the peak resident set of
the worker's process tree, sampled from /proc every 50 ms while the bursts run.

Then, to justify the mechanism and find where time goes:

* the old mechanism, the same worker with ``--pool=prefork --concurrency 2`` (one
  session per process at a time), on ``--prefork-n`` sessions at ``--delay``;
* the Celery round trip of one task at a time at 0 ms: send to result, less the
  session's own duration;
* a CPU profile of the worker at 0 ms: cProfile in every thread, each on its own thread
  CPU clock, snapshot before and after one burst; the difference is the burst. The top
  frames by cumulative time are printed, the full lists go to
  bench/results/worker_path_profile.txt. The profiler slows the worker down: read
  shares, not absolute milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import itertools
import marshal
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
from celery import Celery
from celery.result import ResultSet

from bench.common import (
    LOOPBACK,
    PROCESS_TIMEOUT,
    REPO,
    RESULTS_DIR,
    START_TIMEOUT,
    ServerProcess,
    configure_deployed_logging,
    cpu_seconds,
    deployed_observers,
    peak_rss_kib,
    percentile,
    plain_request,
    print_table,
    process_cpu_seconds,
    raise_open_files_limit,
    ratio,
    server_process,
    thread_cpu_seconds,
    tree_rss_kib,
    write_result,
)
from smtp_session.tasks.contract import DEFAULT_CONCURRENCY
from smtp_session.tasks.observe import SessionObserver
from smtp_session.tasks.request import parse_request
from smtp_session.tasks.sweep import sweep
from smtp_session.tasks.trust_memory import TrustMemory

NAME = "worker_path"
OPEN_TASK = "smtp_session.open"  # the public task name, as a web backend spells it
BIN = Path(sys.executable).parent
REDIS_SERVER = "redis-server"
#: The worker's default pool size (SMTP_SESSION_WORKER_CONCURRENCY), and the sweep's.
CONCURRENCY = DEFAULT_CONCURRENCY
DEFAULT_SESSIONS = 1000
DEFAULT_DELAY = 0.2
CPU_BOUND_DELAY = 0.0
#: Replies a session waits for: the greeting, EHLO's, QUIT's.
REPLIES_PER_SESSION = 3
ROUNDS = 2
PREFORK_CONCURRENCY = 2
DEFAULT_PREFORK_SESSIONS = 100
LATENCY_SAMPLES = 50
SERVER_PORTS = 4
#: Bound on collecting one burst's results (1,000 sessions at 200 ms ideally take 6 s).
RESULT_TIMEOUT = 180.0
PING_TIMEOUT = 0.5
REDIS_PROBE_INTERVAL = 0.01
RSS_SAMPLE_INTERVAL = 0.05
TARGET_IO_RATIO = 0.8
TARGET_CPU_RATIO = 0.5
TARGET_PEAK_RSS_MIB = 250
MIB = 1024  # KiB
PROFILE_TOP = 20
PROFILE_LISTED = 80
#: Free in a Celery worker (SIGUSR1 prints its threads' stacks; SIGUSR2 is rdb's only
#: when CELERY_RDBSIG is set, which the worker's environment here never has).
PROFILE_SIGNAL = signal.SIGUSR2
PROFILED_WORKER = "--profiled-worker"
STDLIB = re.compile(r"/lib/python3\.\d+/")
#: Where the snapshot handler runs: not the worker's work.
PROFILER_PACKAGES = ("stdlib cProfile", "bench (ours)")
SNAPSHOT_POLL = 0.05

WORKER, IN_PROCESS = "worker", "in-process"
PATHS = (WORKER, IN_PROCESS)
#: CPU components: this process (the Celery client, or the in-process sweep), helpers.
BENCH_PROCESS = "bench process (client / sweep)"
REDIS = "redis-server"
SMTP_SERVER = "SMTP server"
WORKER_MAIN = "worker main thread (consumer)"
WORKER_LOOP = "worker event loop thread"
WORKER_POOL = "worker pool + other threads"
TOTAL = "total"
COMPONENTS = (BENCH_PROCESS, REDIS, WORKER_MAIN, WORKER_LOOP, WORKER_POOL, SMTP_SERVER, TOTAL)

CELERY_WORKER = ["-A", "smtp_session.worker.app", "worker", "--loglevel=INFO"]
#: As deployed: default settings, so the threads pool and its default concurrency.
THREADS_ARGV = [str(BIN / "smtp-session"), "worker"]
PREFORK_ARGV = [
    str(BIN / "celery"),
    *CELERY_WORKER,
    "--pool=prefork",
    f"--concurrency={PREFORK_CONCURRENCY}",
]

Result = tuple[bool, float | None]  # (ok, the session's own seconds)
StatsDict = dict[tuple[str, int, str], tuple[Any, ...]]


# ----------------------------------------------------------------------------- processes


@contextlib.contextmanager
def process_group(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` in a process group of its own, output to `log_path`; the group stopped after."""
    log: IO[bytes]
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - redis-server, our own scripts
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a prefork worker's pool processes die with the group
        )
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(PROCESS_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(PROCESS_TIMEOUT)


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[tuple[str, int]]:
    """``redis-server`` on ``folder/redis.sock``; yields (broker/backend URL, pid)."""
    socket_path = folder / "redis.sock"
    argv = [
        REDIS_SERVER,
        *("--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"),
        *("--save", "", "--appendonly", "no", "--dir", str(folder)),
    ]
    with process_group(argv, folder / "redis.log") as process:
        _wait_for_ping(socket_path, process)
        yield f"redis+socket://{socket_path}", process.pid


def _wait_for_ping(socket_path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=PROCESS_TIMEOUT) as probe:
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if probe.ping():
                    return
            if process.poll() is not None:
                raise RuntimeError("redis-server exited at start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not up after {START_TIMEOUT} s")
            time.sleep(REDIS_PROBE_INTERVAL)  # Redis signals readiness only by answering


def slow_servers(delay: float, folder: Path) -> contextlib.AbstractContextManager[ServerProcess]:
    """SERVER_PORTS loopback ports whose every reply comes `delay` seconds late."""
    args = ["--slow", str(SERVER_PORTS), "--banner-delay", str(delay), "--reply-delay", str(delay)]
    return server_process(args, folder / f"server-{_label(delay).replace(' ', '')}.log")


def worker_environment(broker_url: str, folder: Path) -> dict[str, str]:
    """The worker's settings, from the environment alone; loopback only."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("SMTP_SESSION_")
    }
    for name in ("PROMETHEUS_MULTIPROC_DIR", "CELERY_RDBSIG"):
        env.pop(name, None)
    return env | {
        "SMTP_SESSION_BROKER_URL": broker_url,
        "SMTP_SESSION_DATA_DIR": str(folder / "data"),
        "SMTP_SESSION_METRICS_LISTEN": f"{LOOPBACK}:0",
        # The servers on loopback stand for many public ones: the operator's allowance for
        # them, and no bound per destination address below the concurrency.
        "SMTP_SESSION_ALLOW_NETWORKS": "127.0.0.0/8",
        "SMTP_SESSION_ALLOW_PORTS": "1024-65535",
        "SMTP_SESSION_MAX_PER_DESTINATION": str(CONCURRENCY),
    }


@contextlib.contextmanager
def worker_process(
    argv: Sequence[str], client: Celery, env: Mapping[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker started with `argv`, yielded once it answers a ping."""
    with process_group(argv, log_path, env) as process:
        deadline = time.monotonic() + START_TIMEOUT
        while not client.control.ping(timeout=PING_TIMEOUT, limit=1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready:\n{log_path.read_text()[-4000:]}")
        yield process


# ----------------------------------------------------------------------------- measuring


@dataclass
class Tally:
    """What one path did over its rounds."""

    sessions: int = 0
    failed: int = 0
    wall: float = 0.0
    busy: float = 0.0  # the sessions' own durations (Outcome timings.total), summed
    cpu: Counter[str] = field(default_factory=Counter)  # seconds, by component

    def add(self, results: Sequence[Result], wall: float, cpu: Mapping[str, float]) -> None:
        self.sessions += len(results)
        self.failed += sum(not ok for ok, _ in results)
        self.wall += wall
        self.busy += sum(seconds or 0.0 for _, seconds in results)
        self.cpu.update(cpu)

    @property
    def rate(self) -> float:
        return ratio(self.sessions, self.wall)

    def summary(self) -> dict[str, Any]:
        cpu = {**self.cpu, TOTAL: sum(self.cpu.values())} if self.cpu else {}
        return {
            "sessions": self.sessions,
            "failed": self.failed,
            "wall_s": round(self.wall, 3),
            "sessions_per_s": round(self.rate, 1),
            # rate = sessions in flight / session duration: which of the two falls short
            "mean_in_flight": round(ratio(self.busy, self.wall), 1),
            "mean_session_ms": round(1000 * ratio(self.busy, self.sessions), 1),
            "cpu_ms_per_session": {
                name: round(1000 * ratio(seconds, self.sessions), 3)
                for name, seconds in cpu.items()
            },
        }


class CpuMeter:
    """CPU seconds spent between two readings, by component, from /proc (10 ms ticks)."""

    def __init__(self, helpers: Mapping[str, int], worker: int | None = None) -> None:
        self.helpers = dict(helpers)
        self.worker = worker

    def read(self) -> tuple[dict[str, float], dict[int, float]]:
        processes = {BENCH_PROCESS: cpu_seconds()} | {
            name: process_cpu_seconds(pid) for name, pid in self.helpers.items()
        }
        threads = thread_cpu_seconds(self.worker) if self.worker is not None else {}
        return processes, threads

    def since(self, before: tuple[dict[str, float], dict[int, float]]) -> dict[str, float]:
        (processes, threads), (earlier, earlier_threads) = self.read(), before
        used = {name: seconds - earlier[name] for name, seconds in processes.items()}
        if self.worker is not None:
            spent = {tid: s - earlier_threads.get(tid, 0.0) for tid, s in threads.items()}
            main = spent.pop(self.worker, 0.0)
            # The event loop runs every session; each of the 100 pool threads a hundredth
            # of the tasks: the busiest thread but the main one is the loop.
            loop = max(spent.values(), default=0.0)
            used |= {WORKER_MAIN: main, WORKER_LOOP: loop, WORKER_POOL: sum(spent.values()) - loop}
        return used


class PeakRss:
    """The peak resident set of a process tree, sampled from /proc by a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))
            if self._stop.wait(RSS_SAMPLE_INTERVAL):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def session_requests(ports: Sequence[int], count: int) -> list[dict[str, Any]]:
    """Task kwargs, as a web backend sends them: plain sessions, spread over the ports."""
    return [plain_request(ports[index % len(ports)]) for index in range(count)]


def _result(outcome: Mapping[str, Any]) -> Result:
    return bool(outcome["ok"]), outcome["timings"]["total"]


def worker_burst(client: Celery, requests: Sequence[dict[str, Any]]) -> tuple[list[Result], float]:
    """Every request sent at once, every result collected: (results, wall seconds)."""
    started = time.perf_counter()
    sent = [client.send_task(OPEN_TASK, kwargs=fields) for fields in requests]
    outcomes = ResultSet(sent, app=client).join_native(timeout=RESULT_TIMEOUT)
    return [_result(outcome) for outcome in outcomes], time.perf_counter() - started


def in_process_burst(
    requests: Sequence[dict[str, Any]], observers: Sequence[SessionObserver], memory: TrustMemory
) -> tuple[list[Result], float]:
    """The same requests through sweep() in this process: (results, wall seconds)."""

    async def run() -> tuple[list[Result], float]:
        started = time.perf_counter()
        items = [parse_request(fields) for fields in requests]  # validation counts, as in a task
        summary = await sweep(
            items, concurrency=CONCURRENCY, observers=observers, trust_memory=memory
        )
        wall = time.perf_counter() - started
        return [(outcome.ok, outcome.timings.total) for outcome in summary.outcomes], wall

    return asyncio.run(run())


@dataclass
class Bench:
    """What every phase needs: the client, Redis's pid, the in-process observers."""

    client: Celery
    env: dict[str, str]
    folder: Path
    redis_pid: int
    observers: tuple[SessionObserver, ...]
    memory: TrustMemory = field(default_factory=TrustMemory)

    def worker(
        self, argv: Sequence[str], name: str
    ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        return worker_process(argv, self.client, self.env, self.folder / f"{name}.log")

    def compare(
        self,
        worker_pid: int,
        server: ServerProcess,
        requests: Sequence[dict[str, Any]],
        rounds: int,
    ) -> dict[str, Tally]:
        """Worker and in-process take turns, round by round, alternating who goes first."""
        meters = {
            WORKER: CpuMeter({REDIS: self.redis_pid, SMTP_SERVER: server.pid}, worker_pid),
            IN_PROCESS: CpuMeter({SMTP_SERVER: server.pid}),
        }
        runs = {
            WORKER: lambda chosen: worker_burst(self.client, chosen),
            IN_PROCESS: lambda chosen: in_process_burst(chosen, self.observers, self.memory),
        }
        for path in PATHS:  # warm-up: every pool thread started, caches filled
            runs[path](requests[:CONCURRENCY])
        tallies = {path: Tally() for path in PATHS}
        for number in range(rounds):
            for path in PATHS if number % 2 == 0 else PATHS[::-1]:
                before = meters[path].read()
                results, wall = runs[path](requests)
                tallies[path].add(results, wall, meters[path].since(before))
        return tallies


def one_at_a_time(client: Celery, requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Send to result in hand, one task at a time, and the part that is not the session."""
    latencies, sessions = [], []
    for fields in requests:
        started = time.perf_counter()
        outcome = client.send_task(OPEN_TASK, kwargs=fields).get(timeout=RESULT_TIMEOUT)
        latencies.append(time.perf_counter() - started)
        sessions.append(_result(outcome)[1] or 0.0)
    overheads = [latency - own for latency, own in zip(latencies, sessions, strict=True)]
    return {
        "samples": len(requests),
        **{
            f"{name}_ms_{label}": round(1000 * percentile(values, fraction), 2)
            for name, values in (
                ("latency", latencies),
                ("session", sessions),
                ("celery", overheads),
            )
            for label, fraction in (("p50", 0.5), ("p99", 0.99))
        },
    }


# ----------------------------------------------------------------------------- profiling


def profiled_worker(prefix: Path, celery_args: list[str]) -> None:
    """``celery ARGS`` in this process, cProfile in every thread on its own CPU clock.

    Each PROFILE_SIGNAL writes every thread's counts so far to ``<prefix>.<n>``.
    """
    from celery.__main__ import main as celery_main

    profiles: list[cProfile.Profile] = []
    numbers = itertools.count()

    def profile_this_thread(*_: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()  # in a new thread: replaces the threading.setprofile hook

    def snapshot(*_: Any) -> None:
        counts = []
        for profile in list(profiles):
            profile.snapshot_stats()
            counts.append(profile.stats)
        path = prefix.with_name(f"{prefix.name}.{next(numbers)}")
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(marshal.dumps(counts))
        partial.rename(path)  # the parent sees the whole file or none

    threading.setprofile(profile_this_thread)
    signal.signal(PROFILE_SIGNAL, snapshot)
    profile_this_thread()
    sys.argv = ["celery", *celery_args]
    celery_main()


def take_snapshot(pid: int, prefix: Path, number: int) -> list[StatsDict]:
    os.kill(pid, PROFILE_SIGNAL)
    path = prefix.with_name(f"{prefix.name}.{number}")
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no profile snapshot {path.name} after {START_TIMEOUT} s")
        time.sleep(SNAPSHOT_POLL)  # the worker says nothing else when it is written
    counts: list[StatsDict] = marshal.loads(path.read_bytes())  # noqa: S302 - our own file
    return counts


def _minus(after: tuple[float, ...], before: tuple[float, ...] | None) -> tuple[float, ...]:
    return after if before is None else tuple(a - b for a, b in zip(after, before, strict=True))


def stats_between(before: list[StatsDict], after: list[StatsDict], folder: Path) -> pstats.Stats:
    """What every thread's profiler counted between two snapshots, threads merged."""
    paths = []
    for index, counts in enumerate(after):
        earlier = before[index] if index < len(before) else {}
        burst: StatsDict = {}
        for key, (*numbers, callers) in counts.items():
            old = earlier.get(key)
            spent = _minus(tuple(numbers), tuple(old[:4]) if old else None)
            if spent[1] <= 0:  # no call in the burst
                continue
            old_callers = old[4] if old else {}
            burst[key] = (
                *spent,
                {
                    caller: _minus(tuple(c), old_callers.get(caller))
                    for caller, c in callers.items()
                },
            )
        if burst:  # a thread idle all through the burst has nothing to add
            path = folder / f"burst-thread-{index}.prof"
            path.write_bytes(marshal.dumps(burst))
            paths.append(str(path))
    return pstats.Stats(*paths)


def _frame_name(function: tuple[str, int, str]) -> str:
    path, line, name = function
    for prefix in (f"{REPO}/", "site-packages/", "/lib/python3"):
        if prefix in path:
            path = path.split(prefix, 1)[1]
    return f"{name} ({path}:{line})" if line else name


def top_frames(stats: pstats.Stats, sessions: int) -> list[dict[str, Any]]:
    """The top frames by cumulative time; a coroutine counts a call per resumption."""
    stats.sort_stats("cumulative")
    rows = []
    for function in stats.fcn_list[:PROFILE_TOP]:
        _, calls, own, cumulative, _ = stats.stats[function]
        rows.append(
            {
                "frame": _frame_name(function),
                "cumulative_ms_per_session": round(1000 * cumulative / sessions, 3),
                "self_ms_per_session": round(1000 * own / sessions, 3),
                "calls_per_session": round(calls / sessions, 2),
            }
        )
    return rows


def _package(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/")[0].removesuffix(".py")
    if path.startswith(f"{REPO}/"):
        return f"{Path(path).relative_to(REPO).parts[0]} (ours)"
    if STDLIB.search(path):
        return "stdlib " + STDLIB.split(path, 1)[1].split("/")[0].removesuffix(".py")
    return path  # "~" (a C function with no Python caller), "<frozen ...>"


def self_time_by_package(stats: pstats.Stats) -> dict[str, float]:
    """Shares of the profiled CPU by package: self time, a C function's to its caller's.

    Self times add up to the total, unlike cumulative ones (nested and generator frames
    overlap); a C call (socket I/O, JSON, locks) counts to the package that made it.
    """
    seconds: Counter[str] = Counter()
    for (path, _, _), (_, _, own, _, callers) in stats.stats.items():
        if path == "~" and callers:
            for caller, (_, _, caller_share, _) in callers.items():
                seconds[_package(caller[0])] += caller_share
        else:
            seconds[_package(path)] += own
    for name in PROFILER_PACKAGES:  # the snapshots themselves
        seconds.pop(name, None)
    total = sum(seconds.values())
    return {name: round(value / total, 4) for name, value in seconds.most_common(PROFILE_TOP)}


def profile_worker(bench: Bench, requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One 0 ms burst through a worker profiled in every thread; the top frames."""
    prefix = bench.folder / "worker-profile"
    argv = [
        sys.executable,
        "-m",
        "bench.worker_path",
        PROFILED_WORKER,
        str(prefix),
        *CELERY_WORKER,
        "--pool=threads",
        f"--concurrency={CONCURRENCY}",
    ]
    with bench.worker(argv, "worker-profiled") as worker:
        worker_burst(bench.client, requests[:CONCURRENCY])  # warm-up, as unprofiled
        before = take_snapshot(worker.pid, prefix, 0)
        results, wall = worker_burst(bench.client, requests)
        after = take_snapshot(worker.pid, prefix, 1)
    stats = stats_between(before, after, bench.folder)
    text = io.StringIO()
    stats.files = []  # not a header line per thread
    for order in ("cumulative", "tottime"):
        stats.stream = text
        stats.sort_stats(order).print_stats(PROFILE_LISTED)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{NAME}_profile.txt").write_text(
        f"worker at 0 ms, {len(results)} sessions, CPU seconds (thread clocks), all threads\n"
        + text.getvalue()
    )
    return {
        "sessions": len(results),
        "failed": sum(not ok for ok, _ in results),
        "profiled_sessions_per_s": round(len(results) / wall, 1),
        "cpu_ms_per_session": round(1000 * stats.total_tt / len(results), 3),
        "top_cumulative": top_frames(stats, len(results)),
        "self_share_by_package": self_time_by_package(stats),
    }


# ----------------------------------------------------------------------------- phases


def measure(
    bench: Bench, servers: Mapping[float, ServerProcess], arguments: argparse.Namespace
) -> dict[str, Any]:
    ports = {delay: server.ports["slow"] for delay, server in servers.items()}
    phases: dict[str, Any] = {}
    with bench.worker(THREADS_ARGV, "worker-threads") as worker:
        print(f"threads worker {worker.pid} ready", flush=True)
        for delay in (arguments.delay, CPU_BOUND_DELAY):
            requests = session_requests(ports[delay], arguments.n)
            with PeakRss(worker.pid) as rss:
                tallies = bench.compare(worker.pid, servers[delay], requests, arguments.rounds)
            phases[_label(delay)] = {
                "delay_s": delay,
                **{path: tally.summary() for path, tally in tallies.items()},
                "ratio_worker_to_in_process": round(
                    ratio(tallies[WORKER].rate, tallies[IN_PROCESS].rate), 3
                ),
                "worker_peak_tree_rss_mib": round(rss.peak_kib / MIB, 1),
                "worker_vm_hwm_mib": round(peak_rss_kib(worker.pid) / MIB, 1),
            }
            print(f"  {_label(delay)} done", flush=True)
        instant = session_requests(ports[CPU_BOUND_DELAY], LATENCY_SAMPLES)
        latency = one_at_a_time(bench.client, instant)
    requests = session_requests(ports[arguments.delay], arguments.prefork_n)
    with bench.worker(PREFORK_ARGV, "worker-prefork") as worker, PeakRss(worker.pid) as rss:
        print(f"prefork worker {worker.pid} ready", flush=True)
        worker_burst(bench.client, requests[: 2 * PREFORK_CONCURRENCY])  # warm-up
        results, wall = worker_burst(bench.client, requests)
    prefork = Tally()
    prefork.add(results, wall, {})
    profile = profile_worker(bench, session_requests(ports[CPU_BOUND_DELAY], arguments.n))
    return {
        "phases": phases,
        "prefork": {
            "delay_s": arguments.delay,
            "concurrency": PREFORK_CONCURRENCY,
            **prefork.summary(),
            "peak_tree_rss_mib": round(rss.peak_kib / MIB, 1),
        },
        "one_at_a_time_0ms": latency,
        "profile_0ms": profile,
    }


def _label(delay: float) -> str:
    return f"{1000 * delay:g} ms"


# ----------------------------------------------------------------------------- report


def report(results: dict[str, Any], arguments: argparse.Namespace) -> None:
    phases, prefork = results["phases"], results["prefork"]
    rows = []
    for label, phase in phases.items():
        delay = phase["delay_s"]
        ideal = CONCURRENCY / (REPLIES_PER_SESSION * delay) if delay else None
        for path in PATHS:
            tally = phase[path]
            rows.append(
                [
                    label,
                    path,
                    tally["sessions"],
                    tally["wall_s"],
                    tally["sessions_per_s"],
                    ideal,
                    tally["mean_in_flight"],
                    tally["mean_session_ms"],
                    tally["failed"],
                ]
            )
    print_table(
        f"{arguments.n} sessions per round, {CONCURRENCY} at a time, {arguments.rounds} "
        "alternating rounds: Redis + `smtp-session worker` vs sweep() in-process",
        [
            "delay",
            "path",
            "sessions",
            "wall s",
            "sessions/s",
            "ideal /s",
            "in flight",
            "session ms",
            "failed",
        ],
        rows,
    )
    print()
    for label, phase in phases.items():
        target = TARGET_CPU_RATIO if phase["delay_s"] == CPU_BOUND_DELAY else TARGET_IO_RATIO
        _verdict(f"worker / in-process at {label}", phase["ratio_worker_to_in_process"], target)
    print_table(
        "CPU ms per session, by process (the worker's by thread)",
        ["component", *(f"{path} {label}" for label in phases for path in PATHS)],
        [
            [
                component,
                *(
                    phase[path]["cpu_ms_per_session"].get(component)
                    for phase in phases.values()
                    for path in PATHS
                ),
            ]
            for component in COMPONENTS
        ],
    )
    threads_rate = phases[_label(arguments.delay)][WORKER]["sessions_per_s"]
    print_table(
        f"the worker's pool at {_label(arguments.delay)}: threads (one event loop) vs prefork",
        ["pool", "concurrency", "sessions", "sessions/s", "in flight", "peak tree RSS MiB"],
        [
            [
                "threads",
                CONCURRENCY,
                phases[_label(arguments.delay)][WORKER]["sessions"],
                threads_rate,
                phases[_label(arguments.delay)][WORKER]["mean_in_flight"],
                phases[_label(arguments.delay)]["worker_peak_tree_rss_mib"],
            ],
            [
                "prefork",
                PREFORK_CONCURRENCY,
                prefork["sessions"],
                prefork["sessions_per_s"],
                prefork["mean_in_flight"],
                prefork["peak_tree_rss_mib"],
            ],
        ],
    )
    print(f"\nthreads / prefork: {ratio(threads_rate, prefork['sessions_per_s']):.1f}x the rate")
    for label, phase in phases.items():
        peak = phase["worker_peak_tree_rss_mib"]
        print(
            f"worker peak RSS at {label}: {peak} MiB (process tree, sampled every "
            f"{1000 * RSS_SAMPLE_INTERVAL:g} ms; VmHWM {phase['worker_vm_hwm_mib']} MiB), "
            f"{'meets' if peak <= TARGET_PEAK_RSS_MIB else 'misses'} the target "
            f"<= {TARGET_PEAK_RSS_MIB} MiB"
        )
    latency = results["one_at_a_time_0ms"]
    print(
        f"\none task at a time at 0 ms ({latency['samples']}): send -> result p50 "
        f"{latency['latency_ms_p50']} ms (p99 {latency['latency_ms_p99']}), the session itself "
        f"{latency['session_ms_p50']} ms, Celery + Redis round trip {latency['celery_ms_p50']} ms"
    )
    profile = results["profile_0ms"]
    print_table(
        f"worker at 0 ms under cProfile (every thread, CPU clocks): {profile['sessions']} "
        f"sessions at {profile['profiled_sessions_per_s']} /s profiled, "
        f"{profile['cpu_ms_per_session']} ms CPU per session; top frames by cumulative time",
        ["frame", "cumulative ms/session", "self ms/session", "calls/session"],
        [
            [
                row["frame"],
                row["cumulative_ms_per_session"],
                row["self_ms_per_session"],
                row["calls_per_session"],
            ]
            for row in profile["top_cumulative"]
        ],
    )
    unprofiled = sum(
        phases[_label(CPU_BOUND_DELAY)][WORKER]["cpu_ms_per_session"][component]
        for component in (WORKER_MAIN, WORKER_LOOP, WORKER_POOL)
    )
    print_table(
        "the same profile by package: self time, C calls counted to their caller's package; "
        f"ms scaled to the worker's unprofiled {unprofiled:.2f} ms CPU per session at 0 ms",
        ["package", "share", "~ms/session unprofiled"],
        [
            [name, f"{100 * share:.1f}%", unprofiled * share]
            for name, share in profile["self_share_by_package"].items()
        ],
    )
    print(f"\nfull lists: {(RESULTS_DIR / (NAME + '_profile.txt')).relative_to(REPO)}")


def _verdict(what: str, value: float, target: float) -> None:
    verdict = "meets" if value >= target else "misses"
    print(f"{what}: {value:.3f} ({verdict} the target >= {target})")


# ----------------------------------------------------------------------------- main


def main() -> None:
    if sys.argv[1:2] == [PROFILED_WORKER]:  # started by profile_worker(), not by hand
        profiled_worker(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None, allow_abbrev=False
    )
    parser.add_argument("--n", type=int, default=DEFAULT_SESSIONS, help="sessions per round")
    parser.add_argument(
        "--delay", type=float, default=DEFAULT_DELAY, help="seconds before every server reply"
    )
    parser.add_argument("--prefork-n", type=int, default=DEFAULT_PREFORK_SESSIONS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    arguments = parser.parse_args()
    if shutil.which(REDIS_SERVER) is None:
        # Not a test: a benchmark that cannot run says so and leaves a record of why.
        reason = f"{REDIS_SERVER} not on PATH (Debian: apt-get install redis-server)"
        print(f"SKIPPED: {reason}")
        write_result(NAME, {"skipped": reason})
        return
    raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as name:
        folder = Path(name)
        with contextlib.ExitStack() as stack:
            servers = {
                delay: stack.enter_context(slow_servers(delay, folder))
                for delay in dict.fromkeys((arguments.delay, CPU_BOUND_DELAY))
            }
            url, redis_pid = stack.enter_context(redis_server(folder))
            log = stack.enter_context((folder / "in-process.log").open("w"))
            configure_deployed_logging(log)  # this process's sessions log as the worker's do
            client = Celery("bench-client", broker=url, backend=url)
            stack.callback(client.close)
            bench = Bench(
                client=client,
                env=worker_environment(url, folder),
                folder=folder,
                redis_pid=redis_pid,
                observers=deployed_observers(),
            )
            results = measure(bench, servers, arguments)
    report(results, arguments)
    write_result(
        NAME,
        {
            "sessions_per_round": arguments.n,
            "delay_s": arguments.delay,
            "concurrency": CONCURRENCY,
            "rounds": arguments.rounds,
            "targets": {
                "ratio_io_bound": TARGET_IO_RATIO,
                "ratio_cpu_bound": TARGET_CPU_RATIO,
                "peak_rss_mib": TARGET_PEAK_RSS_MIB,
            },
            **results,
        },
    )


if __name__ == "__main__":
    main()
