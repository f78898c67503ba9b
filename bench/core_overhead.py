"""Overhead of the session core: open_session vs a bare aiosmtplib loop, same run.

Against one aiosmtpd server process (plain and STARTTLS) on loopback, three clients
take turns, round by round, in a rotating order so that drift on a shared machine
hits all of them alike:

* ``raw``: aiosmtplib connect / EHLO / (STARTTLS / EHLO) / QUIT, nothing else;
* ``core``: ``open_session`` as a library call, the bare core: no observers
  (``observers=()``), logging at WARNING;
* ``deployed``: ``open_session`` as the worker runs it: observed by the JSON log
  (``tasks.observe.LOG``, INFO lines to /dev/null) and by Prometheus metrics
  (``SessionMetrics`` in a registry of their own).

The TLS context is the same object for all three: the portable-trust context with
the throwaway CA in ``ca_file`` (trust=portable: no native-store fallback).
Reported: sessions per second and client CPU per session (this process only; the
server has its own process), the ratios core/raw and deployed/raw, and what the
observers cost: deployed / bare core. Goals: core/raw >= 0.9, deployed/core >= 0.9.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtplib import SMTP

from bench.common import (
    BARE_CORE,
    EHLO_NAME,
    LOOPBACK,
    configure_deployed_logging,
    cpu_seconds,
    deployed_observers,
    make_pki,
    print_table,
    ratio,
    server_process,
    write_result,
)
from smtp_session.monitoring.logging import configure_logging
from smtp_session.tasks.observe import SessionObserver
from smtp_session.tasks.session import open_session
from smtp_session.tasks.trust import verifying_context

NAME = "core_overhead"
MODES = ("plain", "starttls")
CONCURRENCIES = (1, 10)
VARIANTS = ("raw", "core", "deployed")
ROUNDS = 8
#: Sessions per client per round, sized for ~0.3-0.6 s rounds on a 2-core machine.
SESSIONS_PER_ROUND = {"plain": 200, "starttls": 80}
WARMUP_SESSIONS = 20
GOAL = 0.9
#: (ours, reference): the rate ratios reported. The goal holds for the core against raw
#: aiosmtplib, and for the deployed core (log + metrics observers) against the bare one.
COMPARISONS = (("core", "raw"), ("deployed", "raw"), ("deployed", "core"))
GOALS = (("core", "raw"), ("deployed", "core"))
SESSION_TIMEOUT = 10.0

Session = Callable[[], Awaitable[bool]]


@dataclass
class Tally:
    sessions: int = 0
    failed: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    round_rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return ratio(self.sessions, self.wall)

    @property
    def cpu_ms(self) -> float:
        return 1000 * ratio(self.cpu, self.sessions)


def raw_session(port: int, *, starttls: bool, ca_file: str) -> Session:
    context = verifying_context("portable", ca_file)

    async def session() -> bool:
        smtp = SMTP(
            hostname=LOOPBACK,
            port=port,
            local_hostname=EHLO_NAME,
            use_tls=False,
            start_tls=False,
            tls_context=context,
            timeout=SESSION_TIMEOUT,
        )
        await smtp.connect()
        await smtp.ehlo()
        if starttls:
            await smtp.starttls(tls_context=context)
            await smtp.ehlo()
        await smtp.quit()
        return True

    return session


def our_session(
    port: int, *, starttls: bool, ca_file: str, observers: Sequence[SessionObserver]
) -> Session:
    fields: dict[str, Any] = {
        "host": LOOPBACK,
        "port": port,
        "security": "starttls" if starttls else "plain",
        "trust": "portable",
        "ca_file": ca_file,
        "ehlo_name": EHLO_NAME,
        "retries": 0,
        "timeout": SESSION_TIMEOUT,
    }

    async def session() -> bool:
        # A fresh dict per call, as task kwargs arrive: validation is part of the cost.
        outcome = await open_session(dict(fields), observers=observers)
        return outcome.ok

    return session


def configure_for(variant: str, sink: Any) -> None:
    """Logging as each client runs: quiet for the library call, INFO JSON when deployed."""
    if variant == "deployed":
        configure_deployed_logging(sink)
    else:
        configure_logging("json", level=logging.WARNING, stream=sink)


async def run_round(session: Session, count: int, concurrency: int) -> tuple[int, float, float]:
    """`count` sessions, `concurrency` at a time; (failed, wall seconds, CPU seconds)."""
    remaining = itertools.count()
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while next(remaining) < count:
            if not await session():
                failed += 1

    cpu = cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed, time.perf_counter() - started, cpu_seconds() - cpu


async def measure(ports: dict[str, list[int]], ca_file: str, sink: Any) -> list[dict[str, Any]]:
    deployed = deployed_observers()
    cases: list[dict[str, Any]] = []
    for mode, concurrency in itertools.product(MODES, CONCURRENCIES):
        port = ports[mode][0]
        starttls = mode == "starttls"
        clients: dict[str, Session] = {
            "raw": raw_session(port, starttls=starttls, ca_file=ca_file),
            "core": our_session(port, starttls=starttls, ca_file=ca_file, observers=BARE_CORE),
            "deployed": our_session(port, starttls=starttls, ca_file=ca_file, observers=deployed),
        }
        tallies = {variant: Tally() for variant in VARIANTS}
        for variant in VARIANTS:  # warm-up: contexts cached, imports done, pools primed
            configure_for(variant, sink)
            await run_round(clients[variant], WARMUP_SESSIONS, concurrency)
        count = SESSIONS_PER_ROUND[mode]
        for number in range(ROUNDS):
            shift = number % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                configure_for(variant, sink)
                failed, wall, cpu = await run_round(clients[variant], count, concurrency)
                tally = tallies[variant]
                tally.sessions += count
                tally.failed += failed
                tally.wall += wall
                tally.cpu += cpu
                tally.round_rates.append(count / wall)
        case: dict[str, Any] = {"mode": mode, "concurrency": concurrency}
        for variant, tally in tallies.items():
            case[variant] = {
                "sessions": tally.sessions,
                "failed": tally.failed,
                "sessions_per_s": round(tally.rate, 1),
                "cpu_ms_per_session": round(tally.cpu_ms, 3),
                "round_rates": [round(rate, 1) for rate in tally.round_rates],
            }
        case["ratios"] = {
            f"{ours}/{reference}": compare(tallies[ours], tallies[reference])
            for ours, reference in COMPARISONS
        }
        cases.append(case)
        print(f"  {mode:8} c={concurrency:<3} done", flush=True)
    return cases


def compare(ours: Tally, reference: Tally) -> dict[str, float]:
    """Rate and CPU ratios of two clients (> 1: ours is faster / cheaper)."""
    # Each round's own ratio, then the median: robust to a noisy neighbour.
    paired = [a / b for a, b in zip(ours.round_rates, reference.round_rates, strict=True)]
    return {
        "ratio_rate": round(ratio(ours.rate, reference.rate), 3),
        "ratio_rate_median_round": round(statistics.median(paired), 3),
        "ratio_cpu": round(ratio(reference.cpu_ms, ours.cpu_ms), 3),
    }


def report(cases: list[dict[str, Any]]) -> None:
    names = [f"{ours}/{reference}" for ours, reference in COMPARISONS]
    rows = [
        [
            case["mode"],
            case["concurrency"],
            *(case[variant]["sessions_per_s"] for variant in VARIANTS),
            *(
                case["ratios"][name][key]
                for name in names
                for key in ("ratio_rate", "ratio_rate_median_round")
            ),
            case["raw"]["cpu_ms_per_session"],
            case["core"]["cpu_ms_per_session"],
            case["deployed"]["cpu_ms_per_session"],
            sum(case[variant]["failed"] for variant in VARIANTS),
        ]
        for case in cases
    ]
    print_table(
        f"open_session vs bare aiosmtplib ({ROUNDS} interleaved rounds per client)",
        [
            "mode",
            "conc",
            *(f"{variant}/s" for variant in VARIANTS),
            *(header for name in names for header in (name, "(median round)")),
            "raw cpu ms",
            "core cpu ms",
            "deployed cpu ms",
            "failed",
        ],
        rows,
    )
    print()
    for ours, reference in GOALS:
        name = f"{ours}/{reference}"
        worst = min(case["ratios"][name]["ratio_rate"] for case in cases)
        verdict = "meets" if worst >= GOAL else "misses"
        print(f"worst rate ratio {name}: {worst:.3f} ({verdict} the goal >= {GOAL})")
    print("deployed = observers (LOG, SessionMetrics), INFO JSON logs; core = observers ()")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-core-") as folder, open(os.devnull, "w") as sink:
        pki = make_pki(Path(folder))
        args = ["--plain", "1", "--starttls", "1", "--chain", str(pki.server_chain)]
        with server_process(args, Path(folder) / "server.log") as server:
            print(f"aiosmtpd server process {server.pid}: {server.ports}")
            cases = asyncio.run(measure(server.ports, str(pki.ca_file), sink))
    report(cases)
    write_result(
        NAME,
        {
            "goal_ratio": GOAL,
            "rounds": ROUNDS,
            "sessions_per_round": SESSIONS_PER_ROUND,
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
