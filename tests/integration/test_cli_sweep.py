"""`smtp-session sweep` as a real subprocess: its table on 80 columns, its targets file.

The table is read on an 80-column terminal (COLUMNS=80; stdout is a pipe here, which
without COLUMNS gets wide lines): names whole, each message readable. A targets file
that cannot be swept stops `sweep` and `worker` alike with exit 2, naming the file.
"""

from __future__ import annotations

from pathlib import Path

from tests.cli import cli_env, run_cli

EXIT_FAILED, EXIT_INVALID = 1, 2
#: Keeps the child off DNS for its EHLO name (socket.getfqdn may be slow in a sandbox).
EHLO_NAME = "client.example"
#: Long enough to show names whole only if nothing cuts them.
TARGET_V4 = "submission-relay-primary"
TARGET_V6 = "loopback-v6-relay"


def write_targets(path: Path, *targets: tuple[str, str, int]) -> Path:
    lines = [
        "[defaults]",
        'security = "plain"',
        "retries = 0",
        "timeout = 2",
        f'ehlo_name = "{EHLO_NAME}"',
    ]
    for name, host, port in targets:
        lines += ["[[targets]]", f'name = "{name}"', f'host = "{host}"', f"port = {port}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def test_table_on_80_columns_keeps_names_whole_and_messages_readable(
    refused_port: tuple[str, int], tmp_path: Path
) -> None:
    host, port = refused_port
    # Nothing listens on ::1 here: refused or unreachable, it fails with a message.
    targets = write_targets(
        tmp_path / "targets.toml", (TARGET_V4, host, port), (TARGET_V6, "::1", port)
    )

    run = await run_cli(
        "sweep", "--targets", str(targets), env=cli_env(tmp_path, {"COLUMNS": "80"})
    )

    assert run.code == EXIT_FAILED, run
    lines = run.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), run.stdout
    assert "\N{HORIZONTAL ELLIPSIS}" not in run.stdout  # nothing cut short
    rows = [line for line in lines if line.startswith("│")]
    assert any(TARGET_V4 in row and f"{host}:{port}" in row for row in rows), run.stdout
    assert any(TARGET_V6 in row and f"[::1]:{port}" in row for row in rows), run.stdout
    # Each failure's message whole on its own lines below the table, named by its target.
    below = " ".join(" ".join(lines[lines.index(rows[-1]) + 2 : -1]).split())
    assert f"{TARGET_V4} ({host}:{port}): connection refused" in below, run.stdout
    assert f"{TARGET_V6} ([::1]:{port}): " in below, run.stdout
    assert lines[-1].startswith("0 ok, 2 failed in "), run.stdout


async def test_an_empty_targets_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    targets = tmp_path / "targets.toml"
    targets.write_text("[defaults]\ntimeout = 5\n", encoding="utf-8")

    run = await run_cli("sweep", "--targets", str(targets), env=cli_env(tmp_path))

    assert run.code == EXIT_INVALID, run
    assert run.stdout == ""
    assert run.stderr == (
        f"smtp-session: {targets}: no targets: add at least one [[targets]] table\n"
    ), run.stderr


async def test_the_worker_refuses_an_empty_targets_file_too(tmp_path: Path) -> None:
    targets = tmp_path / "targets.toml"
    targets.write_text("", encoding="utf-8")
    env = cli_env(tmp_path, {"SMTP_SESSION_TARGETS": str(targets)})

    run = await run_cli("worker", env=env)

    assert run.code == EXIT_INVALID, run
    assert run.stderr == (
        f"smtp-session: {targets}: no targets: add at least one [[targets]] table\n"
    ), run.stderr


async def test_a_bad_default_is_blamed_on_defaults(tmp_path: Path) -> None:
    targets = tmp_path / "targets.toml"
    targets.write_text(
        '[defaults]\ntimeout = "ten"\n[[targets]]\nname = "a"\nhost = "a.example.test"\n',
        encoding="utf-8",
    )

    run = await run_cli("sweep", "--targets", str(targets), env=cli_env(tmp_path))

    assert run.code == EXIT_INVALID, run
    assert run.stderr.startswith(f"smtp-session: {targets}: defaults: timeout: "), run.stderr
    assert "'a'" not in run.stderr
