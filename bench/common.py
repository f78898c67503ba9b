"""What every benchmark shares: certificates, the server process, tables, JSON results,
the two ways the core reports (bare, or as deployed), and /proc readings.

Nothing here imports from tests/: the benchmarks carry their own small copies of the
ideas (trustme certificates, loopback servers on port 0 with the port read back).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import resource
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any, TextIO

import trustme
from prometheus_client import CollectorRegistry

from smtp_session.monitoring.logging import configure_logging
from smtp_session.monitoring.metrics import SessionMetrics
from smtp_session.tasks.observe import LOG, SessionObserver

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
LOOPBACK = "127.0.0.1"
#: Every certificate names both, so a client may connect by either.
SERVER_NAMES = ("localhost", LOOPBACK)
#: Sent in EHLO by every client here: keeps socket.getfqdn() (DNS) out of the numbers.
EHLO_NAME = "bench.example"
#: Bound on starting or stopping a helper process (a Python server imports in < 1 s).
PROCESS_TIMEOUT = 30.0
#: The code a benchmark measures: a change there makes a run "dirty".
MEASURED_CODE = ("tasks", "worker", "monitoring")
#: How long a Celery/Redis/exporter helper may take to come up.
START_TIMEOUT = 30.0
#: Every session's deadline: generous, loopback sessions take milliseconds.
SESSION_TIMEOUT = 10.0
#: The core as a library call: it reports to nobody.
BARE_CORE: tuple[SessionObserver, ...] = ()
#: /proc/<pid>/stat counts CPU time in clock ticks.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        completed = subprocess.run(  # noqa: S603 - git, on this repository
            ["git", *args],  # noqa: S607 - git from PATH
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def machine() -> dict[str, Any]:
    """Where, when and on what code the numbers were taken: they mean little without it.

    `dirty`: the measured code (not bench/) had uncommitted changes when the run ended.
    """
    changes = _git("status", "--porcelain", "--", *MEASURED_CODE)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(changes) if changes is not None else None,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "aiosmtplib": _version("aiosmtplib"),
        "aiosmtpd": _version("aiosmtpd"),
        "smtp-session-worker": _version("smtp-session-worker"),
    }


# ----------------------------------------------------------------------------- results


def write_result(name: str, data: Mapping[str, Any]) -> Path:
    """bench/results/<name>.json: the machine, then the script's own numbers."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"benchmark": name, "machine": machine(), **data}
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return path


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table (pasteable into Markdown as is, after the title)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[index]) for row in cells)) if cells else len(header)
        for index, header in enumerate(headers)
    ]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


# ----------------------------------------------------------------------------- sessions


def plain_request(port: int, **fields: Any) -> dict[str, Any]:
    """The fields of a plain session to a loopback port, as task kwargs; `fields` on top."""
    return {
        "host": LOOPBACK,
        "port": port,
        "security": "plain",
        "ehlo_name": EHLO_NAME,
        "retries": 0,
        "timeout": SESSION_TIMEOUT,
        **fields,
    }


# ----------------------------------------------------------------------------- observers


def deployed_observers(known_targets: Iterable[str] | None = None) -> tuple[SessionObserver, ...]:
    """What the worker reports to: the JSON log and Prometheus metrics (a registry of their own)."""
    metrics = SessionMetrics(registry=CollectorRegistry(), known_targets=known_targets)
    return (LOG, metrics)


def configure_deployed_logging(stream: TextIO) -> None:
    """JSON lines at INFO, as the worker logs (to `stream` instead of stderr)."""
    configure_logging("json", level=logging.INFO, stream=stream)


# ----------------------------------------------------------------------------- process


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _status_kib(field: str, pid: int | str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def peak_rss_kib(pid: int | str = "self") -> int:
    """A process's peak resident set (VmHWM), in KiB (this process by default)."""
    peak = _status_kib("VmHWM", pid)
    if peak is None and pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB as well
    return peak or 0


def rss_kib(pid: int | str = "self") -> int:
    """A process's resident set now (VmRSS), in KiB (this process by default)."""
    return _status_kib("VmRSS", pid) or 0


def _stat_cpu_seconds(stat: Path) -> float:
    # The command name (2nd field) may hold spaces and parentheses: split after its last ")".
    fields = stat.read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, from /proc (10 ms ticks)."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU of each thread of a process, by thread id."""
    seconds: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            seconds[int(task.name)] = _stat_cpu_seconds(task / "stat")
    return seconds


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (through /proc/<pid>/task/<tid>/children)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for children in Path(f"/proc/{current}/task").glob("*/children"):
                pending += [int(child) for child in children.read_text().split()]
    return tree


def tree_rss_kib(pid: int) -> int:
    """The resident set of a process and its descendants together, in KiB."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):  # a child that ended meanwhile
            total += rss_kib(member)
    return total


# ----------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and a server certificate for localhost and 127.0.0.1, on disk.

    ``ca_file`` is what a client is given; ``server_chain`` (leaf, CA, key in one PEM)
    is what the server process loads. Made fresh per run, never committed.
    """

    ca_file: Path
    server_chain: Path


def make_pki(folder: Path) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert(*SERVER_NAMES, common_name=SERVER_NAMES[0])
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    chain = folder / "server.pem"
    with chain.open("wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
        out.write(leaf.private_key_pem.bytes())
    return Pki(ca_file=ca_file, server_chain=chain)


# ----------------------------------------------------------------------------- servers


class ServerProcess:
    """``python -m bench.servers ARGS`` in a process of its own, on its own core.

    The server prints one JSON line with its ports once it listens; it runs until its
    standard input closes, so it cannot outlive this process.
    """

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self._log: IO[bytes] = log_path.open("wb")
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "bench.servers", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.ports: dict[str, list[int]] = self._read_ports(log_path)

    def _read_ports(self, log_path: Path) -> dict[str, list[int]]:
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], PROCESS_TIMEOUT)
        line = self._process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"bench server did not start: {log_path.read_text()}")
        ports: dict[str, list[int]] = json.loads(line)
        return ports

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self) -> None:
        """Close its stdin (it stops by itself), else kill it; idempotent."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        try:
            self._process.wait(PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(PROCESS_TIMEOUT)
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._log.close()


@contextlib.contextmanager
def server_process(args: Sequence[str], log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(args, log_path)
    try:
        yield server
    finally:
        server.stop()


def cpu_seconds() -> float:
    """CPU time of this process, all threads (the resolver's executor threads included)."""
    return time.process_time()
