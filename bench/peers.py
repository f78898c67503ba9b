"""Peers on the same targets in the same run: blackbox_exporter, check_smtp, and us.

The targets are N plain and N STARTTLS endpoints spread over a few aiosmtpd servers
in a process of their own. Each client checks all of them, ``CONCURRENCY`` at a time,
taking turns round by round in a rotating order:

* ``smtp-session (in-process)``: ``tasks.sweep.sweep`` as the worker runs it (INFO JSON
  logs to /dev/null, metrics in a registry), trust=portable with the CA in ca_file;
* ``smtp-session check (CLI)``: one ``smtp-session check`` process per target, as a
  cron job or a Nagios-style scheduler would run it. A Python process start costs about
  half a second, so it checks only ``CLI_TARGETS`` targets per mode; its rate is
  measured on those and its wall time for N is extrapolated (marked ``*``);
* ``blackbox_exporter``: Debian's ``prometheus-blackbox-exporter`` on 127.0.0.1, a
  generated config with a ``tcp`` module per mode (``query_response`` with STARTTLS,
  the chain verified against the CA), probed over HTTP at ``/probe``;
* ``check_smtp``: monitoring-plugins' ``check_smtp`` (``-S`` for STARTTLS), one process
  per target. It does not verify the certificate chain: it does less work than the rest.

A peer that is not installed is reported and left out (``make bench`` installs both
where it can: see the Makefile's ``bench-deps``). Reported: checks per second and wall
time per client and mode, and the ratios of smtp-session in-process to each peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bench.common import (
    EHLO_NAME,
    LOOPBACK,
    PROCESS_TIMEOUT,
    START_TIMEOUT,
    configure_deployed_logging,
    deployed_observers,
    make_pki,
    print_table,
    ratio,
    server_process,
    write_result,
)
from smtp_session.tasks.observe import SessionObserver
from smtp_session.tasks.request import parse_request
from smtp_session.tasks.sweep import sweep

NAME = "peers"
TARGETS_PER_MODE = 200
CLI_TARGETS = 5
CONCURRENCY = 10
ROUNDS = 4
SERVERS_PER_MODE = 4
MODES = ("plain", "starttls")
CHECK_TIMEOUT = 10
BLACKBOX = "prometheus-blackbox-exporter"
CHECK_SMTP = "/usr/lib/nagios/plugins/check_smtp"
SMTP_SESSION = str(Path(sys.executable).parent / "smtp-session")
OURS = "smtp-session (in-process)"
CLI = "smtp-session check (CLI)"
PEER_BLACKBOX = "blackbox_exporter"
PEER_CHECK_SMTP = "check_smtp"
_LISTENING = re.compile(r'msg="Listening on" address=(?P<address>\S+)')

Target = tuple[str, int]  # (mode, port)
Checker = Callable[[Target], Awaitable[bool]]


# ----------------------------------------------------------------------------- blackbox


def blackbox_config(ca_file: Path) -> str:
    """Two tcp modules, as blackbox_exporter's own SMTP STARTTLS example goes."""
    # `send` lines get "\n" appended by the exporter: "\r" makes them CRLF.
    return f"""\
modules:
  smtp_plain:
    prober: tcp
    timeout: {CHECK_TIMEOUT}s
    tcp:
      query_response:
        - expect: "^220 "
        - send: "EHLO {EHLO_NAME}\\r"
        - expect: "^250 "
        - send: "QUIT\\r"
        - expect: "^221 "
  smtp_starttls:
    prober: tcp
    timeout: {CHECK_TIMEOUT}s
    tcp:
      tls_config:
        ca_file: "{ca_file}"
      query_response:
        - expect: "^220 "
        - send: "EHLO {EHLO_NAME}\\r"
        - expect: "^250-STARTTLS"
        - expect: "^250 "
        - send: "STARTTLS\\r"
        - expect: "^220 "
        - starttls: true
        - send: "EHLO {EHLO_NAME}\\r"
        - expect: "^250 "
        - send: "QUIT\\r"
        - expect: "^221 "
"""


