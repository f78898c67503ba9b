"""Where the core loop spends its time: pyinstrument over open_session, as deployed.

First, unprofiled and one session at a time, the wall time per stage: the raw
aiosmtplib loop timed step by step next to open_session's own ``Outcome.timings``.

Then the ``deployed`` client of core_overhead (INFO JSON logs to /dev/null, metrics in a
registry) runs plain and STARTTLS sessions at concurrency 10 against the aiosmtpd
server process, under pyinstrument (statistical, wall clock, main thread). Written to
bench/results/: ``profile_core.txt`` (the call trees, then the flat lists) and
``profile_core.json`` (the top frames by self time, and our own functions by total time).

The event loop's idle wait (epoll) is part of the wall clock: it is listed, and the
shares of everything else are of the time not spent waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import ssl
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiosmtplib import SMTP
from pyinstrument import Profiler
from pyinstrument.frame import Frame

from bench.common import (
    EHLO_NAME,
    LOOPBACK,
    REPO,
    RESULTS_DIR,
    deployed_observers,
    make_pki,
    print_table,
    server_process,
    write_result,
)
from bench.core_overhead import configure_for, our_session, raw_session, run_round
from smtp_session.tasks.session import open_session
from smtp_session.tasks.trust import verifying_context

NAME = "profile_core"
SESSIONS = {"plain": 1500, "starttls": 500}
CONCURRENCY = 10
WARMUP_SESSIONS = 50
INTERVAL = 0.0002  # 0.2 ms between samples
TOP = 20
OWN_CODE = ("tasks/", "monitoring/")
IDLE_FUNCTIONS = {"select", "poll"}


def _where(frame: Frame) -> str:
    path = frame.file_path or "?"
    if path.startswith(str(REPO)):
        path = path[len(str(REPO)) + 1 :]
    else:
        marker = "site-packages/"
        path = path.split(marker, 1)[1] if marker in path else path.rsplit("/lib/", 1)[-1]
    return f"{frame.function} ({path}:{frame.line_no})"


def _walk(frame: Frame, selves: dict[str, float], totals: dict[str, float], seen: set[str]) -> None:
    if frame.is_synthetic:  # "[self]", "[await]": already in the parent's self time
        return
    where = _where(frame)
    selves[where] += frame.total_self_time
    if where not in seen:  # a recursive frame counts once in its own total
        totals[where] += frame.time
    for child in frame.children:
        _walk(child, selves, totals, seen | {where})


def summarize(root: Frame) -> dict[str, Any]:
    selves: dict[str, float] = defaultdict(float)
    totals: dict[str, float] = defaultdict(float)
    _walk(root, selves, totals, set())
    idle = sum(
        seconds for where, seconds in selves.items() if where.split(" ")[0] in IDLE_FUNCTIONS
    )
    busy = root.time - idle
    top_self = sorted(selves.items(), key=lambda item: -item[1])[:TOP]
    own = sorted(
        ((where, seconds) for where, seconds in totals.items() if "(" in where and _own(where)),
        key=lambda item: -item[1],
    )[:TOP]
    return {
        "wall_s": round(root.time, 3),
        "idle_s": round(idle, 3),
        "busy_s": round(busy, 3),
        "top_self": [
            {"frame": where, "self_s": round(s, 4), "share_of_busy": round(s / busy, 4)}
            for where, s in top_self
        ],
        "own_total": [
            {"frame": where, "total_s": round(s, 4), "share_of_busy": round(s / busy, 4)}
            for where, s in own
        ],
    }


def _own(where: str) -> bool:
    location = where.rsplit("(", 1)[1]
    return location.startswith(OWN_CODE)


STAGE_SESSIONS = 300


async def stage_breakdown(ports: dict[str, list[int]], ca_file: str) -> dict[str, Any]:
    """Mean microseconds per step: raw aiosmtplib vs open_session's Outcome.timings."""
    context = verifying_context("portable", ca_file)
    results: dict[str, Any] = {}
    for mode in SESSIONS:
        starttls = mode == "starttls"
        port = ports[mode][0]
        raw: dict[str, float] = defaultdict(float)
        ours: dict[str, float] = defaultdict(float)
        fields = {
            "host": LOOPBACK,
            "port": port,
            "security": mode,
            "trust": "portable",
            "ca_file": ca_file,
            "ehlo_name": EHLO_NAME,
            "retries": 0,
        }
        for number in range(WARMUP_SESSIONS + STAGE_SESSIONS):
            keep = number >= WARMUP_SESSIONS
            steps = await _raw_steps(port, starttls, context)
            started = time.perf_counter()
            outcome = await open_session(dict(fields))
            wall = time.perf_counter() - started
            if not keep:
                continue
            for step, seconds in steps.items():
                raw[step] += seconds
            for stage, value in outcome.timings.model_dump().items():
                if value is not None:
                    ours[stage] += value
            ours["wall"] += wall
        results[mode] = {
            "raw_us": {k: round(1e6 * v / STAGE_SESSIONS, 1) for k, v in raw.items()},
            "ours_us": {k: round(1e6 * v / STAGE_SESSIONS, 1) for k, v in ours.items()},
        }
    return results


