"""A secret reaches the SMTP server's AUTH and nothing else.

Sessions run with a known password and, separately, a known XOAUTH2 token: through
``open_session`` in this process and through ``smtp-session check -v`` as a
subprocess. Everything they produce -- the Outcome (JSON and repr), stdout, stderr,
structlog events, the standard library's log records, exception reprs and rendered
tracebacks -- is searched for the secret and for the base64 forms it takes on the
wire. Each case also checks what the server received, so that a product that never
sent the secret (and so could not leak it) would fail here too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
import trustme
from structlog.tracebacks import ExceptionDictTransformer

from smtp_session.tasks.errors import InvalidRequest
from smtp_session.tasks.secrets import REDACTED, SECRETS_DIR_VARIABLE, Credentials, env_variable
from smtp_session.tasks.server_text import MAX_QUOTED_REPLY
from smtp_session.tasks.session import open_session, prepare
from tests.cli import cli_env, log_events, run_cli
from tests.integration.test_cli_check import EHLO
from tests.servers import (
    LOOPBACK,
    WAIT_TIMEOUT,
    WRONG_HOST,
    SmtpMode,
    SmtpServer,
    SmtpServerFactory,
    server_ssl_context,
)
from tests.unit.test_redaction import leaked

USER = "alice@example.com"
# Letters, digits and '-' only: no renderer (JSON, repr, console) escapes them, so a
# plain substring search finds every copy. Each ends in a unique tail that is searched
# for on its own too, to catch a secret that is only partly masked.
PASSWORD_TAIL = "7f3c9a1e5b2d"
PASSWORD = f"Hunter2-pw-{PASSWORD_TAIL}"
TOKEN_TAIL = "c0ffee42d00d"
TOKEN = f"ya29-A0tok-{TOKEN_TAIL}"
WRONG = "not-the-secret"
REFERENCE = "tenant-42"
CLIENT_TIMEOUT = 5.0

# aiosmtpd's own logger: the test server is the secret's rightful recipient, and its
# DEBUG lines show the credentials it accepted, as any server's log might.
SERVER_LOGGER = "mail.log"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def password_needles(username: str, password: str) -> list[str]:
    """The password, and how it goes on the wire: AUTH PLAIN (RFC 4616) and AUTH LOGIN."""
    return [
        password,
        PASSWORD_TAIL,
        b64(f"\0{username}\0{password}".encode()),
        b64(password.encode()),
    ]


def token_needles(username: str, token: str) -> list[str]:
    """The token, and the XOAUTH2 initial response that carries it."""
    return [token, TOKEN_TAIL, b64(f"user={username}\x01auth=Bearer {token}\x01\x01".encode())]


ALL_NEEDLES = password_needles(USER, PASSWORD) + token_needles(USER, TOKEN)


def leaks(text: str) -> list[str]:
    """Every needle found in ``text``: [] is the only good answer."""
    return [needle for needle in ALL_NEEDLES if needle in text]


# ----------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One server, one secret, and what must happen."""

    secret: str
    source: Literal["env", "file"]
    error: str | None  # the Outcome's error; None when ok
    mode: SmtpMode = "starttls"
    auth: dict[str, str] | None = None
    oauth_tokens: dict[str, str] | None = None
    # The AUTH the server must have seen: (mechanism, success); None: no AUTH at all.
    expected_auth: tuple[str, bool] | None = None
    as_json: bool = True  # for the CLI run: --json, else the human summary

    async def start_server(self, factory: SmtpServerFactory) -> SmtpServer:
        return await factory(mode=self.mode, auth=self.auth, oauth_tokens=self.oauth_tokens)

    def environ(self, tmp_path: Path) -> dict[str, str]:
        """Where the reference resolves: an environment variable or a secrets file."""
        if self.source == "env":
            return {env_variable(REFERENCE): self.secret}
        directory = tmp_path / "secrets"
        directory.mkdir(exist_ok=True)
        (directory / REFERENCE).write_text(self.secret)
        return {SECRETS_DIR_VARIABLE: str(directory)}


PASSWORD_SECRET = f"{USER}:{PASSWORD}"
TOKEN_SECRET = json.dumps({"username": USER, "oauth2_token": TOKEN})

