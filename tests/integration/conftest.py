"""Fixtures for the Celery worker tests: a real ``redis-server`` and a real worker process.

Redis listens only on a unix socket in a pytest temporary directory (``--port 0``
turns TCP off), keeps nothing on disk, and is stopped when the test ends. The worker
is ``smtp-session worker`` (or ``celery -A smtp_session.worker.app worker``) as a subprocess in its
own session, configured through the environment alone, exactly as it is deployed; the
whole process group is killed at teardown. Its output is kept: a reader thread copies
every line to ``worker.log`` and wakes whoever waits for a line, and teardown prints the
tail, which pytest shows only when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pytest
import redis
from celery import Celery

from tests.brokers import GatedServer
from tests.rabbitmq import RabbitMQServer

BIN = Path(sys.executable).parent
APP = "smtp_session.worker.app"  # what `celery -A` names
REDIS_SERVER = "redis-server"  # from PATH (Debian: /usr/bin)
REDIS_CLI = "redis-cli"
ENV_PREFIX = "SMTP_SESSION_"
#: Bound on a process start (Redis: milliseconds; a worker: ~2 s for imports and mingle).
START_TIMEOUT = 30.0
#: Bound on a process stop.
STOP_TIMEOUT = 10.0
#: What Redis logs once it accepts connections.
READY_LINE = b"ready to accept connections"  # "The server is now ready to accept…"
#: One control round trip while the worker starts: how long to wait for its pong.
PING_TIMEOUT = 0.5
#: Lines of worker output printed at teardown (shown by pytest for failed tests only).
LOG_TAIL = 200


# ----------------------------------------------------------------------------- Redis


class RedisServer:
    """``redis-server`` on a unix socket, no TCP, no persistence unless asked; restartable."""

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        self.folder = folder
        # Persistent: an append-only file in `folder`, as production Redis should keep
        # (bench/chaos.py restarts it with messages in it).
        self.persistent = persistent
        self.socket_path = folder / "redis.sock"
        self.log_path = folder / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Broker and result backend URL (kombu and Celery both read ``redis+socket://``)."""
        return f"redis+socket://{self.socket_path}"

    def client(self) -> redis.Redis:
        """A direct client, for looking at what the broker and the result store hold."""
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=STOP_TIMEOUT)

    def monitor(self) -> RedisMonitor:
        """Start recording every command Redis runs; ``close()`` returns the record."""
        return RedisMonitor(self)

    def start(self) -> None:
        """Start on the same socket path as before, and return once it answers PING."""
        assert self._process is None, "already running"
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--dir",
                str(self.folder),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        ready = threading.Event()
        self._reader = threading.Thread(
            target=self._copy_log, args=(self._process, ready), name="redis-log", daemon=True
        )
        self._reader.start()
        # Redis says when it is ready: wait for that line, then prove it with one PING.
        try:
            if not ready.wait(START_TIMEOUT):
                raise TimeoutError(f"redis-server not ready after {START_TIMEOUT} s")
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text()}")
            with self.client() as probe:
                assert probe.ping()
        except BaseException:
            self.stop()  # a fixture that failed to start is never torn down
            raise

    def _copy_log(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        """Copy Redis's output to its log file; set `ready` at its ready line (or its end)."""
        assert process.stdout is not None and self._log is not None
        log = self._log
        with process.stdout:  # the reader owns the pipe: closed at its end, not by the GC
            for line in process.stdout:
                log.write(line)
                log.flush()
                if READY_LINE in line.lower():
                    ready.set()
        ready.set()  # it exited: start() sees that and says so

    def stop(self) -> None:
        """Stop (SIGTERM: Redis closes every client and removes its socket); idempotent."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT)  # it ends at the pipe's end, with the process
            self._reader = None
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisMonitor:
    """Every command Redis runs while this is open (``MONITOR``), as redis-cli prints them.

    Broker messages, retries the worker publishes, results, control replies: whatever
    any client sends to Redis is in :attr:`lines`.
    """

    def __init__(self, server: RedisServer) -> None:
        self._server = server
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._process = subprocess.Popen(
            [REDIS_CLI, "-s", str(server.socket_path), "monitor"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, name="redis-monitor", daemon=True)
        self._reader.start()
        # MONITOR answers OK once it is on: from then on nothing escapes it.
        try:
            self._wait_for(lambda line: line == "OK")
        except BaseException:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT)
            raise

    def _read(self) -> None:
        assert self._process.stdout is not None
        with self._process.stdout:  # closed at its end, not by the GC
            for raw in self._process.stdout:
                with self._changed:
                    self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait_for(self, predicate: Callable[[str], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with self._changed:
            while not any(predicate(line) for line in self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise TimeoutError(f"redis MONITOR: nothing expected after {START_TIMEOUT} s")
                self._changed.wait(remaining)

    def close(self) -> str:
        """Stop monitoring once every command sent so far has arrived; all lines, joined."""
        # Commands reach MONITOR in order: once a marker sent now is seen, so is all before it.
        marker = f"monitor-end-{os.urandom(8).hex()}"
        try:
            with self._server.client() as client:
                client.echo(marker)
            self._wait_for(lambda line: marker in line)
        finally:
            self._process.terminate()
            self._process.wait(STOP_TIMEOUT)
            self._reader.join(STOP_TIMEOUT)
        with self._changed:
            return "\n".join(self.lines)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started Redis; ``redis_server.url`` is the broker and result backend URL."""
    # A short folder of its own: a unix socket path must stay under ~107 bytes, and the
    # test's own tmp_path carries the (long) test name.
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """A started RabbitMQ, one per test module (it takes seconds to start)."""
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    yield server
    server.close()


# ----------------------------------------------------------------------------- worker


class WorkerProcess:
    """A worker subprocess whose output can be waited on line by line."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._process = subprocess.Popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own process group: teardown kills the main process and its pool at once.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="worker-output", daemon=True)
        self._reader.start()

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    @property
    def pid(self) -> int:
        """The worker's main process (the pool processes are its children)."""
        return self._process.pid

    def _read(self) -> None:
        assert self._process.stdout is not None
        # The pipe is closed at its end, not left to the GC.
        with self.log_path.open("w", encoding="utf-8") as log, self._process.stdout:
            for raw in self._process.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:  # EOF: nobody waits for a line that can no longer come
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, *, timeout: float, start: int = 0) -> str:
        """The first output line from index ``start`` on that matches ``pattern``."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            checked = start
            while True:
                for line in self.lines[checked:]:
                    if compiled.search(line):
                        return line
                checked = max(checked, len(self.lines))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise TimeoutError(
                        f"no worker output line matching {pattern!r} within {timeout} s"
                    )
                self._changed.wait(remaining)

    def mark(self) -> int:
        """The number of lines so far: ``wait_for_line(start=mark)`` sees only newer ones."""
        with self._changed:
            return len(self.lines)

    def wait_exit(self, *, timeout: float) -> int:
        """Wait for the worker to exit by itself; its exit status."""
        return self._process.wait(timeout)

    def stop(self) -> None:
        """Kill the worker's whole process group (main process and pool) and reap it."""
        # The group, even if the main process is gone: its pool may not be.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)


