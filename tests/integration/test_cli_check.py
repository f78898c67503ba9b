"""`smtp-session check HOST[:PORT]` as a real subprocess against loopback servers.

The servers run in the test's own event loop, so the CLI is started with
``asyncio.create_subprocess_exec`` and awaited: the loop keeps serving while the
child talks to it. Every run gets a clean environment (no inherited
``SMTP_SESSION_*``) with its data directory under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives.serialization import Encoding

from tests.cli import cli_env, finish_cli, log_events, run_cli, start_cli
from tests.servers import (
    LOOPBACK,
    WRONG_HOST,
    RawServerFactory,
    SmtpServer,
    SmtpServerFactory,
    leaf_certificate,
)

#: Keeps the child off DNS for its EHLO name (socket.getfqdn may be slow in a sandbox).
EHLO = ("--ehlo-name", "client.example")

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


# ----------------------------------------------------------------------------- success


async def test_ok_prints_one_line_and_exits_0(
    smtp_server: SmtpServer, ca_pem_path: str, tmp_path: Path
) -> None:
    run = await run_cli(
        "check",
        f"{smtp_server.host}:{smtp_server.port}",
        *EHLO,
        env={**cli_env(tmp_path), "SMTP_SESSION_CA_FILE": ca_pem_path},
    )

    assert run.code == EXIT_OK, run
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout
    assert lines[0].startswith(f"OK {LOOPBACK}:{smtp_server.port}: starttls"), lines[0]
    # The trustme CA is only among the operator's extra CAs of the portable store: native
    # trust refused, portable verified.
    assert "verified (portable trust, after native trust failed)" in lines[0]
    assert smtp_server.received("STARTTLS")
    assert smtp_server.received("QUIT")


async def test_json_is_one_document_and_verbose_logs_go_to_stderr(
    smtp_server: SmtpServer, ca_pem_path: str, good_cert: trustme.LeafCert, tmp_path: Path
) -> None:
    run = await run_cli(
        "check",
        f"{smtp_server.host}:{smtp_server.port}",
        "--ca-file",
        ca_pem_path,
        "--json",
        "-v",
        *EHLO,
        env=cli_env(tmp_path),
    )

    assert run.code == EXIT_OK, run
    outcome = run.json()
    assert outcome["schema"] == 1
    assert outcome["ok"] is True
    assert outcome["err_message"] == ""
    assert outcome["error"] is None
    assert outcome["stage"] == "done"
    assert (outcome["host"], outcome["port"]) == (LOOPBACK, smtp_server.port)
    assert outcome["security"] == "starttls"
    assert outcome["attempts"] == 1
    tls = outcome["tls"]
    # --ca-file names this server's CA: trusted from the first handshake, no fallback.
    assert (tls["trust"], tls["fallback"], tls["verified"]) == ("portable", False, True)
    leaf = leaf_certificate(good_cert)
    assert tls["cert"]["subject"] == leaf.subject.rfc4514_string()
    assert "CN=localhost" in tls["cert"]["subject"]
    assert tls["cert"]["sha256"] == hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    assert set(tls["cert"]["sans"]) >= {"localhost", "127.0.0.1"}
    assert outcome["server"]["banner"].startswith("220 ")

    # -v: the attempt and the result are logged, on stderr only, one JSON object a line.
    events = log_events(run.stderr)
    names = [event.get("event") for event in events]
    assert "session.attempt" in names
    assert names[-1] == "session.result"
    result = events[-1]
    assert result["ok"] is True
    assert (result["trust"], result["fallback"]) == ("portable", False)
    assert "session." not in run.stdout


async def test_tls_name_verifies_a_server_reached_by_its_address(
    smtp_server_factory: SmtpServerFactory,
    wrong_host_cert: trustme.LeafCert,
    ca_pem_path: str,
    tmp_path: Path,
) -> None:
    server = await smtp_server_factory(mode="starttls", cert=wrong_host_cert)
    run = await run_cli(
        "check",
        f"{server.host}:{server.port}",
        "--ca-file",
        ca_pem_path,
        "--tls-name",
        WRONG_HOST,
        "--json",
        *EHLO,
        env=cli_env(tmp_path),
    )

    assert run.code == EXIT_OK, run
    assert run.json()["host"] == LOOPBACK
    assert server.server_names == [WRONG_HOST]


# ----------------------------------------------------------------------------- failures


async def test_refused_prints_a_few_lines_and_exits_1(
    refused_port: tuple[str, int], tmp_path: Path
) -> None:
    host, port = refused_port
    run = await run_cli("check", f"{host}:{port}", "--retries", "0", *EHLO, env=cli_env(tmp_path))

    assert run.code == EXIT_FAILED, run
    lines = run.stdout.splitlines()
    assert 2 <= len(lines) <= 5, run.stdout
    assert lines[0] == f"FAILED {host}:{port}: refused at connect"
    assert "refused" in lines[1]


async def test_silent_server_times_out_at_the_banner(
    raw_server_factory: RawServerFactory, tmp_path: Path
) -> None:
    server = await raw_server_factory("silent")
    run = await run_cli(
        "check",
        f"{server.host}:{server.port}",
        "--timeout",
        "1",
        "--retries",
        "0",
        "--json",
        *EHLO,
        env=cli_env(tmp_path),
    )

    assert run.code == EXIT_FAILED, run
    outcome = run.json()
    assert (outcome["ok"], outcome["error"], outcome["stage"]) == (False, "timeout", "banner")
    assert outcome["retryable"] is True
    assert outcome["attempts"] == 1
    assert outcome["err_message"] == (
        "attempt deadline (timeout) of 1 s reached while waiting for the server greeting"
    )
    assert outcome["hint"] is None  # no greeting, but no answer to TLS either
    # One attempt of 1 s, plus interpreter start-up: not the 10 s default.
    assert run.elapsed < 8.0
    assert server.connections_accepted == 2  # the session, and the probe for TLS


async def test_bracketed_ipv6_address_reaches_the_network(
    refused_port: tuple[str, int], tmp_path: Path
) -> None:
    # Nothing listens on ::1 here (the servers are IPv4): whether ::1 refuses or is
    # unreachable, the point is that `[::1]:PORT` parsed and the session was tried.
    _, port = refused_port
    run = await run_cli(
        "check",
        f"[::1]:{port}",
        "--timeout",
        "2",
        "--retries",
        "0",
        "--json",
        *EHLO,
        env=cli_env(tmp_path),
    )

    assert run.code == EXIT_FAILED, run
    outcome = run.json()
    assert (outcome["host"], outcome["port"]) == ("::1", port)
    assert outcome["error"] != "invalid_request"
    assert outcome["stage"] != "validate"


async def test_ctrl_c_says_interrupted_and_exits_130(
    raw_server_factory: RawServerFactory, tmp_path: Path
) -> None:
    server = await raw_server_factory("silent")
    started = asyncio.get_running_loop().time()
    process = await start_cli(
        "check",
        f"{server.host}:{server.port}",
        "--timeout",
        "60",
        "--retries",
        "0",
        *EHLO,
        env=cli_env(tmp_path),
    )
    # Mid-session: connected, waiting for a greeting that never comes.
    await server.wait_connections(1)
    process.send_signal(signal.SIGINT)
    run = await finish_cli(process, started=started)

    assert run.code == EXIT_INTERRUPTED, run
    assert run.stderr == "smtp-session: interrupted\n", run
    assert run.stdout == ""
    assert run.elapsed < 30.0  # not the 60 s deadline


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "field"),
    [
        pytest.param(["", "--json"], "host", id="empty-host"),
        pytest.param(["a b", "--json"], "host", id="space-in-host"),
        pytest.param(["127.0.0.1:0", "--json"], "port", id="port-0"),
        pytest.param(["127.0.0.1:70000", "--json"], "port", id="port-70000"),
        pytest.param(["127.0.0.1:25", "--timeout", "-1", "--json"], "timeout", id="timeout-neg"),
    ],
)
async def test_invalid_request_is_one_json_document_and_exit_2(
    args: list[str], field: str, tmp_path: Path
) -> None:
    run = await run_cli("check", *args, env=cli_env(tmp_path))

    assert run.code == EXIT_INVALID, run
    outcome = run.json()
    assert outcome["schema"] == 1
    assert (outcome["ok"], outcome["error"], outcome["stage"]) == (
        False,
        "invalid_request",
        "validate",
    )
    assert outcome["err_message"].startswith(f"{field}: "), outcome["err_message"]
    assert outcome["attempts"] == 0


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        pytest.param(
            "check",
            ["127.0.0.1", "--security", "foo"],
            "security: 'foo' is not one of 'auto', 'starttls', 'tls', 'plain'.",
            id="unknown-security",
        ),
        pytest.param("check", ["x:abc"], "port: 'abc' is not a number", id="port-not-a-number"),
        pytest.param("check", ["[::1"], "host: '[::1' is not HOST[:PORT]", id="unclosed-bracket"),
        pytest.param("check", [], "host: is required", id="no-host"),
        pytest.param(
            "check",
            ["x", "--timeout", "soon"],
            "timeout: 'soon' is not a valid float.",
            id="timeout-word",
        ),
        pytest.param(
            "enqueue", ["x", "--bogus"], "--bogus: no such option", id="enqueue-unknown-option"
        ),
    ],
)
async def test_usage_error_with_json_is_an_invalid_request_outcome(
    command: str, args: list[str], message: str, tmp_path: Path
) -> None:
    # --json promises one JSON document on stdout, whatever the command line; the usage
    # text goes to stderr, as without it.
    run = await run_cli(command, *args, "--json", env=cli_env(tmp_path))

    assert run.code == EXIT_INVALID, run
    outcome = run.json()
    assert (outcome["error"], outcome["err_message"]) == ("invalid_request", message)
    assert "Error:" in run.stderr
    assert "Traceback" not in run.stderr


async def test_a_sweep_usage_error_with_json_is_a_summary(tmp_path: Path) -> None:
    run = await run_cli("sweep", "--concurrency", "0", "--json", env=cli_env(tmp_path))

    assert run.code == EXIT_INVALID, run
    summary = run.json()
    assert (summary["total"], summary["failed"]) == (1, 1)
    assert summary["outcomes"][0]["err_message"].startswith("concurrency: ")


async def test_a_usage_error_without_json_prints_nothing_on_stdout(tmp_path: Path) -> None:
    run = await run_cli("check", "x:abc", env=cli_env(tmp_path))

    assert (run.code, run.stdout) == (EXIT_INVALID, "")
    assert "Error: Invalid value for HOST[:PORT]: port 'abc' is not a number" in run.stderr


async def test_invalid_setting_exits_2_naming_the_variable(
    refused_port: tuple[str, int], tmp_path: Path
) -> None:
    host, port = refused_port
    env = cli_env(tmp_path, {"SMTP_SESSION_TIMEOUT": "abc"})
    run = await run_cli("check", f"{host}:{port}", *EHLO, env=env)

    assert run.code == EXIT_INVALID, run
    assert "SMTP_SESSION_TIMEOUT" in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""