SCENARIOS = {
    "password-ok": Scenario(
        PASSWORD_SECRET, "env", None, auth={USER: PASSWORD}, expected_auth=("PLAIN", True)
    ),
    "password-535": Scenario(
        PASSWORD_SECRET,
        "env",
        "auth_failed",
        auth={USER: WRONG},
        expected_auth=("PLAIN", False),
        as_json=False,
    ),
    "token-ok": Scenario(
        TOKEN_SECRET, "file", None, oauth_tokens={USER: TOKEN}, expected_auth=("XOAUTH2", True)
    ),
    "token-535": Scenario(
        TOKEN_SECRET,
        "file",
        "auth_failed",
        oauth_tokens={USER: WRONG},
        expected_auth=("XOAUTH2", False),
        as_json=False,
    ),
    # AUTH PLAIN is offered in the clear, STARTTLS is not: nothing may be sent.
    "no-starttls": Scenario(
        PASSWORD_SECRET, "env", "starttls_unavailable", mode="plain", auth={USER: PASSWORD}
    ),
    "no-auth-offered": Scenario(PASSWORD_SECRET, "env", "auth_unavailable"),
    # A token needs XOAUTH2: it must not be tried as a PLAIN password instead.
    "token-but-only-plain": Scenario(TOKEN_SECRET, "file", "auth_unavailable", auth={USER: TOKEN}),
}
# A subprocess costs ~0.5 s: the CLI runs the cases whose paths differ most.
CLI_SCENARIOS = ["password-ok", "password-535", "token-ok", "no-auth-offered"]


def request_fields(server: SmtpServer, ca_pem_path: str) -> dict[str, Any]:
    # trust auto: native refuses the trustme CA first, so the fallback connection (the
    # one that authenticates) is exercised as well.
    return {
        "host": server.host,
        "port": server.port,
        "credentials": REFERENCE,
        "ca_file": ca_pem_path,
        "timeout": CLIENT_TIMEOUT,
        "retries": 0,
        "ehlo_name": EHLO[1],
        "transcript": True,  # the dialogue, AUTH included, is searched as well
    }


def check_server_side(server: SmtpServer, scenario: Scenario) -> None:
    """The secret was really used (or, before AUTH, really not sent)."""
    attempts = [(a.mechanism, a.username, a.success) for a in server.auth_attempts]
    if scenario.expected_auth is None:
        assert not server.received("AUTH"), server.verbs
        assert attempts == []
    else:
        mechanism, success = scenario.expected_auth
        assert server.received("AUTH"), server.verbs
        assert attempts == [(mechanism, USER, success)]


