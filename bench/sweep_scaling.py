"""Sweep scaling: N loopback targets whose servers wait 200 ms before their greeting.

The servers are a handful of raw asyncio responders in a process of their own; many
targets point at each (the delay is per connection, so that is the same as one server
per target). Each run is ``tasks.sweep.sweep`` in a fresh child process, so that its
peak RSS (VmHWM) is its own, with INFO JSON logs to /dev/null as the worker logs.

* N = 100, 1,000, 5,000 at the default concurrency, as a fleet sweep runs: every
  target named, and counted in Prometheus metrics under its own label;
* N = 5,000 again without metrics: what the sweep itself keeps per target;
* N = 1,000 with every session open at once (concurrency 1,000), no metrics: the
  memory per 1,000 concurrent sessions.

Reported: wall time vs the ideal ``delay x ceil(N / concurrency)``, seconds per 1,000
targets, client CPU per session, and the peak RSS growth over the warmed-up baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    configure_deployed_logging,
    cpu_seconds,
    deployed_observers,
    peak_rss_kib,
    plain_request,
    print_table,
    raise_open_files_limit,
    ratio,
    rss_kib,
    server_process,
    write_result,
)

NAME = "sweep_scaling"
BANNER_DELAY = 0.2
SIZES = (100, 1000, 5000)
CONCURRENCY = 100  # SMTP_SESSION_SWEEP_CONCURRENCY's default
MEMORY_RUN = (1000, 1000)  # every session open at once
#: (targets, concurrency, metrics) of every run, in order.
RUNS = (
    *((size, CONCURRENCY, True) for size in SIZES),
    (SIZES[-1], CONCURRENCY, False),
    (*MEMORY_RUN, False),
)
SERVERS = 8
#: Bound on one child: the 5,000-target sweep is ideally 10 s.
CHILD_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- child


async def _child_sweep(
    size: int, concurrency: int, ports: list[int], *, with_metrics: bool
) -> dict[str, Any]:
    from smtp_session.tasks.observe import DEFAULT_OBSERVERS
    from smtp_session.tasks.request import parse_request
    from smtp_session.tasks.session import open_session
    from smtp_session.tasks.sweep import sweep

    names = [f"target-{index:05d}" for index in range(size)]
    items = [
        parse_request(plain_request(ports[index % len(ports)], target=name))
        for index, name in enumerate(names)
    ]
    # As deployed (the log and metrics), or the log alone: what the sweep itself keeps.
    observers = deployed_observers(known_targets=names) if with_metrics else DEFAULT_OBSERVERS
    # Warm-up (imports, first-use caches) before the baseline is taken.
    await open_session(items[0], observers=observers)
    rss_before, peak_before = rss_kib(), peak_rss_kib()
    cpu = cpu_seconds()
    started = time.perf_counter()
    summary = await sweep(items, concurrency=concurrency, observers=observers)
    wall = time.perf_counter() - started
    errors = Counter(o.error.value for o in summary.outcomes if o.error is not None)
    return {
        "targets": size,
        "concurrency": concurrency,
        "metrics": with_metrics,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu_seconds() - cpu, 3),
        "ok": summary.ok,
        "failed": summary.failed,
        "errors": dict(errors),
        "rss_before_kib": rss_before,
        "peak_before_kib": peak_before,
        "peak_after_kib": peak_rss_kib(),
    }


def child(arguments: argparse.Namespace) -> None:
    raise_open_files_limit()
    with open(os.devnull, "w") as sink:
        configure_deployed_logging(sink)
        ports = [int(port) for port in arguments.ports.split(",")]
        result = asyncio.run(
            _child_sweep(
                arguments.targets,
                arguments.concurrency,
                ports,
                with_metrics=not arguments.no_metrics,
            )
        )
    print(json.dumps(result))


# ----------------------------------------------------------------------------- parent


def run_child(size: int, concurrency: int, ports: list[int], *, metrics: bool) -> dict[str, Any]:
    completed = subprocess.run(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "bench.sweep_scaling",
            "--child",
            "--targets",
            str(size),
            "--concurrency",
            str(concurrency),
            "--ports",
            ",".join(map(str, ports)),
            *([] if metrics else ["--no-metrics"]),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"sweep child failed: {completed.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    ideal = BANNER_DELAY * math.ceil(size / concurrency)
    growth = max(0, result["peak_after_kib"] - result["rss_before_kib"])
    result.update(
        ideal_s=round(ideal, 3),
        wall_over_ideal=round(ratio(result["wall_s"], ideal), 3),
        overhead_ms_per_target=round(1000 * (result["wall_s"] - ideal) / size, 3),
        s_per_1000_targets=round(1000 * result["wall_s"] / size, 3),
        cpu_ms_per_session=round(1000 * result["cpu_s"] / size, 3),
        peak_growth_mib=round(growth / 1024, 1),
        kib_per_target=round(growth / size, 1),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--targets", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    parser.add_argument("--no-metrics", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments)
        return
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        args = ["--slow", str(SERVERS), "--banner-delay", str(BANNER_DELAY)]
        with server_process(args, Path(folder) / "server.log") as server:
            ports = server.ports["slow"]
            print(f"{SERVERS} slow-banner servers ({BANNER_DELAY} s) in process {server.pid}")
            for size, concurrency, metrics in RUNS:
                runs.append(run_child(size, concurrency, ports, metrics=metrics))
                label = "metrics" if metrics else "no metrics"
                print(f"  N={size} c={concurrency} {label}: {runs[-1]['wall_s']} s", flush=True)
    report(runs)


def report(runs: list[dict[str, Any]]) -> None:
    print_table(
        f"sweep, banner delay {BANNER_DELAY} s, plain SMTP, {SERVERS} server ports",
        [
            "N",
            "conc",
            "metrics",
            "wall s",
            "ideal s",
            "wall/ideal",
            "s per 1000",
            "overhead ms/target",
            "cpu ms/session",
            "peak RSS +MiB",
            "KiB/target",
            "ok",
            "failed",
        ],
        [
            [
                run["targets"],
                run["concurrency"],
                "yes" if run["metrics"] else "no",
                run["wall_s"],
                run["ideal_s"],
                run["wall_over_ideal"],
                run["s_per_1000_targets"],
                run["overhead_ms_per_target"],
                run["cpu_ms_per_session"],
                run["peak_growth_mib"],
                run["kib_per_target"],
                run["ok"],
                run["failed"],
            ]
            for run in runs
        ],
    )
    scaling = [run for run in runs if run["concurrency"] == CONCURRENCY and run["metrics"]]
    first, last = scaling[0], scaling[-1]
    growth = ratio(last["wall_s"], first["wall_s"])
    print(
        f"\nwall time x{growth:.1f} for N x{last['targets'] // first['targets']} "
        f"(ideal x{last['ideal_s'] / first['ideal_s']:.0f}); "
        f"worst wall/ideal {max(run['wall_over_ideal'] for run in scaling):.3f}"
    )
    bare = next(run for run in runs if run["concurrency"] == CONCURRENCY and not run["metrics"])
    print(
        f"peak RSS per target at N={bare['targets']}: {bare['kib_per_target']} KiB without "
        f"metrics, {last['kib_per_target']} KiB with a metrics label per target"
    )
    memory = next(run for run in runs if (run["targets"], run["concurrency"]) == MEMORY_RUN)
    per_thousand = memory["peak_growth_mib"] * 1000 / memory["concurrency"]
    print(
        f"peak RSS per 1,000 concurrent sessions: {per_thousand:.1f} MiB "
        f"(N={memory['targets']}, all open at once, outcomes kept; wall {memory['wall_s']} s)"
    )
    for run in runs:
        if run["failed"]:
            print(f"FAILED sessions at N={run['targets']} c={run['concurrency']}: {run['errors']}")
    write_result(
        NAME,
        {
            "banner_delay_s": BANNER_DELAY,
            "concurrency": CONCURRENCY,
            "servers": SERVERS,
            "runs": runs,
            "wall_growth_first_to_last": round(growth, 3),
            "kib_per_target_without_metrics": bare["kib_per_target"],
            "kib_per_target_with_metrics": last["kib_per_target"],
            "peak_rss_mib_per_1000_concurrent": round(per_thousand, 1),
        },
    )


if __name__ == "__main__":
    main()
