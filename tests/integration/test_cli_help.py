"""`--help` answers the first-hour questions: what each choice means, what each default
is, and what each exit code says."""

from __future__ import annotations

from pathlib import Path

from tests.cli import cli_env, run_cli


async def help_text(tmp_path: Path, *command: str) -> str:
    """`smtp-session COMMAND --help`, its whitespace (click's wrapping) made single spaces."""
    run = await run_cli(*command, "--help", env=cli_env(tmp_path))
    assert run.code == 0, run
    assert run.stderr == ""
    return " ".join(run.stdout.split())


async def test_group_help_lists_every_exit_code(tmp_path: Path) -> None:
    text = await help_text(tmp_path)

    for line in (
        "Exit codes:",
        "0 ok",
        "1 a session failed",
        "2 invalid input",
        "3 no outcome: the broker is unreachable, or --wait timed out",
        "130 interrupted (Ctrl+C)",
    ):
        assert line in text, text


async def test_check_help_explains_security_and_trust_and_shows_defaults(tmp_path: Path) -> None:
    text = await help_text(tmp_path, "check")

    for phrase in (
        # --security, each choice
        "auto: implicit TLS on port 465, required STARTTLS on any other",
        "starttls: STARTTLS required, never plaintext",
        "tls: implicit TLS",
        "plain: no TLS",
        "[default: (auto)]",
        # --trust, each choice
        "auto: the system's trust store, then certifi's bundle",
        "native: the system's store only",
        "portable: certifi's bundle",
        "[default: ($SMTP_SESSION_TRUST, else auto)]",
        # the other defaults
        "[default: ($SMTP_SESSION_TIMEOUT, else 10)]",
        "[default: ($SMTP_SESSION_RETRIES, else 2)]",
        "[default: (--timeout)]",
        # and what the command exits with
        "Exit 0 when ok, 1 when the session failed, 2 for invalid input, 130 when interrupted",
    ):
        assert phrase in text, (phrase, text)


async def test_enqueue_help_shows_its_bounds_and_exit_3(tmp_path: Path) -> None:
    text = await help_text(tmp_path, "enqueue")

    assert "--broker-timeout FLOAT RANGE Seconds to reach the broker" in text, text
    assert "[default: 5.0; x>0]" in text, text
    assert "--wait-timeout FLOAT RANGE Seconds --wait waits" in text, text
    assert "[default: 120.0; x>0]" in text, text
    assert "3 when there is no outcome (the broker is unreachable, or --wait timed out)" in text


async def test_sweep_and_worker_help_show_their_defaults(tmp_path: Path) -> None:
    sweep = await help_text(tmp_path, "sweep")
    assert "[default: ($SMTP_SESSION_TARGETS)]" in sweep, sweep
    assert "($SMTP_SESSION_SWEEP_CONCURRENCY, else 100)" in sweep, sweep
    assert "1 when any is down" in sweep, sweep

    worker = await help_text(tmp_path, "worker")
    assert "($SMTP_SESSION_WORKER_CONCURRENCY, else 100)" in worker, worker
    assert "[default: INFO]" in worker, worker