class Blackbox:
    """The exporter on 127.0.0.1 port 0; the bound port is read from its log line."""

    def __init__(self, executable: str, config: Path, log_path: Path) -> None:
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._log_path = log_path
        self._process = subprocess.Popen(  # noqa: S603 - Debian's exporter
            [
                executable,
                f"--config.file={config}",
                f"--web.listen-address={LOOPBACK}:0",
                "--log.level=info",  # the "Listening on" line is at info
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.address = ""
        self._reader = threading.Thread(target=self._read, name="blackbox-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT) or not self.address:
            self.stop()
            raise RuntimeError(f"blackbox_exporter did not start:\n{''.join(self.lines)}")

    def _read(self) -> None:
        assert self._process.stderr is not None
        with self._log_path.open("w") as log:
            for line in self._process.stderr:
                log.write(line)
                self.lines.append(line)
                if match := _LISTENING.search(line):
                    self.address = match["address"]
                    self._ready.set()
        self._ready.set()  # exited: nobody waits for a line that cannot come

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(PROCESS_TIMEOUT)
        self._reader.join(PROCESS_TIMEOUT)


@contextlib.contextmanager
def blackbox(executable: str, ca_file: Path, folder: Path) -> Iterator[Blackbox]:
    config = folder / "blackbox.yml"
    config.write_text(blackbox_config(ca_file))
    exporter = Blackbox(executable, config, folder / "blackbox.log")
    try:
        yield exporter
    finally:
        exporter.stop()


def blackbox_checker(address: str) -> Checker:
    host, _, port = address.rpartition(":")

    async def probe(target: Target) -> bool:
        mode, target_port = target
        query = urlencode({"module": f"smtp_{mode}", "target": f"{LOOPBACK}:{target_port}"})
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET /probe?{query} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            body = await reader.read()  # HTTP/1.0: the exporter closes after the reply
        finally:
            writer.close()
            await writer.wait_closed()
        return b"\nprobe_success 1" in body

    return probe


# ----------------------------------------------------------------------------- processes


def process_checker(argv_for: Callable[[Target], list[str]]) -> Checker:
    async def run(target: Target) -> bool:
        process = await asyncio.create_subprocess_exec(
            *argv_for(target),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            code = await asyncio.wait_for(process.wait(), CHECK_TIMEOUT * 3)
        except TimeoutError:
            process.kill()
            await process.wait()
            return False
        return code == 0

    return run


def check_smtp_argv(target: Target) -> list[str]:
    mode, port = target
    argv = [CHECK_SMTP, "-H", LOOPBACK, "-p", str(port), "-F", EHLO_NAME]
    argv += ["-t", str(CHECK_TIMEOUT)]
    return argv + (["-S"] if mode == "starttls" else [])


def cli_argv(ca_file: Path) -> Callable[[Target], list[str]]:
    def argv(target: Target) -> list[str]:
        mode, port = target
        return [
            SMTP_SESSION,
            "check",
            f"{LOOPBACK}:{port}",
            *("--security", mode, "--trust", "portable", "--ca-file", str(ca_file)),
            *("--retries", "0", "--ehlo-name", EHLO_NAME, "--timeout", str(CHECK_TIMEOUT)),
        ]

    return argv


# ----------------------------------------------------------------------------- running


@dataclass
class Tally:
    checks: int = 0
    failed: int = 0
    wall: float = 0.0

    @property
    def rate(self) -> float:
        return ratio(self.checks, self.wall)


async def bounded(checker: Checker, targets: list[Target]) -> tuple[int, float]:
    """Check every target, CONCURRENCY at a time; (failures, wall seconds)."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(target: Target) -> bool:
        async with slots:
            return await checker(target)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(target) for target in targets))
    return results.count(False), time.perf_counter() - started


def ours_checker(
    ca_file: Path, observers: Sequence[SessionObserver]
) -> Callable[[list[Target]], Any]:
    async def run(targets: list[Target]) -> tuple[int, float]:
        items = [
            parse_request(
                {
                    "host": LOOPBACK,
                    "port": port,
                    "security": mode,
                    "trust": "portable",
                    "ca_file": str(ca_file),
                    "ehlo_name": EHLO_NAME,
                    "retries": 0,
                    "timeout": float(CHECK_TIMEOUT),
                }
            )
            for mode, port in targets
        ]
        started = time.perf_counter()
        summary = await sweep(items, concurrency=CONCURRENCY, observers=observers)
        return summary.failed, time.perf_counter() - started

    return run


async def measure(
    ports: dict[str, list[int]], ca_file: Path, folder: Path, found: dict[str, str | None]
) -> dict[tuple[str, str], Tally]:
    targets = {
        mode: [(mode, ports[mode][index % len(ports[mode])]) for index in range(TARGETS_PER_MODE)]
        for mode in MODES
    }
    clients: dict[str, Callable[[list[Target]], Awaitable[tuple[int, float]]]] = {
        OURS: ours_checker(ca_file, deployed_observers())
    }
    limits = {CLI: CLI_TARGETS}

    def each(checker: Checker) -> Callable[[list[Target]], Awaitable[tuple[int, float]]]:
        return lambda chosen: bounded(checker, chosen)

    clients[CLI] = each(process_checker(cli_argv(ca_file)))
    if found[PEER_CHECK_SMTP]:
        clients[PEER_CHECK_SMTP] = each(process_checker(check_smtp_argv))
    tallies = {(client, mode): Tally() for client in clients for mode in MODES}
    with contextlib.ExitStack() as stack:
        executable = found[PEER_BLACKBOX]
        if executable:
            exporter = stack.enter_context(blackbox(executable, ca_file, folder))
            clients[PEER_BLACKBOX] = each(blackbox_checker(exporter.address))
            tallies |= {(PEER_BLACKBOX, mode): Tally() for mode in MODES}
        names = list(clients)
        for client in names:  # warm-up: page cache, imports, the exporter's first probes
            for mode in MODES:
                await clients[client](targets[mode][:CONCURRENCY])
        for number in range(ROUNDS):
            shift = number % len(names)
            for client in names[shift:] + names[:shift]:
                for mode in MODES:
                    chosen = targets[mode][: limits.get(client, TARGETS_PER_MODE)]
                    failed, wall = await clients[client](chosen)
                    tally = tallies[(client, mode)]
                    tally.checks += len(chosen)
                    tally.failed += failed
                    tally.wall += wall
            print(f"  round {number + 1}/{ROUNDS} done", flush=True)
    return tallies


def find_peers() -> dict[str, str | None]:
    found: dict[str, str | None] = {
        PEER_BLACKBOX: shutil.which(BLACKBOX),
        PEER_CHECK_SMTP: CHECK_SMTP if os.access(CHECK_SMTP, os.X_OK) else None,
    }
    hints = {
        PEER_BLACKBOX: f"{BLACKBOX} not on PATH (Debian: apt-get install {BLACKBOX})",
        PEER_CHECK_SMTP: f"{CHECK_SMTP} not found (Debian: apt-get install "
        "monitoring-plugins-basic)",
    }
    for peer, path in found.items():
        if path is None:
            print(f"PEER NOT FOUND, skipped: {peer}: {hints[peer]}")
    return found


def report(tallies: dict[tuple[str, str], Tally], found: dict[str, str | None]) -> dict[str, Any]:
    rows = []
    results: dict[str, Any] = {}
    for (client, mode), tally in tallies.items():
        per_target = ratio(tally.wall, tally.checks / ROUNDS)
        wall_for_n = per_target * TARGETS_PER_MODE
        extrapolated = tally.checks / ROUNDS < TARGETS_PER_MODE
        ours = tallies[(OURS, mode)]
        versus = ratio(ours.rate, tally.rate)
        rows.append(
            [
                client,
                mode,
                tally.checks,
                round(tally.rate, 1),
                f"{wall_for_n:.2f}{'*' if extrapolated else ''}",
                round(versus, 2) if client != OURS else 1.0,
                tally.failed,
            ]
        )
        results.setdefault(client, {})[mode] = {
            "checks": tally.checks,
            "failed": tally.failed,
            "checks_per_s": round(tally.rate, 1),
            "wall_s_for_n": round(wall_for_n, 3),
            "wall_extrapolated": extrapolated,
            "ours_rate_over_this": round(versus, 3),
        }
    print_table(
        f"{TARGETS_PER_MODE} targets per mode, {CONCURRENCY} at a time, {ROUNDS} rounds "
        "(* extrapolated from fewer targets)",
        [
            "client",
            "mode",
            "checks",
            "checks/s",
            f"wall s for N={TARGETS_PER_MODE}",
            "ours/this",
            "failed",
        ],
        rows,
    )
    missing = [peer for peer, path in found.items() if path is None]
    if missing:
        print(f"\nnot measured (not installed): {', '.join(missing)}")
    print(
        "\nours/this: checks per second of smtp-session in-process divided by this "
        "client's. check_smtp does not verify the certificate chain."
    )
    return results


def main() -> None:
    found = find_peers()
    with (
        tempfile.TemporaryDirectory(prefix="bench-peers-") as name,
        open(os.devnull, "w") as sink,
    ):
        folder = Path(name)
        pki = make_pki(folder)
        configure_deployed_logging(sink)
        args = [
            *("--plain", str(SERVERS_PER_MODE), "--starttls", str(SERVERS_PER_MODE)),
            *("--chain", str(pki.server_chain)),
        ]
        with server_process(args, folder / "server.log") as server:
            tallies = asyncio.run(measure(server.ports, pki.ca_file, folder, found))
    results = report(tallies, found)
    write_result(
        NAME,
        {
            "targets_per_mode": TARGETS_PER_MODE,
            "cli_targets_per_mode": CLI_TARGETS,
            "concurrency": CONCURRENCY,
            "rounds": ROUNDS,
            "peers_found": {peer: path is not None for peer, path in found.items()},
            "clients": results,
            "notes": [
                "check_smtp does not verify the certificate chain",
                "CLI wall time for N is extrapolated from its measured rate",
            ],
        },
    )
    if any(math.isnan(tally.rate) for tally in tallies.values()):
        raise SystemExit("a client measured nothing")


if __name__ == "__main__":
    main()
