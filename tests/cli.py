"""Running `smtp-session` as a real subprocess from async tests.

The loopback servers run in the test's own event loop, so the CLI is started with
``asyncio.create_subprocess_exec`` and awaited: the loop keeps serving while the child
talks to it. Every run gets a clean environment (no inherited ``SMTP_SESSION_*``) with
its data directory under the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLI = Path(sys.executable).parent / "smtp-session"
#: Bound on one CLI run: start-up is ~0.5 s; `enqueue --wait` may wait for a worker.
CLI_RUN_TIMEOUT = 60.0
ENV_PREFIX = "SMTP_SESSION_"


@dataclass(frozen=True)
class CliRun:
    """What one `smtp-session` process did."""

    code: int
    stdout: str
    stderr: str
    elapsed: float

    def json(self) -> dict[str, Any]:
        """The one JSON document stdout must hold with --json (and nothing else)."""
        lines = self.stdout.splitlines()
        assert len(lines) == 1, f"expected one line of JSON on stdout, got {self.stdout!r}"
        document = json.loads(lines[0])
        assert isinstance(document, dict)
        return document


def cli_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without SMTP_SESSION_*, plus a private data dir."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env[ENV_PREFIX + "DATA_DIR"] = str(tmp_path / "data")
    env.update(extra or {})
    return env


async def start_cli(*args: str, env: Mapping[str, str]) -> asyncio.subprocess.Process:
    """Start `smtp-session ARGS`, its stdout and stderr piped; see finish_cli."""
    return await asyncio.create_subprocess_exec(
        str(CLI),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )


async def finish_cli(process: asyncio.subprocess.Process, *, started: float) -> CliRun:
    """Wait (bounded) for a started CLI to end; `started` is its loop.time() at start."""
    loop = asyncio.get_running_loop()
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CliRun(
        code=process.returncode,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        elapsed=loop.time() - started,
    )


async def run_cli(*args: str, env: Mapping[str, str]) -> CliRun:
    """Run `smtp-session ARGS` to completion (bounded), serving the loop meanwhile."""
    started = asyncio.get_running_loop().time()
    return await finish_cli(await start_cli(*args, env=env), started=started)


def log_events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log objects on stderr (every non-empty line must be one)."""
    events = []
    for line in stderr.splitlines():
        if line.strip():
            event = json.loads(line)
            assert isinstance(event, dict), line
            events.append(event)
    return events
