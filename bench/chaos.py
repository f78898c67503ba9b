"""Chaos on each broker: N sessions, the whole worker SIGKILLed mid-run, the broker restarted.

For each broker (``embedded``: the worker's Valkey; ``redis``: redis-server with an
append-only file; ``rabbitmq``: Debian's rabbitmq-server, results in the worker's files),
all on loopback and started here:

1. a worker (100 sessions at once) and ``--n`` sessions sent at once to loopback servers
   whose every reply comes ``--delay`` s late (a session takes three delays);
2. ``--kill-after`` s later, SIGKILL to the worker's whole process group (the worker is
   one process: the threads pool has no pool processes to kill on their own), then a new
   worker on the same data dir;
3. once it consumes, the broker restarted (stopped and started: Redis and RabbitMQ
   keep their messages on disk). The embedded broker lives in the worker, so there the
   "restart" is a second SIGKILL of the whole worker and a third worker;
4. every result waited for, up to ``--wait`` s.

Printed per broker: enqueued, results, missing, duplicates (sessions run more than once
for one task, read from the workers' ``session.attempt`` lines), and when the last result
arrived after the first kill (Redis hands a dead worker's messages out again after its
visibility timeout: 240 s with the defaults, less with ``--max-timeout``).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.brokers import (
    Setup,
    amqp_setup,
    collect,
    embedded_setup,
    redis_setup,
    runs_by_task,
    send,
)
from bench.common import plain_request, print_table, server_process, write_result
from smtp_session.tasks.contract import DEFAULT_CONCURRENCY
from tests.integration.conftest import RedisServer
from tests.rabbitmq import RabbitMQServer

NAME = "chaos"
DEFAULT_SESSIONS = 200
DEFAULT_DELAY = 0.5
DEFAULT_KILL_AFTER = 1.5
DEFAULT_WAIT = 400.0
SERVER_PORTS = 4
BROKERS = ("embedded", "redis", "rabbitmq")

#: A broker: a Setup for a folder, and how to restart it (None: it lives in the worker).
Restart = Callable[[], None] | None


class Restartable:
    """A broker server with stop() and start()."""

    def __init__(self, server: RedisServer | RabbitMQServer) -> None:
        self.server = server

    def __call__(self) -> None:
        self.server.stop()
        self.server.start()


@contextlib.contextmanager
def broker(name: str, folder: Path) -> Iterator[tuple[Setup, Restart]]:
    folder.mkdir(parents=True)
    if name == "embedded":
        yield embedded_setup(folder), None
        return
    server: RedisServer | RabbitMQServer
    if name == "redis":
        server = RedisServer(folder, persistent=True)
        server.start()
        setup = redis_setup(folder, server.url)
    else:
        server = RabbitMQServer(folder / "rabbitmq")
        server.start()
        setup = amqp_setup(folder, server.url)
    try:
        yield setup, Restartable(server)
    finally:
        server.stop()
        if isinstance(server, RabbitMQServer):
            server.close()


def chaos(
    setup: Setup, restart: Restart, requests: list[dict[str, Any]], args: Any
) -> dict[str, Any]:
    """One run of the four steps; what arrived, and when."""
    workers = [setup.start_worker(DEFAULT_CONCURRENCY)]
    with setup.client() as client:
        results = send(client, requests)
        time.sleep(args.kill_after)  # mid-run: the first sessions are on their servers
        workers[-1].stop()
        killed = time.monotonic()
        workers.append(setup.start_worker(DEFAULT_CONCURRENCY))
        if restart is None:
            workers[-1].stop()
            workers.append(setup.start_worker(DEFAULT_CONCURRENCY))
        else:
            restart()
        try:
            arrived = collect(results, timeout=args.wait, since=killed)
        finally:
            for worker in workers:
                worker.stop()
    runs = runs_by_task([worker.log_path for worker in workers])
    return {
        "enqueued": len(results),
        "results": len(arrived),
        "missing": len(results) - len(arrived),
        "duplicates": sum(1 for result in results if runs[result.id] > 1),
        "last_result_after_kill_s": round(max(arrived.values(), default=0.0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=DEFAULT_SESSIONS, help="sessions sent")
    parser.add_argument("--delay", type=float, default=DEFAULT_DELAY, help="s per reply")
    parser.add_argument("--kill-after", type=float, default=DEFAULT_KILL_AFTER)
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT, help="s for the results")
    parser.add_argument(
        "--max-timeout", type=float, help="the workers' SMTP_SESSION_MAX_TIMEOUT (Redis's wait)"
    )
    parser.add_argument("--only", choices=BROKERS, nargs="*", default=list(BROKERS))
    args = parser.parse_args()
    delays = ["--banner-delay", str(args.delay), "--reply-delay", str(args.delay)]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as name:
        folder = Path(name)
        with server_process(
            ["--slow", str(SERVER_PORTS), *delays], folder / "servers.log"
        ) as servers:
            ports = servers.ports["slow"]
            limit = {} if args.max_timeout is None else {"timeout": args.max_timeout}
            requests = [plain_request(ports[i % len(ports)], **limit) for i in range(args.n)]
            for broker_name in args.only:
                with broker(broker_name, folder / broker_name) as (setup, restart):
                    if args.max_timeout is not None:
                        for setting in ("MAX_TIMEOUT", "TIMEOUT"):
                            setup.worker_env[f"SMTP_SESSION_{setting}"] = str(args.max_timeout)
                    report[broker_name] = chaos(setup, restart, requests, args)
    print_table(
        f"{args.n} sessions of {3 * args.delay:g} s; whole worker SIGKILLed after "
        f"{args.kill_after:g} s, then the broker restarted",
        ["broker", "enqueued", "results", "missing", "duplicates", "last result after kill"],
        [
            [
                name,
                row["enqueued"],
                row["results"],
                row["missing"],
                row["duplicates"],
                f"{row['last_result_after_kill_s']} s",
            ]
            for name, row in report.items()
        ],
    )
    write_result(NAME, report)


if __name__ == "__main__":
    main()