def child_processes(pid: int) -> list[int]:
    """The child processes of `pid` (a worker has none: sessions and beat are its threads)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in children.split()]


#: The operator's allowance that lets queue requests reach the tests' servers: they listen
#: on loopback, at any port. Tests of the egress policy itself leave it out.
LOOPBACK_ALLOWED = {
    ENV_PREFIX + "ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
    ENV_PREFIX + "ALLOW_PORTS": "1-65535",
}


def worker_env(
    data_dir: Path, extra: Mapping[str, str] | None = None, *, allow_loopback: bool = True
) -> dict[str, str]:
    """This process's environment without SMTP_SESSION_*, a private data dir, no exporter,
    and (unless `allow_loopback` is false) the loopback allowance."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env[ENV_PREFIX + "DATA_DIR"] = str(data_dir)
    env[ENV_PREFIX + "METRICS_PORT"] = "0"  # 0 disables the /metrics exporter
    if allow_loopback:
        env.update(LOOPBACK_ALLOWED)
    env.update(extra or {})
    return env


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """``start_worker(env=..., celery_cli=False, concurrency=2, beat=False)`` starts a worker.

    ``concurrency``: sessions at once (``None``: the worker's default, 100).

    ``env`` is the whole environment (see :func:`worker_env`). With ``celery_cli`` the
    worker is started as ``celery -A smtp_session.worker.app worker`` instead of
    ``smtp-session worker``;
    with ``beat`` it embeds the beat scheduler (``smtp-session worker --beat``).
    Every worker started is killed at teardown, and the tail of its output printed.
    """
    workers: list[WorkerProcess] = []

    def start(
        *,
        env: Mapping[str, str],
        celery_cli: bool = False,
        concurrency: int | None = 2,
        beat: bool = False,
    ) -> WorkerProcess:
        if celery_cli:  # with `beat`, Celery's own --beat (which the worker refuses)
            argv = [str(BIN / "celery"), "-A", APP, "worker", "--loglevel=INFO"]
            argv += ["--beat"] if beat else []
        else:
            argv = [str(BIN / "smtp-session"), "worker", *(["--beat"] if beat else [])]
        if concurrency is not None:  # None: the worker's default
            argv.append(f"--concurrency={concurrency}")
        worker = WorkerProcess(argv, env, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
        tail = worker.lines[-LOG_TAIL:]
        print(f"--- {worker.log_path} (last {len(tail)} lines)", *tail, sep="\n")


def wait_until_ready(client: Celery, worker: WorkerProcess, *, timeout: float) -> str:
    """Wait until the worker answers a broadcast ping; returns its node name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # limit=1: one worker, so its pong ends the wait at once.
        replies: list[dict[str, Any]] = client.control.ping(timeout=PING_TIMEOUT, limit=1) or []
        if replies:
            return next(iter(replies[0]))
        if not worker.running:
            raise RuntimeError(f"worker exited early:\n{worker.output()}")
    raise TimeoutError(f"worker not ready after {timeout} s:\n{worker.output()}")


async def ready_worker(
    start_worker: WorkerFactory,
    client: Celery,
    env: Mapping[str, str],
    *,
    after: str | None = None,
    **options: Any,
) -> WorkerProcess:
    """A worker started with `env` (and start_worker's `options`), answering pings; asked
    only once it wrote a line matching `after`, if given (before it, pings would fail)."""
    worker = start_worker(env=env, **options)
    if after is not None:
        await asyncio.to_thread(worker.wait_for_line, after, timeout=START_TIMEOUT)
    await asyncio.to_thread(wait_until_ready, client, worker, timeout=START_TIMEOUT)
    return worker


@pytest.fixture
async def gated_server() -> AsyncIterator[GatedServer]:
    """A started :class:`GatedServer`: its sessions begin at ``open_gate()``."""
    server = GatedServer()
    await server.start()
    yield server
    await server.stop()


def running_task(client: Celery, task_id: str, *, timeout: float) -> dict[str, Any]:
    """``inspect active``'s entry for a task that is running now (it has ``worker_pid``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The worker lists a task once its pool process has reported taking it, which
        # may trail the task's first network traffic by a moment: ask again until then.
        active = client.control.inspect(timeout=PING_TIMEOUT, limit=1).active() or {}
        for task in (task for tasks in active.values() for task in tasks):
            if task["id"] == task_id:
                assert isinstance(task, dict)
                return task
    raise TimeoutError(f"task {task_id} not among the active tasks after {timeout} s")


@pytest.fixture
def celery_client(redis_server: RedisServer) -> Iterator[Celery]:
    """A Celery app as a web backend would configure it: broker and backend URL, nothing else.

    Deliberately not ``smtp_session.worker.app``: docs/tasks.md promises that a caller
    needs only Celery, the URL and the task name.
    """
    client = Celery("web-backend", broker=redis_server.url, backend=redis_server.url)
    yield client
    client.close()