async def _raw_steps(port: int, starttls: bool, context: ssl.SSLContext) -> dict[str, float]:
    steps: dict[str, float] = {}
    started = mark = time.perf_counter()

    def step(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        steps[name] = steps.get(name, 0.0) + now - mark
        mark = now

    smtp = SMTP(
        hostname=LOOPBACK,
        port=port,
        local_hostname=EHLO_NAME,
        start_tls=False,
        tls_context=context,
        timeout=10,
    )
    await smtp.connect()
    step("connect+banner")
    await smtp.ehlo()
    step("ehlo")
    if starttls:
        await smtp.starttls(tls_context=context)
        step("starttls")
        await smtp.ehlo()
        step("ehlo")
    await smtp.quit()
    step("quit")
    steps["total"] = time.perf_counter() - started
    return steps


async def profile(ports: dict[str, list[int]], ca_file: str, sink: Any) -> dict[str, Any]:
    observers = deployed_observers()
    configure_for("deployed", sink)
    results: dict[str, Any] = {}
    texts: list[str] = []
    for mode, count in SESSIONS.items():
        starttls = mode == "starttls"
        port = ports[mode][0]
        session = our_session(port, starttls=starttls, ca_file=ca_file, observers=observers)
        raw = raw_session(port, starttls=starttls, ca_file=ca_file)
        await run_round(session, WARMUP_SESSIONS, CONCURRENCY)
        await run_round(raw, WARMUP_SESSIONS, CONCURRENCY)
        _, raw_wall, _ = await run_round(raw, count, CONCURRENCY)  # unprofiled reference
        profiler = Profiler(interval=INTERVAL, async_mode="disabled")
        profiler.start()
        failed, wall, _ = await run_round(session, count, CONCURRENCY)
        profiler.stop()
        session_record = profiler.last_session
        assert session_record is not None
        root = session_record.root_frame()
        assert root is not None
        summary = summarize(root)
        summary.update(
            sessions=count,
            failed=failed,
            profiled_sessions_per_s=round(count / wall, 1),
            raw_unprofiled_sessions_per_s=round(count / raw_wall, 1),
        )
        results[mode] = summary
        texts.append(f"=== {mode}, concurrency {CONCURRENCY}, {count} sessions (call tree)\n")
        texts.append(profiler.output_text(unicode=False, color=False, show_all=False))
        texts.append(f"\n=== {mode}: flat, self time\n")
        texts.append(profiler.output_text(unicode=False, color=False, flat=True))
        print(f"  profiled {mode}", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{NAME}.txt").write_text("\n".join(texts))
    return results


def report_stages(stages: dict[str, Any]) -> None:
    for mode, data in stages.items():
        raw, ours = data["raw_us"], data["ours_us"]
        print_table(
            f"{mode}: mean microseconds per step, one session at a time, unprofiled",
            ["raw aiosmtplib step", "us", "open_session stage", "us"],
            list(
                itertools.zip_longest(
                    raw.keys(), raw.values(), ours.keys(), ours.values(), fillvalue=""
                )
            ),
        )


def report(results: dict[str, Any]) -> None:
    for mode, summary in results.items():
        busy = summary["busy_s"]
        print(
            f"\n{mode}: {summary['sessions']} sessions, wall {summary['wall_s']} s, "
            f"event loop idle {summary['idle_s']} s, busy {busy} s"
        )
        print_table(
            f"{mode}: top frames by self time (share of busy time)",
            ["frame", "self s", "share"],
            [
                [f["frame"], f["self_s"], f"{100 * f['share_of_busy']:.1f}%"]
                for f in summary["top_self"][:12]
            ],
        )
        print_table(
            f"{mode}: our functions by total time (share of busy time)",
            ["frame", "total s", "share"],
            [
                [f["frame"], f["total_s"], f"{100 * f['share_of_busy']:.1f}%"]
                for f in summary["own_total"][:12]
            ],
        )


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-profile-") as folder,
        open(os.devnull, "w") as sink,
    ):
        pki = make_pki(Path(folder))
        args = ["--plain", "1", "--starttls", "1", "--chain", str(pki.server_chain)]
        with server_process(args, Path(folder) / "server.log") as server:
            configure_for("core", sink)
            stages = asyncio.run(stage_breakdown(server.ports, str(pki.ca_file)))
            results = asyncio.run(profile(server.ports, str(pki.ca_file), sink))
    report_stages(stages)
    report(results)
    print(f"\ncall trees: {(RESULTS_DIR / (NAME + '.txt')).relative_to(REPO)}")
    write_result(
        NAME,
        {
            "concurrency": CONCURRENCY,
            "interval_s": INTERVAL,
            "stages_us": stages,
            "modes": results,
        },
    )


if __name__ == "__main__":
    main()