def render_records(records: list[logging.LogRecord]) -> Iterator[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        if record.name == SERVER_LOGGER or record.name.startswith(SERVER_LOGGER + "."):
            continue
        yield formatter.format(record)
        yield repr(record.__dict__)


def render_exception(exc: BaseException) -> Iterator[str]:
    """Every form an exception takes in a log: repr, str, traceback, structlog's dict."""
    yield repr(exc)
    yield str(exc)
    yield "".join(traceback.format_exception(exc))
    yield json.dumps(
        ExceptionDictTransformer(show_locals=False)((type(exc), exc, exc.__traceback__)),
        default=repr,
    )
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        yield from render_exception(cause)


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_open_session_never_shows_the_secret(
    name: str,
    smtp_server_factory: SmtpServerFactory,
    ca_pem_path: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scenario = SCENARIOS[name]
    server = await scenario.start_server(smtp_server_factory)
    caplog.set_level(logging.DEBUG)

    with structlog.testing.capture_logs() as events:
        outcome = await open_session(
            request_fields(server, ca_pem_path), environ=scenario.environ(tmp_path)
        )
    out, err = capsys.readouterr()

    assert outcome.error == scenario.error, outcome
    assert outcome.ok is (scenario.error is None)
    assert outcome.authenticated is (scenario.error is None)
    check_server_side(server, scenario)
    assert [event["event"] for event in events][-1] == "session.result"
    assert outcome.transcript, "a transcript was asked for"
    if scenario.expected_auth is not None:
        assert any(line.line.startswith("AUTH ") for line in outcome.transcript)
    produced = [
        json.dumps(outcome.to_dict()),
        repr(outcome),
        str(outcome),
        repr(events),
        out,
        err,
        *render_records(caplog.records),
    ]
    assert leaks("\n".join(produced)) == []


MALFORMED_SECRETS = {
    "unterminated-json": f'{{"username": "{USER}", "password": "{PASSWORD}"',
    "password-not-a-string": json.dumps({"username": USER, "password": [PASSWORD]}),
    "password-and-token": json.dumps(
        {"username": USER, "password": PASSWORD, "oauth2_token": TOKEN}
    ),
    "no-username-key": json.dumps({"user": USER, "password": PASSWORD}),
    "username-is-the-secret": json.dumps({"username": [PASSWORD], "oauth2_token": TOKEN}),
    "no-colon": PASSWORD,
    "empty-username": f":{PASSWORD}",
}


@pytest.mark.parametrize("name", [*MALFORMED_SECRETS, "not-utf-8"])
async def test_malformed_secret_file_never_shows_the_secret(
    name: str,
    smtp_server: SmtpServer,
    ca_pem_path: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir()
    path = directory / REFERENCE
    if name == "not-utf-8":
        path.write_bytes(b"\xff" + PASSWORD_SECRET.encode())
    else:
        path.write_text(MALFORMED_SECRETS[name])
    environ = {SECRETS_DIR_VARIABLE: str(directory)}
    fields = request_fields(smtp_server, ca_pem_path)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(InvalidRequest) as caught:
        prepare(fields, environ)
    with structlog.testing.capture_logs() as events:
        outcome = await open_session(fields, environ=environ)
    out, err = capsys.readouterr()

    assert caught.value.field == "credentials"
    assert REFERENCE in str(caught.value)  # names the reference, not its content
    assert (outcome.error, outcome.stage) == ("invalid_request", "validate")
    assert outcome.err_message.startswith("credentials: "), outcome.err_message
    assert smtp_server.connections_accepted == 0
    produced = [
        *render_exception(caught.value),
        json.dumps(outcome.to_dict()),
        repr(outcome),
        repr(events),
        out,
        err,
        *render_records(caplog.records),
    ]
    assert leaks("\n".join(produced)) == []


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("name", CLI_SCENARIOS)
async def test_cli_never_shows_the_secret(
    name: str, smtp_server_factory: SmtpServerFactory, ca_pem_path: str, tmp_path: Path
) -> None:
    scenario = SCENARIOS[name]
    server = await scenario.start_server(smtp_server_factory)
    args = [
        "check",
        f"{server.host}:{server.port}",
        "--credentials",
        REFERENCE,
        "--ca-file",
        ca_pem_path,
        "--retries",
        "0",
        *EHLO,
        "--transcript",
        "-v",
    ]
    if scenario.as_json:
        args.append("--json")

    run = await run_cli(*args, env=cli_env(tmp_path, scenario.environ(tmp_path)))

    assert run.code == (0 if scenario.error is None else 1), run
    if scenario.as_json:
        assert run.json()["error"] == scenario.error
        assert run.json()["transcript"][0]["dir"] == "S"
    else:
        assert run.stdout.startswith("OK " if scenario.error is None else "FAILED "), run.stdout
        assert f"C:   EHLO {EHLO[1]}" in run.stdout  # the dialogue, under the summary
    check_server_side(server, scenario)
    assert "session.result" in [event.get("event") for event in log_events(run.stderr)]
    assert leaks(run.stdout) == []
    assert leaks(run.stderr) == []


async def test_cli_malformed_secret_file_never_shows_the_secret(
    smtp_server: SmtpServer, ca_pem_path: str, tmp_path: Path
) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir()
    (directory / REFERENCE).write_text(MALFORMED_SECRETS["unterminated-json"])
    env = cli_env(tmp_path, {SECRETS_DIR_VARIABLE: str(directory)})

    run = await run_cli(
        "check",
        f"{smtp_server.host}:{smtp_server.port}",
        "--credentials",
        REFERENCE,
        "--ca-file",
        ca_pem_path,
        *EHLO,
        "-v",
        env=env,
    )

    assert run.code == 2, run
    assert "credentials" in run.stdout
    assert REFERENCE in run.stdout
    assert smtp_server.connections_accepted == 0
    assert "session.result" in [event.get("event") for event in log_events(run.stderr)]
    assert leaks(run.stdout) == []
    assert leaks(run.stderr) == []


# ----------------------------------------------------------------------------- echoing server

#: Builds a 535 reply's lines from the AUTH lines the client sent.
EchoReply = Callable[[list[str]], list[str]]


def _decoded(line: str) -> str:
    return base64.b64decode(line.rsplit(" ", 1)[-1]).decode()


def echo_everything(sent: list[str]) -> list[str]:
    """What a chatty server might say: the command lines, then what they decode to."""
    return ["5.7.8 Authentication failed", *sent, *map(_decoded, sent)]


@dataclass
class EchoAuthServer:
    """A raw asyncio SMTP server over implicit TLS on loopback: it offers `mechanisms`
    and answers AUTH with a 535 whose lines `reply` builds from what the client sent."""

    reply: EchoReply
    mechanisms: str
    port: int = 0
    auth_lines: list[str] | None = None
    sessions: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            self.sessions.add(task)
        sent: list[str] = []
        try:
            writer.write(b"220 localhost ESMTP echo\r\n")
            while line := (await reader.readline()).decode().rstrip("\r\n"):
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    answer = ["250-localhost", f"250 AUTH {self.mechanisms}"]
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb == "AUTH" and line.split()[1:2] == ["LOGIN"]:
                    sent = [line]
                    answer = ["334 UGFzc3dvcmQ6"]  # "Password:"
                else:
                    sent.append(line)
                    self.auth_lines = list(sent)
                    lines = self.reply(sent)
                    answer = [f"535-{text}" for text in lines[:-1]] + [f"535 {lines[-1]}"]
                writer.write("".join(f"{text}\r\n" for text in answer).encode())
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def echo_auth_server(
    cert: trustme.LeafCert, reply: EchoReply, mechanisms: str = "PLAIN LOGIN XOAUTH2"
) -> AsyncIterator[EchoAuthServer]:
    echo = EchoAuthServer(reply, mechanisms)
    server = await asyncio.start_server(echo.handle, LOOPBACK, 0, ssl=server_ssl_context(cert))
    async with server:
        echo.port = server.sockets[0].getsockname()[1]
        try:
            yield echo
        finally:
            # The sessions end before the test does; one that hangs is cancelled here.
            pending: set[asyncio.Task[Any]] = set()
            if echo.sessions:
                _, pending = await asyncio.wait(echo.sessions, timeout=WAIT_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def open_echo_session(
    echo: EchoAuthServer, secret: str, ca_pem_path: str
) -> tuple[dict[str, Any], str]:
    """The Outcome of a session against `echo`, and every log event, as text."""
    fields = {
        "host": LOOPBACK,
        "port": echo.port,
        "security": "tls",
        "trust": "portable",
        "credentials": REFERENCE,
        "ca_file": ca_pem_path,
        "timeout": CLIENT_TIMEOUT,
        "retries": 0,
        "ehlo_name": EHLO[1],
        "transcript": True,
    }
    with structlog.testing.capture_logs() as events:
        outcome = await open_session(fields, environ={env_variable(REFERENCE): secret})
    assert outcome.error == "auth_failed", outcome
    assert echo.auth_lines, "the server saw no AUTH"
    assert outcome.transcript is not None
    assert outcome.transcript[-1].line.startswith("535 "), outcome.transcript  # echoed
    return outcome.to_dict(), repr(events)


@pytest.mark.parametrize(
    ("mechanisms", "secret"),
    [
        ("PLAIN LOGIN", PASSWORD_SECRET),
        ("LOGIN", PASSWORD_SECRET),
        ("XOAUTH2", TOKEN_SECRET),
        ("PLAIN", f"{USER}:{'Tr0ub4dor&3-correct-horse-battery-staple-' * 2}"),
    ],
)
async def test_a_server_echoing_auth_in_its_535_leaks_nothing(
    mechanisms: str, secret: str, good_cert: trustme.LeafCert, ca_pem_path: str
) -> None:
    async with echo_auth_server(good_cert, echo_everything, mechanisms) as echo:
        outcome, events = await open_echo_session(echo, secret, ca_pem_path)
    parsed = json.loads(secret) if secret.startswith("{") else None
    credentials = (
        Credentials(USER, oauth2_token=parsed["oauth2_token"])
        if parsed
        else Credentials(USER, password=secret.split(":", 1)[1])
    )
    assert outcome["err_message"].startswith("535 5.7.8 Authentication failed / AUTH ")
    assert REDACTED in outcome["err_message"]
    assert leaked(outcome["err_message"], credentials) == []
    assert leaked(json.dumps(outcome["transcript"]), credentials) == []
    assert leaked(events, credentials) == []


async def test_a_one_character_password_hides_only_itself(
    good_cert: trustme.LeafCert, ca_pem_path: str
) -> None:
    def refuse(sent: list[str]) -> list[str]:
        return [f"5.7.8 {WRONG_HOST} refused p"]

    async with echo_auth_server(good_cert, refuse) as echo:
        outcome, _ = await open_echo_session(echo, f"{USER}:p", ca_pem_path)
    assert outcome["err_message"] == f"535 5.7.8 {WRONG_HOST} refused {REDACTED}"


async def test_a_password_across_the_cut_is_hidden_before_the_cut(
    good_cert: trustme.LeafCert, ca_pem_path: str
) -> None:
    """The decoded PLAIN payload placed so that the cut leaves the password's first 7
    characters: too short to recognise once cut, whole before."""
    head = f"5.7.8 rejected ?{USER}?"
    pad = "x" * (MAX_QUOTED_REPLY - len(head) - len("Hunter2"))

    def echo_decoded(sent: list[str]) -> list[str]:
        return [f"5.7.8 rejected {pad}{_decoded(sent[0])}"]

    async with echo_auth_server(good_cert, echo_decoded, "PLAIN") as echo:
        outcome, events = await open_echo_session(echo, PASSWORD_SECRET, ca_pem_path)
    assert "Hunter2" not in outcome["err_message"]
    assert "Hunter2" not in events
