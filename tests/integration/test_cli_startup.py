"""Start-up: the commands that run in this process (`check`, `sweep`, `--help`) do not
import Celery, whose imports alone cost about half a second of every run.

Each command is run as it is installed, with PYTHONPROFILEIMPORTTIME=1: the interpreter
itself then lists on stderr every module the run imported. `enqueue` talks to a broker
and does import Celery, which shows that the listing catches it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import cli_env, run_cli

#: What a command that does not talk to a broker must not import.
BROKER_PACKAGES = ("celery", "kombu")


def imported(stderr: str) -> set[str]:
    """The modules in the interpreter's import-time listing ("import time: … | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def broker_modules(modules: set[str]) -> set[str]:
    return {
        name
        for name in modules
        if any(name == package or name.startswith(package + ".") for package in BROKER_PACKAGES)
    }


def test_importing_the_cli_does_not_import_celery() -> None:
    probe = (
        "import smtp_session.worker.cli, sys; "
        "assert not any(m == 'celery' or m.startswith('celery.') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('celery'))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["--help"], id="help"),
        pytest.param(["check", "--help"], id="check-help"),
        pytest.param(["check", "{address}", "--retries", "0", "--security", "plain"], id="check"),
        pytest.param(["sweep", "--targets", "{targets}"], id="sweep"),
    ],
)
async def test_local_commands_do_not_import_celery(
    command: list[str], refused_port: tuple[str, int], tmp_path: Path
) -> None:
    host, port = refused_port
    targets = tmp_path / "targets.toml"
    targets.write_text(
        f'[[targets]]\nname = "t"\nhost = "{host}"\nport = {port}\n'
        'security = "plain"\nretries = 0\nehlo_name = "client.example"\n',
        encoding="utf-8",
    )
    args = [arg.format(address=f"{host}:{port}", targets=targets) for arg in command]

    run = await run_cli(*args, env=cli_env(tmp_path, {"PYTHONPROFILEIMPORTTIME": "1"}))

    modules = imported(run.stderr)
    assert "click" in modules, run.stderr[-2000:]  # the listing is there
    assert broker_modules(modules) == set()


async def test_enqueue_imports_celery_as_it_talks_to_a_broker(
    refused_port: tuple[str, int], tmp_path: Path
) -> None:
    host, port = refused_port
    env = cli_env(
        tmp_path,
        {"PYTHONPROFILEIMPORTTIME": "1", "SMTP_SESSION_BROKER_URL": f"redis://{host}:{port}/0"},
    )

    run = await run_cli("enqueue", "smtp.example.com", "--broker-timeout", "0.1", env=env)

    assert run.code == 3, run.stderr[-2000:]
    assert {"celery", "kombu"} <= broker_modules(imported(run.stderr))
